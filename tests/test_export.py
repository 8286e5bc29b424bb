"""Export targets on a tiny distilled student: every target works and is verified, a broken artifact is caught,
and every error is one line. Needs the 'export' extra (onnx, onnxruntime, litert-torch, torchao)."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from edgepkd.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.export]
for module in ("onnxruntime", "onnxscript", "litert_torch", "ai_edge_litert", "torchao"):
    pytest.importorskip(module, reason=f"needs {module}: pip install -e '.[export]'")

from edgepkd.compress import onnx_export, tflite_export  # noqa: E402
from edgepkd.compress.formats import FORMATS, ExportFormat, device_runtimes, runtime_format  # noqa: E402
from edgepkd.compress.targets import BUILTIN_DIR, load_targets  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


@pytest.fixture
def loose_targets(tmp_path):
    """Copies of the int8 targets with a wide accuracy tolerance: the tiny synthetic student is not what int8
    tolerances are meant for; also exercises user targets dropped into a folder."""
    folder = tmp_path / "targets"
    folder.mkdir()
    for path in BUILTIN_DIR.glob("*int8*.yaml"):
        data = yaml.safe_load(path.read_text())
        data["name"] = "loose-" + data["name"]
        data["verify"] = {"max_accuracy_drop": 50.0}
        (folder / f"{data['name']}.yaml").write_text(yaml.safe_dump(data))
    return folder


def test_list_targets(capsys):
    assert main(["export", "--list-targets"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines()]
    assert listed == load_targets().names()


# every built-in target; the ExecuTorch ones, which need the executorch package, in test_executorch.py
BUILTIN_TARGETS = [name for name, t in load_targets().items() if t.format != "executorch"]


@pytest.mark.parametrize("name", FORMATS.names())
def test_every_format_declares_its_facts_and_its_exporter_the_three_calls(name):
    f = FORMATS.get(name)
    assert f.name == name and f.suffix.startswith(".") and f.needs and "none" in f.methods
    assert f.runtime is None or runtime_format(f.runtime) == name
    assert any(t.format == name for _, t in load_targets().items()), "no built-in target uses it"
    if f.missing():
        pytest.skip(f"needs {', '.join(f.missing())}")
    module = f.exporter()
    assert callable(module.export) and callable(module.read_metadata)
    assert type(f).open_runtime is not ExportFormat.open_runtime, "declares no runtime to verify its artifacts in"


def test_suffixes_and_runtimes_are_one_each():
    # tflite-micro writes the same flatbuffer as tflite (any TFLite interpreter runs it): the one shared suffix
    suffixes = [f.suffix for name, f in FORMATS.items() if name != "tflite-micro"]
    assert len(set(suffixes)) == len(suffixes) and len(BUILTIN_TARGETS) >= 9
    assert FORMATS.get("tflite-micro").suffix == FORMATS.get("tflite").suffix
    assert device_runtimes() == sorted({f.runtime for _, f in FORMATS.items() if f.runtime})


def test_unknown_format_in_a_target_is_one_line(tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"name": "mine", "format": "onx", "precision": "fp32"}))
    assert main(["export", "--list-targets", "--targets-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "mine.yaml: format: 'onx' is not allowed; did you mean 'onnx'?" in err and err.count("\n") == 1


@pytest.mark.parametrize("name", BUILTIN_TARGETS)
def test_every_target_exports_verifies_and_describes(name, run_copy, loose_targets, capsys):
    target = name if name.endswith("fp32") else f"loose-{name}"
    assert main(["export", str(run_copy), "--target", target, "--model", "chain/s2", "--targets-dir",
                 str(loose_targets), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    t = load_targets([loose_targets]).get(target)
    path = run_copy / "export" / target / entry["file"]
    assert path.is_file() and entry["bytes"] == path.stat().st_size and len(entry["sha256"]) == 64
    v = entry["verification"]
    assert v["passed"] and v["images"] == 60 and v["runtime"]
    if t.precision == "fp32":
        assert v["max_abs_diff"] <= 1e-4 and v["agreement"] == 100.0
    manifest = json.loads((run_copy / "export" / target / "manifest.json").read_text())
    assert [a["file"] for a in manifest["artifacts"]] == [entry["file"]]
    assert entry["preprocessing"]["input_shape"] == [1, 8, 8] and entry["classes"][0] == "class0"
    assert entry["macs"] > 0 and entry["input"]["shape"] == [1, 1, 8, 8]
    meta = t.export_format.read_metadata(path)  # the file alone carries preprocessing and labels
    assert meta["classes"] == entry["classes"] and meta["preprocessing"] == entry["preprocessing"]
    assert not list(path.parent.glob(".*tmp*")), "temporary files left behind"


def test_default_exports_the_teacher_every_student_and_prefix(run_copy, capsys):
    assert main(["export", str(run_copy), "--target", "onnx-fp32", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    files = sorted(e["file"] for e in entries)
    assert files == ["chain-s1.onnx", "chain-s2.onnx", "ensemble-1-1.onnx", "ensemble-1-2.onnx", "teacher.onnx"]
    teacher = next(e for e in entries if e["model"] == "teacher")
    assert teacher["verification"]["passed"] and teacher["macs"] > max(e["macs"] for e in entries if e is not teacher)


def test_model_is_repeatable_and_keeps_the_order_given(run_copy, capsys):
    assert main(["export", str(run_copy), "--target", "onnx-fp32", "--model", "ensemble[1..2]", "--model", "chain-s1",
                 "--model", "chain/s1", "--json"]) == 0
    assert [e["model"] for e in json.loads(capsys.readouterr().out)] == ["ensemble[1..2]", "chain/s1"]


def _optimized_ops(path, tmp_path) -> list[str]:
    """The op types onnxruntime executes for ``path``: the graph after its load-time optimizations."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / f"opt-{path.name}")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sorted(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)


def test_onnx_int8_weights_stores_int8_and_runs_the_fp32_graph(run_copy, tmp_path):
    import onnx
    from onnx import numpy_helper

    for target in ("onnx-fp32", "onnx-int8-weights"):
        assert main(["export", str(run_copy), "--target", target, "--model", "chain/s1"]) == 0
    fp32 = run_copy / "export" / "onnx-fp32" / "chain-s1.onnx"
    int8 = run_copy / "export" / "onnx-int8-weights" / "chain-s1.onnx"
    graph = onnx.load(str(int8)).graph
    scales = {n.input[1] for n in graph.node if n.op_type == "Mul" and n.input[0] in
              {c.output[0] for c in graph.node if c.op_type == "Cast"}}
    stored = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    assert not [a.shape for name, a in stored.items() if a.dtype == np.float32 and a.size >= 64 and name not in scales]
    assert sum(a.size for a in stored.values() if a.dtype == np.int8) > 0.8 * sum(
        numpy_helper.to_array(t).size for t in onnx.load(str(fp32)).graph.initializer)
    # the Cast + Mul decoders are folded when the session loads: it runs exactly the fp32 graph's ops
    assert _optimized_ops(int8, tmp_path) == _optimized_ops(fp32, tmp_path)


def test_a_refusal_is_recorded_with_its_weights_and_target_and_cleared_by_a_later_export(run_copy):
    """--keep-going (and early exit) record a verification refusal in the manifest; it matches (a later
    --keep-going export skips the model) only while the weights, the target definition, edgepkd's code and the
    packages are the same."""
    import dataclasses

    from edgepkd.compress.export import _refusals, _same_refusal, export_run, sha256
    from edgepkd.compress.targets import VerifyConfig
    from edgepkd.rundir import RunDir

    def refused_before(run, target, models, members):   # what a --keep-going export would skip, and why
        path = run / "export" / target.name / "manifest.json"
        records = _refusals(json.loads(path.read_text())) if path.is_file() else {}
        found = {m: _same_refusal(records.get(m), RunDir(run), members[m], target) for m in models}
        return {m: f for m, f in found.items() if f is not None}

    base = load_targets().get("onnx-fp32")
    strict = dataclasses.replace(base, verify=VerifyConfig(max_abs_diff=1e-30))  # no export is that exact
    refused: list[str] = []
    assert export_run(str(run_copy), strict, models=["chain/s2"], log=lambda *a: None, refused=refused) == []
    assert refused == ["chain/s2"]
    data = json.loads((run_copy / "export" / "onnx-fp32" / "manifest.json").read_text())
    assert data["artifacts"] == [] and [r["model"] for r in data["refused"]] == ["chain/s2"]
    weights = run_copy / "weights" / "chain-s2.safetensors"
    assert data["refused"][0]["weights_sha256"] == {"chain/s2": sha256(weights)}
    members = {"chain/s2": ["chain/s2"], "chain/s1": ["chain/s1"]}
    assert list(refused_before(run_copy, strict, ["chain/s1", "chain/s2"], members)) == ["chain/s2"]
    assert "|logit diff|" in refused_before(run_copy, strict, ["chain/s2"], members)["chain/s2"][0]
    assert refused_before(run_copy, base, ["chain/s2"], members) == {}          # another tolerance: try again
    from edgepkd.rundir import load_safetensors, save_safetensors

    tensors, meta = load_safetensors(weights)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name] * 1.001                                    # retrained: other weights
    save_safetensors(weights, tensors, meta)
    assert refused_before(run_copy, strict, ["chain/s2"], members) == {}
    # the same target passes once the tolerance is the built-in one: the record goes
    assert [e["model"] for e in export_run(str(run_copy), base, models=["chain/s2"], log=lambda *a: None,
                                           refused=[])] == ["chain/s2"]
    data = json.loads((run_copy / "export" / "onnx-fp32" / "manifest.json").read_text())
    assert "refused" not in data and [e["model"] for e in data["artifacts"]] == ["chain/s2"]
    # malformed records are ignored, not a traceback: they only save a re-export
    data["refused"] = [{"model": ["chain/s2"]}, "junk", {"model": None}, {"model": "chain/s2", "failures": None}]
    (run_copy / "export" / "onnx-fp32" / "manifest.json").write_text(json.dumps(data))
    assert refused_before(run_copy, strict, ["chain/s2"], members) == {}
    assert export_run(str(run_copy), strict, models=["chain/s2"], log=lambda *a: None, refused=[]) == []


def test_keep_going_does_not_export_again_what_it_refused_under_the_same_key(run_copy, monkeypatch):
    """A refusal recorded under the current key is skipped by a later --keep-going export that names no model
    (the same weights, target, code and packages give the same failure); a changed key or a named model exports."""
    import dataclasses

    import edgepkd.compress.export as export_mod
    from edgepkd.compress.targets import VerifyConfig

    base = load_targets().get("onnx-fp32")
    strict = dataclasses.replace(base, verify=VerifyConfig(max_abs_diff=1e-30))  # no export is that exact
    assert export_mod.export_run(str(run_copy), strict, models=["chain/s2"], log=lambda *a: None, refused=[]) == []
    verify = export_mod.verify

    def no_verify(*a, **k):
        raise AssertionError("exported and verified again")
    monkeypatch.setattr(export_mod, "verify", no_verify)
    logs, refused = [], []
    assert export_mod.export_run(str(run_copy), strict, models=["chain/s2"], log=logs.append, refused=refused,
                                 skip_refused=True) == []
    assert refused == ["chain/s2"] and "refused before" in logs[0] and "|logit diff|" in logs[0], logs
    assert not list((run_copy / "export" / "onnx-fp32").glob(".*tmp*"))
    monkeypatch.setattr(export_mod, "verify", verify)
    # another tolerance is another key: exported, passes, and the record goes
    assert [e["model"] for e in export_mod.export_run(str(run_copy), base, models=["chain/s2"], log=lambda *a: None,
                                                      refused=[], skip_refused=True)] == ["chain/s2"]
    # export_targets skips only with --keep-going and no model named
    seen = []
    monkeypatch.setattr(export_mod, "export_run", lambda *a, **k: seen.append(k["skip_refused"]) or [])
    for keep_going, models in ((True, None), (True, ["chain/s2"]), (False, None)):
        export_mod.export_targets(str(run_copy), [base], models=models, keep_going=keep_going, log=lambda *a: None)
    assert seen == [True, False, False]


def test_onnx_int8_dynamic_quantizes_every_matmul_weight(run_copy, loose_targets):
    """The fp32 ONNX form multiplies W @ x (EXPORT_FORMS 'proj'), whose weight quantize_dynamic leaves in float
    (it quantizes a MatMul's second operand only: the MNIST s1 file was 0.47x of fp32); onnxruntime-quantized
    targets export the 'onnx-ort-quantized' form, with x @ W^T."""
    import onnx
    from onnx import numpy_helper

    assert [load_targets().get(t).form for t in ("onnx-fp32", "onnx-int8-weights", "onnx-int8", "onnx-int8-dynamic")] \
        == ["onnx", "onnx", "onnx-ort-quantized", "onnx-ort-quantized"]

    assert main(["export", str(run_copy), "--target", "loose-onnx-int8-dynamic", "--model", "chain/s1",
                 "--targets-dir", str(loose_targets)]) == 0
    graph = onnx.load(str(run_copy / "export" / "loose-onnx-int8-dynamic" / "chain-s1.onnx")).graph
    stored = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    float_weights = [(n.op_type, stored[i].shape) for n in graph.node if n.op_type in ("MatMul", "Gemm", "Conv")
                     for i in n.input if i in stored and stored[i].dtype == np.float32 and stored[i].size >= 64]
    assert not float_weights, float_weights
    assert any(n.op_type == "MatMulInteger" for n in graph.node)


def test_tflite_int8_weights_dequantizes_constants_only(run_copy):
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    assert main(["export", str(run_copy), "--target", "tflite-int8-weights", "--model", "chain/s1"]) == 0
    model = flatbuffer_utils.read_model(str(run_copy / "export" / "tflite-int8-weights" / "chain-s1.tflite"))
    (sub,) = model.subgraphs
    codes = [model.operatorCodes[op.opcodeIndex].builtinCode for op in sub.operators]
    decoders = [op for op, c in zip(sub.operators, codes) if c == schema.BuiltinOperator.DEQUANTIZE]
    assert decoders and codes[:len(decoders)] == [schema.BuiltinOperator.DEQUANTIZE] * len(decoders)
    for op in decoders:  # an int8 constant in, a float tensor without data out
        src, dst = sub.tensors[op.inputs[0]], sub.tensors[op.outputs[0]]
        assert src.type == schema.TensorType.INT8 and model.buffers[src.buffer].data is not None
        assert dst.type == schema.TensorType.FLOAT32 and model.buffers[dst.buffer].data is None
        assert len(src.quantization.scale) in (1, src.shape[src.quantization.quantizedDimension])
    (code,) = [c for c in model.operatorCodes if c.builtinCode == schema.BuiltinOperator.DEQUANTIZE]
    per_channel = any(len(sub.tensors[op.inputs[0]].quantization.scale) > 1 for op in decoders)
    assert code.version == (5 if per_channel else 2)  # TFLite's op_version: per-channel int8 DEQUANTIZE is v5
    big_float = [t.shape for t in sub.tensors if t.type == schema.TensorType.FLOAT32
                 and model.buffers[t.buffer].data is not None and np.prod(t.shape) >= 64]
    assert not big_float


def test_plain_runtime_script_reproduces_manifest_accuracy(run_copy, loose_targets):
    """Only the manifest, the raw uint8 test images and the runtime: no edgepkd model code."""
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    from edgepkd.data import load_dataset
    from edgepkd.recipe import load_recipe

    assert main(["export", str(run_copy), "--target", "onnx-fp32", "--model", "ensemble[1..2]"]) == 0
    assert main(["export", str(run_copy), "--target", "loose-tflite-int8-static", "--model", "chain/s1",
                 "--targets-dir", str(loose_targets)]) == 0
    recipe = load_recipe(run_copy / "recipe.yaml")
    test = load_dataset(recipe.data, recipe.seed).test
    for target in ("onnx-fp32", "loose-tflite-int8-static"):
        (entry,) = json.loads((run_copy / "export" / target / "manifest.json").read_text())["artifacts"]
        pre = entry["preprocessing"]
        mean = np.array(pre["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.array(pre["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        x = (test.x.numpy().astype(np.float32) * pre["scale"] - mean) / std
        path = str(run_copy / "export" / target / entry["file"])
        preds = []
        if entry["format"] == "onnx":
            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            preds = [sess.run(None, {entry["input"]["name"]: x[i:i + 1]})[0].argmax() for i in range(len(x))]
        else:
            it = Interpreter(model_path=path)
            it.allocate_tensors()
            inp, out = it.get_input_details()[0], it.get_output_details()[0]
            q = entry["input"]["quantization"]
            assert entry["input"]["dtype"] == "int8" and q["scale"] == pytest.approx(inp["quantization"][0])
            for i in range(len(x)):
                xq = np.clip(np.round(x[i:i + 1] / q["scale"]) + q["zero_point"], -128, 127).astype(np.int8)
                it.set_tensor(inp["index"], xq)
                it.invoke()
                preds.append(it.get_tensor(out["index"]).argmax())
        acc = 100.0 * float(np.mean(np.array(preds) == test.y.numpy()))
        assert acc == pytest.approx(entry["verification"]["accuracy"], abs=1e-9)


def test_broken_artifact_is_caught_and_nothing_is_written(run_copy, monkeypatch, capsys):
    assert main(["export", str(run_copy), "--target", "onnx-fp32", "--model", "chain/s1"]) == 0
    good = (run_copy / "export" / "onnx-fp32" / "chain-s1.onnx").read_bytes()
    real_export = onnx_export.export

    def corrupt_then_export(model, *args, **kwargs):
        import copy

        broken = copy.deepcopy(model)  # the artifact deviates; the PyTorch reference does not
        with torch.no_grad():
            broken.head.bias.add_(0.01)  # 1e-2 > the 1e-4 tolerance, and no top-1 change needed to catch it
        return real_export(broken, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "export", corrupt_then_export)
    assert main(["export", str(run_copy), "--target", "onnx-fp32", "--model", "chain/s2"]) == 1
    err = capsys.readouterr().err
    assert "chain/s2 failed verification" in err and "max |logit diff|" in err and err.count("\n") == 1
    folder = run_copy / "export" / "onnx-fp32"
    assert not (folder / "chain-s2.onnx").exists() and not list(folder.glob(".*"))
    assert (folder / "chain-s1.onnx").read_bytes() == good  # earlier results intact
    assert [a["file"] for a in json.loads((folder / "manifest.json").read_text())["artifacts"]] == ["chain-s1.onnx"]


def test_pt2e_exclude_modules_leaves_the_scan_projections_unannotated(run_dir):
    """tflite-int8-static keeps x_proj / dt_proj float: their nodes carry no quantization annotation."""
    from edgepkd.compress.tflite_export import _module_path, _quantizer
    from edgepkd.models import export_mode, load_model
    from edgepkd.rundir import RunDir

    target = load_targets().get("tflite-int8-static")
    assert target.quantization.exclude_modules == ["*.x_proj", "*.dt_proj"]
    model, meta = load_model(RunDir(run_dir).weights_path("chain/s1"))
    example = torch.zeros(1, *meta["preprocessing"]["input_shape"])
    with export_mode(model.eval()):
        gm = torch.export.export(model, (example,)).module()
    _quantizer(target).annotate(gm)
    annotated = {_module_path(n) for n in gm.graph.nodes if "quantization_annotation" in n.meta}
    assert any(p.endswith(".in_proj") for p in annotated) and "head" in annotated
    assert not any(p.endswith((".x_proj", ".dt_proj")) for p in annotated)


def test_keep_going_writes_the_models_that_pass_and_names_the_others(run_copy, monkeypatch, capsys):
    real_export = onnx_export.export

    def corrupt_s2(model, example, path, *args, **kwargs):
        import copy

        if "chain-s2" in path.name:  # written under a temporary name first
            model = copy.deepcopy(model)
            with torch.no_grad():
                model.head.bias.add_(0.01)
        return real_export(model, example, path, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "export", corrupt_s2)
    assert main(["export", str(run_copy), "--target", "onnx-fp32", "--keep-going"]) == 1
    captured = capsys.readouterr()
    assert "chain-s2.onnx" in captured.out and "skipped: failed verification" in captured.out
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "1 model(s) failed verification" in err and "onnx-fp32: chain/s2" in err
    folder = run_copy / "export" / "onnx-fp32"
    written = [a["model"] for a in json.loads((folder / "manifest.json").read_text())["artifacts"]]
    assert "chain/s2" not in written and "chain/s1" in written and len(written) >= 3
    assert not (folder / "chain-s2.onnx").exists() and not list(folder.glob(".*"))


def test_no_verify_says_so_loudly(run_copy, capsys):
    assert main(["export", str(run_copy), "--target", "onnx-fp32", "--model", "chain/s2", "--no-verify"]) == 0
    captured = capsys.readouterr()
    assert "NOT checked" in captured.err and "NOT VERIFIED" in captured.out
    (entry,) = json.loads((run_copy / "export" / "onnx-fp32" / "manifest.json").read_text())["artifacts"]
    assert entry["verification"] == {"passed": None, "skipped": True}


def test_failed_conversion_names_the_model_and_leaves_nothing(run_copy, monkeypatch, capsys):
    def boom(model, example, path, *a, **k):
        path.write_bytes(b"half-written")
        raise RuntimeError("Unsupported op aten::frobnicate in module blocks.0.mixer")

    monkeypatch.setattr(tflite_export, "export", boom)
    assert main(["export", str(run_copy), "--target", "tflite-fp32", "--model", "chain/s2"]) == 1
    err = capsys.readouterr().err
    assert "export of chain/s2 to tflite-fp32 failed: RuntimeError: Unsupported op aten::frobnicate" in err
    assert err.count("\n") == 1
    assert not list((run_copy / "export" / "tflite-fp32").glob("*.tflite*"))
    assert not list((run_copy / "export" / "tflite-fp32").glob(".*"))


@pytest.mark.parametrize("args, code, message", [
    (["--target", "onnx-fp33"], 2, "unknown export target 'onnx-fp33'; did you mean 'onnx-fp32'?"),
    (["--target", "onnx-fp32", "--model", "chain/s9"], 2, "--model chain/s9: not a model of"),
    ([], 2, "give --target NAME"),
])
def test_errors_are_one_line(run_copy, capsys, args, code, message):
    assert main(["export", str(run_copy), *args]) == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_or_incomplete_run(run_copy, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--target", "onnx-fp32"]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (run_copy / "weights" / "chain-s2.safetensors").unlink()
    assert main(["export", str(run_copy), "--target", "onnx-fp32"]) == 2
    assert "weights/chain-s2.safetensors is missing" in capsys.readouterr().err
    (run_copy / "metrics.json").unlink()
    assert main(["export", str(run_copy), "--target", "onnx-fp32"]) == 2
    assert "metrics.json is missing" in capsys.readouterr().err


def test_missing_extra_gives_the_pip_line(run_copy, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "litert_torch" else real(name, *a))
    assert main(["export", str(run_copy), "--target", "tflite-fp32"]) == 1
    err = capsys.readouterr().err
    assert "needs litert_torch: pip install -e '.[export]'" in err


def _list_targets_with(tmp_path, target_yaml: str) -> int:
    """``export --list-targets`` with one user target file holding ``target_yaml``; its exit code."""
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "mine.yaml").write_text(target_yaml)
    return main(["export", "--list-targets", "--targets-dir", str(folder)])


def test_malformed_target_file(tmp_path, capsys):
    assert _list_targets_with(tmp_path, "name: mine\nformat: onnx\nprecision: fp32\n"
                              "quantization: {method: pt2e}\n") == 2
    assert "quantization.method: 'pt2e' does not apply to format onnx" in capsys.readouterr().err


def test_weights_method_refuses_exclude_modules(tmp_path, capsys):
    assert _list_targets_with(tmp_path, "name: mine\nformat: tflite\nprecision: int8\n"
                              "quantization: {method: weights, exclude_modules: ['*.x_proj']}\n") == 2
    err = capsys.readouterr().err
    assert "quantization.exclude_modules: method weights stores every float constant" in err and err.count("\n") == 1


def test_float_weights_int8_only_with_pt2e_tflite(tmp_path, capsys):
    assert _list_targets_with(tmp_path, "name: mine\nformat: onnx\nprecision: int8\n"
                              "quantization: {method: ort_static, float_weights: int8}\n") == 2
    err = capsys.readouterr().err
    assert "quantization.float_weights: int8 storage of the float constants left applies to method pt2e" in err
    assert err.count("\n") == 1


def test_pt2e_float_weights_int8_stores_what_stays_float_as_int8(run_copy, loose_targets):
    """tflite-int8-static with float_weights int8 (its default) against the same target with fp32 storage: no float
    constant of >= 64 finite values is left, the file is smaller, and both pass the same verification."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    data = yaml.safe_load((loose_targets / "loose-tflite-int8-static.yaml").read_text())
    assert data["quantization"]["float_weights"] == "int8"
    data["name"], data["quantization"]["float_weights"] = "fp32-stored", "fp32"
    (loose_targets / "fp32-stored.yaml").write_text(yaml.safe_dump(data))
    sizes, left = {}, {}
    for name in ("loose-tflite-int8-static", "fp32-stored"):
        assert main(["export", str(run_copy), "--target", name, "--model", "chain/s1",
                     "--targets-dir", str(loose_targets)]) == 0
        path = run_copy / "export" / name / "chain-s1.tflite"
        sizes[name] = path.stat().st_size
        model = flatbuffer_utils.read_model(str(path))
        (sub,) = model.subgraphs
        left[name] = [t.shape for t in sub.tensors if t.type == schema.TensorType.FLOAT32
                      and model.buffers[t.buffer].data is not None and np.prod(t.shape) >= 64
                      and np.isfinite(np.frombuffer(model.buffers[t.buffer].data.tobytes(), np.float32)).all()]
    assert left["fp32-stored"] and not left["loose-tflite-int8-static"]  # x_proj stays float in both graphs
    assert sizes["loose-tflite-int8-static"] < sizes["fp32-stored"]


def test_onnx_int8_stores_7_bit_weights(run_copy, loose_targets):
    """onnx-int8 quantizes with onnxruntime's reduce_range (7-bit weights, |q| <= 64), which its u8s8 kernels need
    on x86 CPUs without VNNI (8-bit weights saturated there: MNIST chain/s7 20.83 % instead of 91 %); the same
    target without it stores the full 8-bit range."""
    import onnx
    from onnx import numpy_helper

    data = yaml.safe_load((loose_targets / "loose-onnx-int8.yaml").read_text())
    assert data["quantization"]["reduce_range"] is True
    data["name"] = "loose-onnx-int8-8bit"
    data["quantization"]["reduce_range"] = False
    (loose_targets / "loose-onnx-int8-8bit.yaml").write_text(yaml.safe_dump(data))
    widest = {}
    for name in ("loose-onnx-int8", "loose-onnx-int8-8bit"):
        assert main(["export", str(run_copy), "--target", name, "--model", "chain/s1",
                     "--targets-dir", str(loose_targets)]) == 0
        graph = onnx.load(str(run_copy / "export" / name / "chain-s1.onnx")).graph
        weights = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8
                   and len(t.dims) >= 2]
        assert weights
        widest[name] = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert widest["loose-onnx-int8"] <= 64 < widest["loose-onnx-int8-8bit"], widest
