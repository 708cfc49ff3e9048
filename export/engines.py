"""TensorRT engines for the exported components: profiles from the specs, polygraphy builds, sidecars, up-to-date skip.

An engine folder holds `<component>.plan`, its sidecar `<component>.plan.json` (the ONNX file it came from, the
TensorRT version and GPU it was built for, its profile, precision and flags) and `timing.cache`, which every build
on the same TensorRT and GPU reuses. Nothing here imports tensorrt at module level: the CLI, the profile checks and
the cache decisions work on machines without it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .spec import LATENT, ComponentSpec, request_dims

FORMAT = "vidrd-trt-engine/1"
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # engine precision -> float I/O dtype
FP32_ALWAYS = ("timestep",)  # float32 in every precision (spec.py: its sinusoid is computed in fp32)
OPT_LEVEL = 3  # builder optimisation level, as NVIDIA's diffusion demo
TIMING_CACHE = "timing.cache"
INSTALL = ("install TensorRT on a machine with an NVIDIA GPU: `pip install tensorrt-cu12` (NVIDIA's wheel, CUDA 12) "
           "and `pip install 'vidrd[tensorrt]'` (polygraphy)")
RUNTIME_COMPONENTS = {"text": ("text_encoder",), "unet": ("unet",), "vae": ("vae_decoder", "vae_decoder_temporal")}
KEY = ("onnx_sha256", "onnx_data_sha256", "precision", "profile", "flags", "tensorrt", "gpu")  # all must match


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or polygraphy, or a CUDA device) is missing; the message says how to get it."""


class EngineMismatch(ValueError):
    """An engine does not fit this machine or this request; the message names the command that rebuilds it."""


@dataclass(frozen=True)
class Shapes:
    """What engines serve, each (min, opt, max): prompts B, frames F, pixels per side. Guidance doubles B."""
    batch: tuple = (1, 1, 4)
    frames: tuple = (8, 8, 8)
    size: tuple = (256, 256, 512)
    static: bool = False  # min = opt = max at opt: no shape changes, so CUDA graphs can be replayed
    guidance: bool = True  # classifier-free guidance: text encoder and UNet see N = 2B

    def pinned(self) -> "Shapes":
        """The static variant: every range collapsed to its opt value."""
        if not self.static:
            return self
        return Shapes(*((r[1],) * 3 for r in (self.batch, self.frames, self.size)), True, self.guidance)

    def args(self) -> str:
        """The build-engines flags that give these shapes."""
        r = " ".join(f"--{k} {':'.join(map(str, getattr(self, k)))}" for k in ("batch", "frames", "size"))
        return r + (" --static" if self.static else "") + ("" if self.guidance else " --no-guidance")


def parse_range(flag: str, text: str) -> tuple[int, int, int]:
    """'8' -> (8, 8, 8); 'A:B' -> (A, A, B) (opt = min); 'A:B:C' -> (A, B, C)."""
    try:
        v = [int(x) for x in str(text).split(":")]
    except ValueError:
        v = []
    if len(v) == 2:
        v = [v[0], v[0], v[1]]
    elif len(v) == 1:
        v = v * 3
    if len(v) != 3 or not 1 <= v[0] <= v[1] <= v[2]:
        raise ValueError(f"{flag} {text!r}: give N, MIN:MAX or MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX")
    return tuple(v)


def _explain(name: str, k: str, d, shapes: Shapes) -> tuple[str, str, str]:
    """(the flags that set dim `k` of component `name`, how the dim follows from them, what the export accepts)."""
    if k in ("h", "w"):
        return "size", f"pixels / {LATENT}", (f"Choose --size in multiples of {LATENT * d.multiple} px within "
                                              f"[{LATENT * d.min}, {LATENT * d.max}].")
    if k == "F":
        return "frames", "frames", f"Choose --frames within [{d.min}, {d.max}]."
    if name == "vae_decoder":
        return "batch frames", "B*F frames decoded at once", (f"Keep max batch x max frames <= {d.max}, or leave "
                                                              "vae_decoder out of --components.")
    g = 2 if shapes.guidance and name in ("text_encoder", "unet") else 1
    how = "2B under classifier-free guidance" if g == 2 else "B prompts"
    return "batch", how, f"Choose --batch within [{-(-d.min // g)}, {d.max // g}]."


def profile_dims(spec: ComponentSpec, shapes: Shapes) -> dict[str, tuple[int, int, int]]:
    """Dim name -> (min, opt, max) for `spec` at `shapes`; ValueError when the export does not cover them."""
    s = shapes.pinned()
    for v in s.size:
        if v % LATENT:
            raise ValueError(f"--size {':'.join(map(str, shapes.size))}: {v} px is not a multiple of {LATENT}")
    at = [spec.request_dims(s.batch[i], s.frames[i], s.size[i], s.size[i], s.guidance) for i in range(3)]
    dims = {k: tuple(a[k] for a in at) for k in at[0]}
    for k, values in dims.items():
        d = spec.dims[k]
        bad = [v for v in values if not d.min <= v <= d.max or v % d.multiple]
        if bad:
            flags, how, hint = _explain(spec.name, k, d, shapes)
            given = " ".join(f"--{f} {':'.join(map(str, getattr(shapes, f)))}" for f in flags.split())
            mult = f", multiples of {d.multiple}" if d.multiple > 1 else ""
            raise ValueError(f"{given}: {spec.name} would need {k}={bad[0]} ({how}), outside what the ONNX export "
                             f"supports: {k} in [{d.min}, {d.max}]{mult}. {hint}")
    return dims


def profile_shapes(spec: ComponentSpec, dims: dict) -> dict[str, dict[str, list[int]]]:
    """Input name -> {'min', 'opt', 'max': shape}: the TensorRT optimisation profile of `dims`."""
    at = {a: {k: v[i] for k, v in dims.items()} for i, a in enumerate(("min", "opt", "max"))}
    return {t.name: {a: list(t.resolve(d)) for a, d in at.items()} for t in spec.inputs}


def build_flags(precision: str, onnx_precision: str, static: bool) -> dict:
    """How a `precision` engine is built from an `onnx_precision` export (recorded in the sidecar)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if onnx_precision == "fp16" and precision != "fp16":
        raise ValueError(f"--precision {precision}: the ONNX export is fp16, so only fp16 engines can be built from "
                         "it; export fp32 (`vidrd export --precision fp32`) for fp32 or bf16 engines")
    strongly = onnx_precision == precision  # the graph already holds the types: TensorRT keeps them exactly
    # Otherwise builder flags let TensorRT choose fp16/bf16 kernels in an fp32 graph (weak typing, deprecated since
    # TensorRT 10.12; an fp16 export takes the strongly typed path) and the float I/O is set to the precision.
    return {"strongly_typed": strongly, "fp16": precision == "fp16" and not strongly,
            "bf16": precision == "bf16" and not strongly, "io_dtype": PRECISIONS[precision],
            "native_instancenorm": True, "builder_optimization_level": OPT_LEVEL, "static": static}


# ---------------------------------------------------------------------------------------------- environment

def import_tensorrt():
    """The tensorrt module, or TensorRTUnavailable saying how to install it."""
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTUnavailable(f"TensorRT is not installed ({e}); {INSTALL}") from None
    return tensorrt


def gpu_info(device=None) -> dict:
    """Name and compute capability of the CUDA device; TensorRTUnavailable when there is none."""
    import torch

    if device is not None and torch.device(device).type != "cuda":
        raise TensorRTUnavailable(f"TensorRT engines run on CUDA devices only, got device {device!r}: pass "
                                  "--device cuda")
    if not torch.cuda.is_available():
        raise TensorRTUnavailable(f"no CUDA device: TensorRT engines build and run on NVIDIA GPUs only "
                                  f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
    idx = torch.device(device or "cuda").index
    idx = torch.cuda.current_device() if idx is None else idx
    major, minor = torch.cuda.get_device_capability(idx)
    return {"name": torch.cuda.get_device_name(idx), "compute_capability": f"{major}.{minor}"}


def running_env(device=None) -> dict:
    """The TensorRT version and GPU engines are built for or run on here."""
    trt = import_tensorrt()
    return {"tensorrt": trt.__version__, "gpu": gpu_info(device)}


# ------------------------------------------------------------------------------------------------- sidecars

def engine_path(engine_dir, name: str) -> Path:
    return Path(engine_dir) / f"{name}.plan"


def sidecar_path(engine_dir, name: str) -> Path:
    return Path(engine_dir) / f"{name}.plan.json"


def read_sidecar(engine_dir, name: str) -> dict:
    """The sidecar of engine `name` in `engine_dir`; FileNotFoundError naming the build command when missing."""
    plan, side = engine_path(engine_dir, name), sidecar_path(engine_dir, name)
    build = f"`vidrd build-engines --onnx EXPORT_DIR --out {engine_dir} --precision P --components {name}`"
    if not plan.is_file():
        raise FileNotFoundError(f"no TensorRT engine {plan}: build it with {build}")
    if not side.is_file():
        raise FileNotFoundError(f"{plan} has no sidecar {side.name} (so its TensorRT version, GPU and profile are "
                                f"unknown): rebuild it with {build} --force")
    try:
        sidecar = json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise EngineMismatch(f"{side} is not valid JSON ({e}): rebuild with {build} --force") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        raise EngineMismatch(f"{side} is not a vidrd engine sidecar ({FORMAT}): rebuild with {build} --force")
    return sidecar


def stale_reason(sidecar: dict | None, key: dict, plan: Path) -> str | None:
    """Why engine `plan` must be (re)built for `key` (None: it is up to date and is skipped)."""
    if sidecar is None:
        return "no engine yet" if not plan.is_file() else "the engine has no sidecar"
    if sidecar.get("format") != FORMAT:
        return f"the sidecar is not in the format {FORMAT}"
    if not plan.is_file():
        return f"{plan.name} is missing"
    if plan.stat().st_size != sidecar.get("engine_bytes"):
        return f"{plan.name} was modified"
    for k in KEY:
        if sidecar.get(k) != key[k]:
            what = {"onnx_sha256": "the ONNX file", "onnx_data_sha256": "the ONNX external data", "gpu": "the GPU",
                    "tensorrt": "the TensorRT version"}.get(k, f"the {k}")
            return f"{what} changed ({_short(sidecar.get(k))} -> {_short(key[k])})"
    return None


def _short(v) -> str:
    if isinstance(v, str) and len(v) == 64:
        return v[:12]  # a sha256
    if isinstance(v, dict) and "name" in v:
        return f"{v['name']} (sm {v.get('compute_capability')})"
    return json.dumps(v) if isinstance(v, dict) else str(v)


def check_compatible(sidecar: dict, env: dict) -> None:
    """EngineMismatch unless the engine was built for this TensorRT version and GPU; names the rebuild command."""
    built, here = sidecar.get("gpu", {}), env["gpu"]
    if sidecar.get("tensorrt") != env["tensorrt"]:
        why = f"TensorRT {sidecar.get('tensorrt')}, but TensorRT {env['tensorrt']} is installed"
    elif built.get("compute_capability") != here["compute_capability"] or built.get("name") != here["name"]:
        why = f"GPU {_short(built)}, but this GPU is {_short(here)}"
    else:
        return
    raise EngineMismatch(f"{sidecar['engine']} was built for {why}: rebuild it here with `{sidecar['command']}`")


def check_profile(sidecar: dict, dims: dict[str, int], why: str = "") -> None:
    """ValueError unless every dim value lies in the engine's profile; names the dim, the range and the rebuild."""
    for k, v in dims.items():
        lo, _, hi = sidecar["dims"][k]
        step = sidecar["spec"]["dims"][k].get("multiple", 1)
        if v % step:  # a graph limit (e.g. UNet down-sampling), whatever the profile
            raise EngineMismatch(f"{sidecar['engine']}: {k}={v}{why} is not a multiple of {step}, which the exported "
                                 f"{sidecar['component']} requires")
        if not lo <= v <= hi:
            rng = f"fixed at {lo}" if lo == hi else f"[{lo}, {hi}]"
            raise EngineMismatch(f"{sidecar['engine']}: {k}={v}{why} is outside the engine's profile ({k} {rng}, "
                                 f"built with {sidecar['shapes']}): rebuild it with `vidrd build-engines --onnx "
                                 f"{sidecar['onnx_dir']} --out {sidecar['engine_dir']} --precision "
                                 f"{sidecar['precision']} --components {sidecar['component']}` and --batch/--frames/"
                                 f"--size ranges that cover the request")


def check_request(sidecar: dict, batch: int, frames: int, height: int, width: int, guidance: bool) -> None:
    """check_profile for B prompts of F frames at H x W pixels (the runtime's setup and per-request check)."""
    if height % LATENT or width % LATENT:
        raise ValueError(f"height={height}, width={width} must be multiples of {LATENT}")
    dims = request_dims(sidecar["component"], batch, frames, height, width, guidance)
    how = f" (batch {batch}, frames {frames}, {height}x{width} px{', guidance' if guidance else ''})"
    check_profile(sidecar, dims, how)


# ----------------------------------------------------------------------------------------------------- build

def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def build_engine(onnx: Path, plan: Path, profile: dict, flags: dict, timing_cache: Path) -> None:
    """Parse `onnx`, build with one optimisation profile through polygraphy, write the serialized engine to `plan`."""
    trt = import_tensorrt()
    try:
        from polygraphy.backend.trt import (CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path,
                                            set_tensor_datatypes)
    except ImportError as e:
        raise TensorRTUnavailable(f"polygraphy is not installed ({e}): pip install 'vidrd[tensorrt]'") from None
    parser_flags = [trt.OnnxParserFlag.NATIVE_INSTANCENORM] if flags["native_instancenorm"] else []
    network = network_from_onnx_path(str(onnx), flags=parser_flags, strongly_typed=flags["strongly_typed"])
    if not flags["strongly_typed"] and flags["io_dtype"] != "float32":  # fp32 graph, fp16/bf16 I/O
        io = {"float16": trt.float16, "bfloat16": trt.bfloat16}[flags["io_dtype"]]
        network = set_tensor_datatypes(network, {n: io for n in flags["float_io"]})
    p = Profile()
    for name, s in profile.items():
        p.add(name, min=s["min"], opt=s["opt"], max=s["max"])
    config = CreateConfig(fp16=flags["fp16"], bf16=flags["bf16"], profiles=[p],
                          builder_optimization_level=flags["builder_optimization_level"],
                          load_timing_cache=str(timing_cache) if timing_cache.is_file() else None)
    data = engine_bytes_from_network(network, config=config, save_timing_cache=str(timing_cache))
    tmp = plan.with_name(f".{plan.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, plan)


def _load_json(path: Path) -> dict | None:
    """A JSON file's object, or None when it is absent or unreadable (then it is rewritten)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _timing_cache(out: Path, env: dict) -> Path:
    """The shared timing cache, dropped when it was made by another TensorRT version or GPU."""
    cache, tag = out / TIMING_CACHE, out / f"{TIMING_CACHE}.json"
    if cache.is_file() and _load_json(tag) != env:
        cache.unlink()
    _write_json(tag, env)
    return cache


@dataclass
class Built:
    name: str
    plan: Path
    skipped: bool
    reason: str
    seconds: float = 0.0


def build_all(onnx_dir, out, shapes: Shapes, precision: str, components=None, *, force: bool = False,
              env: dict | None = None, build: Callable = build_engine, log=print) -> list[Built]:
    """Build (or skip, when up to date) one engine per component of the export in `onnx_dir` into `out`.

    Every request is checked against the export's specs before TensorRT is touched. `env` (TensorRT version and
    GPU) and `build` default to this machine's TensorRT and `build_engine`.
    """
    from .onnx_export import file_sha256, read_manifest

    onnx_dir, out = Path(onnx_dir), Path(out)
    manifest = read_manifest(onnx_dir)
    if manifest is None:
        raise FileNotFoundError(f"no ONNX export in {onnx_dir} (no manifest.json): make one with "
                                f"`vidrd export --out {onnx_dir}`")
    if not manifest.get("complete"):
        raise ValueError(f"the export in {onnx_dir} did not finish: redo it with `vidrd export --out {onnx_dir}`")
    exported = manifest["components"]
    components = list(components or exported)
    missing = [c for c in components if c not in exported]
    if missing or not components:
        raise ValueError(f"--components: {missing or 'empty list'} not in the export in {onnx_dir}, which has "
                         f"{','.join(exported)}")
    flags = build_flags(precision, manifest["precision"], shapes.static)
    plans = {}
    for name in components:  # every check before any work
        spec = ComponentSpec.from_json(exported[name]["spec"])
        dims = profile_dims(spec, shapes)
        f = {**flags, "float_io": [t.name for t in spec.inputs + spec.outputs
                                   if t.dtype == "float32" and t.name not in FP32_ALWAYS]}
        for file in (exported[name]["file"], exported[name].get("external_data")):
            if file and not (onnx_dir / file).is_file():
                raise FileNotFoundError(f"{onnx_dir / file} is missing: redo the export with "
                                        f"`vidrd export --out {onnx_dir}`")
        plans[name] = (spec, dims, f)
    env = running_env() if env is None else env
    out.mkdir(parents=True, exist_ok=True)
    cache = _timing_cache(out, env)
    results = []
    for name, (spec, dims, f) in plans.items():
        entry, plan = exported[name], engine_path(out, name)
        data = entry.get("external_data")
        key = {"onnx_sha256": file_sha256(onnx_dir / entry["file"]),
               "onnx_data_sha256": file_sha256(onnx_dir / data) if data else None, "precision": precision,
               "profile": profile_shapes(spec, dims), "flags": f, **env}
        old = _load_json(sidecar_path(out, name))
        reason = "forced" if force else stale_reason(old, key, plan)
        if reason is None:
            log(f"{plan} is up to date ({precision}, TensorRT {env['tensorrt']}, {env['gpu']['name']}): skipped; "
                f"pass --force to rebuild it")
            results.append(Built(name, plan, True, "up to date"))
            continue
        log(f"building {plan} ({reason}) ...")
        sidecar_path(out, name).unlink(missing_ok=True)  # no sidecar vouches for a half-built engine
        t0 = time.perf_counter()
        build(onnx_dir / entry["file"], plan, key["profile"], f, cache)
        seconds = round(time.perf_counter() - t0, 2)
        command = (f"vidrd build-engines --onnx {onnx_dir.resolve()} --out {out.resolve()} --precision {precision} "
                   f"{shapes.args()} --components {name}")
        _write_json(sidecar_path(out, name), {
            "format": FORMAT, "component": name, "engine": plan.name, "engine_bytes": plan.stat().st_size, **key,
            "dims": {k: list(v) for k, v in dims.items()}, "shapes": shapes.args(), "command": command,
            "onnx_dir": str(onnx_dir.resolve()), "engine_dir": str(out.resolve()), "onnx_file": entry["file"],
            "onnx_precision": manifest["precision"], "weights_sha256": manifest.get("weights_sha256"),
            "spec": entry["spec"], "build_seconds": seconds, "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        log(f"built {plan}: {plan.stat().st_size / 1e6:.1f} MB in {seconds:.1f}s")
        results.append(Built(name, plan, False, reason, seconds))
    return results
