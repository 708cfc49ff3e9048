"""How a runtime runs (RuntimeOptions: backends, dtypes, compilation, attention, device, threads and the on/off
execution options a quality preset may turn on) and `open_runtime`, the one way to build a Runtime (or, for
--backend reference, a ReferenceRuntime with the same interface).

Each option is declared once, as a field with its help, choices and command-line spelling: `vidrd.runtime.cli.args`
makes every command's flags from the fields, `vidrd.runtime.quality` turns the toggles on by their metadata, and the
backends act on them. A new execution option is a field here, its use in a backend, and its test.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from vidrd.ref.attention import BACKENDS as ATTENTION

from .backends import BACKENDS, COMPONENTS
from .loop import Limits, Runtime
from .reference import ReferenceRuntime

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP8 = "fp8"  # --dtype fp8: bf16 networks, the torch UNet's GEMMs in FP8 (backends/fp8.py); buffers are bf16
_FLAG = {v: k for k, v in DTYPES.items()}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
REFERENCE = "reference"  # --backend reference: the readable reference sampler behind the runtime's interface
OFFICIAL_NEGATIVE = "watermark"  # the official evaluator hard-codes this negative prompt (SPEC §4.14)


NAMES = {"text": "text encoder", "unet": "UNet", "vae": "VAE decoder"}


@dataclass(frozen=True)
class Toggle:
    """An on/off option a quality preset may turn on: it acts where one of `needs` runs on torch; `on`/`off` name
    it in a preset's line, `gain` says what it buys."""
    needs: tuple
    on: str
    off: str
    gain: str


def _option(default, help: str, *, choices=None, flag: str | None = None, metavar: str | None = None, kind=None,
            toggle: Toggle | None = None, preset: bool = False):
    """A RuntimeOptions field: default, help, choices and command-line flag (default --the-name), in one place.
    preset: a quality preset may choose it where it was not given (toggles always may)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "metavar": metavar,
                                            "kind": kind, "toggle": toggle, "preset": preset or toggle is not None})


def flag(name: str) -> str:
    """The command-line spelling of an option or setting: export_dir -> --onnx, fast_ops -> --fast-ops."""
    f = next((f for f in fields(RuntimeOptions) if f.name == name), None)
    return (f.metadata["flag"] if f is not None and f.metadata["flag"] else None) or "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------------------- runtime options

@dataclass(frozen=True)
class RuntimeOptions:
    """How a runtime runs: a backend per component, dtypes, compilation, attention kernels, the export and engine
    folders, device and threads. Validated on construction (ValueError naming the flag)."""
    backend: str = _option("torch", "torch (default), onnxruntime (--onnx), tensorrt (--engines), aoti (--onnx: "
                           "AOTInductor packages) run the lean runtime; reference runs the readable reference sampler",
                           choices=BACKENDS + (REFERENCE,))
    text_backend: str | None = _option(None, "another backend for the text encoder only", choices=BACKENDS)
    unet_backend: str | None = _option(None, "another backend for the UNet only", choices=BACKENDS)
    vae_backend: str | None = _option(None, "another backend for the VAE decoder only", choices=BACKENDS)
    export_dir: str | None = _option(None, "an export folder: ONNX files (`vidrd export`) for onnxruntime, "
                                     "AOTInductor packages (`vidrd export --format aoti`) for aoti", flag="--onnx",
                                     metavar="DIR")
    engine_dir: str | None = _option(None, "TensorRT engines (`vidrd build-engines`), for tensorrt", flag="--engines",
                                     metavar="DIR")
    compile: str | None = _option(None, "torch.compile the UNet and VAE decoder (torch backend); reduce-overhead uses "
                                  "CUDA graphs on a GPU", choices=COMPILE_MODES)
    attention: str = _option("sdpa", "attention kernels of the torch UNet and the reference sampler (triton needs a "
                             "GPU)", choices=ATTENTION)
    dtype: str = _option("fp32", "the networks' dtype (default fp32; bf16 under --quality balanced/fast where it is "
                         "fast; fp8: bf16 with the torch UNet's linear layers and 1x1 convolutions as FP8 GEMMs, on "
                         "GPUs with FP8 units); latents and the DDIM update stay float32",
                         choices=tuple(DTYPES) + (FP8,), preset=True)
    vae_dtype: str | None = _option(None, "the VAE decoder's dtype (default: --dtype; fp32 for --dtype fp16, the SD "
                                    "VAE overflows in fp16)", choices=tuple(DTYPES))
    allow_slow_dtype: bool = _option(False, "run a --dtype/--vae-dtype this device runs slower than fp32 (bf16 on a "
                                     "CPU without bf16 units) instead of refusing it")
    vae_channels_last: bool = _option(
        False, "run the torch VAE decoder's 2-D convolutions in channels-last memory format: about 1.2x faster "
        "decoding on CPU, not bit-exact (within 1e-4) (default off; on under --quality balanced/fast with the torch "
        "VAE decoder)",
        toggle=Toggle(("vae",), "channels-last VAE", "default-layout VAE", "about 1.2x faster on CPU, within 1e-4"))
    fast_ops: bool = _option(
        False, "faster kernels for the torch UNet and VAE decoder, not bit-exact (within float rounding): temporal "
        "convolutions as 2-D ones, bf16 CPU attention in chunks with float32 scores, the CPU VAE decode a frame per "
        "call (default off; on under --quality balanced/fast)",
        toggle=Toggle(("unet", "vae"), "fast ops", "default ops", "faster kernels within float rounding"))
    device: str | None = _option(None, "cpu or cuda (default: cuda when available)")
    threads: int | None = _option(None, "torch CPU threads (default: torch's choice)", kind=int)

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
        if "aoti" in kinds and not self.export_dir:
            raise ValueError("the aoti backend needs --onnx DIR (make it with `vidrd export --format aoti --out DIR`)")
        if {"onnxruntime", "aoti"} <= kinds:
            raise ValueError("onnxruntime and aoti both read --onnx DIR, which holds one export format: run the "
                             "components of one of them on another backend")
        if "tensorrt" in kinds and not self.engine_dir:
            raise ValueError("the tensorrt backend needs --engines DIR (make it with `vidrd build-engines`)")
        for name, value, choices in (("dtype", self.dtype, (*DTYPES, FP8)), ("vae-dtype", self.vae_dtype, DTYPES),
                                     ("compile", self.compile, COMPILE_MODES), ("attention", self.attention,
                                                                                 ATTENTION)):
            if value is not None and value not in choices:
                raise ValueError(f"--{name} {value!r}: choose one of {', '.join(choices)}")
        if self.compile and self.attention == "chunked":
            raise ValueError("--attention chunked loops over (batch, head) in Python, which torch.compile does not "
                             "trace as one graph: drop --compile or use --attention sdpa (with --compile, --fast-ops "
                             "keeps SDPA)")
        if self.dtype == FP8 and self.kind("unet") != "torch":
            raise ValueError(f"--dtype fp8 runs the torch UNet's GEMMs in FP8, not {self._elsewhere(('unet',))}")
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
        for name, t in TOGGLES.items():
            value, spelled = getattr(self, name), flag(name)
            if not isinstance(value, bool):
                raise ValueError(f"{spelled} {value!r} must be True or False")
            if value and not self.torch_parts(t.needs):
                raise ValueError(f"{spelled} applies to the torch {' and '.join(NAMES[c] for c in t.needs)}, not "
                                 f"{self._elsewhere(t.needs)}")

    def torch_parts(self, components) -> list[str]:
        """Those of `components` that run on the torch backend."""
        return [c for c in components if self.kind(c) == "torch"]

    def _elsewhere(self, components) -> str:
        """Where `components` run instead of torch, in words."""
        if self.backend == REFERENCE:
            return "--backend reference (the reference sampler runs as written)"
        if len(components) == 1:
            return f"the {self.kind(components[0])} {NAMES[components[0]]}"
        return "exported graphs (" + ", ".join(f"the {NAMES[c]}: {self.kind(c)}" for c in components) + ")"

    def kind(self, component: str) -> str:
        """The backend of `component` ('text', 'unet' or 'vae')."""
        return getattr(self, f"{component}_backend") or self.backend

    @property
    def torch_dtype(self) -> torch.dtype:
        """The networks' dtype (and their buffers'): bf16 for fp8, whose FP8 tensors live inside the UNet."""
        return torch.bfloat16 if self.dtype == FP8 else DTYPES[self.dtype]

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
        from .precision import check_dtype, check_fp8

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.dtype == FP8:
            try:
                check_fp8(device)
            except ValueError as e:
                raise ValueError(f"--dtype fp8: {e}") from None
        if torch.device(device).type == "cpu" and torch.float16 in (self.torch_dtype, self.torch_vae_dtype):
            raise ValueError("--dtype fp16 needs a GPU; use fp32 or bf16 on the CPU")
        for flag, dtype in (("--dtype", self.torch_dtype), ("--vae-dtype", self.torch_vae_dtype)):
            try:
                check_dtype(dtype, device, self.allow_slow_dtype)
            except ValueError as e:
                raise ValueError(f"{flag} {_FLAG[dtype]}: {str(e).replace('(allow_slow)', '(--allow-slow-dtype)')}") \
                    from None
        return replace(self, device=device)


TOGGLES = {f.name: f.metadata["toggle"] for f in fields(RuntimeOptions) if f.metadata["toggle"] is not None}


# ------------------------------------------------------------------------------------------------ opening

def open_runtime(model, options: RuntimeOptions = RuntimeOptions(),
                 limits: Limits = Limits()) -> Runtime | ReferenceRuntime:
    """A Runtime for requests up to `limits` on `model`, with the backends, dtypes, compilation, attention, device
    (default: the model's) and threads of `options`; for --backend reference a ReferenceRuntime (the reference
    sampler behind the same generate(request)). Load the model in options.torch_dtype on that device.

    Raises ValueError when a backend cannot run in the dtype asked for (an ONNX export or engine of another
    precision), naming the flag that fixes it.
    """
    from . import backends

    o = options if options.device else replace(options, device=str(model.device))
    if o.backend == REFERENCE:
        return ReferenceRuntime(model, o, limits)
    if o.threads is not None:
        torch.set_num_threads(o.threads)
    device = torch.device(o.device)
    want = {"text": o.torch_dtype, "unet": o.torch_dtype, "vae": o.torch_vae_dtype}
    made = {}
    for name in COMPONENTS:
        kind = o.kind(name)
        fast = o.fast_ops and kind == "torch"
        extra = {"unet": {"compile": o.compile, "attention": o.attention, "fast_ops": fast, "fp8": o.dtype == FP8},
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

