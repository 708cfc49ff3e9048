"""ONNX export: rewrites equal the reference, ORT equals PyTorch at other shapes, TensorRT op check, manifest, CLI."""
import json

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from tolerances import EXPORT_FP16, EXPORT_FP32
from vidrd.export import onnx_export
from vidrd.export.check import CheckError, check_export, check_trt_ops, trt_friendly_issues, unsupported_ops
from vidrd.export.onnx_export import export, read_manifest
from vidrd.export.ort import choose_providers, make_session, session_provider
from vidrd.export.rewrite import example_inputs, export_module, verify
from vidrd.export.spec import COMPONENTS, ComponentSpec, component_specs, read_specs
from vidrd.ref.weights import random_model
from vidrd.runtime.cli import main



pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    return random_model("tiny", 0)


@pytest.fixture(scope="module")
def tiny_export(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_export")
    (out / "notes.txt").write_text("not ours")
    result = export(tiny, out, source={"kind": "preset", "preset": "tiny", "seed": 0})
    assert not result.skipped
    return out


def test_rewrites_equal_reference(tiny):
    specs = component_specs(tiny.config)
    for name in ("unet", "vae_decoder_temporal"):
        module = export_module(tiny, name)
        for dims in (specs[name].example, *specs[name].checks):
            err = verify(tiny, name, module, example_inputs(specs[name], dims, tiny.config))
            assert err < EXPORT_FP32, (name, dims, err)
    # the copy shares the reference's tensors and leaves the reference modules untouched
    assert type(tiny.unet.down_blocks[0].temp_convs[0]).__name__ == "TemporalConv"


def test_manifest_and_specs(tiny_export, tiny):
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    assert manifest["opset"] == 17 and manifest["precision"] == "fp32" and manifest["complete"]
    assert {"torch", "onnx"} <= set(manifest["versions"]) and len(manifest["weights_sha256"]) == 64
    assert set(manifest["components"]) == set(COMPONENTS)
    specs = read_specs(tiny_export)
    assert specs == component_specs(tiny.config, "fp32")
    unet = specs["unet"]
    assert unet.input_names == ["sample", "timestep", "encoder_hidden_states"] and unet.output_names == ["noise_pred"]
    assert unet.shape("noise_pred", {"N": 2, "F": 8, "h": 32, "w": 32}) == (2, 4, 8, 32, 32)
    assert unet.profile()["sample"] == ((1, 4, 2, 8, 8), (2, 4, 8, 32, 32), (8, 4, 32, 64, 64))
    assert specs["vae_decoder"].shape("frames", {"N": 8, "h": 32, "w": 32}) == (8, 3, 256, 256)
    assert specs["text_encoder"].io["input_ids"].torch_dtype == torch.int64
    with pytest.raises(ValueError, match="F=1"):
        unet.check_dims({"N": 2, "F": 1, "h": 32, "w": 32})
    for name, entry in manifest["components"].items():
        assert (tiny_export / entry["file"]).stat().st_size == entry["bytes"] and entry["external_data"] is None
        model = onnx.load(str(tiny_export / entry["file"]))
        assert [i.name for i in model.graph.input] == specs[name].input_names
        assert [o.name for o in model.graph.output] == specs[name].output_names
    assert (tiny_export / "notes.txt").read_text() == "not ours"
    assert not [p for p in tiny_export.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_ort_matches_reference(tiny_export, tiny):
    report = check_export(tiny_export, tiny, threads=1, log=lambda *a: None)
    assert set(report) == set(COMPONENTS)
    for name, rep in report.items():
        spec = read_specs(tiny_export)[name]
        assert len(rep["ort"]) >= 2 and not rep["failures"]
        for row in rep["ort"]:
            assert row["dims"] != spec.example
            assert all(err <= EXPORT_FP32 for err in row["errors"].values()), (name, row)


def test_graphs_are_tensorrt_friendly(tiny_export):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(tiny_export / "unet.onnx")))
    ops = check_trt_ops(model)
    assert ("", "ScatterND") not in ops and ops[("", "Resize")] == 3 and not trt_friendly_issues(model)
    inits = {t.name: t for t in model.graph.initializer}
    assert all(len(inits[n.input[1]].dims) == 4 for n in model.graph.node if n.op_type == "Conv")


def _graph(op, domain="", **attrs):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inputs = ["x", "", "scales"] if op == "Resize" else ["x"]
    node = helper.make_node(op, inputs, ["y"], domain=domain, **attrs)
    scales = [helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])] if op == "Resize" else []
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(helper.make_graph([node], "g", [x], [y], scales), opset_imports=opsets)


def test_op_check_rejects_unsupported_ops():
    assert unsupported_ops(_graph("Relu")) == {}
    assert unsupported_ops(_graph("Resize", mode="nearest", coordinate_transformation_mode="asymmetric",
                                  nearest_mode="floor")) == {}
    with pytest.raises(CheckError, match="Unique"):
        check_trt_ops(_graph("Unique"))
    with pytest.raises(CheckError, match="com.example::MyOp"):
        check_trt_ops(_graph("MyOp", domain="com.example"))
    with pytest.raises(CheckError, match=r"Resize\(mode=cubic\)"):
        check_trt_ops(_graph("Resize", mode="cubic"))
    with pytest.raises(CheckError, match="tf_crop_and_resize"):
        check_trt_ops(_graph("Resize", coordinate_transformation_mode="tf_crop_and_resize"))


def test_up_to_date_skip_and_no_clobber(tiny, tmp_path):
    comps = ("vae_decoder",)
    first = export(tiny, tmp_path, components=comps, log=lambda *a: None)
    stamp = (tmp_path / "vae_decoder.onnx").stat().st_mtime_ns
    lines = []
    again = export(tiny, tmp_path, components=comps, log=lines.append)
    assert again.skipped and "up to date" in lines[0] and not first.skipped
    assert (tmp_path / "vae_decoder.onnx").stat().st_mtime_ns == stamp
    other = random_model("tiny", 1)  # other weights: redone
    assert not export(other, tmp_path, components=comps, log=lambda *a: None).skipped
    assert read_manifest(tmp_path)["weights_sha256"] != first.manifest["weights_sha256"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "vae_decoder.onnx").write_bytes(b"someone else's")
    with pytest.raises(FileExistsError, match="not from a vidrd export"):
        export(tiny, foreign, components=comps, log=lambda *a: None)
    assert (foreign / "vae_decoder.onnx").read_bytes() == b"someone else's"


def test_external_data_and_stale_file_cleanup(tiny, tmp_path, monkeypatch):
    comps = ("vae_decoder",)
    monkeypatch.setattr(onnx_export, "PROTO_LIMIT", 0)  # as if the model passed 2 GB
    export(tiny, tmp_path, components=comps, log=lambda *a: None)
    assert read_manifest(tmp_path)["components"]["vae_decoder"]["external_data"] == "vae_decoder.onnx.data"
    assert (tmp_path / "vae_decoder.onnx.data").stat().st_size > (tmp_path / "vae_decoder.onnx").stat().st_size
    check_export(tmp_path, tiny, threads=1, log=lambda *a: None)
    monkeypatch.undo()
    export(tiny, tmp_path, components=comps, force=True, log=lambda *a: None)
    assert not (tmp_path / "vae_decoder.onnx.data").exists()


def test_fp16_export_runs_loosely(tiny, tmp_path):
    comps = ("text_encoder", "vae_decoder")
    export(tiny, tmp_path, precision="fp16", components=comps, log=lambda *a: None)
    specs = read_specs(tmp_path)
    assert specs["vae_decoder"].io["latents"].dtype == "float16"
    report = check_export(tmp_path, tiny, threads=1, log=lambda *a: None)
    for rep in report.values():
        assert not rep["failures"]
        for row in rep["ort"]:
            assert "skipped" in row or all(e < EXPORT_FP16 for e in row["errors"].values())


def test_ort_session_helper(tiny_export):
    assert choose_providers(available=["CUDAExecutionProvider", "CPUExecutionProvider"]) == \
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(available=["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    sess = make_session(tiny_export / "text_encoder.onnx", threads=1)
    assert session_provider(sess) in choose_providers()
    with pytest.raises(RuntimeError, match="asked for"):
        make_session(tiny_export / "text_encoder.onnx", require="TensorrtExecutionProvider", threads=1)
    with pytest.raises(ValueError, match="unknown execution providers"):
        choose_providers(prefer=("FooExecutionProvider",))


def test_cli_exports_and_checks_fixture_model(tiny_dir, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", "--weights", str(tiny_dir), "--out", str(out), "--check", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "check passed" in text and "noise_pred max abs err" in text
    manifest = read_manifest(out)
    assert manifest["source"] == {"kind": "weights", "weights": str(tiny_dir.resolve())}
    # again, without model flags: the manifest names the model; the export is up to date and only re-checked
    assert main(["export", "--out", str(out), "--check-only", "--components", "vae_decoder", "--threads", "1"]) == 0
    assert "check passed" in capsys.readouterr().out
    assert main(["export", "--out", str(out), "--components", "nope"]) == 2


def test_spec_json_round_trip(tiny):
    for spec in component_specs(tiny.config, "fp16").values():
        assert ComponentSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    with pytest.raises(ValueError, match="precision"):
        component_specs(tiny.config, "int8")
