"""The two option sets every command shares, each with the one function that adds its flags and the one that reads
them back: SamplerSettings (what to generate: vidrd.ref.sampler) and RuntimeOptions (how to run it), plus
`open_runtime`, the one way to build a Runtime.

`vidrd generate`, `bench`, `eval`, `serve` and the Ray deployment all take their execution flags from
`add_runtime_args` and open their runtime with `open_runtime`, so every execution flag works everywhere.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace

import torch

from vidrd.ref.attention import BACKENDS as ATTENTION
from vidrd.ref.sampler import SamplerSettings

from .backends import BACKENDS, COMPONENTS
from .loop import Limits, Runtime

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_FLAG = {v: k for k, v in DTYPES.items()}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
REFERENCE = "reference"  # --backend reference: the readable reference sampler instead of a runtime
OFFICIAL_NEGATIVE = "watermark"  # the official evaluator hard-codes this negative prompt (SPEC §4.14)


# ------------------------------------------------------------------------------------------ sampler settings

def add_sampler_args(group, defaults: SamplerSettings = SamplerSettings(), alternative: dict | None = None,
                     alternative_name: str = "the embedded model") -> None:
    """One flag per SamplerSettings field (--noise-recycle for noise_recycle), its help and choices from the field.

    Flags default to None (unset), so `sampler_settings` can tell what was given; the help names `defaults` and,
    for the fields in `alternative`, the value `alternative_name` uses instead."""
    alternative = alternative or {}
    for f in fields(SamplerSettings):
        flag, value, meta = f"--{f.name.replace('_', '-')}", getattr(defaults, f.name), f.metadata
        if isinstance(value, bool):
            group.add_argument(flag, action="store_true", default=None, help=f"{meta['help']} (default off)")
            continue
        alt = alternative.get(f.name, value)
        note = f"default {value}" + (f"; {alt} for {alternative_name}" if alt != value else "")
        group.add_argument(flag, type=type(value), choices=meta["choices"], default=None,
                           help=f"{meta['help']} ({note})")


def sampler_settings(args, defaults: SamplerSettings = SamplerSettings(), base: dict | None = None) -> SamplerSettings:
    """The settings of the flags of add_sampler_args (validated: ValueError names the bad value). A flag left out
    takes its value from `base` (e.g. the embedded model's settings), else from `defaults`."""
    base = base or {}
    given = {f.name: getattr(args, f.name) for f in fields(SamplerSettings)}
    return SamplerSettings(**{k: v if v is not None else base.get(k, getattr(defaults, k)) for k, v in given.items()})


# ----------------------------------------------------------------------------------------- runtime options

@dataclass(frozen=True)
class RuntimeOptions:
    """How a runtime runs: a backend per component, dtypes, compilation, attention kernels, the export and engine
    folders, device and threads. Validated on construction (ValueError naming the flag)."""
    backend: str = "torch"  # every component, unless named below; "reference": the reference sampler, no runtime
    text_backend: str | None = None
    unet_backend: str | None = None
    vae_backend: str | None = None
    dtype: str = "fp32"  # the networks'; latents, guidance and the DDIM update stay float32
    vae_dtype: str | None = None  # None: dtype, but fp32 for fp16 (the SD VAE decoder overflows in float16)
    compile: str | None = None  # torch.compile mode of the torch UNet and VAE decoder
    attention: str = "sdpa"  # attention kernels of the torch UNet (and of the reference sampler)
    export_dir: str | None = None  # `vidrd export` folder, for onnxruntime
    engine_dir: str | None = None  # `vidrd build-engines` folder, for tensorrt
    device: str | None = None  # None: cuda when available, else cpu (resolved); open_runtime: the model's device
    threads: int | None = None  # torch CPU threads (None: torch's choice)
    allow_slow_dtype: bool = False  # run bf16/fp16 where runtime.precision says it is slower than float32
    vae_channels_last: bool = False  # the torch VAE decoder's 2-D convolutions in channels-last (not bit-exact)
    fast_ops: bool = False  # the torch UNet's and VAE decoder's faster kernels (runtime/fast_ops.py; not bit-exact)

    def __post_init__(self):
        for name in ("export_dir", "engine_dir"):  # plain strings: the options are JSON rows in bench summaries
            if getattr(self, name) is not None:
                object.__setattr__(self, name, str(getattr(self, name)))
        if self.backend not in BACKENDS + (REFERENCE,):
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {BACKENDS + (REFERENCE,)}")
        for c in COMPONENTS:
            kind = getattr(self, f"{c}_backend")
            if kind is not None and kind not in BACKENDS:
                raise ValueError(f"unknown backend {kind!r} for --{c}-backend; choose one of {BACKENDS}")
        given = [c for c in COMPONENTS if getattr(self, f"{c}_backend")]
        if self.backend == REFERENCE and given:
            raise ValueError(f"--{'/--'.join(c + '-backend' for c in given)} choose runtime backends; they do not "
                             "apply to --backend reference")
        kinds = {self.kind(c) for c in COMPONENTS}
        if "onnxruntime" in kinds and not self.export_dir:
            raise ValueError("the onnxruntime backend needs --onnx DIR (make it with `vidrd export --out DIR`)")
        if "tensorrt" in kinds and not self.engine_dir:
            raise ValueError("the tensorrt backend needs --engines DIR (make it with `vidrd build-engines`)")
        for name, value, choices in (("dtype", self.dtype, DTYPES), ("vae-dtype", self.vae_dtype, DTYPES),
                                     ("compile", self.compile, COMPILE_MODES), ("attention", self.attention,
                                                                                 ATTENTION)):
            if value is not None and value not in choices:
                raise ValueError(f"--{name} {value!r}: choose one of {', '.join(choices)}")
        if self.compile and self.attention == "chunked":
            raise ValueError("--attention chunked loops over (batch, head) in Python around a process-wide oneDNN "
                             "setting, which torch.compile cannot trace: drop --compile or use --attention sdpa (with "
                             "--compile, --fast-ops keeps SDPA)")
        if self.compile and self.backend == REFERENCE:
            raise ValueError("--compile applies to the torch backend, not --backend reference")
        for c, used in (("unet", self.compile or self.attention != "sdpa"), ("vae", self.compile)):
            if used and self.kind(c) not in ("torch", REFERENCE):
                raise ValueError(f"--compile and --attention apply to the torch backend, not {self.kind(c)} (the "
                                 f"{c})")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"--threads {self.threads} must be >= 1")
        if not isinstance(self.allow_slow_dtype, bool):
            raise ValueError(f"--allow-slow-dtype {self.allow_slow_dtype!r} must be True or False")
        if not isinstance(self.vae_channels_last, bool):
            raise ValueError(f"--vae-channels-last {self.vae_channels_last!r} must be True or False")
        if not isinstance(self.fast_ops, bool):
            raise ValueError(f"--fast-ops {self.fast_ops!r} must be True or False")
        if self.fast_ops and "torch" not in (self.kind("unet"), self.kind("vae")):
            what = ("--backend reference (the reference sampler runs as written)" if self.backend == REFERENCE else
                    f"exported graphs (the UNet: {self.kind('unet')}, the VAE decoder: {self.kind('vae')})")
            raise ValueError(f"--fast-ops applies to the torch UNet and VAE decoder, not {what}")
        if self.vae_channels_last and self.kind("vae") != "torch":
            what = ("--backend reference (the reference sampler's VAE)" if self.kind("vae") == REFERENCE else
                    f"the {self.kind('vae')} VAE decoder (an exported graph keeps the layout it was exported with)")
            raise ValueError(f"--vae-channels-last applies to the torch VAE decoder, not {what}")

    def kind(self, component: str) -> str:
        """The backend of `component` ('text', 'unet' or 'vae')."""
        return getattr(self, f"{component}_backend") or self.backend

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_vae_dtype(self) -> torch.dtype:
        """The VAE decoder's dtype: vae_dtype, else the networks' dtype but float32 instead of float16."""
        if self.vae_dtype is not None:
            return DTYPES[self.vae_dtype]
        return torch.float32 if self.torch_dtype == torch.float16 else self.torch_dtype

    def resolved(self) -> "RuntimeOptions":
        """These options with the device decided (cuda when available), for a command about to load its model;
        ValueError for fp16 on the CPU (slow or unsupported there), and for a dtype the device runs slower than
        float32 (runtime.precision: bf16 on a CPU without bf16 units) unless allow_slow_dtype."""
        from .precision import check_dtype

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch.device(device).type == "cpu" and torch.float16 in (self.torch_dtype, self.torch_vae_dtype):
            raise ValueError("--dtype fp16 needs a GPU; use fp32 or bf16 on the CPU")
        for flag, dtype in (("--dtype", self.torch_dtype), ("--vae-dtype", self.torch_vae_dtype)):
            try:
                check_dtype(dtype, device, self.allow_slow_dtype)
            except ValueError as e:
                raise ValueError(f"{flag} {_FLAG[dtype]}: {str(e).replace('(allow_slow)', '(--allow-slow-dtype)')}") \
                    from None
        return replace(self, device=device)


def add_runtime_args(o, reference: bool = False) -> None:
    """The execution flags of RuntimeOptions on parser or group `o`; `reference` offers --backend reference."""
    kinds = BACKENDS + ((REFERENCE,) if reference else ())
    o.add_argument("--backend", choices=kinds, default="torch",
                   help="torch (default), onnxruntime (--onnx), tensorrt (--engines) run the lean runtime"
                   + ("; reference runs the readable reference sampler" if reference else ""))
    for c, what in (("text", "the text encoder"), ("unet", "the UNet"), ("vae", "the VAE decoder")):
        o.add_argument(f"--{c}-backend", choices=BACKENDS, help=f"another backend for {what} only")
    o.add_argument("--onnx", metavar="DIR", help="exported ONNX files (`vidrd export`), for onnxruntime")
    o.add_argument("--engines", metavar="DIR", help="TensorRT engines (`vidrd build-engines`), for tensorrt")
    o.add_argument("--compile", choices=COMPILE_MODES,
                   help="torch.compile the UNet and VAE decoder (torch backend); reduce-overhead uses CUDA graphs on "
                   "a GPU")
    o.add_argument("--attention", choices=ATTENTION, default="sdpa",
                   help="attention kernels of the torch UNet" + (" and the reference sampler" if reference else "")
                   + " (triton needs a GPU)")
    o.add_argument("--dtype", choices=tuple(DTYPES),
                   help="the networks' dtype (default fp32; bf16 under --quality balanced/fast where it is fast); "
                   "latents and the DDIM update stay float32")
    o.add_argument("--vae-dtype", choices=tuple(DTYPES),
                   help="the VAE decoder's dtype (default: --dtype; fp32 for --dtype fp16, the SD VAE overflows in "
                   "fp16)")
    o.add_argument("--allow-slow-dtype", action="store_true",
                   help="run a --dtype/--vae-dtype this device runs slower than fp32 (bf16 on a CPU without bf16 "
                   "units) instead of refusing it")
    o.add_argument("--vae-channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="run the torch VAE decoder's 2-D convolutions in channels-last memory format: about 1.2x "
                   "faster decoding on CPU, not bit-exact (within 1e-4) (default off; on under --quality "
                   "balanced/fast with the torch VAE decoder)")
    o.add_argument("--fast-ops", action=argparse.BooleanOptionalAction, default=None,
                   help="faster kernels for the torch UNet and VAE decoder, not bit-exact (within float rounding): "
                   "temporal convolutions as 2-D ones, bf16 CPU attention in chunks with float32 scores, the CPU VAE "
                   "decode a frame per call (default off; on under --quality balanced/fast)")
    o.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    o.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def runtime_options(args) -> RuntimeOptions:
    """The RuntimeOptions of the flags of add_runtime_args (validated)."""
    return RuntimeOptions(args.backend, args.text_backend, args.unet_backend, args.vae_backend, args.dtype or "fp32",
                          args.vae_dtype, args.compile, args.attention, args.onnx, args.engines, args.device,
                          args.threads, args.allow_slow_dtype, bool(args.vae_channels_last), bool(args.fast_ops))


# ------------------------------------------------------------------------------------------------ opening

def open_runtime(model, options: RuntimeOptions = RuntimeOptions(), limits: Limits = Limits()) -> Runtime:
    """A Runtime for requests up to `limits` on `model`, with the backends, dtypes, compilation, attention, device
    (default: the model's) and threads of `options`. Load the model in options.torch_dtype on that device.

    Raises ValueError when a backend cannot run in the dtype asked for (an ONNX export or engine of another
    precision), naming the flag that fixes it.
    """
    from . import backends

    o = options if options.device else replace(options, device=str(model.device))
    if o.backend == REFERENCE:
        raise ValueError("--backend reference runs the reference sampler (vidrd.ref.sampler.generate), not a runtime")
    if o.threads is not None:
        torch.set_num_threads(o.threads)
    device = torch.device(o.device)
    want = {"text": o.torch_dtype, "unet": o.torch_dtype, "vae": o.torch_vae_dtype}
    made = {}
    for name in COMPONENTS:
        kind = o.kind(name)
        fast = o.fast_ops and kind == "torch"
        extra = {"unet": {"compile": o.compile, "attention": o.attention, "fast_ops": fast},
                 "vae": {"compile": o.compile, "channels_last": o.vae_channels_last, "fast_ops": fast}}.get(name, {})
        be = backends.make(kind, name, model, want[name], device, export_dir=o.export_dir, engine_dir=o.engine_dir,
                           **extra)
        if be.dtype != want[name]:
            flag = "--vae-dtype" if name == "vae" else "--dtype"
            raise ValueError(f"the {kind} {name} runs in {be.dtype} but {want[name]} was asked for: export or build "
                             f"that component in {want[name]}, or ask for {be.dtype} ({flag} "
                             f"{_FLAG.get(be.dtype, be.dtype)})")
        made[name] = be
    return Runtime(model, made["text"], made["unet"], made["vae"], limits, device)


def prepare_reference(model, options: RuntimeOptions) -> None:
    """The reference sampler's share of `options` (--backend reference): its UNet's attention kernels and the torch
    threads. dtype and device are the model's (load it with options.torch_dtype on options.device)."""
    from vidrd.ref.attention import set_attention

    assert options.backend == REFERENCE, options.backend
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    set_attention(model.unet, options.attention)
