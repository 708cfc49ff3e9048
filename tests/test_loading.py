"""Loading: strict keys, safe unpickling, clear errors, init-random round trip, safetensors conversion."""
import os
import pickle
import shutil

import pytest
import torch

from tolerances import GOLDEN
from vidrd.ref.loading import WeightsError, load_official, read_state_dict
from vidrd.ref.weights import init_random, load_dir, random_model, resolve
from vidrd.runtime.cli import main


def copy_layout(src, dst):
    shutil.copytree(src / "sd", dst / "sd")
    shutil.copytree(src / "vae_finetuned", dst / "vae_finetuned")
    return dst


def write_ckpt(path, state):
    torch.save({"state_dict": state, "epoch": 0, "global_step": 0}, path)


@pytest.fixture(scope="module")
def official_state(tiny_dir):
    return read_state_dict(tiny_dir / "ModelT2V.pth")


def test_truncated_file_is_a_clear_error(tiny_dir, tmp_path):
    data = (tiny_dir / "ModelT2V.pth").read_bytes()
    bad = tmp_path / "ModelT2V.pth"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        read_state_dict(bad)
    bad_st = tmp_path / "x.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ")
    with pytest.raises(WeightsError, match="safetensors"):
        read_state_dict(bad_st)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/vidrd_pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"unet.x": Evil()}}, f)
    torch.save({"state_dict": {"unet.x": Evil()}}, tmp_path / "evil2.pth")
    for p in (path, tmp_path / "evil2.pth"):
        with pytest.raises(WeightsError, match="refused"):
            read_state_dict(p)
    assert not os.path.exists("/tmp/vidrd_pwned")


def test_random_bytes_are_not_called_a_dangerous_pickle(tmp_path):
    path = tmp_path / "ModelT2V.pth"
    path.write_bytes(bytes(range(256)) * 20)  # not a pickle at all
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint") as e:
        read_state_dict(path)
    assert "could run code" not in str(e.value)
    path.write_bytes(b"hello, these are not weights")
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        read_state_dict(path)


@pytest.mark.parametrize("bad", ["nan", "inf", "int"])
def test_nan_inf_or_integer_weights_are_refused(tmp_path, capsys, bad):
    out = init_random("tiny", tmp_path / "w", seed=0)
    ckpt = torch.load(out / "ModelT2V.pth", weights_only=True)
    key = "unet.down_blocks.0.temp_convs.0.convs.15.weight"
    w = ckpt["state_dict"][key]
    if bad == "int":
        ckpt["state_dict"][key] = w.to(torch.int32)
    else:
        w.view(-1)[3] = float(bad)
    torch.save(ckpt, out / "ModelT2V.pth")
    with pytest.raises(WeightsError, match="dtypes" if bad == "int" else "NaN or inf") as e:
        load_dir(out)
    assert key.removeprefix("unet.") in str(e.value)
    video = tmp_path / "v.mp4"
    assert main(["generate", "x", "-o", str(video), "--weights", str(out), "--steps", "1", "--frames", "2",
                 "--height", "32", "--width", "32", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err and not video.exists()
    assert not list(tmp_path.glob(".*"))


def test_missing_key_names_the_key_file_and_component(tiny_dir, tmp_path, official_state):
    state = dict(official_state)
    del state["unet.conv_in.bias"]
    copy_layout(tiny_dir, tmp_path)
    write_ckpt(tmp_path / "ModelT2V.pth", state)
    with pytest.raises(WeightsError) as e:
        load_official(tmp_path / "sd", tmp_path / "ModelT2V.pth", tmp_path / "vae_finetuned")
    msg = str(e.value)
    assert "conv_in.bias" in msg and "missing keys 1" in msg and "unet" in msg and "ModelT2V.pth" in msg


def test_wrong_shape_and_unexpected_key(tiny_dir, tmp_path, official_state):
    state = dict(official_state)
    state["unet.conv_in.weight"] = torch.zeros(7, 4, 3, 3)
    state["unet.extra.weight"] = torch.zeros(1)
    copy_layout(tiny_dir, tmp_path)
    write_ckpt(tmp_path / "ModelT2V.pth", state)
    with pytest.raises(WeightsError, match=r"unexpected keys 1 \(extra.weight\).*wrong shapes 1 \(conv_in.weight"):
        load_official(tmp_path / "sd", tmp_path / "ModelT2V.pth", tmp_path / "vae_finetuned")


def test_checkpoint_without_unet(tiny_dir, tmp_path, official_state):
    copy_layout(tiny_dir, tmp_path)
    write_ckpt(tmp_path / "ModelT2V.pth", {k: v for k, v in official_state.items() if not k.startswith("unet.")})
    with pytest.raises(WeightsError, match="no `unet"):
        load_official(tmp_path / "sd", tmp_path / "ModelT2V.pth", tmp_path / "vae_finetuned")


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_official(tmp_path / "nowhere", tmp_path / "x.pth")
    with pytest.raises(FileNotFoundError, match="init-random"):
        resolve(tmp_path / "nothing")


def test_text_encoder_without_position_ids_and_new_vae_names(tiny_dir, tmp_path, official_state, golden):
    """Saves from newer libraries: no position_ids buffer, diffusers>=0.15 VAE attention names."""
    copy_layout(tiny_dir, tmp_path)
    write_ckpt(tmp_path / "ModelT2V.pth",
               {k: v for k, v in official_state.items() if not k.endswith("position_ids")})
    vae_file = tmp_path / "vae_finetuned" / "diffusion_pytorch_model.bin"
    vae = torch.load(vae_file, weights_only=True)
    renamed = {k.replace(".query.", ".to_q.").replace(".proj_attn.", ".to_out.0."): v for k, v in vae.items()}
    os.chmod(vae_file, 0o644)
    torch.save(renamed, vae_file)
    m = load_official(tmp_path / "sd", tmp_path / "ModelT2V.pth", tmp_path / "vae_finetuned")
    with torch.no_grad():
        out = m.text_encoder(golden["text.input_ids"])
    assert (out - golden["text.embeddings"]).abs().max() < GOLDEN


def test_without_temporal_vae_uses_the_plain_sd_vae(tiny_dir):
    m = load_official(tiny_dir / "sd", tiny_dir / "ModelT2V.pth")
    assert not m.vae.cfg.add_temp_conv
    assert not any("temp_" in k for k in m.vae.state_dict())


def test_init_random_round_trip(tmp_path):
    out = init_random("tiny", tmp_path / "w", seed=3)
    with pytest.raises(FileExistsError, match="--force"):
        init_random("tiny", tmp_path / "w", seed=3)
    loaded = load_dir(out)
    fresh = random_model("tiny", 3)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 3, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    ids = torch.randint(0, 500, (1, 77), generator=g)
    # exact: the same weights, inputs and kernels in one process, so the same arithmetic by construction
    with torch.no_grad():
        assert torch.equal(loaded.unet(x, 501, ctx), fresh.unet(x, 501, ctx))
        assert torch.equal(loaded.text_encoder(ids), fresh.text_encoder(ids))
        z = torch.randn(3, 4, 8, 8, generator=g)
        assert torch.equal(loaded.vae.decode(z, 3), fresh.vae.decode(z, 3))
    assert loaded.tokenizer("a boat").input_ids == fresh.tokenizer("a boat").input_ids
    assert not any("temp_" in k for k in read_state_dict(out / "sd" / "vae" / "diffusion_pytorch_model.bin"))
    # temporal layers are non-zero, so parity tests on this model see them
    assert loaded.unet.state_dict()["down_blocks.0.temp_convs.0.convs.15.weight"].abs().sum() > 0


def test_convert_to_safetensors_via_cli(tiny_dir, tmp_path, golden):
    out = tmp_path / "st"
    rc = main(["convert", "--sd", str(tiny_dir / "sd"), "--ckpt", str(tiny_dir / "ModelT2V.pth"),
               "--vae", str(tiny_dir / "vae_finetuned"), "--out", str(out)])
    assert rc == 0
    assert (out / "ModelT2V.safetensors").is_file() and not (out / "ModelT2V.pth").exists()
    m = load_dir(out)
    with torch.no_grad():
        o = m.unet(golden["unet.sample"], 981, golden["unet.context"])
    assert (o - golden["unet.t981.out"]).abs().max() < GOLDEN
    assert main(["convert", "--sd", str(tiny_dir / "sd"), "--ckpt", str(tiny_dir / "ModelT2V.pth"),
                 "--out", str(out)]) == 2  # exists, no --force
