"""Triton GroupNorm + SiLU, with an optional per-(batch, channel) add before the norm (a ResNet block's temb).

Legend: B batch, C channels, G groups (Cg = C / G channels each), F frames, S = h * w positions.
x is read as (B, C, F, S) through explicit strides, so contiguous (B,C,F,h,w), the frame-major view that a
per-frame conv returns ((B,F,C,h,w) memory seen as (B,C,F,h,w)) and channels-last-3d all run without a copy.
A group's statistics span all its channels, frames and positions (5-D GroupNorm, SPEC §4.5).

Two kernels, so that a group's reduction is spread over n_split programs (B * G alone is too few to fill a GPU):
  gn_stats  grid (B*G, n_split): partial sums of (x + temb - K) and its square over a range of tiles
  gn_apply  grid (B*G, n_split): combine the n_split partials, y = (x + temb - mean) * (rstd * w) + b, out = silu(y)
K is the group's first element: summing shifted values keeps E[d^2] - E[d]^2 from cancelling catastrophically when
|mean| >> std. Everything is computed in fp32 after the loads; out is stored in out's dtype.
"""
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction


@triton.jit
def _tile(X, TEMB, sxc, sxf, sxs, stc, c0, t, n_sblk, CG, S,
          HAS_TEMB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Mask and fp32 values x + temb (BLOCK_C, BLOCK_S) of tile t (frame t // n_sblk) of one group."""
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = (t % n_sblk) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (offs_c < CG)[:, None] & (offs_s < S)[None, :]
    offs = (c0 + offs_c)[:, None] * sxc + (t // n_sblk) * sxf + offs_s[None, :] * sxs
    v = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_TEMB:
        v += tl.load(TEMB + (c0 + offs_c) * stc, mask=offs_c < CG, other=0.0).to(tl.float32)[:, None]
    return mask, v


@triton.jit
def _pivot(X, TEMB, sxb, sxc, stb, stc, bg, G, CG, HAS_TEMB: tl.constexpr):
    """Base pointers of batch b and the group's shift K (its first element, temb included) in fp32."""
    b = bg // G
    c0 = (bg % G) * CG
    xb = X + b * sxb
    k = tl.load(xb + c0 * sxc).to(tl.float32)
    tb = TEMB + b * stb
    if HAS_TEMB:
        k += tl.load(tb + c0 * stc).to(tl.float32)
    return xb, tb, c0, k


@triton.jit
def gn_stats(X, TEMB, PART, sxb, sxc, sxf, sxs, stb, stc,
             G, CG, S, n_sblk, n_tiles, tiles_per_prog, n_split,
             HAS_TEMB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """PART[bg, split, 0:2] = (sum d, sum d^2), d = x + temb - K, over tiles [split * tpp, (split + 1) * tpp) of
    group bg."""
    bg = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    xb, tb, c0, k = _pivot(X, TEMB, sxb, sxc, stb, stc, bg, G, CG, HAS_TEMB)
    acc1 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc2 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    t0 = split * tiles_per_prog
    for t in range(t0, tl.minimum(t0 + tiles_per_prog, n_tiles)):
        mask, v = _tile(xb, tb, sxc, sxf, sxs, stc, c0, t, n_sblk, CG, S, HAS_TEMB, BLOCK_C, BLOCK_S)
        d = tl.where(mask, v - k, 0.0)
        acc1 += d
        acc2 += d * d
    tl.store(PART + (bg * n_split + split) * 2, tl.sum(tl.sum(acc1, 1), 0))
    tl.store(PART + (bg * n_split + split) * 2 + 1, tl.sum(tl.sum(acc2, 1), 0))


@triton.jit
def gn_apply(X, TEMB, W, BIAS, PART, OUT, sxb, sxc, sxf, sxs, stb, stc, sob, soc, sof, sos,
             G, CG, S, n_sblk, n_tiles, tiles_per_prog, n_split, count, eps,
             HAS_TEMB: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
             BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """OUT = silu((x + temb - mean) * rstd * w + b) over the same tiles gn_stats summed; count = Cg * F * S."""
    bg = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    xb, tb, c0, k = _pivot(X, TEMB, sxb, sxc, stb, stc, bg, G, CG, HAS_TEMB)
    # mean and rstd of the whole group from its n_split partial sums
    offs_p = tl.arange(0, BLOCK_SPLIT)
    p_ok = offs_p < n_split
    s1 = tl.sum(tl.load(PART + (bg * n_split + offs_p) * 2, mask=p_ok, other=0.0), 0)
    s2 = tl.sum(tl.load(PART + (bg * n_split + offs_p) * 2 + 1, mask=p_ok, other=0.0), 0)
    d1 = s1 / count
    var = tl.maximum(s2 / count - d1 * d1, 0.0)
    mean = k + d1
    rstd = tl.math.rsqrt(var + eps)
    # y = (v - mean) * scale + shift per channel, v = x + temb from _tile. Subtracting the mean before scaling (not
    # v * scale + (b - mean * scale)) avoids cancelling two large products when |mean| >> std.
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < CG
    scale = tl.load(W + c0 + offs_c, mask=c_ok, other=0.0).to(tl.float32) * rstd
    shift = tl.load(BIAS + c0 + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    ob = OUT + (bg // G) * sob
    t0 = split * tiles_per_prog
    for t in range(t0, tl.minimum(t0 + tiles_per_prog, n_tiles)):
        mask, v = _tile(xb, tb, sxc, sxf, sxs, stc, c0, t, n_sblk, CG, S, HAS_TEMB, BLOCK_C, BLOCK_S)
        y = (v - mean) * scale[:, None] + shift[:, None]
        y = y * tl.sigmoid(y)
        offs_s = (t % n_sblk) * BLOCK_S + tl.arange(0, BLOCK_S)
        o_offs = (c0 + offs_c)[:, None] * soc + (t // n_sblk) * sof + offs_s[None, :] * sos
        tl.store(ob + o_offs, y.to(OUT.dtype.element_ty), mask=mask)


# True when TRITON_INTERPRET=1 was set before this module was imported (kernels run on CPU).
INTERPRETED = not isinstance(gn_stats, JITFunction)
