"""What a hostile user or a bad day must not do to the command line: lose files, leave partial outputs behind, crash
late on a value that could have been refused up front. The service's side: test_service_hardening."""
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from vidrd.ref.config import SchedulerConfig
from vidrd.ref.ddim import DDIM
from vidrd.ref.dpmpp import DPMSolverPP2M
from vidrd.ref.sampler import SEED_MAX, SamplerSettings, check_prompts, check_seed
from vidrd.ref.weights import random_model
from vidrd.runtime.bench.metrics import strict_json
from vidrd.runtime.cli import main
from vidrd.runtime.video_io import VideoWriter

T = ["--preset", "tiny", "--height", "32", "--width", "32", "--frames", "4", "--steps", "2", "--overlap", "2",
     "--no-progress"]
LOADED = "model: "  # what generate and eval print once the model has loaded: absent means no work was done


def tree(folder: Path) -> dict:
    """Every entry under `folder` with its bytes (None for folders), to prove nothing changed."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def hidden(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------ --force (case 1)

def test_force_never_wipes_a_folder_with_other_files(tmp_path, capsys):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("x")
    before = tree(tmp_path)
    assert main(["generate", "a", *T, "-o", str(d), "--force"]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "sub/" in err and LOADED not in err
    assert tree(tmp_path) == before


def test_force_replaces_vidrds_own_frames(tmp_path):
    d = tmp_path / "frames"
    assert main(["generate", "a", *T, "-o", str(d)]) == 0
    first = tree(d)
    assert sorted(first) == [f"frame_{i:05d}.png" for i in range(4)]
    assert main(["generate", "b", *T, "-o", str(d), "--seed", "7", "--force"]) == 0
    assert sorted(tree(d)) == sorted(first) and tree(d) != first and hidden(tmp_path) == []


@pytest.mark.parametrize("out", [".", "..", "./", "sub/..", "/"])
def test_the_working_folder_and_its_parents_are_never_an_output(tmp_path, monkeypatch, capsys, out):
    (tmp_path / "sub").mkdir()
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    assert main(["generate", "a", *T, "-o", out, "--force"]) == 2
    err = capsys.readouterr().err
    assert "never an output" in err and LOADED not in err
    assert tree(tmp_path) == before


def test_special_files_are_never_replaced(tmp_path, capsys):
    fifo, link, target = tmp_path / "pipe", tmp_path / "link.mp4", tmp_path / "target.mp4"
    os.mkfifo(fifo)
    target.write_bytes(b"mine")
    link.symlink_to(target)
    for out in (fifo, link, Path("/dev/null")):
        assert main(["generate", "a", *T, "-o", str(out), "--force"]) == 2
    assert main(["eval", "--out", str(fifo), "--force", "--samples", "1", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("device, pipe or socket") == 3 and "symbolic link" in err and LOADED not in err
    assert fifo.is_fifo() and link.is_symlink() and target.read_bytes() == b"mine"
    assert Path("/dev/null").is_char_device()


def test_model_commands_replace_only_model_folders(tmp_path, capsys):
    m = tmp_path / "m"
    assert main(["init-random", "--preset", "tiny", "--out", str(m)]) == 0
    assert main(["init-random", "--preset", "tiny", "--out", str(m), "--force", "--seed", "1"]) == 0  # its own
    assert hidden(tmp_path) == []  # no .m.old.* left
    (m / "mine.txt").write_text("x")
    assert main(["init-random", "--preset", "tiny", "--out", str(m), "--force"]) == 2
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("x")
    convert = ["convert", "--sd", str(m / "sd"), "--ckpt", str(m / "ModelT2V.pth"), "--vae", str(m / "vae_finetuned")]
    assert main([*convert, "--out", str(d), "--force"]) == 2
    assert (d / "notes.txt").read_text() == "x" and (m / "mine.txt").exists()
    assert "mine.txt" in capsys.readouterr().err


def test_convert_into_the_working_folder_is_refused(tmp_path, monkeypatch, capsys):
    m = tmp_path / "m"
    assert main(["init-random", "--preset", "tiny", "--out", str(m)]) == 0
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    convert = ["convert", "--sd", str(m / "sd"), "--ckpt", str(m / "ModelT2V.pth"), "--vae", str(m / "vae_finetuned")]
    assert main([*convert, "--out", ".", "--force"]) == 2
    assert list(work.iterdir()) == [] and hidden(tmp_path) == []
    assert "never an output" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- disk full (case 2)

@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (a real full disk), or skip where this process may not mount one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()}); test_writer_abort_survives_* covers it")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path, leave: int) -> Path:
    """Fill `folder`'s filesystem up to `leave` free bytes."""
    st = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


@pytest.mark.parametrize("name, leave", [("v.mp4", 512), ("v.mp4", 24 * 1024), ("v.gif", 24 * 1024), ("v", 24 * 1024)])
def test_disk_full_leaves_nothing_and_the_next_run_works(small_fs, capsys, name, leave):
    filler = fill(small_fs, leave)  # 512 bytes: the container's header fails; 24 KiB: a later frame does
    out = small_fs / name
    big = ["--height", "128", "--width", "128", "--frames", "8", "--steps", "1", "--preset", "tiny", "--no-progress"]
    fds = len(os.listdir("/proc/self/fd"))
    assert main(["generate", "a", *big, "-o", str(out)]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]  # no partial output, no temporary file
    assert len(os.listdir("/proc/self/fd")) == fds  # no descriptor left open to a deleted file
    filler.unlink()
    assert main(["generate", "a", *big, "-o", str(out)]) == 0 and out.exists()


class FullDisk:
    """A PyAV container on a full disk: every mux and the final close raise ENOSPC (close flushes again)."""

    def __init__(self, *a, **k):
        self.closed = False

    def add_stream(self, *a, **k):
        class Stream:
            width = height = pix_fmt = None

            def encode(self, frame=None):
                return [b"packet"]
        return Stream()

    def mux(self, packet):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        self.closed = True
        raise OSError(errno.ENOSPC, "No space left on device")


def test_writer_abort_survives_a_close_that_raises(tmp_path, monkeypatch):
    import av
    monkeypatch.setattr(av, "open", FullDisk)
    w = VideoWriter(tmp_path / "v.mp4")
    with pytest.raises(OSError, match="No space"):
        w.write(np.zeros((2, 16, 16, 3), np.uint8))
    container = w._container
    w.abort()  # must not raise, must remove the temporary file
    assert container.closed and list(tmp_path.iterdir()) == []
    with pytest.raises(OSError, match="No space"), VideoWriter(tmp_path / "w.mp4") as w2:
        w2.write(np.zeros((2, 16, 16, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ step counts (case 6)

def test_every_step_count_the_schedule_allows_runs_and_the_others_are_refused():
    ddim = DDIM(SchedulerConfig())
    assert ddim.max_steps("leading") == 999 and ddim.max_steps("trailing") == 1000
    with pytest.raises(ValueError, match=r"steps=1000 .*at most 999"):
        ddim.timesteps(1000)
    for steps in (667, 800, 999, 1000):  # DPM-Solver++ divided by a zero-width last step from 667 on
        dpm = DPMSolverPP2M(SchedulerConfig(), steps, "trailing")
        coefs = [dpm.coefficients(i) for i in range(steps)]
        assert all(math.isfinite(v) for c in coefs for v in c)
        assert coefs[-1][1:3] == (0.0, 0.0)  # t=0 to alpha_bar_0: the identity
    assert len(set(ddim.timesteps(999).tolist())) == 999


def test_a_thousand_trailing_steps_prepare_finite_tables_in_both_samplers():
    """Both samplers take DPM-Solver++'s factors from DPMSolverPP2M.coefficients (equal elsewhere by test_solver):
    the runtime's per-step table for 1000 trailing steps is finite and the last step is the identity."""
    from vidrd.runtime.loop import Limits, Request
    from vidrd.runtime.options import open_runtime
    model = random_model("tiny", 0)
    s = SamplerSettings(height=16, width=16, frames=2, steps=1000, solver="dpmpp-2m", spacing="trailing")
    rt = open_runtime(model, limits=Limits.of(s, 1))
    request = Request(("a",), ("",), s, 3)
    rt.prepare(*rt.check(request), request)
    m = rt.mcoef[:1000]  # (T,5) sigma_i, alpha_i, c_x, c_x0, c_prev
    assert torch.isfinite(m).all() and m[-1, 2:].tolist() == [1.0, 0.0, 0.0]
    rt.close()
    dpm = DPMSolverPP2M(SchedulerConfig(), 1000, "trailing")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, generator=g)
    for i in range(1000):  # the reference update, end to end
        x = dpm.step(torch.randn(2, 4, generator=g), i, x)
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="steps=1000"):
        SamplerSettings(steps=1000).check_model(model)


def test_cli_refuses_steps_the_schedule_cannot_take(tmp_path, capsys):
    assert main(["generate", "a", *T[:-3], "--steps", "1000", "-o", str(tmp_path / "v.mp4"), "--no-progress"]) == 2
    assert "steps=1000" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- eval --out (case 8)

def test_eval_checks_its_report_path_before_any_work(tmp_path, capsys):
    folder = tmp_path / "existing"
    folder.mkdir()
    for out, needle in ((folder, "is a folder"), (tmp_path / "no" / "r.json", "does not exist")):
        assert main(["eval", "--out", str(out), "--force", "--samples", "1", "--preset", "tiny", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert needle in err and LOADED not in err


# ------------------------------------------------------------------------------------------- signals (case 9)

@pytest.mark.parametrize("name", ["h4.mp4", "h5"])
def test_sigterm_leaves_no_partial_output(tmp_path, name):
    long = ["--preset", "tiny", "--height", "32", "--width", "32", "--frames", "4", "--steps", "500", "--clips",
            "50", "--overlap", "2", "--no-progress"]
    p = subprocess.Popen([sys.executable, "-m", "vidrd.runtime.cli", "generate", "a", *long, "-o",
                          str(tmp_path / name)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not hidden(tmp_path) and time.monotonic() < deadline:  # the writer's temporary output exists: mid-work
        time.sleep(0.05)
    assert hidden(tmp_path), "the generation never started writing"
    p.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)  # a second one during the cleanup must not stop it
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and "terminated" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- requests too large (case 11)

def test_requests_too_large_for_memory_are_refused_at_setup(tmp_path, capsys):
    from vidrd.runtime.loop import Limits
    from vidrd.runtime.options import open_runtime
    with pytest.raises(ValueError, match=r"frames=10000000.*GiB"):
        open_runtime(random_model("tiny", 0), limits=Limits(frames=10_000_000, height=32, width=32))
    assert main(["generate", "a", *T[:6], "--frames", "1000000", "-o", str(tmp_path / "v.mp4"), "--no-progress"]) == 2
    assert "need at least" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------- seeds and prompts (12, 14, 18)

@pytest.mark.parametrize("seed", ["-1", str(2**63), str(2**64)])
def test_seeds_outside_one_range_are_refused_up_front(tmp_path, capsys, seed):
    assert main(["generate", "a", *T, "--seed", seed, "-o", str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr().err
    assert "--seed" in err and str(SEED_MAX) in err and LOADED not in err


def test_the_seed_range_is_the_same_in_the_api():
    check_seed(0)
    check_seed(SEED_MAX)
    for bad in (-1, SEED_MAX + 1, 1.0, True):
        with pytest.raises(ValueError, match="seed"):
            check_seed(bad)
    from vidrd.runtime.loop import Limits, Request
    from vidrd.runtime.options import open_runtime
    rt = open_runtime(random_model("tiny", 0), limits=Limits(height=32, width=32))
    with pytest.raises(ValueError, match="seed=-1"):
        rt.generate(Request(("a",), None, SamplerSettings(height=32, width=32), -1)).__next__()
    rt.close()


@pytest.mark.parametrize("prompt", ["", "   "])
def test_an_empty_prompt_is_refused_everywhere(tmp_path, capsys, prompt):
    assert main(["generate", prompt, *T, "-o", str(tmp_path / "v.mp4")]) == 2
    assert "empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"prompts\[0\].*empty"):
        check_prompts(random_model("tiny", 0).tokenizer, [prompt], None)


def test_warnings_quote_at_most_a_little_of_a_huge_prompt(tmp_path, capsys):
    prompt = "zebra " * 20_000  # 120k characters, every word unknown to the embedded model
    assert main(["generate", prompt, "--height", "32", "--width", "32", "--frames", "2", "--steps", "1", "--clips",
                 "1", "--no-progress", "-o", str(tmp_path / "v.mp4")]) == 0
    err = capsys.readouterr().err
    assert "does not know the words" in err and err.count("zebra") < 100, err[:3000]  # 20000 in the prompt
    assert max(len(line) for line in err.splitlines()) < 600, err[:3000]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_prompts(random_model("tiny", 0).tokenizer, [prompt], None)
    assert caught and all(len(str(w.message)) < 500 for w in caught)


# ----------------------------------------------------------------------------------- configs and settings (15-17)

@pytest.mark.parametrize("change, needle", [({"num_train_timesteps": 0}, "num_train_timesteps=0"),
                                            ({"steps_offset": 5000}, "steps_offset=5000"),
                                            ({"beta_start": -1.0}, "beta_start=-1.0")])
def test_scheduler_config_is_validated_on_load(tmp_path, capsys, change, needle):
    m = tmp_path / "m"
    assert main(["init-random", "--preset", "tiny", "--out", str(m)]) == 0
    cfg = m / "sd" / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **change}))
    assert main(["generate", "a", *T[2:], "--weights", str(m), "-o", str(tmp_path / "v.mp4")]) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--ema", "2"), ("--unet-lr", "inf"), ("--vae-lr", "0"),
                                         ("--dir-weight", "nan"), ("--seed", "-1"), ("--stop-after", "0")])
def test_train_shapes_settings_are_validated(tmp_path, capsys, flag, value):
    assert main(["train-shapes", "--out", str(tmp_path / "run"), flag, value]) == 2
    assert flag.lstrip("-").replace("-", "_") in capsys.readouterr().err.replace("-", "_")
    assert not (tmp_path / "run").exists()


def test_benchmark_rows_are_standard_json():
    row = {"psnr_db": math.inf, "write_s": math.nan, "nested": {"x": [1.0, -math.inf]}, "ok": 2.5}
    text = strict_json(row)

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    back = json.loads(text, parse_constant=refuse)
    assert back["psnr_db"] is None and back["write_s"] is None and back["nested"]["x"] == [1.0, None]
    assert back["ok"] == 2.5 and "identical" in back["non_finite"]["psnr_db"]
    assert "not measured" in back["non_finite"]["write_s"] and "nested.x[1]" in back["non_finite"]
