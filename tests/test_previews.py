"""The tiny decoder (runtime/preview.py): its file format, the shipped one for vidrd-shapes, previews during
denoising (every K steps, final video unchanged) and the CLI's --preview-dir and --decoder tiny."""
from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from vidrd.ref.sampler import SamplerSettings
from vidrd.ref.weights import random_model
from vidrd.runtime import preview
from vidrd.runtime.cli import main
from vidrd.runtime.loop import Limits, Request
from vidrd.runtime.options import open_runtime
from vidrd.runtime.shapes import MODEL_DIR, data

SHIPPED = MODEL_DIR / "tiny_decoder.safetensors"


def test_decoder_shapes_and_file_checks(tmp_path):
    torch.manual_seed(0)
    dec = preview.TinyDecoder(4).eval()
    assert dec(torch.randn(2, 4, 4, 6)).shape == (2, 3, 32, 48)  # 8x per side
    path = tmp_path / "d.safetensors"
    preview.save(dec, path)
    back = preview.load(path)
    for (k, a), b in zip(dec.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a.half().float(), b), k  # stored in fp16
    state, meta = load_file(path), {**dec.meta()}
    key = next(iter(state))
    save_file({**state, key: state[key][:1]}, str(path), metadata=meta)
    with pytest.raises(ValueError, match=f"tensor '{key}' is"):
        preview.load(path)
    del state[key]
    save_file(state, str(path), metadata=meta)
    with pytest.raises(ValueError, match=f"missing tensor '{key}'"):
        preview.load(path)
    with pytest.raises(FileNotFoundError, match="vidrd train-decoder"):
        preview.load(tmp_path / "none.safetensors")


def test_train_decoder_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "d.safetensors"
    assert main(["train-decoder", "--out", str(out), "--steps", "2", "--batch", "1"]) == 0
    first = preview.load(out)
    assert main(["train-decoder", "--out", str(out), "--steps", "3", "--batch", "1"]) == 0
    assert "resuming" in capsys.readouterr().err
    assert not torch.equal(first.layers[0].weight, preview.load(out).layers[0].weight)
    assert main(["train-decoder", "--out", str(out), "--steps", "0"]) == 2


def test_shipped_decoder_keeps_colour():
    """The shipped decoder on the embedded VAE's latents of rendered videos: the harness names the colour."""
    from vidrd.ref.weights import load_dir
    from vidrd.runtime.shapes.harness import score_video
    assert SHIPPED.stat().st_size <= 2 * 2 ** 20
    vae, dec = load_dir(MODEL_DIR).vae, preview.load(SHIPPED)
    vids, caps = data.batch(123_456, 6, seed=7)  # (B,F,3,H,W) in [0,1]
    with torch.no_grad():
        z = vae.encode(vids.flatten(0, 1) * 2 - 1).chunk(2, dim=1)[0]  # (N,C,h,w) posterior means
        frames = preview.to_uint8(dec(z)).float().div(255).view(vids.shape)
    ok = [score_video(v, c, data.FRAMES)["color_ok"] for v, c in zip(frames, caps)]
    assert sum(ok) >= 5, (ok, caps)


def _generate(rt, request, **kw):
    clips = list(rt.generate(request, **kw))
    return [c.frames for c in clips]


def test_previews_every_k_steps_and_video_unchanged():
    model = random_model("tiny", 0)
    s = SamplerSettings(height=32, width=32, frames=4, steps=6, clips=2, overlap=2)
    request = Request(("a cat",), ("",), s, seed=3)
    rt = open_runtime(model, limits=Limits.of(s, 1))
    torch.manual_seed(0)
    dec = preview.TinyDecoder(model.config.vae.latent_channels).eval()
    rt.previews = preview.Previews(dec, rt.limits, model.config.vae.scaling_factor, every=2, drop=False)
    try:
        plain = _generate(rt, request)
        got = []
        with_previews = _generate(rt, request, on_preview=lambda c, i, f: got.append((c, i, f.shape, f.dtype)))
        dpm = _generate(rt, Request(("a cat",), ("",), replace(s, solver="dpmpp-2m"), 3),
                        on_preview=lambda c, i, f: got.append((c, i)))
    finally:
        rt.close()
        rt.previews.close()
    assert [g[:2] for g in got[:6]] == [(c, i) for c in (0, 1) for i in (2, 4, 6)]
    assert all(g[2] == (1, 4, 32, 32, 3) and str(g[3]) == "uint8" for g in got[:6])
    assert got[6:] == [(c, i) for c in (0, 1) for i in (2, 4, 6)]
    assert len(plain) == len(with_previews) == len(dpm) == 2
    for a, b in zip(plain, with_previews):
        assert (a == b).all()  # the hook only reads x0


def test_cli_preview_dir_and_tiny_decoder(tmp_path):
    small = ["--steps", "4", "--clips", "2", "--preview-every", "2", "--no-progress"]
    out, previews = tmp_path / "v.mp4", tmp_path / "previews"
    assert main(["generate", data.TEMPLATE.format(color="red", shape="circle", direction="right",
                 background="black"), "-o", str(out), "--preview-dir", str(previews), "--decoder", "tiny",
                 *small]) == 0
    assert out.stat().st_size > 0
    names = sorted(p.name for p in previews.glob("*.png"))
    assert len(names) == 2 * 2 * data.FRAMES, names  # 2 clips x 2 previews x 8 frames
    assert names[0] == "clip0_step002_v0_f00.png"
    assert main(["generate", "x", "-o", str(tmp_path / "w.mp4"), "--preset", "tiny", "--decoder", "tiny"]) == 2


def test_the_public_taesd_layout_loads_with_its_keys_checked(tmp_path):
    """A file in TAESD's decoder layout (keys 1.weight, 3.conv.0.weight, ..., 19.bias; seeded random weights here:
    the public ones are not shipped) loads through the same loader; a missing or misshaped key is named."""
    torch.manual_seed(0)
    ref = preview.TAESDDecoder(0.18215)
    state = {k: v.contiguous() for k, v in ref.layers.state_dict().items()}
    assert len(state) == 67 and sum(v.numel() for v in state.values()) == 1_222_531  # TAESD's decoder
    path = tmp_path / "taesd_decoder.safetensors"
    save_file(state, str(path))
    got = preview.load(path)
    assert isinstance(got, preview.TAESDDecoder) and got.latent_channels == 4
    z = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(1))  # (N,4,h,w) latents / scaling factor
    out = got(z)  # (N,3,8h,8w) in the VAE's range: TAESD's [0,1] of the UNet's latents, mapped to [-1,1]
    want = ref.layers(torch.tanh(z * 0.18215 / 3) * 3) * 2 - 1
    assert out.shape == (2, 3, 40, 48) and torch.allclose(out, want, atol=1e-6)
    for broken, needle in (({k: v for k, v in state.items() if k != "19.bias"}, "missing tensor '19.bias'"),
                           ({**state, "7.weight": torch.zeros(64, 64, 1, 1)}, "tensor '7.weight' is (64, 64, 1, 1)"),
                           ({**state, "20.weight": torch.zeros(1)}, "unexpected tensor '20.weight'")):
        save_file(broken, str(path))
        with pytest.raises(ValueError, match=re.escape(needle)):
            preview.load(path)
