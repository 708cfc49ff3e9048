"""DPM-Solver++(2M): exact where the ODE is trivial, closer than DDIM to the exact solution of a Gaussian's ODE."""
import math
from dataclasses import replace

import pytest
import torch

from tolerances import POINT_MASS_FP64, RUNTIME_LATENT_REL

from vidrd.ref.config import SchedulerConfig
from vidrd.ref.ddim import DDIM
from vidrd.ref.dpmpp import DPMSolverPP2M
from vidrd.ref.sampler import SamplerSettings, generate
from vidrd.ref.weights import random_model

CFG = SchedulerConfig()


def _solve(steps, eps_fn, x):
    """Both solvers from the same x_T with the same exact noise predictor -> (ddim, dpm, ab_T, ab_final)."""
    ddim, dpm = DDIM(CFG), DPMSolverPP2M(CFG, steps)
    xd, xp = x.clone(), x.clone()
    for i, t in enumerate(ddim.timesteps(steps).tolist()):
        a, _ = ddim.alphas(t, steps)
        xd = ddim.step(eps_fn(xd, a), t, xd, steps)
        xp = dpm.step(eps_fn(xp, a), i, xp)
    return xd, xp, dpm.alpha[0] ** 2, dpm.alpha[-1] ** 2


def test_point_mass_is_solved_exactly():
    """Data = one point: the exact x0 prediction is constant and the update lands on alpha x0 + sigma eps."""
    x0 = torch.linspace(-1, 1, 64, dtype=torch.float64)
    noise = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a_t = DPMSolverPP2M(CFG, 7).alpha[0] ** 2
    x = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * noise
    _, xp, _, a_f = _solve(7, lambda x, a: (x - math.sqrt(a) * x0) / math.sqrt(1 - a), x)
    torch.testing.assert_close(xp, math.sqrt(a_f) * x0 + math.sqrt(1 - a_f) * noise, rtol=0, atol=POINT_MASS_FP64)


@pytest.mark.parametrize("steps", [20, 50, 200])
def test_gaussian_ode_error_below_ddim(steps):
    """Data ~ N(0, s^2): eps(x) = sigma x / (a s^2 + 1 - a) and the ODE's solution is x_T sqrt(a s^2 + 1 - a)
    / sqrt(a_T s^2 + 1 - a_T)."""
    s = 0.5
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xd, xp, a_t, a_f = _solve(steps, lambda x, a: math.sqrt(1 - a) * x / (a * s * s + 1 - a), x)
    exact = x * math.sqrt(a_f * s * s + 1 - a_f) / math.sqrt(a_t * s * s + 1 - a_t)
    err_ddim, err_dpm = float((xd - exact).abs().max()), float((xp - exact).abs().max())
    assert err_dpm < err_ddim * (0.5 if steps >= 200 else 1.0), (err_dpm, err_ddim)


def test_first_and_few_step_last_steps_are_first_order():
    dpm = DPMSolverPP2M(CFG, 10)
    assert dpm.coefficients(0)[2] == 0 and dpm.coefficients(9)[2] == 0 and dpm.coefficients(5)[2] != 0
    assert DPMSolverPP2M(CFG, 20).coefficients(19)[2] != 0


def test_sampler_runs_the_solver_on_the_same_schedule():
    model = random_model("tiny", 0)
    s = SamplerSettings(height=16, width=16, frames=4, steps=4, clips=2, overlap=2)
    dpm = replace(s, solver="dpmpp-2m")
    v_ddim, _ = generate(model, ["a"], None, s, torch.Generator().manual_seed(0))
    v_dpm, lat = generate(model, ["a"], None, dpm, torch.Generator().manual_seed(0))
    again, lat2 = generate(model, ["a"], None, dpm, torch.Generator().manual_seed(0))
    assert torch.equal(lat, lat2)  # deterministic
    assert v_dpm.shape == v_ddim.shape and not torch.equal(v_dpm, v_ddim)
    with pytest.raises(ValueError, match="solver='euler'"):
        SamplerSettings(solver="euler")


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_runtime_solver_matches_reference(guidance):
    from vidrd.runtime.loop import Limits, Request
    from vidrd.runtime.options import open_runtime
    model = random_model("tiny", 0)
    s = SamplerSettings(height=16, width=16, frames=4, steps=5, clips=2, overlap=2, guidance_scale=guidance,
                        solver="dpmpp-2m")
    rt = open_runtime(model, limits=Limits(batch=2, frames=4, height=16, width=16, steps=5, overlap=2))
    clips = list(rt.generate(Request(("a", "b"), None, s, seed=3, float_video=True)))
    latents = torch.stack([c.latents for c in clips])
    _, ref = generate(model, ["a", "b"], None, s, torch.Generator().manual_seed(3))
    assert (latents - ref).abs().max() <= RUNTIME_LATENT_REL * ref.abs().max()


# ------------------------------------------------------------------------------------------- trailing timesteps

def test_trailing_timesteps():
    """Trailing spacing starts at the last training timestep and steps down by T/steps (rounded); leading is the
    official schedule, unchanged."""
    ddim = DDIM(CFG)
    assert ddim.timesteps(10, "trailing").tolist() == list(range(999, 0, -100))
    assert ddim.timesteps(4, "trailing").tolist() == [999, 749, 499, 249]
    assert ddim.timesteps(10).tolist() == list(range(901, 0, -100))  # leading: the official schedule
    for steps in (1, 7, 15, 25, 999, 1000):
        ts = ddim.timesteps(steps, "trailing").tolist()
        gaps = [a - b for a, b in zip(ts, ts[1:])]
        assert len(ts) == steps and ts[0] == 999 and all(abs(g - 1000 / steps) <= 1 for g in gaps), (steps, ts)
    with pytest.raises(ValueError, match="spacing='uniform' must be one of"):
        ddim.timesteps(10, "uniform")
    with pytest.raises(ValueError, match="spacing='uniform' must be one of"):
        SamplerSettings(spacing="uniform")


@pytest.mark.parametrize("steps", [10, 15])
def test_trailing_steps_go_to_the_next_timestep(steps):
    """Each step's alpha_bar_prev is the next timestep's (uneven gaps at 15 steps), the last one the final alpha_bar;
    the first step of DPM-Solver++ (first order) is then the DDIM step on the same schedule."""
    ddim, dpm = DDIM(CFG), DPMSolverPP2M(CFG, steps, "trailing")
    ts = ddim.timesteps(steps, "trailing").tolist()
    ab = ddim.alphas_cumprod
    for t, nxt in zip(ts, ts[1:] + [None]):
        a, ap = ddim.alphas(t, steps, "trailing")
        assert a == float(ab[t]) and ap == float(ab[nxt] if nxt is not None else ddim.final_alpha_cumprod)
    assert dpm.alpha[0] ** 2 == pytest.approx(float(ab[999])) and dpm.alpha[-1] ** 2 == pytest.approx(float(ab[0]))
    g = torch.Generator().manual_seed(5)
    x, eps = torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    torch.testing.assert_close(dpm.step(eps, 0, x), ddim.step(eps, 999, x, steps, "trailing"), rtol=0,
                               atol=POINT_MASS_FP64)
    with pytest.raises(ValueError, match="timestep 998 is not in the 10-step trailing schedule"):
        ddim.alphas(998, 10, "trailing")


@pytest.mark.parametrize("solver", ["ddim", "dpmpp-2m"])
def test_runtime_trailing_matches_reference(solver):
    """Trailing spacing through the runtime (its per-step factor tables) equals the reference sampler; it changes
    the output (the first step is another noise level)."""
    from vidrd.runtime.loop import Limits, Request
    from vidrd.runtime.options import open_runtime
    model = random_model("tiny", 0)
    s = SamplerSettings(height=16, width=16, frames=4, steps=5, clips=2, overlap=2, solver=solver, spacing="trailing")
    rt = open_runtime(model, limits=Limits(batch=1, frames=4, height=16, width=16, steps=5, overlap=2))
    clips = list(rt.generate(Request(("a",), None, s, seed=3, float_video=True)))
    latents = torch.stack([c.latents for c in clips])
    _, ref = generate(model, ["a"], None, s, torch.Generator().manual_seed(3))
    _, leading = generate(model, ["a"], None, replace(s, spacing="leading"), torch.Generator().manual_seed(3))
    assert (latents - ref).abs().max() <= RUNTIME_LATENT_REL * ref.abs().max()
    assert (leading - ref).abs().max() > 1e-3 * ref.abs().max()
