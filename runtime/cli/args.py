"""The one mapping between flags and the option sets: SamplerSettings (what to generate) and RuntimeOptions (how to
run it) each become flags from their fields (name, default, help, choices), and are read back from them; --quality
resolves a preset over what was left out. Every command that generates takes its flags from here."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from vidrd.ref.sampler import SamplerSettings
from vidrd.runtime.options import REFERENCE, TOGGLES, RuntimeOptions, flag
from vidrd.runtime.quality import QUALITIES, Resolved, check_reuse, feature_reuse_blocker, resolve

# ------------------------------------------------------------------------------------------ sampler settings


def add_sampler_args(group, defaults: SamplerSettings = SamplerSettings(), alternative: dict | None = None,
                     alternative_name: str = "the embedded model") -> None:
    """One flag per SamplerSettings field (--noise-recycle for noise_recycle), its help and choices from the field.

    Flags default to None (unset), so `sampler_settings` can tell what was given; the help names `defaults` and,
    for the fields in `alternative`, the value `alternative_name` uses instead."""
    alternative = alternative or {}
    for f in fields(SamplerSettings):
        spelled, value, meta = flag(f.name), getattr(defaults, f.name), f.metadata
        if isinstance(value, bool):
            group.add_argument(spelled, action="store_true", default=None, help=f"{meta['help']} (default off)")
            continue
        alt = alternative.get(f.name, value)
        note = f"default {value}" + (f"; {alt} for {alternative_name}" if alt != value else "")
        group.add_argument(spelled, type=type(value), choices=meta["choices"], default=None,
                           help=f"{meta['help']} ({note})")


def sampler_settings(args, defaults: SamplerSettings = SamplerSettings(), base: dict | None = None) -> SamplerSettings:
    """The settings of the flags of add_sampler_args (validated: ValueError names the bad value). A flag left out
    takes its value from `base` (e.g. the embedded model's settings), else from `defaults`."""
    base = base or {}
    given = {f.name: getattr(args, f.name) for f in fields(SamplerSettings)}
    return SamplerSettings(**{k: v if v is not None else base.get(k, getattr(defaults, k)) for k, v in given.items()})


# ----------------------------------------------------------------------------------------- runtime options


def add_runtime_args(o, reference: bool = False) -> None:
    """One flag per RuntimeOptions field on parser or group `o`; `reference` offers --backend reference. Options a
    preset may choose (toggles, --dtype) default to unset, so a preset can tell what was given."""
    for f in fields(RuntimeOptions):
        meta, spelled = f.metadata, flag(f.name)
        choices = meta["choices"]
        if f.name == "backend" and not reference:
            choices = tuple(c for c in choices if c != REFERENCE)
        help = meta["help"] if reference or f.name != "backend" else meta["help"].split("; reference")[0]
        if meta["toggle"] is not None:
            o.add_argument(spelled, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif isinstance(f.default, bool):
            o.add_argument(spelled, dest=f.name, action="store_true", help=help)
        else:
            o.add_argument(spelled, dest=f.name, choices=choices, metavar=meta["metavar"], type=meta["kind"],
                           default=None if meta["preset"] else f.default, help=help)


def runtime_options(args) -> RuntimeOptions:
    """The RuntimeOptions of the flags of add_runtime_args (validated); unset flags take the fields' defaults."""
    given = {f.name: getattr(args, f.name) for f in fields(RuntimeOptions)}
    return RuntimeOptions(**{k: v for k, v in given.items() if v is not None})


# -------------------------------------------------------------------------------------------------- --quality


def add_quality_arg(group) -> None:
    """--quality on a command's parser or group."""
    group.add_argument("--quality", choices=QUALITIES,
                       help="exact: the official sampler; balanced: DPM-Solver++ on trailing timesteps at 0.6x the "
                       "steps, guidance reuse in the last 30%%, bf16 where fast; fast: the same at 0.4x the steps "
                       "without reuse. Settings given explicitly win (runtime/README.md, quality presets)")


def explicit_args(args) -> frozenset:
    """The settings given on the command line: sampler flags not left unset, and the options a preset may choose
    (--dtype, the toggles such as --[no-]fast-ops)."""
    names = {f.name for f in fields(SamplerSettings) if getattr(args, f.name, None) is not None}
    chosen = {f.name for f in fields(RuntimeOptions) if f.metadata["preset"]}
    return frozenset(names | {name for name in chosen if getattr(args, name, None) is not None})


def apply_args(args, settings: SamplerSettings, options: RuntimeOptions,
               log=lambda line: print(line, file=sys.stderr)) -> tuple[SamplerSettings, RuntimeOptions,
                                                                       Resolved | None]:
    """A command's --quality -> (settings, options, the Resolved or None), options resolved (device decided, dtype
    checked). Without --quality the settings and options stand (feature reuse checked against the UNet); with it,
    the preset's, and its line is logged."""
    if args.quality is None:
        check_reuse(settings, feature_reuse_blocker(options))
        return settings, options.resolved(), None
    q = resolve(args.quality, settings, options, explicit_args(args))
    log(q.line())
    return q.settings, q.options, q


__all__ = ["TOGGLES", "add_quality_arg", "add_runtime_args", "add_sampler_args", "apply_args", "explicit_args",
           "runtime_options", "sampler_settings"]
