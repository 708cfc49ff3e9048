"""The `vidrd` command line end to end on the embedded default model."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from vidrd.runtime.cli import main
from vidrd.runtime.video_io import read_video

SMALL = ["--height", "64", "--width", "48", "--frames", "4", "--steps", "2", "--clips", "3", "--overlap", "2",
         "--no-progress"]


def test_generate_mp4_on_the_embedded_default(tmp_path, capsys):
    out = tmp_path / "boat.mp4"
    assert main(["generate", "a boat sailing on a lake", "-o", str(out), *SMALL]) == 0
    err = capsys.readouterr().err
    assert "random weights" in err and "not what a trained model makes" in err
    frames = read_video(out)
    assert frames.shape == (12, 64, 48, 3)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    # same seed, same video as the reference sampler, up to H.264 loss (4:2:0 chroma: compare 4x4 block means)
    want = reference_frames("a boat sailing on a lake", trim=False)
    blocks = lambda a: a.astype(np.float32).reshape(12, 16, 4, 12, 4, 3).mean(axis=(2, 4))  # noqa: E731
    other = reference_frames("a boat sailing on a lake", trim=False, seed=7)
    assert np.abs(blocks(frames) - blocks(want)).mean() < 0.3 * np.abs(blocks(other) - blocks(want)).mean()


def reference_frames(prompt, trim, seed=42, batch=None):
    from vidrd.ref.sampler import generate
    from vidrd.ref.weights import random_model
    from vidrd.runtime.video_io import to_uint8
    prompts = batch or [prompt]
    video, _ = generate(random_model(), prompts, ["watermark"] * len(prompts), height=64, width=48, frames=4, steps=2, clips=3,
                        overlap=2, generator=torch.Generator().manual_seed(seed),
                        assembly="trim" if trim else "official")
    return to_uint8(video[prompts.index(prompt)])


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "v.gif"
    out.write_bytes(b"precious")
    assert main(["generate", "x", "-o", str(out), *SMALL]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert main(["generate", "x", "-o", str(out), "--force", *SMALL]) == 0
    assert read_video(out).shape == (12, 64, 48, 3)


def test_batch_writes_one_png_folder_each(tmp_path):
    out = tmp_path / "frames"
    assert main(["generate", "--prompt", "a", "--prompt", "b", "-o", str(out), "--assembly", "trim", *SMALL]) == 0
    for i in range(2):
        assert read_video(tmp_path / f"frames-{i}").shape == (4 + 2 * 2, 64, 48, 3)
    # PNG is lossless: each file is exactly the reference sampler's video for the same batch and seed
    for i, p in enumerate("ab"):
        assert np.array_equal(read_video(tmp_path / f"frames-{i}"), reference_frames(p, trim=True, batch=["a", "b"]))


@pytest.mark.parametrize("args, needle", [
    (["--overlap", "4"], "overlap=4"), (["--height", "30"], "height=30"), (["--steps", "0"], "steps=0"),
    (["--denoise-guidance", "2"], "denoise_guidance=2.0"), (["--fps", "0"], "--fps"),
    (["--preset", "tiny", "--weights", "/x"], "choose one of"), (["--sd", "/x"], "--sd and --ckpt"),
    (["--weights", "/nonexistent"], "/nonexistent"),
])
def test_bad_arguments_exit_nonzero_naming_the_argument(tmp_path, capsys, args, needle):
    out = tmp_path / "v.mp4"
    base = SMALL[:SMALL.index("--overlap")] + ["--no-progress"] if "--overlap" in args else SMALL
    assert main(["generate", "x", "-o", str(out), *base, *args]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_unknown_extension_and_missing_prompt(tmp_path, capsys):
    assert main(["generate", "x", "-o", str(tmp_path / "v.avi"), *SMALL]) == 2
    assert ".avi" in capsys.readouterr().err
    assert main(["generate", "-o", str(tmp_path / "v.mp4"), *SMALL]) == 2
    assert "give a prompt" in capsys.readouterr().err


def test_console_script_help_and_info():
    r = subprocess.run([sys.executable, "-m", "vidrd.runtime.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "generate" in r.stdout and "init-random" in r.stdout
    r = subprocess.run([sys.executable, "-m", "vidrd.runtime.cli", "info", "--json"], capture_output=True, text=True)
    data = json.loads(r.stdout)
    assert data["torch"].startswith("2.13.0") and data["backends"]["reference"] is True
