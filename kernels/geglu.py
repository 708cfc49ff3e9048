"""Triton bias + GEGLU: the feed-forward's proj output (M, 2I) -> value * gelu(gate), (M, I).

Legend: M rows (all leading dims), I inner width (4 C in the UNet's feed-forward).
Mirrors vidrd_ref GEGLU: `value, gate = proj(x).chunk(2, -1)`, value * F.gelu(gate) with the exact erf gelu.
With HAS_BIAS the kernel adds the linear's bias (2I,) first, so proj can run as a bias-free matmul.
Computed in fp32 after the loads; out is stored in OUT's dtype.
"""
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction


@triton.jit
def geglu_fwd(X, BIAS, OUT, sxm, som, M, I,
              HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[m, n] = (X[m, n] + b[n]) * gelu(X[m, I + n] + b[I + n]) on a (BLOCK_M, BLOCK_N) tile; X's columns are
    contiguous."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    mask = (offs_m < M)[:, None] & n_ok[None, :]
    x = X + offs_m[:, None] * sxm + offs_n[None, :]
    value = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(x + I, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        value += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        gate += tl.load(BIAS + I + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = value * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))
    tl.store(OUT + offs_m[:, None] * som + offs_n[None, :], out.to(OUT.dtype.element_ty), mask=mask)


# True when TRITON_INTERPRET=1 was set before this module was imported (kernels run on CPU).
INTERPRETED = not isinstance(geglu_fwd, JITFunction)
