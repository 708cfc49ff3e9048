"""attention(q, k, v, scale): Triton kernels behind a `vidrd::attention` custom op, SDPA fallback.

Legend: N batch, H heads, Lq/Lk query/key length, D head dim.
Dispatch by shape (thresholds come from configs.json):
  temporal  Lq, Lk <= temporal BLOCK_N: many short sequences per program (short_fwd)
  cross     Lk <= cross BLOCK_N: flash_fwd with all of Lk in one tile
  spatial   otherwise: flash_fwd tiling Lq and Lk
"""
import contextlib
import functools
import importlib.util
import json
import logging
import math
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_D = 256
BUCKETS = (64, 128, 256)
CONFIGS = Path(__file__).with_name("configs.json")
_warned = set()


def _check(q, k, v):
    """Raise ValueError unless q (N,H,Lq,D), k and v (N,H,Lk,D) agree in shape, dtype and device."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects 4-D (N,H,L,D) q, k, v; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention expects q (N,H,Lq,D), k and v (N,H,Lk,D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention expects one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention expects one device; got {q.device}, {k.device}, {v.device}")


@functools.cache
def _kernels():
    """The flash module, or None when triton is not importable."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        from . import flash
    except Exception as e:  # broken triton install: fall back rather than fail
        log.warning("vidrd.kernels: importing triton kernels failed: %s", e)
        return None
    return flash


def device_reason(t, interpreted):
    """Why Triton kernels (interpreted or not) cannot run on t's device, or None when they can."""
    if t.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1" or not interpreted:
            return "CPU tensors need TRITON_INTERPRET=1 set before triton kernels are imported"
    elif t.device.type != "cuda":
        return f"device type {t.device.type}"
    elif not interpreted:
        if torch.version.hip is not None:
            return "ROCm GPUs (configs and compile checks cover NVIDIA only)"
        if torch.cuda.get_device_capability(t.device) < (8, 0):
            return "CUDA GPUs older than sm_80"
    return None


def _unsupported(q, k, v):
    """Why the Triton path cannot run these valid inputs, or None when it can."""
    kern = _kernels()
    if kern is None:
        return "triton is not importable"
    reason = device_reason(q, kern.INTERPRETED)
    if reason is not None:
        return reason
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype}"
    if q.shape[3] > MAX_HEAD_D:
        return f"head dim > {MAX_HEAD_D}"
    if k.shape[2] == 0:
        return "empty key sequence"
    return None


def _fallback(q, k, v, scale, reason):
    """torch SDPA, logging the reason once."""
    if reason not in _warned:
        _warned.add(reason)
        log.warning("vidrd.kernels.attention falls back to torch SDPA: %s", reason)
    from vidrd.ref.attention import sdpa  # batch slices past the CUDA grid limit of SDPA's kernels
    return sdpa(q, k, v, scale)


def new_out(q):
    """Fresh output (N,H,Lq,D) laid out like q: for q viewed from (N,L,H,D), o.transpose(1, 2) is free."""
    return torch.empty_like(q, memory_format=torch.preserve_format)


@functools.cache
def load_configs():
    """configs.json as a dict: {gpu key: {path: {bucket: {BLOCK_M, BLOCK_N, num_warps, num_stages}}}}."""
    return json.loads(CONFIGS.read_text())


@functools.cache
def gpu_key(device_index):
    """'sm_<major><minor>' for a CUDA device index, or 'default' when configs.json has no entry."""
    major, minor = torch.cuda.get_device_capability(device_index)
    key = f"sm_{major}{minor}"
    return key if key in load_configs() else "default"


def head_block(d):
    """Head dim padded to a power of two >= 16 (a tl.dot dimension)."""
    return max(16, next_pow2(d))


def seq_block(n):
    """Sequence length padded to a power of two >= 16 (a tl.dot dimension)."""
    return max(16, next_pow2(n))


def next_pow2(n):
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (max(1, n) - 1).bit_length()


def bucket(block_d):
    """Head-dim bucket name in configs.json for a padded head dim."""
    return str(next(b for b in BUCKETS if block_d <= b))


def plan(key, dtype, d, lq, lk, upcast=False):
    """(kernel name, constexprs, launch options) the wrapper uses for one shape on GPU `key`."""
    entry = load_configs()[key]
    block_d = head_block(d)
    b = bucket(block_d)
    flags = dict(HEAD_D=d, BLOCK_D=block_d, UPCAST=upcast, IEEE=upcast or dtype == torch.float32)
    tiles = (lambda c: {**c, **c["fp32"]}) if dtype == torch.float32 else (lambda c: c)
    tmp = entry["temporal"][b]
    if lq <= tmp["BLOCK_N"] and lk <= tmp["BLOCK_N"]:
        cfg = tiles(tmp)
        block_lq = seq_block(lq)
        group = max(1, cfg["BLOCK_M"] // block_lq)
        consts = dict(flags, BLOCK_LQ=block_lq, BLOCK_LK=seq_block(lk), GROUP=group)
        return "short_fwd", consts, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    cfg = tiles(entry["cross"][b] if lk <= entry["cross"][b]["BLOCK_N"] else entry["spatial"][b])
    consts = dict(flags, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], EVEN_N=lk % cfg["BLOCK_N"] == 0)
    return "flash_fwd", consts, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _launch(q, k, v, out, scale):
    """Run the Triton kernel the shape calls for, writing out (N,H,Lq,D)."""
    kern = _kernels()
    n, h, lq, d = q.shape
    lk = k.shape[2]
    if n * h * lq == 0:
        return out
    key = "default" if kern.INTERPRETED or q.device.type != "cuda" else gpu_key(q.device.index)
    name, consts, opts = plan(key, q.dtype, d, lq, lk, upcast=kern.INTERPRETED)
    qk_scale = (scale if scale is not None else 1.0 / math.sqrt(d)) * math.log2(math.e)
    strides = (*q.stride(), *k.stride(), *v.stride(), *out.stride())
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        if name == "short_fwd":
            grid = (cdiv(n * h, consts["GROUP"]),)
            kern.short_fwd[grid](q, k, v, out, *strides, n * h, h, lq, lk, qk_scale, **consts, **opts)
        else:
            grid = (cdiv(lq, consts["BLOCK_M"]) * n * h,)
            kern.flash_fwd[grid](q, k, v, out, *strides, h, lq, lk, qk_scale, **consts, **opts)
    return out


def cdiv(a, b):
    """Ceil division."""
    return -(-a // b)


def attention_into(q, k, v, out, scale=None):
    """Write attention(q, k, v) into out (N,H,Lq,D) and return it (Triton, or SDPA when unsupported)."""
    _check(q, k, v)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must match q {tuple(q.shape)} {q.dtype}; got {tuple(out.shape)} {out.dtype}")
    reason = _unsupported(q, k, v)
    if reason is not None:
        return out.copy_(_fallback(q, k, v, scale, reason))
    return _launch(q, k, v, out, scale)


@torch.library.custom_op("vidrd::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """q (N,H,Lq,D), k and v (N,H,Lk,D) -> (N,H,Lq,D) laid out like q."""
    return attention_into(q, k, v, new_out(q), scale)


@_attention_op.register_fake
def _attention_fake(q, k, v, scale=None):
    """Shape-only twin for torch.compile / fake tensors: (N,H,Lq,D) laid out like q."""
    _check(q, k, v)
    return new_out(q)


def attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v like F.scaled_dot_product_attention: q (N,H,Lq,D), k, v (N,H,Lk,D) -> (N,H,Lq,D)."""
    _check(q, k, v)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _fallback(q, k, v, scale, "autograd (the Triton kernels are forward-only)")
    return torch.ops.vidrd.attention(q, k, v, scale)
