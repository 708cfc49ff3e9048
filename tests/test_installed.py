"""`pip install .` (not editable) into a fresh virtual environment works from a folder outside the checkout: every
command's --help, and `vidrd generate` with the embedded model (its weights ship as package data)."""
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    from vidrd.runtime.cli import parser
    sub = next(a for a in parser()._actions if a.dest == "command")
    return sorted(sub.choices)


@pytest.mark.slow
def test_an_installed_package_runs_outside_the_checkout(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    target = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    # the dependencies (torch, ...) come from this environment's site-packages as a plain path entry: its .pth files,
    # among them the checkout's editable hook, are not processed, so `vidrd` comes from the installed copy only
    (target / "vidrd-test-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    build = tmp_path / "build"
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-build-isolation",
                        "--no-compile", str(ROOT)], capture_output=True, text=True,
                       env={**os.environ, "TMPDIR": str(tmp_path), "PIP_CACHE_DIR": str(build)})
    assert r.returncode == 0, r.stderr[-3000:]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run([str(py), "-c", "import vidrd.runtime, vidrd.ref; print(vidrd.runtime.__file__)"],
                           cwd=outside, env=env, capture_output=True, text=True)
    assert where.returncode == 0 and where.stdout.startswith(str(target)), where.stdout + where.stderr
    vidrd = [str(venv / "bin" / "vidrd")]  # the console script, as a user runs it
    for command in [None, *_commands()]:
        r = subprocess.run(vidrd + ([command] if command else []) + ["--help"], cwd=outside, env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0 and "usage: vidrd" in r.stdout, (command, r.stderr[-2000:])
    r = subprocess.run(vidrd + ["generate", "a red circle moving right on a black background", "-o", "v.mp4",
                                "--steps", "2", "--clips", "2", "--no-progress"], cwd=outside, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "embedded default model" in r.stderr and (outside / "v.mp4").stat().st_size > 0
