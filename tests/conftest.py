"""Shared test setup. TRITON_INTERPRET must be set before any Triton kernel is defined."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny graphs: on two cores shared with other work, OpenMP's second thread
    spin-waits for a core another process holds and makes tiny models 50-100x slower."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
