"""`vidrd export`: each component to ONNX (TorchScript exporter, opset 17), cleaned, folded, shape-inferred.

Output folder: one `<component>.onnx` per spec (plus `<component>.onnx.data` past 2 GB) and `manifest.json`.
Everything is written under a temporary folder inside the output folder and renamed into place; only files this
exporter owns (named by a previous vidrd manifest) are ever replaced.

`weights_sha256` identifies the model, whatever its source (preset, weights folder, released checkpoint): the
sha256 of the model config (JSON) and of every state-dict tensor (name, dtype, shape, bytes) of unet, vae and
text_encoder, in that order and in key order, as loaded in fp32 before any export cast.

Precision fp16: a cast copy of the weights is exported; float inputs and outputs are float16 except `timestep`
(float32, its sinusoid is computed in fp32 as in the reference). Memory: about the fp32 model plus one copy of the
largest component's weights (sd21-base: 11.8 GB peak RSS for the 4.7 GB UNet).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .rewrite import example_inputs, export_module, verify
from .spec import COMPONENTS, ComponentSpec, component_specs

EXPORTER = "vidrd.export"
EXPORTER_VERSION = 1  # bump whenever the exported graphs change, so that older exports are redone
OPSET = 17  # TorchScript exporter: the known-good path (the dynamo exporter mistranslates repeat_interleave)
FORMAT = "vidrd-onnx-export/1"
ONNX_PRECISIONS = ("fp32", "fp16")  # numpy, hence ONNX Runtime's I/O binding, has no bfloat16
MODEL_KEYS = ("weights_sha256", "precision", "opset", "exporter")  # an export is valid only for all four
PROTO_LIMIT = 2 ** 31 - 2 ** 24  # protobuf's 2 GB limit, with headroom for the graph itself


def versions() -> dict[str, str]:
    """Library versions recorded in the manifest."""
    import onnx
    import onnx_graphsurgeon
    import onnxruntime
    import transformers
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnx_graphsurgeon": onnx_graphsurgeon.__version__, "transformers": transformers.__version__}


def weights_sha256(model) -> str:
    """sha256 of the model config and all its tensors (see the module docstring)."""
    h = hashlib.sha256(json.dumps(asdict(model.config), sort_keys=True).encode())
    for part in ("unet", "vae", "text_encoder"):
        for k, t in getattr(model, part).state_dict().items():
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{part}.{k}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(out: Path, fmt: str = FORMAT) -> dict | None:
    """The vidrd manifest of format `fmt` in `out`, or None when there is none; ValueError for a foreign or broken
    one, or one of another format."""
    path = Path(out) / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); remove it or pass --force") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{path} is not a vidrd export manifest of format {fmt}"
                         + (f" (it is {found}: use another folder)" if found else "") + "; pass --force to replace it")
    return manifest


def owned_files(manifest: dict | None) -> set[str]:
    """File names a manifest says this exporter wrote (manifest.json included)."""
    if manifest is None:
        return set()
    names = {"manifest.json"}
    for c in manifest.get("components", {}).values():
        names.update(n for n in (c.get("file"), c.get("external_data")) if n)
    return names


def stale_reason(manifest: dict | None, key: dict, out: Path, keys=MODEL_KEYS) -> str | None:
    """Why the export in `out` must be redone for `key`, valid only for the same `keys` (None: it is up to date)."""
    if manifest is None:
        return "no previous export"
    if not manifest.get("complete", False):
        return "the previous export did not finish"
    for k in keys:
        if manifest.get(k) != key[k]:
            return f"{k} changed ({manifest.get(k)} -> {key[k]})"
    for name, spec in key["components"].items():
        if name not in manifest["components"]:
            return f"{name} was not exported"
        if manifest["components"][name].get("spec") != spec:
            return f"the spec of {name} changed"
    for name in key["components"]:
        c = manifest["components"][name]
        for name in (c["file"], c.get("external_data")):
            if name and not (out / name).is_file():
                return f"{name} is missing"
        if (out / c["file"]).stat().st_size != c["bytes"]:
            return f"{c['file']} was modified"
    return None


def _write_json(path: Path, obj: dict) -> None:
    """Atomic JSON write: temporary file in the same folder, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def to_onnx(module: torch.nn.Module, spec: ComponentSpec, inputs: tuple, path: Path, work: Path) -> Path:
    """Trace `module` at `inputs`, clean up and fold the graph, infer shapes; write `path` (+ external data)."""
    import onnx
    import onnx_graphsurgeon as gs
    from onnx import external_data_helper

    raw = work / f"raw-{spec.name}" / spec.file  # own folder: past 2 GB the exporter writes one file per tensor
    raw.parent.mkdir(parents=True)
    axes = {t.name: t.dynamic_axes() for t in spec.inputs + spec.outputs}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # trace-time branches are pinned by the spec ranges
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is chosen on purpose (OPSET)
        torch.onnx.export(module, inputs, str(raw), input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    # Past 2 GB the weights stay on disk while graphsurgeon works (nodes reading them were folded by the exporter
    # already), and are loaded once into the cleaned model: one copy of the weights in memory instead of two.
    model = onnx.load(str(raw), load_external_data=False)
    for t in model.graph.initializer:  # small tensors (shape constants) in memory so that folding can use them
        if t.data_location == onnx.TensorProto.EXTERNAL and _nbytes(t) < 1 << 20:
            external_data_helper.load_external_data_for_tensor(t, str(raw.parent))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
    graph = gs.import_onnx(model)
    del model
    graph.cleanup().toposort()
    graph.fold_constants(should_exclude_node=_reads_external).cleanup().toposort()
    model = gs.export_onnx(graph)
    del graph
    onnx.load_external_data_for_model(model, str(raw.parent))
    shutil.rmtree(raw.parent)
    model.producer_name, model.producer_version = EXPORTER, str(EXPORTER_VERSION)
    big = sum(len(t.raw_data) for t in model.graph.initializer) > PROTO_LIMIT
    if not big:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, data_prop=True)
    onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    del model
    if big:  # in-memory inference would serialize the model: use the path-based variant
        onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, data_prop=True)
    return path


def _nbytes(t) -> int:
    """Size of an ONNX TensorProto's data from its dims and type."""
    import onnx
    return int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _reads_external(node) -> bool:
    """Whether a graphsurgeon node reads a weight still on disk (not foldable without loading it)."""
    import onnx
    for t in node.inputs:
        proto = getattr(getattr(t, "_values", None), "tensor", None)
        if proto is not None and proto.data_location == onnx.TensorProto.EXTERNAL:
            return True
    return False


@dataclass
class ExportResult:
    out: Path
    skipped: bool
    manifest: dict
    reason: str = ""


def export(model, out, *, precision: str = "fp32", source: dict | None = None, components=COMPONENTS,
           force: bool = False, log=print) -> ExportResult:
    """Export `components` of `model` (fp32 weights) into folder `out`; skip when an up-to-date export is there."""
    if precision not in ONNX_PRECISIONS:
        raise ValueError(f"ONNX export takes precision {' or '.join(ONNX_PRECISIONS)}, not {precision!r} (bf16 is "
                         "for --format aoti)")
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise ValueError(f"unknown components {unknown}; choose from {list(COMPONENTS)}")
    if model.dtype != torch.float32:
        raise ValueError(f"export takes the model in float32 (got {model.dtype}); use --precision for fp16")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = {k: v for k, v in component_specs(model.config, precision).items() if k in components}
    key = {"weights_sha256": weights_sha256(model), "precision": precision, "opset": OPSET,
           "exporter": {"name": EXPORTER, "version": EXPORTER_VERSION},
           "components": {k: s.to_json() for k, s in specs.items()}}
    try:
        old = read_manifest(out)
    except ValueError:
        if not force:
            raise
        old = None
    reason = "forced" if force else stale_reason(old, key, out)
    if reason is None:
        log(f"export in {out} is up to date (weights {key['weights_sha256'][:12]}, {precision}, opset {OPSET}): "
            f"skipped; pass --force to redo it")
        return ExportResult(out, True, old, "up to date")
    if not force:  # never replace a file that no vidrd manifest in this folder claims
        mine = owned_files(old)
        for s in specs.values():
            for name in (s.file, s.file + ".data", "manifest.json"):
                if (out / name).exists() and name not in mine:
                    raise FileExistsError(f"{out / name} exists and is not from a vidrd export; pass --force to "
                                          f"replace it")
    log(f"exporting to {out} ({reason})")

    dtype = torch.float16 if precision == "fp16" else torch.float32
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    entries = {}
    try:
        for name, spec in specs.items():
            t0 = time.perf_counter()
            inputs = example_inputs(spec, spec.example, model.config)
            module = export_module(model, name)
            err = verify(model, name, module, inputs)  # the fp32 rewrite equals the reference
            if dtype != torch.float32:
                module = export_module(model, name, dtype)
            io_types = {t.name: t.dtype for t in spec.inputs}
            args = tuple(v.to(dtype) if io_types[k] == "float16" else v for k, v in inputs.items())
            path = to_onnx(module, spec, args, work / spec.file, work)
            data = path.with_name(path.name + ".data")
            entries[name] = {"file": spec.file, "external_data": data.name if data.exists() else None,
                             "bytes": path.stat().st_size, "data_bytes": data.stat().st_size if data.exists() else 0,
                             "sha256": file_sha256(path),
                             "data_sha256": file_sha256(data) if data.exists() else None, "export_seconds": round(time.perf_counter() - t0, 2),
                             "rewrite_max_abs_err": err, "spec": spec.to_json()}
            log(f"exported {spec.file}: {(entries[name]['bytes'] + entries[name]['data_bytes']) / 1e6:.1f} MB in "
                f"{entries[name]['export_seconds']:.1f}s")
        if old is not None and old.get("complete") and all(old.get(k) == key[k] for k in MODEL_KEYS):
            entries = {**{k: v for k, v in old["components"].items() if k not in entries}, **entries}  # still valid
        manifest = {"format": FORMAT, "complete": True, "exporter": key["exporter"], "opset": OPSET,
                    "precision": precision, "weights_sha256": key["weights_sha256"],
                    "weights_sha256_of": "model config JSON + every unet, vae, text_encoder state-dict tensor "
                                         "(name, dtype, shape, bytes) as loaded in fp32",
                    "source": source or {}, "versions": versions(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "components": entries}
        if old is not None:  # a crash while files move leaves a manifest that is not "complete"
            _write_json(out / "manifest.json", {**old, "complete": False})
        for name in specs:
            for file in (entries[name]["file"], entries[name]["external_data"]):
                if file:
                    os.replace(work / file, out / file)
        for name in owned_files(old) - owned_files(manifest):
            (out / name).unlink(missing_ok=True)
        _write_json(out / "manifest.json", manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExportResult(out, False, manifest, reason)
