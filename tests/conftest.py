"""Shared test setup. TRITON_INTERPRET must be set before any Triton kernel is defined."""
import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# ../shared/fixtures beside the checkout (dev machines, CI); ./shared/fixtures inside it on the GPU machines
FIXTURES = next((p for p in (ROOT.parent / "shared" / "fixtures", ROOT / "shared" / "fixtures") if p.is_dir()),
                ROOT.parent / "shared" / "fixtures")
TINY = FIXTURES / "vidrd-tiny"


def pytest_collection_modifyitems(config, items):
    if os.environ.get("VIDRD_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set VIDRD_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir():
    """The official-layout tiny model with golden outputs (../shared/fixtures/vidrd-tiny)."""
    if not (TINY / "golden.safetensors").exists():
        pytest.skip(f"fixtures not found at {TINY} (only present in the project's CI and dev machines)")
    return TINY


@pytest.fixture(scope="session")
def golden(tiny_dir):
    from safetensors.torch import load_file
    return load_file(str(tiny_dir / "golden.safetensors"))


# VIDRD_TEST_THREADS=N runs the whole suite with N torch threads (the README's 1- and 2-thread runs); unset, torch
# chooses, except in modules that ask for one_torch_thread.
THREADS = int(os.environ["VIDRD_TEST_THREADS"]) if os.environ.get("VIDRD_TEST_THREADS") else None


def pytest_configure(config):
    if THREADS is not None:
        import torch
        torch.set_num_threads(THREADS)


def pytest_report_header(config):
    import torch
    return (f"torch {torch.__version__}: {torch.get_num_threads()} threads (VIDRD_TEST_THREADS={THREADS}), "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()} "
            f"(ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY')})")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, so any draw without its own generator is the same on every
    run, whatever ran before it."""
    import torch
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny graphs: on two cores shared with other work, OpenMP's second thread
    spin-waits for a core another process holds and makes tiny models 50-100x slower. VIDRD_TEST_THREADS wins."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(THREADS or 1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def default_onnx(tmp_path_factory):
    """`vidrd export` of the random tiny preset (weights seed 0): all four components, fp32."""
    pytest.importorskip("onnxruntime")
    from vidrd.export.onnx_export import export
    from vidrd.ref.weights import random_model
    out = tmp_path_factory.mktemp("default_onnx")
    export(random_model("tiny", 0), out, log=lambda *a: None)
    return out


# ------------------------------------------------------------------ a PostgreSQL server (test_pg_store, test_service)


def as_user() -> list[str]:
    """The command prefix that runs the server's tools: initdb refuses to run as root, so root runs them as an
    unprivileged user (postgres, else nobody)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        pytest.skip("running as root and runuser is missing: initdb refuses to run as root")
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return ["runuser", "-u", pwd.getpwnam(name).pw_name, "--"]
    pytest.skip("running as root with no unprivileged user (postgres, nobody) to run initdb as")


@pytest.fixture(scope="session")
def pg_server():
    """The conninfo prefix of a PostgreSQL server started for this session (trust auth, user vidrd, unix socket in a
    temporary folder, no TCP); skips with the reason when it cannot be started."""
    tools = [shutil.which(t) for t in ("initdb", "pg_ctl")]
    if None in tools:
        pytest.skip("initdb/pg_ctl not on PATH: install PostgreSQL (apt-get install postgresql) to run these tests")
    prefix = as_user()
    root = tempfile.mkdtemp(prefix="vidrd-pg-")
    if prefix:
        os.chown(root, pwd.getpwnam(prefix[2]).pw_uid, -1)
    data, port = os.path.join(root, "data"), 5432
    run = lambda *cmd: subprocess.run(prefix + list(cmd), capture_output=True, text=True, timeout=120)  # noqa: E731
    r = run(tools[0], "-D", data, "--auth=trust", "-U", "vidrd", "-E", "UTF8", "--no-sync")
    if r.returncode:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb cannot run here: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    r = run(tools[1], "-D", data, "-l", os.path.join(root, "log"), "-w", "-o",
            f"-k {root} -c listen_addresses='' -p {port} -c fsync=off", "start")
    if r.returncode:
        log = open(os.path.join(root, "log")).read() if os.path.exists(os.path.join(root, "log")) else r.stderr
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"pg_ctl cannot start the server: {log.strip().splitlines()[-1:]}")
    try:
        yield f"postgresql://vidrd@/%s?host={root}&port={port}"
    finally:
        run(tools[1], "-D", data, "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty database on the session's server."""
    psycopg = pytest.importorskip("psycopg")
    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(pg_server % "postgres", autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    return pg_server % name
