"""The `vidrd` command line end to end on the random tiny preset (the embedded trained model: test_shapes_model)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tolerances import COMPILE_UINT8_LEVELS, H264_VS_OTHER_SEED, ORT_UINT8_LEVELS, RUNTIME_LATENT_REL, \
    VAE_CHANNELS_LAST_UINT8_LEVELS, assert_uint8_close
from vidrd.runtime.cli import main
from vidrd.runtime.video_io import read_video

SMALL = ["--height", "64", "--width", "48", "--frames", "4", "--steps", "2", "--clips", "3", "--overlap", "2",
         "--no-progress", "--preset", "tiny"]


def test_generate_mp4_on_the_random_tiny_preset(tmp_path, capsys):
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
    near, far = np.abs(blocks(frames) - blocks(want)).mean(), np.abs(blocks(other) - blocks(want)).mean()
    assert near < H264_VS_OTHER_SEED * far


def reference_frames(prompt, trim, seed=42, batch=None):
    from vidrd.ref.sampler import SamplerSettings, generate
    from vidrd.ref.weights import random_model
    from vidrd.runtime.video_io import to_uint8
    prompts = batch or [prompt]
    s = SamplerSettings(height=64, width=48, frames=4, steps=2, clips=3, overlap=2,
                        assembly="trim" if trim else "official")
    video, _ = generate(random_model(), prompts, ["watermark"] * len(prompts), s, torch.Generator().manual_seed(seed))
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
    # PNG is lossless: each file is the reference sampler's video for the same batch and seed (up to truncation)
    for i, p in enumerate("ab"):
        assert_uint8_close(read_video(tmp_path / f"frames-{i}"), reference_frames(p, trim=True, batch=["a", "b"]))


@pytest.mark.parametrize("args, needle", [
    (["--overlap", "4"], "overlap=4"), (["--height", "30"], "height=30"), (["--steps", "0"], "steps=0"),
    (["--denoise-guidance", "2"], "denoise_guidance=2.0"), (["--fps", "0"], "fps=0"),
    (["--fps", "inf"], "fps=inf"), (["--fps", "nan"], "fps=nan"), (["--guidance-scale", "1e300"], "guidance_scale"),
    (["--noise-prior", "inf"], "noise_prior"), (["--width", "100000", "--height", "8"], "100000x8"),
    (["--negative-prompt", "\udcff"], "--negative-prompt"),
    (["--preset", "tiny", "--weights", "/x"], "choose one of"), (["--sd", "/x"], "--sd and --ckpt"),
    (["--weights", "/nonexistent"], "/nonexistent"),
])
def test_bad_arguments_exit_nonzero_naming_the_argument(tmp_path, capsys, args, needle):
    out = tmp_path / "v.mp4"
    base = SMALL[:SMALL.index("--overlap")] + ["--no-progress", "--preset", "tiny"] if "--overlap" in args else SMALL
    if {"--preset", "--sd", "--weights"} & set(args):  # the model flag under test replaces the tiny preset
        base = [a for a in base if a not in ("--preset", "tiny")]
    assert main(["generate", "x", "-o", str(out), *base, *args]) == 2
    assert_one_error_line(capsys.readouterr().err, needle)
    assert not list(tmp_path.iterdir())


def assert_one_error_line(err: str, needle: str) -> None:
    """The whole stderr is one `vidrd generate: error: ...` line naming the bad value, printed before the model
    loaded (which prints its own line first): checked before the expensive work."""
    assert err.count("\n") == 1 and err.startswith("vidrd generate: error: ") and needle in err, err


def test_gif_fps_and_output_problems_fail_before_any_work(tmp_path, capsys):
    assert main(["generate", "x", "-o", str(tmp_path / "v.gif"), "--fps", "0.0004", *SMALL]) == 2
    assert_one_error_line(capsys.readouterr().err, "fps=0.0004")
    folder = tmp_path / "d.mp4"  # a folder where the video file would go: --force replaces files only
    folder.mkdir()
    (folder / "keep").write_text("mine")
    assert main(["generate", "x", "-o", str(folder), "--force", *SMALL]) == 2
    assert_one_error_line(capsys.readouterr().err, "is a folder")
    assert (folder / "keep").read_text() == "mine"
    if os.geteuid() == 0:  # root writes through permission bits: use a folder no one can create files in
        readonly = Path("/sys")
    else:
        readonly = tmp_path / "ro"
        readonly.mkdir(mode=0o555)
    assert main(["generate", "x", "-o", str(readonly / "v.mp4"), *SMALL]) == 2
    assert_one_error_line(capsys.readouterr().err, "cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d.mp4"] + (["ro"] if os.geteuid() else []))


def test_invalid_utf8_prompt_is_one_line_not_a_traceback(tmp_path):
    out = tmp_path / "v.mp4"
    r = subprocess.run([sys.executable.encode(), b"-m", b"vidrd.runtime.cli", b"generate", b"a \xff boat", b"-o",
                        str(out).encode(), *(a.encode() for a in SMALL)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and not out.exists(), r.stderr
    assert r.stderr.startswith("vidrd generate: error: prompt=") and "surrogate" in r.stderr


def test_outputs_follow_the_umask(tmp_path):
    umask = os.umask(0o027)
    try:
        assert main(["generate", "x", "-o", str(tmp_path / "v.mp4"), *SMALL]) == 0
        assert main(["generate", "x", "-o", str(tmp_path / "frames"), *SMALL]) == 0
    finally:
        os.umask(umask)
    assert (tmp_path / "v.mp4").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "frames").stat().st_mode & 0o777 == 0o750


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


# ------------------------------------------------------------------------------------------ execution paths
# 64x64 and 4 frames: the smallest request inside the ONNX export's ranges (latents >= 8)
PATHS = ["--height", "64", "--width", "64", "--frames", "4", "--steps", "2", "--clips", "2", "--overlap", "2",
         "--no-progress", "--preset", "tiny"]


@pytest.fixture(scope="module")
def torch_frames(tmp_path_factory):
    """PNG frames of `vidrd generate` on the default torch backend, per frame and temporal decoding."""
    out = {}
    for temporal in (False, True):
        path = tmp_path_factory.mktemp("torch") / "frames"
        assert main(["generate", "a boat", "-o", str(path), *PATHS] + (["--temporal-decode"] if temporal else [])) == 0
        out[temporal] = read_video(path)
    return out


def diff_levels(a, b):
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_backend_reference_writes_the_runtimes_video(tmp_path, torch_frames):
    out = tmp_path / "frames"
    assert main(["generate", "a boat", "-o", str(out), "--backend", "reference", *PATHS]) == 0
    assert_uint8_close(read_video(out), torch_frames[False])
    assert main(["generate", "a boat", "-o", str(tmp_path / "v.mp4"), "--backend", "reference", "--compile",
                 "default", *PATHS]) == 2  # --compile is the runtime's


@pytest.mark.parametrize("flags", [["--vae-backend", "onnxruntime"], ["--unet-backend", "onnxruntime"],
                                   ["--vae-backend", "onnxruntime", "--temporal-decode"],
                                   ["--backend", "onnxruntime"]], ids=" ".join)
def test_per_component_backends(tmp_path, torch_frames, default_onnx, flags):
    out = tmp_path / "frames"
    assert main(["generate", "a boat", "-o", str(out), "--onnx", str(default_onnx), *flags, *PATHS]) == 0
    got = read_video(out)
    want = torch_frames["--temporal-decode" in flags]
    assert got.shape == want.shape == (8, 64, 64, 3)
    assert diff_levels(got, want) <= ORT_UINT8_LEVELS


def test_per_component_backend_needs_its_files(tmp_path, capsys):
    assert main(["generate", "x", "-o", str(tmp_path / "v.mp4"), "--vae-backend", "onnxruntime", *PATHS]) == 2
    assert "--onnx" in capsys.readouterr().err
    assert main(["generate", "x", "-o", str(tmp_path / "v.mp4"), "--backend", "reference", "--unet-backend",
                 "onnxruntime", "--onnx", str(tmp_path), *PATHS]) == 2
    assert "do not apply to --backend reference" in capsys.readouterr().err


@pytest.mark.parametrize("temporal", [False, True], ids=["per-frame", "temporal"])
def test_vae_channels_last(tmp_path, torch_frames, temporal):
    out = tmp_path / "frames"
    flags = ["--temporal-decode"] if temporal else []
    assert main(["generate", "a boat", "-o", str(out), "--vae-channels-last", *flags, *PATHS]) == 0
    got = read_video(out)
    assert got.shape == torch_frames[temporal].shape and diff_levels(got, torch_frames[temporal]) <= \
        VAE_CHANNELS_LAST_UINT8_LEVELS
    assert main(["generate", "a boat", "-o", str(out), "--force", "--no-vae-channels-last", *flags, *PATHS]) == 0
    assert np.array_equal(read_video(out), torch_frames[temporal])  # off: the default, bit for bit


@pytest.mark.parametrize("command", [["generate", "x", "-o", "v.mp4"], ["bench"], ["eval"], ["serve"]],
                         ids=lambda c: c[0])
def test_vae_channels_last_is_an_execution_flag_everywhere(command):
    from vidrd.runtime.cli import parser
    from vidrd.runtime.cli.args import runtime_options

    p = parser()
    for flags, value in (([], False), (["--vae-channels-last"], True), (["--no-vae-channels-last"], False)):
        assert runtime_options(p.parse_args(command + flags)).vae_channels_last is value
    with pytest.raises(ValueError, match="^--vae-channels-last applies to the torch VAE decoder, not the tensorrt"):
        runtime_options(p.parse_args(command + ["--vae-channels-last", "--vae-backend", "tensorrt", "--engines",
                                                "e"]))


@pytest.mark.slow  # inductor compiles the UNet and the VAE decoder: about 3 minutes on one core
def test_compile_default_matches_eager(tmp_path, torch_frames):
    """--compile default: inductor with freezing on the CPU for the UNet and the VAE decoder."""
    out = tmp_path / "frames"
    assert main(["generate", "a boat", "-o", str(out), "--compile", "default", *PATHS]) == 0
    got = read_video(out)
    assert got.shape == torch_frames[False].shape and diff_levels(got, torch_frames[False]) <= COMPILE_UINT8_LEVELS


def test_bench_tiny_workload(capsys):
    """`vidrd bench --workload tiny`: one JSON row per run and a summary with times, FLOPs and the accuracy against
    the reference sampler, which runs the same workload in the same process."""
    assert main(["bench", "--workload", "tiny", "--repeats", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["kind"] for r in rows] == ["run", "run", "summary"]
    summary = rows[-1]
    assert summary["workload"] == "tiny" and summary["repeats"] == 2 and summary["frames_out"] == 8
    assert summary["s_per_frame"] > 0 and summary["unet_per_call_s"] > 0 and rows[0]["unet_calls"] == 2 * 3
    assert summary["latents_max_abs_rel"] <= RUNTIME_LATENT_REL
    cpu = summary["cpu"]  # what the row depends on, recorded with it (BENCHMARKS.md asks for the flags)
    assert cpu["capability"] == torch.backends.cpu.get_cpu_capability() and isinstance(cpu["bf16"], str)
    assert cpu["flags"] is None or set(cpu["flags"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16"}
