"""ExecuTorch targets on a tiny distilled run: executorch-fp32 and executorch-int8 export, verify and carry their
metadata; a corrupted .pte is caught; the device runner runs .pte files without torch (executorch-numpy-runtime in
a venv holding only numpy and that runtime, checked through sys.modules); `bench` and `pick` on host-executorch;
a missing ExecuTorch is one line with the pip command. No assertion depends on a timing."""

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import manifest, one_line_error
from edgepkd.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.export]
for module in ("executorch", "torchao"):
    pytest.importorskip(module, reason=f"needs {module}: pip install -e '.[export]'")

from edgepkd.compress import executorch_export  # noqa: E402
from edgepkd.compress.targets import BUILTIN_DIR, load_targets  # noqa: E402
from edgepkd.measure import runner as runner_module  # noqa: E402

RUNNER = Path(runner_module.__file__)
FAST = ["--min-runs", "3", "--min-seconds", "0", "--warmup-seconds", "0"]
NUMPY_RUNTIME = "executorch-numpy-runtime==1.4.0"


@pytest.fixture(scope="module")
def run_dir(tiny_exported_run):
    """The tiny recipe; chain/s1 and chain/s2 exported to executorch-fp32, chain/s2 to loose-executorch-int8."""
    return tiny_exported_run


def write_images(run: Path, path: Path) -> Path:
    import numpy as np

    from edgepkd.data import load_dataset
    from edgepkd.recipe import load_recipe

    recipe = load_recipe(run / "recipe.yaml")
    test = load_dataset(recipe.data, recipe.seed).test
    np.savez(path, images=test.x.numpy(), labels=test.y.numpy())
    return path


def run_runner(*args: str, python: str = sys.executable, cwd=None, env=None) -> tuple[int, list[dict], str]:
    proc = subprocess.run([python, *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env=None if env is None else {**os.environ, **env})
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")], \
        proc.stderr


# ------------------------------------------------------------------------------------------------- export
def test_both_targets_are_listed_and_verified_with_their_metadata(run_dir, capsys):
    assert main(["export", "--list-targets"]) == 0
    out = capsys.readouterr().out
    assert "executorch-fp32" in out and "executorch-int8" in out
    fp32 = manifest(run_dir, "executorch-fp32")
    int8 = manifest(run_dir, "loose-executorch-int8")
    assert sorted(fp32) == ["chain-s1.pte", "chain-s2.pte"] and list(int8) == ["chain-s2.pte"]
    for target, entries in (("executorch-fp32", fp32), ("loose-executorch-int8", int8)):
        for file, entry in entries.items():
            path = run_dir / "export" / target / file
            assert path.read_bytes()[4:8] == b"ET12"  # ExecuTorch's program identifier
            assert entry["format"] == "executorch" and entry["bytes"] == path.stat().st_size
            v = entry["verification"]
            assert v["passed"] and v["images"] == 60 and v["runtime"] == "executorch" and v["runtime_version"]
            assert entry["input"] == {"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32"}
            meta = executorch_export.read_metadata(path)  # the file alone carries preprocessing, labels, provenance
            assert meta["classes"] == entry["classes"] and meta["preprocessing"] == entry["preprocessing"]
            assert meta["provenance"] == entry["provenance"] and meta["model"] == entry["model"]
            assert not list(path.parent.glob(".*tmp*")), "temporary files left behind"
    for entry in fp32.values():
        assert entry["verification"]["max_abs_diff"] <= 1e-4 and entry["verification"]["agreement"] == 100.0
    # int8 computes differently from fp32 (quantized layers), far beyond the fp32 file's float rounding
    assert int8["chain-s2.pte"]["verification"]["max_abs_diff"] > \
        100 * fp32["chain-s2.pte"]["verification"]["max_abs_diff"]
    assert int8["chain-s2.pte"]["precision"] == "int8"


def test_int8_quantizer_annotates_linear_and_conv_but_not_the_scan_projections(run_dir):
    """executorch-int8 keeps x_proj / dt_proj float (exclude_modules) and the scan's elementwise ops unquantized."""
    from edgepkd.compress.tflite_export import _module_path
    from edgepkd.models import export_mode, load_model
    from edgepkd.rundir import RunDir

    target = load_targets().get("executorch-int8")
    assert target.quantization.exclude_modules == ["*.x_proj", "*.dt_proj"] and target.quantization.per_channel
    model, meta = load_model(RunDir(run_dir).weights_path("chain/s1"))
    example = torch.zeros(1, *meta["preprocessing"]["input_shape"])
    with export_mode(model.eval()):
        gm = torch.export.export(model, (example,)).module()
    executorch_export._quantizer(target).annotate(gm)
    annotated = [n for n in gm.graph.nodes if "quantization_annotation" in n.meta]
    paths = {_module_path(n) for n in annotated}
    assert any(p.endswith(".in_proj") for p in paths) and "head" in paths
    assert not any(p.endswith((".x_proj", ".dt_proj")) for p in paths)
    targets = {n.target for n in annotated if n.op == "call_function"}
    assert torch.ops.aten.linear.default in targets and torch.ops.aten.conv1d.default in targets
    aten = torch.ops.aten  # the scan's arithmetic stays float (shape ops next to a quantized layer may be annotated)
    assert not targets & {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.exp.default, aten.cat.default,
                          aten.softplus.default, aten.sum.dim_IntList, aten.silu.default}


def test_corrupted_pte_is_caught_and_nothing_is_written(run_copy, monkeypatch, capsys):
    folder = run_copy / "export" / "executorch-fp32"
    good = (folder / "chain-s1.pte").read_bytes()
    before = (folder / "manifest.json").read_bytes()
    real_export = executorch_export.export

    def export_then_truncate(model, example, path, *args, **kwargs):
        real_export(model, example, path, *args, **kwargs)
        path.write_bytes(path.read_bytes()[:1000])  # a truncated program

    monkeypatch.setattr(executorch_export, "export", export_then_truncate)
    assert main(["export", str(run_copy), "--target", "executorch-fp32", "--model", "chain/s2"]) == 1
    err = one_line_error(capsys)
    assert "chain/s2 to executorch-fp32 failed" not in err  # not a conversion error: the runtime refused it
    assert "cannot load it" in err and ".chain-s2.tmp.pte" in err
    assert not list(folder.glob(".*")) and (folder / "chain-s1.pte").read_bytes() == good
    assert (folder / "manifest.json").read_bytes() == before  # chain-s2's earlier artifact stays listed, untouched

    def export_deviating(model, *args, **kwargs):
        import copy

        broken = copy.deepcopy(model)  # the program deviates; the PyTorch reference does not
        with torch.no_grad():
            broken.head.bias.add_(0.01)
        return real_export(broken, *args, **kwargs)

    monkeypatch.setattr(executorch_export, "export", export_deviating)
    assert main(["export", str(run_copy), "--target", "executorch-fp32", "--model", "chain/s2"]) == 1
    err = one_line_error(capsys)
    assert "chain/s2 failed verification" in err and "max |logit diff|" in err
    assert (folder / "manifest.json").read_bytes() == before


def test_runner_refuses_a_corrupted_pte_in_one_line(run_dir, tmp_path):
    blob = (run_dir / "export" / "executorch-fp32" / "chain-s1.pte").read_bytes()
    for name, data in (("truncated.pte", blob[:len(blob) // 2]), ("junk.pte", b"not a program" * 10)):
        (tmp_path / name).write_bytes(data)
        code, (out,), err = run_runner(str(RUNNER), str(tmp_path / name), *FAST)
        assert code == 2 and out["kind"] == "artifact" and "cannot load it" in out["error"]
        assert err.startswith("runner: error: ") and err.count("\n") == 1, err


def test_missing_executorch_is_one_line_with_the_pip_command(run_copy, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "executorch" else real(name, *a))
    assert main(["export", str(run_copy), "--target", "executorch-int8"]) == 1
    assert "export target 'executorch-int8' needs executorch: pip install -e '.[export]'" in one_line_error(capsys)
    monkeypatch.undo()

    # a device without either runtime: both packages shadowed by ones that fail to import, for every process
    hidden = tmp_path / "hidden"
    for name in ("executorch", "executorch_numpy_runtime"):
        (hidden / name).mkdir(parents=True)
        (hidden / name / "__init__.py").write_text("raise ImportError('not on this device')\n")
    monkeypatch.setenv("PYTHONPATH", str(hidden))
    pte = run_copy / "export" / "executorch-fp32" / "chain-s1.pte"
    code, (out,), err = run_runner(str(RUNNER), str(pte), *FAST)
    assert code == 3 and out["kind"] == "environment" and err.count("\n") == 1
    assert "no executorch runtime on this device (tried executorch_numpy_runtime, executorch)" in err
    assert "pip install executorch-numpy-runtime" in err
    # bench there (three artifacts, each in its own runner process): one line, nothing stored
    assert main(["bench", str(run_copy), "--device", "host-executorch", *FAST[:4]]) == 1
    err = one_line_error(capsys)
    assert "device 'host-executorch': no executorch runtime on this device" in err
    assert not (run_copy / "bench" / "host-executorch.json").exists()


# ---------------------------------------------------------------------------------------------- bench, pick
def test_bench_and_pick_on_host_executorch(run_copy, capsys):
    assert main(["bench", str(run_copy), "--device", "host-executorch", *FAST[:4]]) == 0
    out = capsys.readouterr().out
    assert "device 'host-executorch' (local): executorch " in out and "1 thread(s)" in out and "p90 ms" in out
    stored = json.loads((run_copy / "bench" / "host-executorch.json").read_text())
    assert sorted(stored["results"]) == ["executorch-fp32/chain-s1.pte", "executorch-fp32/chain-s2.pte",
                                         "loose-executorch-int8/chain-s2.pte"] and stored["errors"] == {}
    for key, r in stored["results"].items():
        target, file = key.split("/")
        entry = manifest(run_copy, target)[file]
        assert key.split("/")[1] in out
        assert r["sha256"] == entry["sha256"] and not r["estimated"] and r["format"] == "executorch"
        assert r["accuracy"]["top1"] == pytest.approx(entry["verification"]["accuracy"])  # on-device top-1
        assert r["runtime"] == "executorch" and r["threads"] == 1 and r["torch_imported"] is True
        assert r["runs"] >= 3 and r["latency_ms"]["p50"] <= r["latency_ms"]["p90"]
        assert r["memory"]["model_rss_bytes"] is not None and r["metadata"] == "manifest.json"
    bench_file = (run_copy / "bench" / "host-executorch.json").read_bytes()
    assert main(["pick", str(run_copy), "--device", "host-executorch", "--latency-ms", "1000", "--no-bench"]) == 0
    out = capsys.readouterr().out
    assert "pick for device 'host-executorch' (executorch, measured, 1 thread(s))" in out and "chosen" in out
    sel = json.loads((run_copy / "selection.json").read_text())["devices"]["host-executorch"]
    accuracies = [c["accuracy"] for c in sel["candidates"]]
    assert len(sel["candidates"]) == 3 and sel["choice"]["accuracy"] == max(accuracies)
    assert sel["choice"]["file"].endswith(".pte") and sel["runtime"] == "executorch"
    assert (run_copy / "bench" / "host-executorch.json").read_bytes() == bench_file  # nothing measured again
    # a .pte is not for a TFLite device, nor a .tflite for an ExecuTorch one: one line each
    assert main(["bench", str(run_copy / "export" / "executorch-fp32"), "--device", "host"]) == 2
    assert "a .pte artifact, but device 'host' runs tflite" in one_line_error(capsys)


# ------------------------------------------------------------------------------- torch-free: numpy runtime
def python_312() -> str | None:
    """An interpreter of Python >= 3.12 (executorch-numpy-runtime's wheels are cp312-abi3): this one, one on PATH,
    or a pyenv version."""
    root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates = [sys.executable] + [shutil.which(n) for n in ("python3.14", "python3.13", "python3.12")] + \
        sorted(glob.glob(f"{root}/versions/3.1[2-9]*/bin/python3"), reverse=True)
    for python in filter(None, candidates):
        check = subprocess.run([python, "-c", "import sys, venv; sys.exit(sys.version_info < (3, 12))"],
                               capture_output=True)
        if check.returncode == 0:
            return python
    return None


def numpy_runtime_venv() -> str:
    """A venv holding only numpy and executorch-numpy-runtime (a device without torch), built once under the cache
    dir; skips with the reason when there is no Python >= 3.12 or pip cannot provide the packages."""
    base = python_312()
    if base is None:
        pytest.skip("executorch-numpy-runtime needs Python >= 3.12; none found (PATH, pyenv)")
    version = subprocess.run([base, "-c", "import sys; print(f'{sys.version_info[0]}{sys.version_info[1]}')"],
                             capture_output=True, text=True).stdout.strip()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgepkd"
    venv = cache / f"venv-{NUMPY_RUNTIME.replace('==', '-')}-py{version}"
    python = venv / "bin" / "python"
    if not python.exists():
        cache.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(venv, ignore_errors=True)
        for step in ([base, "-m", "venv", str(venv)], [str(python), "-m", "pip", "install", "-q", "numpy", NUMPY_RUNTIME]):
            proc = subprocess.run(step, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                why = (proc.stderr.strip().splitlines() or ["?"])[-1]
                pytest.skip(f"cannot build a venv with {NUMPY_RUNTIME}: {why}")
    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode != 0, \
        "the numpy-runtime venv must not hold torch"
    return str(python)


def test_runner_runs_pte_without_torch(run_dir, tmp_path):
    """The files bench copies to a device (runner.py, runtimes.py), alone in an empty folder, in a venv of numpy +
    executorch-numpy-runtime: both targets run with the manifest's top-1, and torch is not in sys.modules (the
    runner reports it and a guard checks it)."""
    python = numpy_runtime_venv()
    images = write_images(run_dir, tmp_path / "test.npz")
    device = tmp_path / "device"
    device.mkdir()
    for file in runner_module.device_files():
        shutil.copy(file, device / Path(file).name)
    pte = [run_dir / "export" / "executorch-fp32" / "chain-s2.pte",
           run_dir / "export" / "loose-executorch-int8" / "chain-s2.pte"]
    # the runner, then a check of sys.modules in the same process after it ran
    probe = ("import runpy, sys; sys.argv = ['runner.py'] + sys.argv[1:]\n"
             "try:\n    runpy.run_path('runner.py', run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "print('TORCH-IMPORTED' if 'torch' in sys.modules else 'TORCH-NOT-IMPORTED'); sys.exit(code)")
    for path in pte:
        code, (out,), err = run_runner("-c", probe, str(path), "--images", str(images), *FAST, python=python,
                                       cwd=device)
        assert code == 0, err
        entry = manifest(run_dir, path.parent.name)[path.name]
        print(path.parent.name, out["runtime"], out["runtime_version"], out["accuracy"])
        assert out["runtime"] == "executorch_numpy_runtime" and out["torch_imported"] is False
        assert out["accuracy"]["top1"] == pytest.approx(entry["verification"]["accuracy"], abs=1e-9)
        assert out["accuracy"]["images"] == 60 and out["metadata"] == "manifest.json"
        assert out["sha256"] == entry["sha256"] and out["threads"] is None and out["threads_requested"] == 1
        lat = out["latency_ms"]
        assert out["runs"] >= 3 and lat["min"] <= lat["p50"] <= lat["p90"] <= lat["max"]
    probed = subprocess.run([python, "-c", probe, str(pte[0]), *FAST], capture_output=True, text=True, cwd=device)
    assert probed.returncode == 0 and probed.stdout.strip().endswith("TORCH-NOT-IMPORTED"), probed.stderr
    # without a manifest: the program's own 'edgepkd_metadata' method supplies preprocessing
    alone = tmp_path / "alone.pte"
    shutil.copy(pte[1], alone)
    code, (out,), err = run_runner(str(device / "runner.py"), str(alone), "--images", str(images), *FAST,
                                   python=python)
    assert code == 0, err
    assert out["metadata"] == "embedded" and out["model"] == "chain/s2" and out["precision"] == "int8"
    assert out["accuracy"]["top1"] == pytest.approx(manifest(run_dir, pte[1].parent.name)[pte[1].name]
                                                    ["verification"]["accuracy"], abs=1e-9)
