"""Fused classifier-free-guidance combine + DDIM (eta = 0) update: one pass over the latents.

With eta = 0 both parameterizations are linear in (x, model output m):
  epsilon: x_prev = sqrt(a_prev / a_t) x + (sqrt(1 - a_prev) - sqrt(a_prev (1 - a_t) / a_t)) m
  v:       x_prev = (sqrt(a_prev a_t) + sqrt((1 - a_prev)(1 - a_t))) x
                    + (sqrt((1 - a_prev) a_t) - sqrt(a_prev (1 - a_t))) m
and under guidance m = u + g (c - u) with [u; c] the batch halves of the UNet output.
"""
import contextlib
import math
import os

import torch

from .ops import _kernels

BLOCK = 1024


def ddim_coefficients(a_t, a_prev, prediction_type="epsilon"):
    """(A, B) with x_prev = A x + B m for alpha_bar_t, alpha_bar_prev."""
    if prediction_type == "epsilon":
        return math.sqrt(a_prev / a_t), math.sqrt(1 - a_prev) - math.sqrt(a_prev * (1 - a_t) / a_t)
    if prediction_type == "v_prediction":
        return (math.sqrt(a_prev * a_t) + math.sqrt((1 - a_prev) * (1 - a_t)),
                math.sqrt((1 - a_prev) * a_t) - math.sqrt(a_prev * (1 - a_t)))
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def cfg_ddim_step(model_out, x, a_t, a_prev, guidance_scale=None, prediction_type="epsilon"):
    """x_prev (shape and dtype of x) from x (B,...) and model_out: (2B,...) = [uncond; cond] when
    guidance_scale is given, else (B,...)."""
    cfg = guidance_scale is not None
    want = (2 * x.shape[0], *x.shape[1:]) if cfg else tuple(x.shape)
    if tuple(model_out.shape) != want:
        raise ValueError(f"model_out {tuple(model_out.shape)} does not match x {tuple(x.shape)} "
                         f"(expected {want}{' = [uncond; cond]' if cfg else ''})")
    a, b = ddim_coefficients(float(a_t), float(a_prev), prediction_type)
    return torch.ops.vidrd.cfg_ddim_step(model_out, x, float(guidance_scale or 1.0), cfg, a, b)


@torch.library.custom_op("vidrd::cfg_ddim_step", mutates_args=())
def _step_op(model_out: torch.Tensor, x: torch.Tensor, guidance: float, cfg: bool,
             coef_x: float, coef_m: float) -> torch.Tensor:
    """coef_x x + coef_m m, m the guided model output; shape and dtype of x."""
    if not _triton_ok(model_out, x):
        m = model_out.float()
        if cfg:
            u, c = m.chunk(2)
            m = u + guidance * (c - u)
        return (coef_x * x.float() + coef_m * m).to(x.dtype).contiguous()
    from .step_kernel import cfg_ddim_fwd
    mo, xc = model_out.contiguous(), x.contiguous()
    out = torch.empty_like(xc)
    numel = xc.numel()
    if numel:
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            cfg_ddim_fwd[(-(-numel // BLOCK),)](mo, xc, out, numel, guidance, coef_x, coef_m, CFG=cfg, BLOCK=BLOCK)
    return out


@_step_op.register_fake
def _step_fake(model_out, x, guidance, cfg, coef_x, coef_m):
    """Shape-only twin: like x, contiguous."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _triton_ok(model_out, x):
    """Whether the Triton kernel can run here (else the same formula runs in torch)."""
    kern = _kernels()
    if kern is None or model_out.device != x.device or not x.dtype.is_floating_point:
        return False
    if x.device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1" and kern.INTERPRETED
    return x.device.type == "cuda" and torch.version.hip is None
