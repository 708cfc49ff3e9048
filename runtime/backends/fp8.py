"""FP8 GEMMs for the torch UNet (--dtype fp8): its linear layers (attention projections, feed-forward, the
transformers' proj_in/proj_out) and 1x1 convolutions (resnet shortcuts) as e4m3 GEMMs with float32 scales, through
`torch._scaled_mm`; everything else in bf16. The recipe of TensorRT Model Optimizer's and torchao's float8 inference:
weights quantized once, activations quantized per call with their own scale (dynamic scaling).

`fp8_copy(unet)` returns a copy that shares no tensor with the caller's network. Left in bf16, and why: the
cross-attention keys/values (to_k, to_v read the text context, constant over a request: CrossKV computes them once,
from to_k.weight's dtype), the time-embedding linears (one row per sample: nothing to gain) and any layer whose sizes
are not multiples of 16 (what _scaled_mm takes).

Scales: `row` gives each weight row (output channel) and each activation row (token, or pixel of a 1x1 convolution)
its own, amax / 448; `tensor` one per tensor. Either way y = (x_q sx)(w_q sw)^T + b with float32 accumulation,
rounded to bf16: `scaled_mm_reference` computes exactly that in float32, the definition tests hold _scaled_mm to.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from vidrd.ref.attention import Attention
from vidrd.ref.unet import TimestepEmbedding

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448: the largest finite e4m3 value
AMAX_FLOOR = 1e-12  # an all-zero row gets a tiny scale instead of a division by zero
SCALINGS = ("row", "tensor")
KERNELS = ("scaled_mm", "reference")


def quantize(x: torch.Tensor, scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M,K) -> (q (M,K) e4m3, scale float32 (M,1) per row or () per tensor) with x ~= q * scale."""
    assert x.dim() == 2 and scaling in SCALINGS, (tuple(x.shape), scaling)
    amax = (x.abs().amax(dim=-1, keepdim=True) if scaling == "row" else x.abs().amax()).float()
    scale = amax.clamp(min=AMAX_FLOOR) / E4M3_MAX
    return (x.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def scaled_mm(xq, sx, wq, sw, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """xq (M,K) e4m3, wq (N,K) e4m3 with their scales -> (M,N) out_dtype on torch._scaled_mm. The bias is added
    after the GEMM (one kernel) rather than passed in, which not every scaling mode of every build takes."""
    y = torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw.t() if sw.dim() else sw, out_dtype=out_dtype)
    return y if bias is None else y.add_(bias)


def scaled_mm_reference(xq, sx, wq, sw, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """What scaled_mm computes, in float32 matmuls of the dequantized operands. (M,K), (N,K) -> (M,N)."""
    y = (xq.float() * sx) @ (wq.float() * sw).T  # (M,N) float32
    return (y if bias is None else y + bias.float()).to(out_dtype)


class FP8Linear(nn.Module):
    """An nn.Linear with e4m3 weights: x (..., K) -> (..., N) in x's dtype; activations quantized per call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scaling: str, kernel: str,
                 dtype: torch.dtype):
        super().__init__()
        assert scaling in SCALINGS and kernel in KERNELS, (scaling, kernel)
        self.out_features, self.in_features = weight.shape
        self.scaling, self.mm = scaling, scaled_mm if kernel == "scaled_mm" else scaled_mm_reference
        q, s = quantize(weight.detach(), scaling)
        self.register_buffer("weight_fp8", q)  # (N,K) e4m3
        self.register_buffer("weight_scale", s)  # (N,1) or () float32
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype, copy=True))  # (N,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, sx = quantize(x.reshape(-1, self.in_features), self.scaling)  # (M,K) e4m3, M = all leading dims
        y = self.mm(xq, sx, self.weight_fp8, self.weight_scale, self.bias, x.dtype)  # (M,N)
        return y.view(*x.shape[:-1], self.out_features)


class FP8Conv1x1(FP8Linear):
    """A 1x1 nn.Conv2d as an FP8Linear over pixels: x (B,C,h,w) -> (B,C',h,w), channels-last strides."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = super().forward(x.permute(0, 2, 3, 1))  # (B,h,w,C')
        return y.permute(0, 3, 1, 2)  # (B,C',h,w)


def _swappable(parent: nn.Module, name: str, child: nn.Module) -> bool:
    """Whether `child` (attribute `name` of `parent`) runs as FP8 (see the module docstring for what stays)."""
    if isinstance(child, nn.Conv2d):
        if child.kernel_size != (1, 1) or child.stride != (1, 1) or child.padding != (0, 0) or child.groups != 1:
            return False
    elif type(child) is not nn.Linear:
        return False
    if isinstance(parent, TimestepEmbedding) or name == "time_emb_proj":
        return False
    if isinstance(parent, Attention) and parent.cross and name in ("to_k", "to_v"):
        return False
    out_f, in_f = child.weight.shape[:2]
    return out_f % 16 == 0 and in_f % 16 == 0


def fp8_copy(unet: nn.Module, scaling: str = "row", kernel: str = "scaled_mm",
             dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A copy of `unet` in `dtype` whose linear layers and 1x1 convolutions are FP8 (weights quantized from the
    original's, in its precision); it shares no tensor with `unet`, which is left as it is."""
    if scaling not in SCALINGS or kernel not in KERNELS:
        raise ValueError(f"scaling={scaling!r}, kernel={kernel!r}: choose from {SCALINGS} and {KERNELS}")
    net = copy.deepcopy(unet).to(dtype)
    originals = dict(unet.named_modules())
    for prefix, parent in list(net.named_modules()):
        for name, child in list(parent.named_children()):
            if not _swappable(parent, name, child):
                continue
            src = originals[f"{prefix}.{name}" if prefix else name]
            if isinstance(src, nn.Conv2d):
                new = FP8Conv1x1(src.weight[:, :, 0, 0], src.bias, scaling, kernel, dtype)  # (C',C,1,1) -> (C',C)
            else:
                new = FP8Linear(src.weight, src.bias, scaling, kernel, dtype)
            setattr(parent, name, new.to(child.weight.device))
    return net.eval()
