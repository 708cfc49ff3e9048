"""Opt-in step skipping past bit-exactness: UNet feature reuse and guidance-difference reuse, per step.

Feature reuse follows DeepCache (Ma et al. 2023, arXiv 2312.00858): the deep features entering the outermost up
block(s) change slowly from one denoising step to the next, so a "store" step runs the whole UNet and keeps them,
and the following "reuse" steps run only conv_in, the shallow down layers whose outputs those up blocks take as
skips, and the up blocks themselves (UNet3D.forward's `cache`).

Guidance reuse: late in the schedule the guidance direction d = eps_c - eps_u changes little, so a "cond_reuse"
step evaluates only the conditional branch and takes d from the last step that ran both (`guided_eps_reuse`).

Everything here is pure: `ReuseSettings.plan(steps)` says per step what to run; the samplers act on it. The default
settings (and PRESETS["exact"]) plan every step "full" + "both", which is the reference sampler unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

UNET_MODES = ("full", "store", "reuse")


def setting(default, help: str, choices: tuple | None = None):
    """A settings field: its default, the help text the CLI and the service show, its allowed values."""
    return field(default=default, metadata={"help": help, "choices": choices})


GUIDANCE_MODES = ("both", "cond_reuse")


@dataclass
class FeatureCache:
    """The deep feature one UNet3D.forward hands to the next: mode "store" saves it, "reuse" reads it.

    depth d (1 = the outermost up block) keeps the input of up block n-d (n up blocks): a reuse call then runs
    conv_in, the down path until the first d*(layers_per_block+1) skips exist, and the last d up blocks. `feature`
    is a reference to the forward's own tensor (B,C,F,h,w), not a copy: storing allocates nothing. A reuse call
    needs the same batch as the store call (so the same guidance mode: ReuseSettings.plan ensures it).
    """
    mode: str = "store"
    depth: int = 1
    feature: torch.Tensor | None = None  # (B,C,F,h,w) input of up block n-depth, set by the last "store" forward

    def for_step(self, unet: str) -> "FeatureCache | None":
        """The `cache` argument of UNet3D.forward for a StepPlan.unet: None for "full", else this cache in that mode."""
        if unet not in UNET_MODES:
            raise ValueError(f"unet mode {unet!r} must be one of {UNET_MODES}")
        if unet == "full":
            return None
        self.mode = unet
        return self


@dataclass(frozen=True)
class StepPlan:
    """What one denoising step runs. unet: "full" | "store" | "reuse"; guidance: "both" | "cond_reuse"."""
    unet: str = "full"
    guidance: str = "both"


@dataclass(frozen=True)
class ReuseSettings:
    """When to reuse UNet features and the guidance difference; the defaults reuse nothing (bit-exact).

    cache_interval k: inside the window [cache_from, cache_until) of the schedule, one "store" step (full UNet)
    then k-1 "reuse" steps; 1 = off. Steps outside the window, early ones above all, stay "full".
    cache_depth: how many up blocks a reuse step runs (1 = the outermost: cheapest, furthest from the full UNet).
    guidance_reuse_after: the fraction of steps after which the unconditional branch is skipped ("cond_reuse"),
    eps = eps_c + (g - 1) * d_last (`guided_eps_reuse`); 1.0 = never. Step 0 always runs both branches.
    guidance_refresh m: among those late steps every m-th runs both branches again to refresh d_last; 0 = never.
    A fraction f marks step floor(f * steps + 0.5). Under no guidance (guidance_scale <= 1) `guidance` is moot.
    """
    cache_interval: int = setting(1, "UNet feature reuse (DeepCache): inside the cache window one full UNet step, "
                                   "then interval-1 steps that reuse its deep features; 1 = off")
    cache_from: float = setting(0.0, "start of the feature-reuse window, as a fraction of the steps")
    cache_until: float = setting(1.0, "end of the feature-reuse window (exclusive), as a fraction of the steps")
    cache_depth: int = setting(1, "up blocks a feature-reuse step runs (1 = the outermost: cheapest, furthest from "
                                "the full UNet)")
    guidance_reuse_after: float = setting(1.0, "fraction of the steps after which only the conditional branch runs, "
                                           "with the last measured guidance difference; 1 = never")
    guidance_refresh: int = setting(0, "among the guidance-reuse steps, every n-th runs both branches again to "
                                     "refresh the difference; 0 = never")


    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        for name, low in (("cache_interval", 1), ("cache_depth", 1), ("guidance_refresh", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name}={v!r} must be an integer >= {low}")
        for name in ("cache_from", "cache_until", "guidance_reuse_after"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0):  # refuses NaN
                raise ValueError(f"{name}={v!r} must be a fraction of the schedule between 0 and 1")
        if self.cache_from > self.cache_until:
            raise ValueError(f"cache_from={self.cache_from!r} must not exceed cache_until={self.cache_until!r}")

    def plan(self, steps: int) -> list[StepPlan]:
        """One StepPlan per step of a `steps`-step schedule."""
        self.validate()
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps={steps!r} must be an integer >= 1")
        lo, hi = _mark(self.cache_from, steps), _mark(self.cache_until, steps)
        late = max(_mark(self.guidance_reuse_after, steps), 1)  # d_last needs one step with both branches first
        m = self.guidance_refresh
        out: list[list[str]] = []
        since, stored = None, None  # steps since the last store and that store's guidance mode (its batch)
        for i in range(steps):
            r = i - late
            guidance = "cond_reuse" if r >= 0 and not (m and (r + 1) % m == 0) else "both"
            if self.cache_interval == 1 or not lo <= i < hi:
                unet, since = "full", None
            elif since is not None and since < self.cache_interval - 1 and stored == guidance:
                unet, since = "reuse", since + 1
            else:  # a new store also when the batch changed: a feature of 2B rows cannot serve a B-row call
                unet, since, stored = "store", 0, guidance
            out.append([unet, guidance])
        for i, p in enumerate(out):  # a store nobody reads is a plain full step
            if p[0] == "store" and (i + 1 == steps or out[i + 1][0] != "reuse"):
                p[0] = "full"
        return [StepPlan(u, g) for u, g in out]


def _mark(fraction: float, steps: int) -> int:
    """The step a schedule fraction marks, rounded half up (0.3 * 10 is 3.0000000000000004: still step 3)."""
    return math.floor(fraction * steps + 0.5)


def guided_eps_reuse(eps_c: torch.Tensor, d_last: torch.Tensor, g: float) -> torch.Tensor:
    """eps_c + (g - 1) d_last, with d_last = eps_c - eps_u of the last step that ran both branches. (B,C,F,h,w).

    With a fresh d (same step) this is the reference sampler's guidance up to float rounding:
    eps_c + (g-1)(eps_c - eps_u) = eps_u + g (eps_c - eps_u).
    """
    return eps_c + (g - 1.0) * d_last


# Named reuse settings. Only the reuse part of a speed preset lives here; the presets that also pick the solver
# (dpmpp-2m, trailing timesteps) and fewer steps are built from these in vidrd.runtime.quality. Chosen on the
# quality harness (BENCHMARKS.md, quality presets): feature reuse cost background and colour in every schedule
# tried, so no preset reuses features; guidance reuse late in a 15-step schedule stayed within the harness' noise,
# in a 10-step one it did not, so fast runs every step whole.
PRESETS = {
    "exact": ReuseSettings(),
    # the last 30% of the steps skip the unconditional branch; no feature reuse
    "balanced": ReuseSettings(guidance_reuse_after=0.7),
    # nothing reused: its speed is fewer solver steps and the precision (vidrd.runtime.quality)
    "fast": ReuseSettings(),
}
