"""DPM-Solver++(2M) (Lu et al., arXiv 2211.01095, multistep second order, data prediction), deterministic.

It runs on the same timesteps as DDIM (SD2.1's "leading" spacing + steps_offset, or "trailing": vidrd.ref.ddim) and
ends at the same final alpha_bar, so a step index means the same noise level for both solvers and the reuse-and-diffuse bookkeeping
(history per step, staged-guidance windows in steps) applies unchanged. With alpha_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t) and h_i = lambda_{i+1} - lambda_i:

    x0_i    = (x_i - sigma_i eps_i) / alpha_i                                   (data prediction)
    D_i     = x0_i                                          first step, and the last one below 15 steps
            = (1 + 1 / (2 r_i)) x0_i - 1 / (2 r_i) x0_{i-1}, r_i = h_{i-1} / h_i   otherwise
    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (exp(-h_i) - 1) D_i
"""
from __future__ import annotations

import math

import torch

from .config import SchedulerConfig
from .ddim import DDIM

LOWER_ORDER_FINAL_BELOW = 15  # few-step schedules take a first-order last step (more stable, as in the paper's code)


class DPMSolverPP2M:
    """Per-step coefficients for `steps` steps; `step` keeps the previous data prediction of one trajectory."""

    def __init__(self, cfg: SchedulerConfig, steps: int, spacing: str = "leading"):
        ddim = DDIM(cfg)
        self.cfg, self.steps = cfg, steps
        self.timesteps = ddim.timesteps(steps, spacing)  # (T,) descending
        pairs = [ddim.alphas(int(t), steps, spacing) for t in self.timesteps]
        ab = [a for a, _ in pairs] + [pairs[-1][1]]
        self.alpha = [math.sqrt(a) for a in ab]  # (T+1,) the last entry is the final target
        self.sigma = [math.sqrt(1 - a) for a in ab]
        lam = [math.log(a / s) for a, s in zip(self.alpha, self.sigma)]
        self.h = [lam[i + 1] - lam[i] for i in range(steps)]  # (T,)
        self.prev_x0: torch.Tensor | None = None

    def coefficients(self, i: int) -> tuple[float, float, float, float]:
        """(c_x, c_x0, c_prev, a_i): x_{i+1} = c_x x_i + c_x0 x0_i + c_prev x0_{i-1}; x0_i = (x_i - s_i eps) / a_i."""
        c_x = self.sigma[i + 1] / self.sigma[i]
        c_d = -self.alpha[i + 1] * math.expm1(-self.h[i])  # multiplies D_i
        if self.h[i] == 0:  # the last trailing step, t=0 to the final alpha_bar (= alpha_bar_0): the identity
            return c_x, 0.0, 0.0, self.alpha[i]
        first = i == 0 or (i == self.steps - 1 and self.steps < LOWER_ORDER_FINAL_BELOW)
        if first:
            return c_x, c_d, 0.0, self.alpha[i]
        r = self.h[i - 1] / self.h[i]
        return c_x, c_d * (1 + 0.5 / r), -c_d * 0.5 / r, self.alpha[i]

    def x0(self, model_output: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """Data prediction from the model output (epsilon or v)."""
        a, s = self.alpha[i], self.sigma[i]
        if self.cfg.prediction_type == "epsilon":
            return (x - s * model_output) / a
        return a * x - s * model_output  # v_prediction

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """x_i -> x_{i+1} for step index i (0-based); call with i = 0 first to restart the history."""
        x0 = self.x0(model_output, i, x)
        c_x, c_x0, c_prev, _ = self.coefficients(i)
        out = c_x * x + c_x0 * x0
        if c_prev:
            assert self.prev_x0 is not None and self.prev_x0.shape == x0.shape, "step(i > 0) before step(0)"
            out = out + c_prev * self.prev_x0
        self.prev_x0 = x0
        return out
