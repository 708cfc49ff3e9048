"""DDIM with eta = 0 (SPEC §3.3), as diffusers' DDIMScheduler builds it from SD2.1-base's scheduler config."""
from __future__ import annotations

import torch

from .config import SchedulerConfig


def alphas_cumprod(cfg: SchedulerConfig) -> torch.Tensor:
    """Cumulative products of (1 - beta), float32. (T_train,)"""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=torch.float32) ** 2
    else:
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


class DDIM:
    """Timesteps and the deterministic update; keeps no per-step state, so one schedule serves every clip."""

    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.alphas_cumprod = alphas_cumprod(cfg)  # (T_train,)
        self.final_alpha_cumprod = torch.tensor(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]

    def timesteps(self, steps: int) -> torch.Tensor:
        """The `steps` timesteps, descending, int64: 981, 961, ..., 1 for 50 steps."""
        if not 1 <= steps <= self.cfg.num_train_timesteps:
            raise ValueError(f"steps={steps} must be between 1 and {self.cfg.num_train_timesteps}")
        ratio = self.cfg.num_train_timesteps // steps
        return (torch.arange(steps, dtype=torch.int64) * ratio).flip(0) + self.cfg.steps_offset

    def alphas(self, t: int, steps: int) -> tuple[float, float]:
        """(alpha_bar_t, alpha_bar_prev) for timestep t of a `steps`-step schedule."""
        prev = t - self.cfg.num_train_timesteps // steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        return float(a_t), float(a_prev)

    def step(self, model_output: torch.Tensor, t: int, x: torch.Tensor, steps: int) -> torch.Tensor:
        """x_t -> x_prev with eta = 0; element-wise, any shape."""
        a_t, a_prev = self.alphas(int(t), steps)
        if self.cfg.prediction_type == "epsilon":
            eps = model_output
            x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        else:  # v_prediction
            x0 = a_t ** 0.5 * x - (1 - a_t) ** 0.5 * model_output
            eps = a_t ** 0.5 * model_output + (1 - a_t) ** 0.5 * x
        return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
