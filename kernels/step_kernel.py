"""Triton kernel for the fused guidance + DDIM update (wrapper: vidrd.kernels.guidance)."""
import triton
import triton.language as tl


@triton.jit
def cfg_ddim_fwd(M, X, O, numel, guidance, coef_x, coef_m, CFG: tl.constexpr, BLOCK: tl.constexpr):
    """O = coef_x X + coef_m (U + g (C - U)), M = [U; C] flat (2 numel) under CFG, else M flat (numel)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(M + offs, mask=ok, other=0.0).to(tl.float32)
    if CFG:
        c = tl.load(M + numel + offs, mask=ok, other=0.0).to(tl.float32)
        m = m + guidance * (c - m)
    tl.store(O + offs, (coef_x * x + coef_m * m).to(O.dtype.element_ty), mask=ok)
