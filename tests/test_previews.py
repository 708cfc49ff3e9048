"""The tiny decoder (runtime/preview.py): its file format."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from vidrd.runtime import preview


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
    from vidrd.runtime.cli import main
    out = tmp_path / "d.safetensors"
    assert main(["train-decoder", "--out", str(out), "--steps", "2", "--batch", "1"]) == 0
    first = preview.load(out)
    assert main(["train-decoder", "--out", str(out), "--steps", "3", "--batch", "1"]) == 0
    assert "resuming" in capsys.readouterr().err
    assert not torch.equal(first.layers[0].weight, preview.load(out).layers[0].weight)
    assert main(["train-decoder", "--out", str(out), "--steps", "0"]) == 2
