"""Shared test setup. TRITON_INTERPRET must be set before any Triton kernel is defined."""
import os

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
