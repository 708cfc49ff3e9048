"""The tiny decoder (runtime/preview.py): its file format, training, and the shipped one for vidrd-shapes."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from vidrd.runtime import preview
from vidrd.runtime.cli import main
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

