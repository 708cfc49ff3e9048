"""`vidrd export --format aoti`: each component as an AOTInductor package (torch.export, then
torch._inductor.aoti_compile_and_package), described by the same specs as the ONNX export.

Output folder: one `<component>.pt2` per spec and `manifest.json` (format vidrd-aoti-export/1) with the specs'
names, dtypes and dim ranges, read back by `vidrd.export.spec.read_specs` like an ONNX export's. Each dynamic dim of
a spec is a torch.export dim with its min and max (a dim with a `multiple` is that multiple of a smaller dim), so a
package takes the requests the ONNX export takes, but for the UNet's smallest (package_ranges); `ranges` narrows
them further (a static or small range compiles faster).

A package runs on the device type it was compiled for (`device` in the manifest: cpu or cuda) and takes inputs in
the export's precision (fp32, fp16 or bf16; `timestep` stays float32). Staleness, file ownership and --force follow
the ONNX export (onnx_export.py); the model must be float32 on the export device, and is never moved or changed.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import onnx_export
from .onnx_export import _write_json, file_sha256, owned_files, stale_reason, weights_sha256
from .rewrite import example_inputs, export_module, reference, verify
from .spec import COMPONENTS, PRECISIONS, ComponentSpec, Dim, component_specs

EXPORTER = "vidrd.export.aoti"
EXPORTER_VERSION = 1  # bump whenever the packaged graphs change, so that older exports are redone
FORMAT = "vidrd-aoti-export/1"
MODEL_KEYS = ("weights_sha256", "precision", "device", "exporter")  # a package is valid only for all four


def read_manifest(out) -> dict | None:
    """The AOTInductor manifest of `out`, or None when there is none; ValueError for another one (an ONNX export's
    included: the two formats live in separate folders)."""
    return onnx_export.read_manifest(out, FORMAT)


def narrow(spec: ComponentSpec, ranges: dict[str, Dim]) -> ComponentSpec:
    """`spec` (as a package) with the dims in `ranges` replaced: the example moves to each new range's opt, and the
    check shapes outside the new ranges go."""
    unknown = set(ranges) - set(spec.dims)
    if unknown:
        raise ValueError(f"{spec.name} has no dims {sorted(unknown)}; it has {sorted(spec.dims)}")
    dims = {**spec.dims, **ranges}
    example = {k: (ranges[k].opt if k in ranges else v) for k, v in spec.example.items()}

    def inside(d: dict) -> bool:
        return d != example and all(dims[k].min <= v <= dims[k].max and v % dims[k].multiple == 0
                                    for k, v in d.items())
    return replace(spec, dims=dims, example=example, checks=tuple(d for d in spec.checks if inside(d)))


def package_ranges(spec: ComponentSpec) -> dict[str, Dim]:
    """Where a package's default ranges differ from the spec's: the UNet takes N >= 2 (the reference's one-timestep
    branch, `t.numel() == 1`, becomes a guard) and h, w from twice their multiple (a latent grid whose deepest level
    is 1x1 fails torch.export's stride guards); every other dim and component keeps the spec's range."""
    if spec.name != "unet":
        return {}
    n, h, w = spec.dims["N"], spec.dims["h"], spec.dims["w"]
    return {"N": Dim(max(n.min, 2), max(n.opt, 2), n.max),
            **{k: Dim(max(d.min, 2 * d.multiple), max(d.opt, 2 * d.multiple), d.max, d.multiple)
               for k, d in (("h", h), ("w", w))}}


def dynamic_shapes(spec: ComponentSpec) -> tuple[dict[int, object], ...]:
    """torch.export's dynamic_shapes for the inputs of `spec`: a torch.export Dim per dynamic dim (min < max), a
    multiple of a smaller Dim where the dim has a `multiple`; a dim with min == max stays static."""
    from torch.export import Dim as ExportDim

    made = {}
    for name, d in spec.dims.items():
        if d.min == d.max:
            continue
        if d.multiple == 1:
            made[name] = ExportDim(name, min=d.min, max=d.max)
        else:  # e.g. h = 8 * h_8 with h_8 in [min/8, max/8]
            made[name] = d.multiple * ExportDim(f"{name}_{d.multiple}", min=d.min // d.multiple,
                                                max=d.max // d.multiple)
    out = []
    for t in spec.inputs:
        axes = {}
        for i, s in enumerate(t.shape):
            if isinstance(s, str):
                k, _, name = s.rpartition("*")
                assert not k, f"{spec.name}.{t.name}: scaled input dim {s!r} has no torch.export spelling"
                if name in made:
                    axes[i] = made[name]
        out.append(axes)
    return tuple(out)


def to_package(module: torch.nn.Module, spec: ComponentSpec, args: tuple, path: Path) -> tuple[float, float]:
    """torch.export `module` at `args` with the spec's dynamic dims, compile it with AOTInductor into `path`;
    (export seconds, compile seconds)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes(spec))
    t1 = time.perf_counter()
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return t1 - t0, time.perf_counter() - t1


def _inputs(spec: ComponentSpec, dims: dict, cfg, device) -> dict[str, torch.Tensor]:
    """example_inputs on `device`, float inputs in the spec's dtype (timestep stays float32)."""
    return {k: v.to(device, spec.io[k].torch_dtype) for k, v in example_inputs(spec, dims, cfg).items()}


def export(model, out, *, precision: str = "fp32", source: dict | None = None, components=COMPONENTS,
           ranges: dict[str, dict[str, Dim]] | None = None, force: bool = False, log=print):
    """Package `components` of `model` (float32, on the device the packages are for) into folder `out`; skip when
    an up-to-date export is there. `ranges`: component -> {dim: Dim} narrowing the spec's ranges."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {sorted(PRECISIONS)}")
    unknown = [c for c in components if c not in COMPONENTS] + [c for c in (ranges or {}) if c not in components]
    if unknown or not components:
        raise ValueError(f"unknown components {unknown}; choose from {list(components or COMPONENTS)}")
    if model.dtype != torch.float32:
        raise ValueError(f"export takes the model in float32 (got {model.dtype}); use --precision for fp16/bf16")
    device = model.device
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = {k: narrow(replace(v, file=f"{k}.pt2"), {**package_ranges(v), **(ranges or {}).get(k, {})})
             for k, v in component_specs(model.config, precision).items() if k in components}
    key = {"weights_sha256": weights_sha256(model), "precision": precision, "device": device.type,
           "exporter": {"name": EXPORTER, "version": EXPORTER_VERSION},
           "components": {k: s.to_json() for k, s in specs.items()}}
    try:
        old = read_manifest(out)
    except ValueError:
        if not force:
            raise
        old = None
    reason = "forced" if force else stale_reason(old, key, out, MODEL_KEYS)
    if reason is None:
        log(f"export in {out} is up to date (weights {key['weights_sha256'][:12]}, {precision}, {device.type}): "
            f"skipped; pass --force to redo it")
        return onnx_export.ExportResult(out, True, old, "up to date")
    if not force:  # never replace a file that no vidrd manifest in this folder claims
        mine = owned_files(old)
        for name in [s.file for s in specs.values()] + ["manifest.json"]:
            if (out / name).exists() and name not in mine:
                raise FileExistsError(f"{out / name} exists and is not from a vidrd export; pass --force to replace "
                                      f"it")
    log(f"exporting AOTInductor packages for {device.type} to {out} ({reason})")

    dtype = getattr(torch, PRECISIONS[precision])
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    entries = {}
    try:
        for name, spec in specs.items():
            err = verify(model, name, export_module(model, name), _inputs(spec, spec.example, model.config, device))
            module = export_module(model, name, None if dtype == torch.float32 else dtype)
            args = tuple(_inputs(spec, spec.example, model.config, device).values())
            export_s, compile_s = to_package(module, spec, args, work / spec.file)
            path = work / spec.file
            entries[name] = {"file": spec.file, "bytes": path.stat().st_size, "sha256": file_sha256(path),
                             "export_seconds": round(export_s, 2), "compile_seconds": round(compile_s, 2),
                             "rewrite_max_abs_err": err, "spec": spec.to_json()}
            log(f"packaged {spec.file}: {entries[name]['bytes'] / 1e6:.1f} MB, torch.export {export_s:.1f} s, "
                f"AOTInductor {compile_s:.1f} s")
        if old is not None and old.get("complete") and all(old.get(k) == key[k] for k in MODEL_KEYS):
            entries = {**{k: v for k, v in old["components"].items() if k not in entries}, **entries}  # still valid
        manifest = {"format": FORMAT, "complete": True, "exporter": key["exporter"], "precision": precision,
                    "device": device.type, "weights_sha256": key["weights_sha256"],
                    "weights_sha256_of": "model config JSON + every unet, vae, text_encoder state-dict tensor "
                                         "(name, dtype, shape, bytes) as loaded in fp32",
                    "source": source or {}, "versions": {"torch": torch.__version__},
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "components": entries}
        if old is not None:  # a crash while files move leaves a manifest that is not "complete"
            _write_json(out / "manifest.json", {**old, "complete": False})
        for name in specs:
            os.replace(work / entries[name]["file"], out / entries[name]["file"])
        for name in owned_files(old) - owned_files(manifest):
            (out / name).unlink(missing_ok=True)
        _write_json(out / "manifest.json", manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return onnx_export.ExportResult(out, False, manifest, reason)


def check(out, model, components=COMPONENTS, log=print) -> dict[str, dict]:
    """Run each package in `out` against the reference model (float32) at its example and check shapes:
    component -> {"dims": [...], "max_abs_err": [...]} (errors scaled by max(1, max |reference|)); CheckError past
    the ONNX check's tolerance of the precision (fp32, fp16; bf16 is reported, not bounded)."""
    from vidrd.runtime.backends.aoti import load_package  # the runtime's loader: what is checked is what runs

    from .check import TOLERANCE, CheckError
    from .spec import read_specs
    manifest = read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"no AOTInductor export in {out} (make one with `vidrd export --format aoti --out "
                                f"{out}`)")
    specs, report = read_specs(out), {}
    for name in components:
        if name not in specs:
            continue
        spec, fn = specs[name], load_package(Path(out) / specs[name].file, model.device)
        rows = report[name] = {"dims": [], "max_abs_err": []}
        for dims in (spec.example, *spec.checks):
            inputs = _inputs(spec, dims, model.config, model.device)
            ref = reference(model, name, {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()})
            got = fn(*inputs.values())
            got = got if isinstance(got, (tuple, list)) else (got,)
            err = max(((g.float() - r).abs().max() / r.abs().max().clamp(min=1)).item()
                      for r, g in zip(ref.values(), got))
            rows["dims"].append(dims)
            rows["max_abs_err"].append(err)
            log(f"{spec.file} at {dims}: max abs err {err:.2e} (scaled by max(1, max |reference|))")
    tol = TOLERANCE.get(manifest["precision"])
    bad = [f"{n} at {d}: {e:.2e} > {tol}" for n, r in report.items() for d, e in zip(r["dims"], r["max_abs_err"])
           if tol is not None and not e <= tol]
    if bad:
        raise CheckError("AOTInductor packages differ from the reference: " + "; ".join(bad))
    return report
