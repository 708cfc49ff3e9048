"""group_norm_silu and geglu: guarded wrappers of the fused Triton kernels, custom ops, torch fallbacks.

Legend: B batch, C channels, G groups, F frames, h, w latent size, M rows, I feed-forward inner width.
  group_norm_silu(x, weight, bias, groups, eps, temb)  silu(group_norm(x + temb[:, :, None...]))  (groupnorm.py)
  geglu(x, bias)                                       value * gelu(gate), [value | gate] = x + bias  (geglu.py)
Both are registered as custom ops (torch.ops.vidrd.group_norm_silu / .geglu) so torch.compile traces them as one
node each, and fall back to the unfused torch ops, logging the reason once, when Triton cannot run the input.
Not used by the UNet or the runtime yet: wiring them in waits for GPU measurements (kernels/bench_fused.py).
"""
import contextlib
import functools
import importlib
import importlib.util
import logging

import torch
import torch.nn.functional as F

from .ops import DTYPES, cdiv, device_reason, next_pow2

log = logging.getLogger(__name__)
_warned = set()

# Launch plan. GroupNorm: a tile holds about GN_TILE elements; a group's tiles are split over up to GN_MAX_SPLIT
# programs so that B * G * split reaches GN_PROGRAMS (a few waves on a 132-SM GPU). GEGLU: (GEGLU_TILE / BLOCK_N,
# BLOCK_N) tiles. Starting points for the GPU benchmark to tune, not measured values.
GN_TILE = 2048
GN_PROGRAMS = 1024
GN_MAX_SPLIT = 64
GEGLU_TILE = 2048
GEGLU_MAX_N = 128
NUM_WARPS = 4


@functools.cache
def _kernels(name):
    """The Triton kernel module `name` (groupnorm, geglu), or None when triton is not importable."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        return importlib.import_module(f".{name}", __package__)
    except Exception as e:  # broken triton install: fall back rather than fail
        log.warning("vidrd.kernels: importing the %s kernels failed: %s", name, e)
        return None


def _note_fallback(op, reason):
    """Log once per (op, reason) that `op` runs as unfused torch ops."""
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        log.warning("vidrd.kernels.%s falls back to torch ops: %s", op, reason)


def _device(t):
    """The CUDA device context for t, or a null context on CPU (interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# --- GroupNorm + SiLU ---------------------------------------------------------------------------------------------

def _check_gn(x, weight, bias, groups, eps, temb):
    """Raise ValueError unless x (B,C,*) with 1-3 trailing dims, weight and bias (C,) and temb (B,C) agree."""
    if x.dim() not in (3, 4, 5):
        raise ValueError(f"group_norm_silu expects x (B,C,L), (B,C,h,w) or (B,C,F,h,w); got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"group_norm_silu expects a floating x; got {x.dtype}")
    b, c = x.shape[:2]
    if not isinstance(groups, int) or groups <= 0 or c % groups:
        raise ValueError(f"group_norm_silu: groups {groups!r} must be a positive int dividing C={c}")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"group_norm_silu: eps {eps!r} must be a number >= 0")
    for name, t, shape in (("weight", weight, (c,)), ("bias", bias, (c,)), ("temb", temb, (b, c))):
        if t is None and name == "temb":
            continue
        if tuple(t.shape) != shape or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"group_norm_silu expects {name} {shape} {x.dtype} on {x.device} for x "
                             f"{tuple(x.shape)}; got {tuple(t.shape)} {t.dtype} on {t.device}")


def group_norm_silu_reference(x, weight, bias, groups, eps=1e-5, temb=None):
    """The unfused torch ops the kernel replaces: silu(group_norm(x + temb)), temb (B,C) broadcast over the rest."""
    if temb is not None:
        x = x + temb.view(*temb.shape, *(1,) * (x.dim() - 2))  # (B,C,1,..): shared by frames and positions
    return F.silu(F.group_norm(x, groups, weight, bias, eps))


def _as_bcfs(*ts):
    """(B, C, F, S) sizes and one (B, C, F, S) stride tuple per tensor (all of x's shape) with h, w merged into
    S = h w, or None when some tensor's strides do not merge."""
    b, c, *rest = ts[0].shape
    if len(rest) == 1:
        return (b, c, 1, rest[0]), [(t.stride(0), t.stride(1), 0, t.stride(2)) for t in ts]
    f, (h, w) = (rest[0] if len(rest) == 3 else 1), rest[-2:]
    strides = []
    for t in ts:
        sb, sc, *rs = t.stride()
        sf, (sh, sw) = (rs[0] if len(rs) == 3 else 0), rs[-2:]
        if h > 1 and sh != w * sw:
            return None
        strides.append((sb, sc, sf, sw))
    s = h * w
    if f > 1 and s > 1 and all(sf == s * ss for _, _, sf, ss in strides):
        # frames adjacent in memory (contiguous (B,C,F,h,w)): one run of F h w per channel
        return (b, c, 1, f * s), [(sb, sc, 0, ss) for sb, sc, _, ss in strides]
    return (b, c, f, s), strides


def plan_group_norm(b, groups, cg, f, s):
    """Constexprs and grid numbers for one (B, G, Cg, F, S) problem: BLOCK_C, BLOCK_S, n_split, tiles_per_prog."""
    block_c = next_pow2(cg)
    block_s = max(16, min(next_pow2(s), max(16, GN_TILE // block_c)))
    n_sblk = cdiv(s, block_s)
    n_tiles = f * n_sblk
    split = max(1, min(n_tiles, GN_MAX_SPLIT, cdiv(GN_PROGRAMS, b * groups)))
    per_prog = cdiv(n_tiles, split)
    split = cdiv(n_tiles, per_prog)  # no program without tiles
    return dict(BLOCK_C=block_c, BLOCK_S=block_s, BLOCK_SPLIT=next_pow2(split), n_sblk=n_sblk,
                n_tiles=n_tiles, n_split=split, tiles_per_prog=per_prog)


def _gn_unsupported(x, weight, bias, out):
    """Why the Triton path cannot run these valid inputs, or None when it can."""
    kern = _kernels("groupnorm")
    if kern is None:
        return "triton is not importable"
    reason = device_reason(x, kern.INTERPRETED)
    if reason is not None:
        return reason
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype}"
    if x.numel() == 0:
        return "empty input"
    if weight.stride(0) != 1 or bias.stride(0) != 1:
        return "strided weight or bias"
    if _as_bcfs(x, out) is None:
        return f"h and w of strides {x.stride()} do not merge into one dimension"
    return None


def _new_like(x):
    """Fresh output laid out like x (dense views such as the frame-major (B,C,F,h,w) keep their strides)."""
    return torch.empty_like(x, memory_format=torch.preserve_format)


def gn_args(x, weight, bias, groups, eps, temb, out):
    """(grid, gn_stats kwargs, gn_apply kwargs, PART shape) of one call; both take PART, a (B G, n_split, 2) fp32
    scratch. Also what kernels.aot compiles, from meta tensors."""
    (b, c, f, s), ((sb, sc, sf, ss), (ob, oc, of, os_)) = _as_bcfs(x, out)
    cg = c // groups
    p = plan_group_norm(b, groups, cg, f, s)
    stb, stc = temb.stride() if temb is not None else (0, 0)
    common = dict(X=x, TEMB=temb if temb is not None else x, sxb=sb, sxc=sc, sxf=sf, sxs=ss, stb=stb, stc=stc,
                  G=groups, CG=cg, S=s, n_sblk=p["n_sblk"], n_tiles=p["n_tiles"],
                  tiles_per_prog=p["tiles_per_prog"], n_split=p["n_split"], HAS_TEMB=temb is not None,
                  BLOCK_C=p["BLOCK_C"], BLOCK_S=p["BLOCK_S"])
    apply = dict(common, W=weight, BIAS=bias, OUT=out, sob=ob, soc=oc, sof=of, sos=os_, count=cg * f * s,
                 eps=float(eps), BLOCK_SPLIT=p["BLOCK_SPLIT"])
    return (b * groups, p["n_split"]), common, apply, (b * groups, p["n_split"], 2)


def _launch_gn(x, weight, bias, groups, eps, temb, out):
    """Run gn_stats then gn_apply, writing out (laid out like x)."""
    kern = _kernels("groupnorm")
    grid, stats, apply, part_shape = gn_args(x, weight, bias, groups, eps, temb, out)
    part = torch.empty(part_shape, dtype=torch.float32, device=x.device)  # (B G, n_split, 2) partial sums
    with _device(x):
        kern.gn_stats[grid](**stats, PART=part, num_warps=NUM_WARPS)
        kern.gn_apply[grid](**apply, PART=part, num_warps=NUM_WARPS)
    return out


@torch.library.custom_op("vidrd::group_norm_silu", mutates_args=())
def _group_norm_silu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                        temb: torch.Tensor | None = None) -> torch.Tensor:
    """x (B,C,*), weight and bias (C,), temb (B,C) or None -> silu(group_norm(x + temb)) laid out like x."""
    out = _new_like(x)
    reason = _gn_unsupported(x, weight, bias, out)
    if reason is not None:
        _note_fallback("group_norm_silu", reason)
        return out.copy_(group_norm_silu_reference(x, weight, bias, groups, eps, temb))
    return _launch_gn(x, weight, bias, groups, eps, temb, out)


@_group_norm_silu_op.register_fake
def _group_norm_silu_fake(x, weight, bias, groups, eps, temb=None):
    """Shape-only twin for torch.compile / fake tensors: laid out like x."""
    _check_gn(x, weight, bias, groups, eps, temb)
    return _new_like(x)


def group_norm_silu(x, weight, bias, groups, eps=1e-5, temb=None):
    """silu(GroupNorm(groups, C, eps)(x + temb)) in one pass pair. x (B,C,L), (B,C,h,w) or (B,C,F,h,w), statistics
    over all frames; weight, bias (C,); temb (B,C) or None, added before the norm as in a ResNet block's norm2."""
    _check_gn(x, weight, bias, groups, eps, temb)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, temb)):
        _note_fallback("group_norm_silu", "autograd (the Triton kernels are forward-only)")
        return group_norm_silu_reference(x, weight, bias, groups, eps, temb)
    return torch.ops.vidrd.group_norm_silu(x, weight, bias, groups, float(eps), temb)


# --- bias + GEGLU -------------------------------------------------------------------------------------------------

def _check_geglu(x, bias):
    """Raise ValueError unless x (..., 2I) is floating with an even, non-zero last dim and bias is (2I,) like x."""
    if x.dim() < 1 or x.shape[-1] == 0 or x.shape[-1] % 2:
        raise ValueError(f"geglu expects x (..., 2I) with an even last dim > 0; got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"geglu expects a floating x; got {x.dtype}")
    if bias is not None and (tuple(bias.shape) != (x.shape[-1],) or bias.dtype != x.dtype
                             or bias.device != x.device):
        raise ValueError(f"geglu expects bias ({x.shape[-1]},) {x.dtype} on {x.device}; got "
                         f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")


def geglu_reference(x, bias=None):
    """The unfused torch ops (vidrd_ref GEGLU after its proj): value * gelu(gate), exact erf gelu. (..., I)."""
    if bias is not None:
        x = x + bias
    value, gate = x.chunk(2, dim=-1)  # (..., I) each
    return value * F.gelu(gate)


def _rows(x):
    """x as a (M, 2I) view, or None when its leading dims do not flatten without a copy."""
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:  # leading dims not collapsible
        return None


def plan_geglu(inner):
    """BLOCK_M, BLOCK_N for inner width I."""
    block_n = max(16, min(GEGLU_MAX_N, next_pow2(inner)))
    return dict(BLOCK_M=max(1, GEGLU_TILE // block_n), BLOCK_N=block_n)


def geglu_args(x, bias, out):
    """(grid, geglu_fwd kwargs) of one call; also what kernels.aot compiles, from meta tensors."""
    rows = _rows(x)  # (M, 2I)
    m, inner = rows.shape[0], rows.shape[1] // 2
    p = plan_geglu(inner)
    args = dict(X=rows, BIAS=bias if bias is not None else rows, OUT=out, sxm=rows.stride(0), som=inner, M=m,
                I=inner, HAS_BIAS=bias is not None, **p)
    return (cdiv(m, p["BLOCK_M"]), cdiv(inner, p["BLOCK_N"])), args


def _geglu_unsupported(x, bias):
    """Why the Triton path cannot run these valid inputs, or None when it can."""
    kern = _kernels("geglu")
    if kern is None:
        return "triton is not importable"
    reason = device_reason(x, kern.INTERPRETED)
    if reason is not None:
        return reason
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype}"
    if x.numel() == 0:
        return "empty input"
    if x.stride(-1) != 1 or (bias is not None and bias.stride(0) != 1):
        return "last dim not contiguous"
    if _rows(x) is None:
        return f"leading dims of strides {x.stride()} do not flatten into rows"
    return None


def _new_geglu_out(x):
    """Fresh contiguous output (..., I)."""
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@torch.library.custom_op("vidrd::geglu", mutates_args=())
def _geglu_op(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., 2I), bias (2I,) or None -> value * gelu(gate), contiguous (..., I)."""
    out = _new_geglu_out(x)
    reason = _geglu_unsupported(x, bias)
    if reason is not None:
        _note_fallback("geglu", reason)
        return out.copy_(geglu_reference(x, bias))
    with _device(x):
        grid, args = geglu_args(x, bias, out)
        _kernels("geglu").geglu_fwd[grid](**args, num_warps=NUM_WARPS)
    return out


@_geglu_op.register_fake
def _geglu_fake(x, bias=None):
    """Shape-only twin for torch.compile / fake tensors: contiguous (..., I)."""
    _check_geglu(x, bias)
    return _new_geglu_out(x)


def geglu(x, bias=None):
    """vidrd_ref GEGLU after its projection: x (..., 2I) = [value | gate] (+ bias (2I,)) -> value * gelu(gate),
    (..., I)."""
    _check_geglu(x, bias)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        _note_fallback("geglu", "autograd (the Triton kernels are forward-only)")
        return geglu_reference(x, bias)
    return torch.ops.vidrd.geglu(x, bias)
