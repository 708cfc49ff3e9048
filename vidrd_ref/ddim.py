"""DDIM with eta = 0 (SPEC §3.3), as diffusers' DDIMScheduler builds it from SD2.1-base's scheduler config.

Timestep spacing: "leading" is the official one (SD2.1-base's scheduler config: 0, T/steps, ... plus steps_offset, so
the first step is at t = T - T/steps + 1, e.g. 901 for 10 steps, while the initial noise is pure noise); "trailing"
(opt-in) starts at t = T - 1 and steps down by T/steps (rounded), as in Lin et al. 2023 (arXiv 2305.08891):
in few steps the first step then sees the noise level the initial noise has. Either way each step goes to the next
timestep of its schedule, the last one to the final alpha_bar.
"""
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


SPACINGS = ("leading", "trailing")


class DDIM:
    """Timesteps and the deterministic update; keeps no per-step state, so one schedule serves every clip."""

    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.alphas_cumprod = alphas_cumprod(cfg)  # (T_train,)
        self.final_alpha_cumprod = torch.tensor(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]

    def timesteps(self, steps: int, spacing: str = "leading") -> torch.Tensor:
        """The `steps` timesteps, descending, int64: 981, 961, ..., 1 for 50 steps (leading); 999, 979, ..., 19
        (trailing)."""
        self.check_steps(steps, spacing)
        return self._timesteps(steps, spacing)

    def levels(self, steps: int, spacing: str = "leading") -> list[int]:
        """The `steps` timesteps as numbers, unchecked: the official windows' noise levels for another schedule
        (SamplerSettings.pinned), where leading's first of 1000 steps, t=1000, is a level, not an index."""
        return self._timesteps(steps, spacing).tolist()

    def _timesteps(self, steps: int, spacing: str) -> torch.Tensor:
        n = self.cfg.num_train_timesteps
        if spacing == "leading":
            return (torch.arange(steps, dtype=torch.int64) * (n // steps)).flip(0) + self.cfg.steps_offset
        # trailing: round(n - i n / steps) - 1, i = 0..steps-1, in float64 as diffusers does
        return (torch.arange(n, 0, -n / steps, dtype=torch.float64).round() - 1).to(torch.int64)[:steps]

    def check_steps(self, steps: int, spacing: str = "leading") -> None:
        """ValueError (naming steps=N) unless a `steps`-step `spacing` schedule has `steps` distinct timesteps within
        the training ones: leading spacing with steps_offset 1 puts the first of 1000 steps at t=1000, past 999."""
        n = self.cfg.num_train_timesteps
        if spacing not in SPACINGS:
            raise ValueError(f"spacing={spacing!r} must be one of {SPACINGS}")
        if not isinstance(steps, int) or not 1 <= steps <= n:
            raise ValueError(f"steps={steps!r} must be between 1 and the scheduler's {n} training timesteps")
        ts = self._timesteps(steps, spacing)
        if len(ts) != steps or int(ts.max()) >= n or int(ts.min()) < 0 or len(set(ts.tolist())) != steps:
            most = self.max_steps(spacing)
            raise ValueError(f"steps={steps} does not fit the {spacing} schedule of {n} training timesteps (steps_offset "
                             f"{self.cfg.steps_offset}): it allows at most {most} steps"
                             + (" (--spacing trailing allows more)" if spacing == "leading" else ""))

    def max_steps(self, spacing: str = "leading") -> int:
        """The largest step count whose `spacing` schedule fits the training timesteps (check_steps)."""
        n = self.cfg.num_train_timesteps
        for steps in range(n, 0, -1):
            ts = self._timesteps(steps, spacing)
            if len(ts) == steps and int(ts.max()) < n and int(ts.min()) >= 0 and len(set(ts.tolist())) == steps:
                return steps
        return 0

    def alphas(self, t: int, steps: int, spacing: str = "leading") -> tuple[float, float]:
        """(alpha_bar_t, alpha_bar_prev) for timestep t of a `steps`-step schedule: prev is the next timestep of
        the schedule (leading: t - T // steps), the final alpha_bar after the last one."""
        if spacing == "leading":
            prev = t - self.cfg.num_train_timesteps // steps
        else:
            ts = self.timesteps(steps, spacing).tolist()
            if t not in ts:
                raise ValueError(f"timestep {t} is not in the {steps}-step {spacing} schedule")
            i = ts.index(t)
            prev = ts[i + 1] if i + 1 < steps else -1
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        return float(a_t), float(a_prev)

    def step(self, model_output: torch.Tensor, t: int, x: torch.Tensor, steps: int,
             spacing: str = "leading") -> torch.Tensor:
        """x_t -> x_prev with eta = 0; element-wise, any shape."""
        return self.update(model_output, x, *self.alphas(int(t), steps, spacing))

    def update(self, model_output: torch.Tensor, x: torch.Tensor, a_t: float, a_prev: float) -> torch.Tensor:
        """The DDIM update from alpha_bar_t to alpha_bar_prev (the pair `alphas` gives, computed once per schedule
        by a sampler)."""
        if self.cfg.prediction_type == "epsilon":
            eps = model_output
            x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        else:  # v_prediction
            x0 = a_t ** 0.5 * x - (1 - a_t) ** 0.5 * model_output
            eps = a_t ** 0.5 * model_output + (1 - a_t) ** 0.5 * x
        return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
