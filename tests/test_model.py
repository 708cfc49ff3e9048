"""The reference networks against the official key manifests and the vidrd-tiny golden tensors (SPEC §1-§3)."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tolerances import DDIM_STEP, DDIM_TABLE, FRAME_MIXING_EFFECT, GOLDEN, UNET_BATCH_ROW
from vidrd.ref.config import ModelConfig, SchedulerConfig, TextConfig, UNetConfig, VAEConfig, preset, read_json
from vidrd.ref.ddim import DDIM
from vidrd.ref.loading import build, load_official
from vidrd.ref.text import tokenize

from conftest import FIXTURES

SD21 = FIXTURES / "sd21-base"


def manifest(name):
    path = SD21 / name
    if not path.exists():
        pytest.skip(f"key manifest {path} not found (fixtures absent)")
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    return {k: (tuple(json.loads(s.replace("(", "[").replace(")", "]").replace(",]", "]"))), d) for k, s, d in rows}


def assert_keys(module, rows, component):
    state = module.state_dict()
    assert sorted(state) == sorted(rows), f"{component}: key sets differ"
    for k, (shape, dtype) in rows.items():
        assert tuple(state[k].shape) == shape, f"{component}.{k}: {tuple(state[k].shape)} != {shape}"
        assert str(state[k].dtype).removeprefix("torch.") == dtype, f"{component}.{k} dtype"


def test_sd21_base_preset_has_the_released_keys():
    unet, vae, text = build(preset("sd21-base"))  # meta device: no memory
    assert_keys(unet, manifest("unet_keys.tsv"), "unet")
    assert_keys(vae, manifest("temporal_vae_keys.tsv"), "vae")
    assert_keys(text, manifest("text_encoder_keys.tsv"), "text_encoder")
    assert len(unet.state_dict()) == 1150 and len(vae.state_dict()) == 392 and len(text.state_dict()) == 373


def test_presets_match_the_released_configs():
    if not SD21.exists():
        pytest.skip(f"{SD21} not found (fixtures absent)")
    cfg = preset("sd21-base")
    # the official from_pretrained_2d sets sample_size = resolution // 8 = 32 (it only sets default sizes)
    unet = dataclasses.replace(UNetConfig.from_dict(read_json(SD21 / "unet_config.json")), sample_size=32)
    assert unet == cfg.unet
    assert VAEConfig.from_dict({**read_json(SD21 / "vae_config.json"), "add_temp_conv": True}) == cfg.vae
    assert TextConfig.from_dict(read_json(SD21 / "text_encoder_config.json")) == cfg.text
    assert SchedulerConfig.from_dict(read_json(SD21 / "scheduler_config.json")) == cfg.scheduler


def test_config_rejects_unused_options():
    raw = {"block_out_channels": [32, 64], "attention_head_dim": [1, 2], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
    with pytest.raises(ValueError, match="add_temp_transformer"):
        UNetConfig.from_dict({**raw, "add_temp_transformer": True})
    with pytest.raises(ValueError, match="act_fn"):
        UNetConfig.from_dict({**raw, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="frobnicate"):
        UNetConfig.from_dict({**raw, "frobnicate": 3})
    # keys that do not change the network are ignored (SPEC §4.9)
    assert UNetConfig.from_dict({**raw, "mid_block_type": "UNetMidBlock2DCrossAttn"}) == UNetConfig.from_dict(raw)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return load_official(tiny_dir / "sd", tiny_dir / "ModelT2V.pth", tiny_dir / "vae_finetuned")


def close(a, b, tol=GOLDEN):
    """Max abs difference within tol, relative to the tensor's scale where that is above 1."""
    scale = max(1.0, b.abs().max().item())
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"max abs diff {err:.3g} > {tol * scale:.3g}"


def test_tokenizer_and_text_encoder(tiny_model, tiny_dir, golden):
    prompts = json.loads((tiny_dir / "cases.json").read_text())["cases"]["text"]["prompts"]
    ids = tokenize(tiny_model.tokenizer, prompts)
    assert torch.equal(ids, golden["text.input_ids"])
    assert tiny_model.tokenizer.pad_token_id == 0  # "!" as SD2.1 ships it (SPEC §4.16)
    with torch.no_grad():
        close(tiny_model.text_encoder(ids), golden["text.embeddings"])


@pytest.mark.parametrize("t", [981, 501, 1])
def test_unet(tiny_model, golden, t):
    with torch.no_grad():
        out = tiny_model.unet(golden["unet.sample"], t, golden["unet.context"])
    close(out, golden[f"unet.t{t}.out"])


def test_unet_single_frame_path(tiny_model, golden):
    with torch.no_grad():
        out = tiny_model.unet(golden["unet.sample"][:, :, :1], 981, golden["unet.context"])
    close(out, golden["unet.f1.out"])


def test_unet_math_attention_matches_sdpa(tiny_model, golden):
    from vidrd.ref.attention import set_attention
    try:
        with torch.no_grad():
            set_attention(tiny_model.unet, "math")
            out = tiny_model.unet(golden["unet.sample"], 501, golden["unet.context"])
    finally:
        set_attention(tiny_model.unet, "sdpa")
    close(out, golden["unet.t501.out"])


@pytest.mark.parametrize("mode", ["per_frame", "temporal"])
def test_vae_decode(tiny_model, golden, mode):
    z = golden["vae.latents"]  # (1,4,F,h,w)
    b, c, f, h, w = z.shape
    zf = z.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # ((B F),4,h,w) b-major
    with torch.no_grad():
        out = tiny_model.vae.decode(zf, num_frames=1 if mode == "per_frame" else f)
    close(out, golden[f"vae.decode_{mode}"])


def test_temporal_decode_differs_from_per_frame(tiny_model, golden):
    assert not torch.allclose(golden["vae.decode_per_frame"], golden["vae.decode_temporal"])
    with pytest.raises(ValueError, match="num_frames=4"):
        tiny_model.vae.decode(torch.zeros(6, 4, 8, 8), num_frames=4)


def test_ddim_tables(tiny_model, golden):
    ddim = tiny_model.scheduler
    assert torch.equal(ddim.timesteps(10), golden["ddim.timesteps_10"])
    assert torch.equal(ddim.timesteps(50), golden["ddim.timesteps_50"])
    close(ddim.alphas_cumprod, golden["ddim.alphas_cumprod"], DDIM_TABLE)


def test_ddim_step_recovers_x0_at_the_last_step():
    ddim = DDIM(SchedulerConfig())
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, generator=g), torch.randn(4, generator=g)
    t = 1
    a_t = ddim.alphas_cumprod[t]
    xt = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
    a_prev = ddim.alphas_cumprod[0]  # set_alpha_to_one = false: the final alpha is alpha_bar_0
    expect = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    assert torch.allclose(ddim.step(eps, t, xt, 50), expect, atol=DDIM_STEP)


def test_groupnorm_spans_frames(tiny_model, golden):
    """Changing frame 2 changes frame 0's output: 5-D GroupNorm and temporal layers mix frames (SPEC §4.5)."""
    x = golden["unet.sample"].clone()
    with torch.no_grad():
        a = tiny_model.unet(x, 501, golden["unet.context"])
        x[:, :, 2] += 1.0
        b = tiny_model.unet(x, 501, golden["unet.context"])
    assert (a[:, :, 0] - b[:, :, 0]).abs().max() > FRAME_MIXING_EFFECT
    # videos in a batch stay independent
    alone = tiny_model.unet(golden["unet.sample"][1:], 501, golden["unet.context"][1:])
    assert torch.allclose(a[1:], alone, atol=UNET_BATCH_ROW)
