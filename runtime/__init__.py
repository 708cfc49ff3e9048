"""The lean runtime: set it up once for the largest request (`Limits`), then stream clips of reuse-and-diffuse
videos (`Runtime.generate(Request)`); `open_runtime` builds one from `RuntimeOptions`.

    from vidrd.runtime import Limits, Request, RuntimeOptions, open_runtime

Where things live: loop.py (the denoising loop and its buffers), history.py (reuse-and-diffuse bookkeeping),
batch.py (several requests in one UNet batch), options.py (execution options, open_runtime), quality.py (presets), precision.py, memory.py (what the limits
need), preview.py (the tiny preview decoder), video_io.py; backends/, cli/, serve/, bench/ and shapes/ (the
embedded demo model) are packages of their own. Names load on first use, so importing a subpackage does not
import them all.
"""
from __future__ import annotations

import importlib

_API = {
    "Cancelled": "loop", "Checkpoint": "loop", "Clip": "loop", "Limits": "loop", "NonFiniteOutput": "loop", "Request": "loop",
    "Runtime": "loop", "Superseded": "loop", "Batch": "batch",
    "RuntimeOptions": "options", "open_runtime": "options",
    "QUALITIES": "quality", "resolve": "quality",
    "VideoWriter": "video_io", "read_video": "video_io",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
