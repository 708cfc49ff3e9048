"""Triton attention kernels: a flash kernel for long sequences, a batched one for short sequences.

Legend: N batch, H heads, L sequence (M query rows, K key rows), D head dim, G sequences per program.
Both kernels take explicit strides (any view works) and write a tile of O in O's dtype.
UPCAST (interpreter only) computes everything in fp32, since the interpreter gets bf16 wrong;
on GPU the dots take fp16/bf16 operands with fp32 accumulation, fp32 inputs use IEEE dots.
"""
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction


@triton.jit
def flash_fwd(Q, K, V, O,
              sqn, sqh, sqm, sqd, skn, skh, skl, skd,
              svn, svh, svl, svd, son, soh, som, sod,
              H, LQ, LK, qk_scale,
              HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              EVEN_N: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """O[n, h, m-tile] (BLOCK_M, D) = softmax(Q K^T * scale) V, online softmax over K in BLOCK_N tiles."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(LQ, BLOCK_M)
    nh = (pid // num_m).to(tl.int64)
    n = nh // H
    h = nh % H
    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    m_ok = offs_m < LQ

    # q: (BLOCK_M, BLOCK_D), rows past LQ and columns past HEAD_D read as 0
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + n * sqn + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = K + n * skn + h * skh + offs_n[:, None] * skl + offs_d[None, :] * skd
    v_ptrs = V + n * svn + h * svh + offs_n[:, None] * svl + offs_d[None, :] * svd

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, LK, BLOCK_N):
        # k, v: (BLOCK_N, BLOCK_D)
        if EVEN_N:
            k = tl.load(k_ptrs + start * skl, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs + start * svl, mask=d_ok[None, :], other=0.0)
        else:
            kv_mask = ((start + offs_n) < LK)[:, None] & d_ok[None, :]
            k = tl.load(k_ptrs + start * skl, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs + start * svl, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # s: (BLOCK_M, BLOCK_N) in log2 units
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        if not EVEN_N:
            s = tl.where(((start + offs_n) < LK)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(O + n * son + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=q_mask)


@triton.jit
def short_fwd(Q, K, V, O,
              sqn, sqh, sqm, sqd, skn, skh, skl, skd,
              svn, svh, svl, svd, son, soh, som, sod,
              S, H, LQ, LK, qk_scale,
              HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_LQ: tl.constexpr, BLOCK_LK: tl.constexpr, GROUP: tl.constexpr,
              UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """GROUP whole sequences per program: O (G, LQ, D) from scores (G, LQ, LK) in one 3-D dot each."""
    seq = tl.program_id(0).to(tl.int64) * GROUP + tl.arange(0, GROUP)
    s_ok = seq < S
    n = seq // H
    h = seq % H
    offs_q = tl.arange(0, BLOCK_LQ)
    offs_k = tl.arange(0, BLOCK_LK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < HEAD_D)[None, None, :]
    k_ok = offs_k < LK

    # q: (G, BLOCK_LQ, BLOCK_D); k, v: (G, BLOCK_LK, BLOCK_D); padding reads as 0
    q_mask = s_ok[:, None, None] & (offs_q < LQ)[None, :, None] & d_ok
    kv_mask = s_ok[:, None, None] & k_ok[None, :, None] & d_ok
    q = tl.load(Q + (n * sqn + h * sqh)[:, None, None] + offs_q[None, :, None] * sqm
                + offs_d[None, None, :] * sqd, mask=q_mask, other=0.0)
    k = tl.load(K + (n * skn + h * skh)[:, None, None] + offs_k[None, :, None] * skl
                + offs_d[None, None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + (n * svn + h * svh)[:, None, None] + offs_k[None, :, None] * svl
                + offs_d[None, None, :] * svd, mask=kv_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    # s, p: (G, BLOCK_LQ, BLOCK_LK) in log2 units; every row has at least one valid key
    if IEEE:
        s = tl.dot(q, tl.trans(k, (0, 2, 1)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k, (0, 2, 1)))
    s = tl.where(k_ok[None, None, :], s * qk_scale, float("-inf"))
    p = tl.exp2(s - tl.max(s, 2)[:, :, None])
    l_i = tl.sum(p, 2)
    if IEEE:
        acc = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v)
    out = acc / l_i[:, :, None]
    tl.store(O + (n * son + h * soh)[:, None, None] + offs_q[None, :, None] * som
             + offs_d[None, None, :] * sod, out.to(O.dtype.element_ty), mask=q_mask)


# True when TRITON_INTERPRET=1 was set before this module was imported (kernels run on CPU).
INTERPRETED = not isinstance(flash_fwd, JITFunction)


def compilable(kernel):
    """The real JITFunction behind a kernel, even when the interpreter wrapped it (for triton.compile)."""
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
