"""`vidrd export --check`: ONNX checker and shape inference, TensorRT parser op coverage, and ONNX Runtime (CPU)
against the reference PyTorch model at shapes other than the export example.

Tolerances (max abs error, scaled by max(1, max |reference|)): fp32 1e-4; fp16 5e-2 against the fp32 reference,
checked only where ONNX Runtime's CPU provider has fp16 kernels for every node (else reported as skipped).
"""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .onnx_export import read_manifest, weights_sha256
from .rewrite import example_inputs, reference
from .spec import ComponentSpec

TRT_OPS = Path(__file__).with_name("trt_onnx_ops.json")
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}
# Supported by TensorRT, but what the export rewrites remove: finding one means a rewrite did not apply.
AVOID = {"ScatterND": "frame embedding built in the graph (expected a sliced table)"}
ONNX_DTYPES = {"float32": 1, "int64": 7, "float16": 10}  # TensorProto enum


class CheckError(ValueError):
    """An export that failed a check: the message lists every failure."""


def load_trt_table(path: Path = TRT_OPS) -> dict:
    """The TensorRT ONNX-parser operator table kept in the repo (source and version inside)."""
    return json.loads(Path(path).read_text())


def _graphs(graph):
    """A graph and all its subgraphs (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _graphs(g)


def op_histogram(model) -> Counter:
    """(domain, op_type) -> count over the model's graphs; the default domain is ''."""
    return Counter((n.domain if n.domain != "ai.onnx" else "", n.op_type) for g in _graphs(model.graph) for n in g.node)


def unsupported_ops(model, table: dict | None = None) -> dict[str, str]:
    """Op name -> why the TensorRT ONNX parser rejects it; empty when every node is supported."""
    import onnx

    table = table or load_trt_table()
    ok = set(table["supported"])
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    bad = {}
    if not table["opset_range"][0] <= opset <= table["opset_range"][1]:
        bad[f"opset {opset}"] = f"outside TensorRT {table['tensorrt']}'s opset range {table['opset_range']}"
    for g in _graphs(model.graph):
        for n in g.node:
            name = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
            if name not in ok:
                bad[name] = f"not in the TensorRT {table['tensorrt']} ONNX parser's supported list"
                continue
            rules = table["attribute_rules"].get(n.op_type, {})
            if rules:
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                schema = onnx.defs.get_schema(n.op_type, opset)
                for attr, allowed in rules.items():
                    if attr not in attrs and attr not in schema.attributes:
                        continue  # the attribute does not exist at this opset
                    v = attrs[attr] if attr in attrs else onnx.helper.get_attribute_value(
                        schema.attributes[attr].default_value)
                    v = v.decode() if isinstance(v, bytes) else v
                    if v not in allowed:
                        bad[f"{n.op_type}({attr}={v})"] = f"TensorRT accepts {attr} in {allowed}"
    return bad


def check_trt_ops(model, table: dict | None = None) -> Counter:
    """Raise CheckError naming every op the TensorRT parser does not take; returns the op histogram."""
    table = table or load_trt_table()
    bad = unsupported_ops(model, table)
    if bad:
        raise CheckError("unsupported by the TensorRT ONNX parser (" + table["source"].split(",")[0] + ", TensorRT "
                         + table["tensorrt"] + "): " + "; ".join(f"{k}: {v}" for k, v in sorted(bad.items())))
    return op_histogram(model)


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def trt_friendly_issues(model) -> list[str]:
    """What the rewrites should have removed: AVOID ops, 3-D convs, resizes on rank-5 tensors."""
    issues = [f"{op}: {why}" for op, why in AVOID.items() if any(n.op_type == op for n in model.graph.node)]
    inits = {t.name: t for t in model.graph.initializer}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in
             list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    for n in model.graph.node:
        if n.op_type == "Conv" and n.input[1] in inits and len(inits[n.input[1]].dims) != 4:
            issues.append(f"Conv {n.name}: {len(inits[n.input[1]].dims) - 2}-D kernel (expected 2-D)")
        if n.op_type == "Resize" and ranks.get(n.input[0], 4) != 4:
            issues.append(f"Resize {n.name}: rank-{ranks[n.input[0]]} input (expected 4-D frames)")
    return issues


def check_graph(path: Path, spec: ComponentSpec) -> tuple:
    """onnx.checker (path-based, fine past 2 GB), shape inference, I/O names/dtypes/ranks; (model, failures)."""
    import onnx

    failures = []
    onnx.checker.check_model(str(path), full_check=False)
    with tempfile.TemporaryDirectory() as tmp:  # path-based inference works for external-data models too
        inferred = Path(tmp) / path.name
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), check_type=True, strict_mode=True)
        model = onnx.load(str(inferred), load_external_data=False)
    for kind, got, want in (("input", model.graph.input, spec.inputs), ("output", model.graph.output, spec.outputs)):
        got = [v for v in got if v.name not in {t.name for t in model.graph.initializer}]
        if [v.name for v in got] != [t.name for t in want]:
            failures.append(f"{kind} names {[v.name for v in got]} != spec {[t.name for t in want]}")
            continue
        for v, t in zip(got, want):
            dims = _dims(v)
            if v.type.tensor_type.elem_type != ONNX_DTYPES[t.dtype]:
                failures.append(f"{t.name}: ONNX elem_type {v.type.tensor_type.elem_type}, spec {t.dtype}")
            if len(dims) != len(t.shape) or any(isinstance(s, int) and d != s for d, s in zip(dims, t.shape)):
                failures.append(f"{t.name}: ONNX shape {dims}, spec {list(t.shape)}")
    return model, failures


def check_ort(path: Path, spec: ComponentSpec, model, precision: str, threads: int | None = None) -> list[dict]:
    """Run `path` in ONNX Runtime (CPU) at every spec.checks shape; max abs error per output vs the reference."""
    from .ort import make_session

    try:
        sess = make_session(path, prefer=("CPUExecutionProvider",), threads=threads)
    except Exception as e:  # ORT's CPU provider lacks some fp16 kernels: NOT_IMPLEMENTED at session creation
        if precision == "fp32":
            raise
        return [{"skipped": f"ONNX Runtime CPU cannot run this {precision} graph: {str(e).splitlines()[0][:200]}"}]
    tol = TOLERANCE[precision]
    rows = []
    for dims in spec.checks:
        inputs = example_inputs(spec, dims, model.config, seed=1)
        ref = reference(model, spec.name, inputs)
        feed = {t.name: inputs[t.name].numpy().astype(t.dtype) for t in spec.inputs}
        got = dict(zip(spec.output_names, sess.run(spec.output_names, feed)))
        row = {"dims": dims, "errors": {}, "ok": True}
        for t in spec.outputs:
            r = ref[t.name].float().numpy()
            if got[t.name].shape != r.shape or got[t.name].shape != spec.shape(t.name, dims):
                row["errors"][t.name], row["ok"] = f"shape {got[t.name].shape} != {r.shape}", False
                continue
            err = float(np.abs(got[t.name].astype(np.float32) - r).max())
            bound = tol * max(1.0, float(np.abs(r).max()))
            row["errors"][t.name], row["bound"] = err, bound
            row["ok"] &= bool(err <= bound)  # NaN fails
        rows.append(row)
    return rows


@torch.no_grad()
def check_export(out, model, *, components=None, threads: int | None = None, log=print) -> dict:
    """All checks on the export in `out` against `model` (fp32); CheckError listing failures, else a report."""
    out = Path(out)
    manifest = read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"no export in {out} (make one with `vidrd export --out {out}`)")
    if weights_sha256(model) != manifest["weights_sha256"]:
        raise CheckError(f"{out} was exported from other weights (sha256 {manifest['weights_sha256'][:12]}) than "
                         f"the model given; re-export or pass the same model")
    precision, table = manifest["precision"], load_trt_table()
    report, failures = {}, []
    for name, entry in manifest["components"].items():
        if components and name not in components:
            continue
        spec, path = ComponentSpec.from_json(entry["spec"]), out / entry["file"]
        graph, fails = check_graph(path, spec)
        bad = unsupported_ops(graph, table)
        fails += [f"TensorRT parser does not take {k} ({v})" for k, v in sorted(bad.items())]
        fails += trt_friendly_issues(graph)
        hist = op_histogram(graph)
        rows = check_ort(path, spec, model, precision, threads)
        for r in rows:
            if not r.get("ok", True):
                fails.append(f"ONNX Runtime differs from PyTorch at {r['dims']}: {r['errors']} (bound {r['bound']:.2g})")
        report[name] = {"ops": {op: n for (_, op), n in sorted(hist.items())}, "nodes": sum(hist.values()),
                        "ort": rows, "failures": fails}
        log(f"{entry['file']}: checker and shape inference ok, {sum(hist.values())} nodes, {len(hist)} op types "
            f"{'all' if not bad else 'NOT all'} in the TensorRT {table['tensorrt']} parser list")
        for r in rows:
            if "skipped" in r:
                log(f"  ONNX Runtime: skipped ({r['skipped']})")
                continue
            errs = ", ".join(f"{k} max abs err {v:.2e}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in r["errors"].items())
            dims = " ".join(f"{k}={v}" for k, v in r["dims"].items())
            log(f"  ONNX Runtime vs PyTorch at {dims}: {errs} (bound {r.get('bound', 0):.1e}) "
                f"{'ok' if r['ok'] else 'FAILED'}")
        failures += [f"{entry['file']}: {f}" for f in fails]
    if failures:
        raise CheckError("export check failed:\n  " + "\n  ".join(failures))
    return report
