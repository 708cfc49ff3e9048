"""What benchmarks and checks measure, in one place: PSNR and SSIM of videos, and rows as standard JSON."""
from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [0,1] (any equal shapes); inf when they are equal."""
    mse = ((a.detach().double() - b.detach().double()) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004) of two videos (B,3,T,H,W) in [0,1]: per frame and channel, 11x11 gaussian
    windows (sigma 1.5; frames smaller than 11 pixels: windows of their size) without padding, C1 = 0.01^2,
    C2 = 0.03^2."""
    bsz, c, t, h, w = a.shape
    assert a.shape == b.shape, f"videos {tuple(a.shape)} and {tuple(b.shape)} differ in shape"
    x = a.detach().to("cpu", torch.float64).transpose(1, 2).reshape(bsz * t * c, 1, h, w)  # ((B T 3),1,H,W)
    y = b.detach().to("cpu", torch.float64).transpose(1, 2).reshape(bsz * t * c, 1, h, w)
    k = min(11, h, w)
    g = torch.exp(-((torch.arange(k, dtype=torch.float64) - (k - 1) / 2) ** 2) / (2 * 1.5 ** 2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :])[None, None]  # (1,1,k,k)
    mu_x, mu_y = F.conv2d(x, win), F.conv2d(y, win)
    var_x = F.conv2d(x * x, win) - mu_x ** 2
    var_y = F.conv2d(y * y, win) - mu_y ** 2
    cov = F.conv2d(x * y, win) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    m = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return m.mean().item()


def strict_json(row: dict, **kw) -> str:
    """`row` as standard JSON: a non-finite number (an infinite PSNR for identical videos, a time not measured)
    becomes null, and `non_finite` says which and why, so every JSON parser reads the row."""
    notes = {}

    def clean(v, key):
        if isinstance(v, float) and not math.isfinite(v):
            notes[key] = ("inf: identical to the reference" if key.endswith("psnr_db") and v > 0 else
                          "nan: not measured" if math.isnan(v) else repr(v))
            return None
        if isinstance(v, dict):
            return {k: clean(x, f"{key}.{k}" if key else str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x, f"{key}[{i}]") for i, x in enumerate(v)]
        return v

    out = clean(row, "")
    if notes:
        out["non_finite"] = notes
    return json.dumps(out, allow_nan=False, **kw)
