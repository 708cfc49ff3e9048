"""`--quality exact|balanced|fast`: one name for a speed/quality trade-off, resolved here for `vidrd
generate`, `bench`, `eval`, the service's `quality` field and the Python API (`resolve`).

exact     nothing changes: the official sampler (DDIM, no reuse) at the requested steps, the dtype asked for.
balanced  DPM-Solver++(2M) on trailing timesteps (vidrd.ref.ddim: the first step at t = 999, and staged guidance at the
          official windows' noise levels, SamplerSettings.pinned) at max(4, round(0.6 x steps)) steps,
          vidrd.ref.reuse.PRESETS["balanced"] (guidance reuse in the last 30% of the steps), bf16 networks where
          runtime.precision.bf16_support says bf16 is fast on the device, and the torch VAE decoder's 2-D convolutions
          in channels-last (--vae-channels-last: ~1.2x faster on CPU, within 1e-4 of the default layout), and the
          torch backends' faster kernels (--fast-ops, runtime/fast_ops.py: within float rounding).
fast      the same at max(4, round(0.4 x steps)) steps and without guidance reuse (PRESETS["fast"] reuses nothing).

--steps is always the requested step count, which a preset scales (that is its point: it is compared with the exact
run at the requested steps), never above the request (a 3-step request stays at 3 steps). Otherwise a preset fills
only what was not set explicitly: a given --solver, --spacing, reuse option, --dtype, --[no-]vae-channels-last or
--[no-]fast-ops wins.
With `exact` an explicit reuse option, another solver or spacing is a contradiction (ValueError). Feature reuse
(which no preset turns on) needs the eager torch UNet: where the UNet is an exported graph or compiled, an explicit
--cache-interval is an error. Channels-last needs the torch VAE decoder: elsewhere a preset leaves it off (and says
so), and an explicit --vae-channels-last is refused (RuntimeOptions); --fast-ops likewise needs a torch UNet or VAE.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from vidrd.ref.reuse import PRESETS as REUSE
from vidrd.ref.reuse import ReuseSettings
from vidrd.ref.sampler import SamplerSettings

from .backends import COMPONENTS
from .options import NAMES, REFERENCE, TOGGLES, RuntimeOptions, flag

QUALITIES = ("exact", "balanced", "fast")
MIN_STEPS = 4
REUSE_FIELDS = tuple(f.name for f in fields(ReuseSettings))


@dataclass(frozen=True)
class Preset:
    """What a quality preset sets where the request did not: solver and spacing (None: keep), steps as a fraction
    of the requested steps, the reuse settings, whether the networks run in bf16 where it is fast, and which on/off
    execution options (options.TOGGLES) it turns on where they apply."""
    solver: str | None
    spacing: str | None
    step_fraction: float
    reuse: ReuseSettings
    bf16: bool
    toggles: frozenset = frozenset()


PRESETS = {
    "exact": Preset(None, None, 1.0, REUSE["exact"], False),
    "balanced": Preset("dpmpp-2m", "trailing", 0.6, REUSE["balanced"], True, frozenset(TOGGLES)),
    "fast": Preset("dpmpp-2m", "trailing", 0.4, REUSE["fast"], True, frozenset(TOGGLES)),
}


def feature_reuse_blocker(options: RuntimeOptions) -> str | None:
    """Why the UNet of `options` cannot take a FeatureCache (Backend.feature_cache), or None when it can."""
    kind = options.kind("unet")
    if kind not in ("torch", REFERENCE):
        return f"the {kind} UNet is an exported graph, which keeps no features between calls"
    if options.compile:
        return "the compiled UNet (--compile) takes no feature cache"
    return None


def check_reuse(settings: SamplerSettings, blocker: str | None, spell=flag) -> None:
    """ValueError before any work when `settings` ask for feature reuse and `blocker` says why the UNet cannot."""
    if settings.cache_interval > 1 and blocker:
        raise ValueError(f"{spell('cache_interval')} {settings.cache_interval} (UNet feature reuse) needs the eager "
                         f"torch UNet: {blocker}")


@dataclass(frozen=True)
class Resolved:
    """A quality preset applied: the settings and (where execution options were given) the runtime options to run,
    and why each was chosen."""
    quality: str
    settings: SamplerSettings
    options: RuntimeOptions | None  # resolved (device decided, dtype checked); None: the caller's dtype stands
    requested_steps: int
    why: dict  # "steps", "reuse", "vae_channels_last", "fast_ops", "dtype" -> the reason, in words

    def line(self) -> str:
        """One line: what the preset resolved to (solver, steps, reuse, VAE layout, dtype) and why."""
        s = self.settings
        steps = f"{s.steps} steps ({self.why['steps']})" if "steps" in self.why else f"{s.steps} steps"
        if s.cache_interval > 1:
            feature = (f"feature reuse every {s.cache_interval} steps over [{s.cache_from:g}, {s.cache_until:g}) of "
                       f"the schedule at depth {s.cache_depth}")
        else:
            feature = "no feature reuse" + (f" ({self.why['reuse']})" if "reuse" in self.why else "")
        if not s.cfg:
            guidance = "no guidance reuse (no guidance)"
        elif s.guidance_reuse_after < 1:
            guidance = f"guidance reuse after {s.guidance_reuse_after:g} of the steps" + (
                f", refreshed every {s.guidance_refresh}" if s.guidance_refresh else "")
        else:
            guidance = "no guidance reuse"
        vae = ""  # each toggle, where the preset or the user chose it
        for name, t in TOGGLES.items():
            if self.options is not None and (getattr(self.options, name) or name in self.why):
                vae += ", " + (t.on if getattr(self.options, name) else t.off) + (
                    f" ({self.why[name]})" if name in self.why else "")
        dtype = "the service's dtype" if self.options is None else self.options.dtype
        dtype += f" ({self.why['dtype']})" if "dtype" in self.why else ""
        official = " (the official sampler)" if self.quality == "exact" else ""
        spacing = "" if s.spacing == "leading" else f" ({s.spacing} timesteps)"
        return f"quality {self.quality}{official}: {s.solver}{spacing}, {steps}, {feature}, {guidance}{vae}, {dtype}"

    def summary(self) -> dict:
        """JSON-ready: the preset, the resolved solver, steps, reuse settings, dtype and VAE layout, the reasons."""
        o = self.options
        return {"quality": self.quality, "solver": self.settings.solver, "spacing": self.settings.spacing,
                "steps": self.settings.steps,
                "requested_steps": self.requested_steps, **asdict(self.settings.reuse()),
                "dtype": None if o is None else o.dtype,
                **{name: None if o is None else getattr(o, name) for name in TOGGLES}, "why": dict(self.why)}


def resolve(quality: str, settings: SamplerSettings, options: RuntimeOptions | None = None, explicit=(), *,
            spell=flag, feature_reuse_off: str | None = None) -> Resolved:
    """Apply preset `quality` to the requested `settings` and execution `options`.

    explicit: the names of the settings the user gave (SamplerSettings fields, "dtype" for options.dtype and
    "vae_channels_last"/"fast_ops" for those options); the preset leaves those as they are. options None: only the
    sampler settings are resolved (the service, whose runtime's dtype and VAE layout are its own), and
    `feature_reuse_off` says why its UNet cannot reuse features (None: it can).
    spell: how errors name a setting (the CLI's --flag, the service's field). Raises ValueError for a
    contradiction, before any work."""
    if quality not in PRESETS:
        raise ValueError(f"{spell('quality')} {quality!r}: choose one of {', '.join(QUALITIES)}")
    explicit = frozenset(explicit)
    p, why = PRESETS[quality], {}
    blocker = feature_reuse_off
    if options is not None:
        options = options.resolved()  # the device, and an explicit slow dtype refused, before the preset's choice
        blocker = feature_reuse_blocker(options)
    if quality == "exact":
        exact = SamplerSettings()
        for name in ("solver", "spacing") + REUSE_FIELDS:
            if name in explicit and getattr(settings, name) != getattr(exact, name):
                raise ValueError(f"{spell('quality')} exact runs the official sampler; drop {spell(name)} or choose "
                                 f"{spell('quality')} balanced|fast")
        check_reuse(settings, blocker, spell)
        if options is not None:
            for name in TOGGLES:
                options = _toggle(name, p, options, name in explicit, why)
        return Resolved(quality, settings, options, settings.steps, why)

    change = {name: getattr(p.reuse, name) for name in REUSE_FIELDS if name not in explicit}
    for name in ("solver", "spacing"):
        if name not in explicit:
            change[name] = getattr(p, name)
    req = settings.steps  # the requested steps, given or default: the preset's UNet budget is a fraction of them
    raw = round(p.step_fraction * req)
    change["steps"] = min(req, max(MIN_STEPS, raw))
    why["steps"] = f"{p.step_fraction:g} x {req} requested" + (
        "" if change["steps"] == raw else f", kept within {min(MIN_STEPS, req)}..{req}")
    if settings.continuation == "fifo":  # diagonal denoising: DDIM, nothing reused, at least a level per frame
        for name in ("solver",) + REUSE_FIELDS:
            change.pop(name, None)
        if change["steps"] < min(req, settings.frames):
            change["steps"] = min(req, settings.frames)
            why["steps"] += f", at least frames={settings.frames} with continuation fifo"
        why["solver"] = "continuation fifo runs DDIM without reuse"
    if blocker and "cache_interval" not in explicit and p.reuse.cache_interval > 1:
        change["cache_interval"] = 1
        why["reuse"] = blocker
    resolved = replace(settings, **change)  # validates: an explicit value that contradicts the preset's is named
    check_reuse(resolved, blocker, spell)
    if options is not None:
        for name in TOGGLES:
            options = _toggle(name, p, options, name in explicit, why)
        options = _dtype(p, options, "dtype" in explicit, why)
    return Resolved(quality, resolved, options, settings.steps, why)


def _toggle(name: str, p: Preset, options: RuntimeOptions, given: bool, why: dict) -> RuntimeOptions:
    """On/off option `name` under preset `p`: as given (said so), else on where the preset turns it on and one of
    the components it needs runs on torch; why[name] says which."""
    if given:
        why[name] = f"{flag(name) if getattr(options, name) else '--no-' + flag(name)[2:]} given"
        return options
    if name not in p.toggles:
        return options
    t = TOGGLES[name]
    if options.backend == REFERENCE:
        why[name] = "kept: the reference sampler runs as written"
        return options
    parts = options.torch_parts(t.needs)
    if not parts:
        why[name] = ("kept: the " + " and the ".join(NAMES[c] for c in t.needs) + " are exported graphs"
                     if len(t.needs) > 1 else f"kept: the {options.kind(t.needs[0])} {NAMES[t.needs[0]]} is an "
                     "exported graph")
        return options
    why[name] = f"torch {' and '.join(NAMES[c] for c in parts)}: {t.gain}"
    return replace(options, **{name: True})


def _dtype(p: Preset, options: RuntimeOptions, given: bool, why: dict) -> RuntimeOptions:
    """The networks' dtype of preset `p`: bf16 where runtime.precision says it is fast, else float32."""
    from .precision import bf16_support

    if given:
        why["dtype"] = f"{flag('dtype')} given"
        return options
    if not p.bf16:
        return options
    graphs = sorted({options.kind(c) for c in COMPONENTS} - {"torch", REFERENCE})
    if graphs:
        why["dtype"] = f"kept: exported graphs ({', '.join(graphs)}) run in the precision they were exported in"
        return options
    if options.backend == REFERENCE:
        why["dtype"] = "kept: the reference sampler's latents and guidance follow the networks' dtype"
        return options
    fast, reason = bf16_support(options.device)
    why["dtype"] = reason if fast else f"bf16 is not fast here: {reason}"
    return replace(options, dtype="bf16" if fast else "fp32").resolved()
