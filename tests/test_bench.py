"""On-device benchmarking and picking on a tiny distilled run: the torch-free runner, `edgepkd bench` (local, over
ssh to a real sshd on 127.0.0.1, estimated), `edgepkd pick`, `distill --device`, tflite-runtime 2.14 in a venv
holding only numpy<2 and that runtime, and one-line errors that leave earlier results intact.
No assertion here depends on a timing: latency figures are checked for consistency, never against a clock."""

import getpass
import hashlib
import json
import shlex
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, manifest, one_line_error
from edgepkd.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.export]
for module in ("onnxruntime", "onnxscript", "litert_torch", "ai_edge_litert", "torchao"):
    pytest.importorskip(module, reason=f"needs {module}: pip install -e '.[export]'")

from edgepkd.compress.targets import BUILTIN_DIR  # noqa: E402
from edgepkd.measure import runner as runner_module  # noqa: E402
from edgepkd.measure.devices import MIB, load_devices  # noqa: E402

RUNNER = Path(runner_module.__file__)
FAST = ["--min-runs", "3", "--min-seconds", "0"]
# an estimated TFLite device (connect: none): cortex-m7 runs TFLite Micro instead, tested in test_tflm.py
MCU = {"runtime": "tflite", "connect": "none", "precisions": ["fp32", "int8"],
       "calibration": {"macs_per_second": 2.3e8, "source": "test"},
       "budget": {"latency_ms": 50, "ram_mib": 0.25, "storage_mib": 1.0}}


@pytest.fixture(scope="module")
def run_dir(tiny_exported_run):
    """The tiny recipe, exported: every model to tflite-fp32, chain/s1 to onnx-fp32, chain/s2 to loose-tflite-int8."""
    return tiny_exported_run


def devices_dir(tmp_path: Path, **profiles: dict) -> Path:
    folder = tmp_path / "devices"
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in profiles.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, **data}))
    return folder


# ------------------------------------------------------------------------------------------------- runner
def write_images(run: Path, path: Path) -> Path:
    from edgepkd.data import load_dataset
    from edgepkd.recipe import load_recipe

    recipe = load_recipe(run / "recipe.yaml")
    test = load_dataset(recipe.data, recipe.seed).test
    np.savez(path, images=test.x.numpy(), labels=test.y.numpy())
    return path


def run_runner(python: str, *args: str, cwd=None) -> tuple[int, list[dict], str]:
    proc = subprocess.run([python, *args], capture_output=True, text=True, cwd=cwd, timeout=600)
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")], \
        proc.stderr


def test_runner_is_two_torch_free_files_matching_the_manifest(run_dir, tmp_path):
    """The files bench copies to a device (runner.py and runtimes.py), alone in an empty folder and run with torch
    and edgepkd made unimportable, reproduce the export's verified top-1 from raw uint8 test images, in both
    runtimes."""
    images = write_images(run_dir, tmp_path / "test.npz")
    alone = tmp_path / "device"
    alone.mkdir()
    shipped = runner_module.device_files()
    assert sorted(Path(f).name for f in shipped) == ["runner.py", "runtimes.py"]
    for file in shipped:
        shutil.copy(file, alone / Path(file).name)
    guard = ("import runpy, sys; sys.modules['torch'] = None; sys.modules['edgepkd'] = None; "
             "sys.argv = ['runner.py'] + sys.argv[1:]; runpy.run_path('runner.py', run_name='__main__')")
    for target, file in (("tflite-fp32", "chain-s1.tflite"), ("onnx-fp32", "chain-s1.onnx")):
        path = run_dir / "export" / target / file
        code, (out,), err = run_runner(sys.executable, "-c", guard, str(path), "--images", str(images), *FAST,
                                       "--warmup-seconds", "0", cwd=alone)
        assert code == 0, err
        entry = manifest(run_dir, target)[file]
        print(target, out["runtime"], out["accuracy"], entry["verification"]["accuracy"])
        assert out["accuracy"]["top1"] == pytest.approx(entry["verification"]["accuracy"], abs=1e-9)
        assert out["accuracy"]["images"] == 60 and out["metadata"] == "manifest.json"
        assert out["bytes"] == entry["bytes"] and out["sha256"] == entry["sha256"]
        lat = out["latency_ms"]
        assert out["runs"] >= 3 and lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert out["memory"]["peak_rss_bytes"] >= out["memory"]["baseline_rss_bytes"] > 0
        assert out["runtime_version"] and out["threads"] == 1 and out["load_ms"] > 0


def test_runner_reads_embedded_metadata_without_a_manifest(run_dir, tmp_path):
    images = write_images(run_dir, tmp_path / "test.npz")
    for target, file in (("tflite-fp32", "chain-s2.tflite"), ("onnx-fp32", "chain-s1.onnx")):
        shutil.copy(run_dir / "export" / target / file, tmp_path / file)
        code, (out,), err = run_runner(sys.executable, str(RUNNER), str(tmp_path / file), "--images", str(images),
                                       *FAST, "--warmup-seconds", "0")
        assert code == 0, err
        assert out["metadata"] == "embedded"
        assert out["accuracy"]["top1"] == pytest.approx(manifest(run_dir, target)[file]["verification"]["accuracy"])


def test_runner_flatbuffer_reader_agrees_with_the_tflite_schema(run_dir):
    """The runner's minimal flatbuffer reader against ai_edge_litert's generated schema: the metadata entry and
    the bytes of the non-constant tensors."""
    from ai_edge_litert.tools import flatbuffer_utils

    from edgepkd.compress.tflite_export import read_metadata

    for path in sorted((run_dir / "export" / "tflite-fp32").glob("*.tflite")):
        blob = path.read_bytes()
        assert runner_module.tflite_metadata(blob) == read_metadata(path)
        model = flatbuffer_utils.read_model(str(path))
        sizes = {0: 4, 1: 2, 2: 4, 3: 1, 4: 8, 6: 1, 7: 2, 9: 1, 10: 8}
        expected = sum(int(np.prod([max(int(d), 1) for d in t.shape])) * sizes[t.type]
                       for t in model.subgraphs[0].tensors
                       if model.buffers[t.buffer].data is None or len(model.buffers[t.buffer].data) == 0)
        assert runner_module.tflite_activation_bytes(blob) == expected > 0


def test_runner_ram_is_the_model_not_the_test_images(run_dir, tmp_path):
    """A model's RAM (model_rss_bytes, what pick budgets) is its load and first run: the same with 359 test images
    as with 100,000 of them, whose float32 copies alone are 25 MB (they were counted as the model's before)."""
    small = write_images(run_dir, tmp_path / "small.npz")
    with np.load(small) as z:
        images, labels = z["images"], z["labels"]
    reps = -(-100_000 // len(images))
    big = tmp_path / "big.npz"
    np.savez(big, images=np.tile(images, (reps, 1, 1, 1))[:100_000], labels=np.tile(labels, reps)[:100_000])
    path = str(run_dir / "export" / "tflite-fp32" / "chain-s1.tflite")
    ram = {}
    for npz in (small, big):
        code, (out,), _ = run_runner(sys.executable, str(RUNNER), path, "--images", str(npz), "--min-runs", "3",
                                     "--min-seconds", "0", "--warmup-seconds", "0")
        assert code == 0, out
        ram[npz.stem] = out["memory"]["model_rss_bytes"]
    floats = 100_000 * int(np.prod(images.shape[1:])) * 4
    assert ram["big"] < ram["small"] + floats / 4, (ram, floats)


def test_runner_without_its_runtimes_file_is_one_line(tmp_path):
    """runner.py copied without runtimes.py: exit 3 (this device lacks what the runner needs), one line naming the
    file to copy; beside it, the runner runs (a missing artifact is its usual exit 2)."""
    shutil.copy(RUNNER, tmp_path / "runner.py")
    code, out, err = run_runner(sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "chain-s1.tflite"))
    assert code == 3 and out == [] and err.count("\n") == 1, err
    assert err.startswith("runner: error: runtimes.py is missing: copy it next to runner.py")
    shutil.copy(runner_module.runtimes.__file__, tmp_path / "runtimes.py")
    code, (out,), err = run_runner(sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "chain-s1.tflite"))
    assert code == 2 and "chain-s1.tflite: no such file" in out["error"]


def test_runner_errors_are_one_line(tmp_path):
    code, (out,), err = run_runner(sys.executable, str(RUNNER), str(tmp_path / "missing.tflite"))
    assert code == 2 and "missing.tflite: no such file" in out["error"] and err.count("\n") == 1
    (tmp_path / "junk.tflite").write_bytes(b"not a model")
    code, (out,), err = run_runner(sys.executable, str(RUNNER), str(tmp_path / "junk.tflite"))
    assert code == 2 and out["kind"] == "artifact" and err.startswith("runner: error: ") and err.count("\n") == 1


# -------------------------------------------------------------------------------------------- bench: local
def test_bench_host_prints_table_and_stores_results(run_copy, capsys):
    assert main(["bench", str(run_copy), "--device", "host", *FAST]) == 0
    out = capsys.readouterr().out
    assert "device 'host' (local)" in out and "p90 ms" in out and "tflite-fp32/chain-s1.tflite" in out
    stored = json.loads((run_copy / "bench" / "host.json").read_text())
    # every TFLite artifact of the run at the host's precisions: 5 fp32 (the teacher too) + the int8 one; not ONNX
    assert sorted(stored["results"]) == ["loose-tflite-int8/chain-s2.tflite", "tflite-fp32/chain-s1.tflite",
                                         "tflite-fp32/chain-s2.tflite", "tflite-fp32/ensemble-1-1.tflite",
                                         "tflite-fp32/ensemble-1-2.tflite", "tflite-fp32/teacher.tflite"]
    assert (run_copy / "bench" / "host.png").read_bytes()[:4] == b"\x89PNG"
    for key, r in stored["results"].items():
        target, file = key.split("/")
        entry = manifest(run_copy, target)[file]
        assert r["sha256"] == entry["sha256"] and not r["estimated"]
        assert r["accuracy"]["top1"] == pytest.approx(entry["verification"]["accuracy"])  # on-device top-1
        assert r["runs"] >= 3 and r["latency_ms"]["p50"] <= r["latency_ms"]["p90"]
        assert r["memory"]["model_rss_bytes"] is not None and r["runtime"] == "ai_edge_litert"
    assert (run_copy / "bench" / "test-images.npz").is_file()
    assert stored["profile"]["name"] == "host" and stored["errors"] == {}


def test_bench_json_and_a_single_file(run_copy, capsys):
    path = run_copy / "export" / "onnx-fp32" / "chain-s1.onnx"
    assert main(["bench", str(path), "--device", "host-onnxruntime", "--json", "--random-input", *FAST]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["key"] == "onnx-fp32/chain-s1.onnx" and result["runtime"] == "onnxruntime"
    assert result["accuracy"] is None and "standard-normal" in result["inputs"]


def test_bad_inputs_are_one_line_and_leave_results_intact(run_copy, tmp_path, capsys):
    assert main(["bench", str(run_copy / "export" / "tflite-fp32"), "--device", "host", *FAST]) == 0
    capsys.readouterr()
    results = run_copy / "bench" / "host.json"
    before = results.read_bytes()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    gone = devices_dir(tmp_path / "gone", gone={"runtime": "tflite", "connect": f"ssh://nobody@127.0.0.1:{closed}",
                                                "ssh": {"connect_timeout_s": 3},
                                                "budget": {"latency_ms": 1, "ram_mib": 1, "storage_mib": 1}})
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "broken.yaml").write_text("name: broken\nruntime: tflite\nbudget: {latency_ms: 1}\n")
    onnx = run_copy / "export" / "onnx-fp32"
    cases = [
        ([str(run_copy), "--device", "hots"], "unknown device 'hots'; did you mean 'host'?"),
        ([str(onnx / "chain-s1.onnx"), "--device", "host"], "chain-s1.onnx: a .onnx artifact, but device 'host' "
                                                            "runs tflite (.tflite files); bench the run's .tflite"),
        ([str(onnx), "--device", "host"], "but device 'host' runs tflite"),
        ([str(run_copy / "nothing"), "--device", "host"], "nothing: no such file or directory"),
        ([str(run_copy), "--device", "host", "--devices-dir", str(broken)], "broken.yaml: budget.ram_mib: required"),
    ]
    for args, message in cases:
        assert main(["bench", *args]) == 2, args
        assert message in one_line_error(capsys)
    if shutil.which("ssh"):
        assert main(["bench", str(run_copy), "--device", "gone", "--devices-dir", str(gone), *FAST]) == 1
        err = one_line_error(capsys)
        assert f"cannot reach nobody@127.0.0.1 port {closed} over ssh" in err and "EDGEPKD_SSH_IDENTITY" in err
        assert not (run_copy / "bench" / "gone.json").exists()
    assert results.read_bytes() == before


def test_artifact_the_device_cannot_run_is_recorded_and_reported(run_copy, tmp_path, capsys):
    """A broken artifact among good ones (its manifest agrees with it, so it is the file that was exported): the
    good results are stored, the bad one is listed under errors, the command exits 1 with one line."""
    folder = run_copy / "export" / "tflite-fp32"
    entries = json.loads((folder / "manifest.json").read_text())
    bad = folder / "ensemble-1-2.tflite"
    bad.write_bytes(b"TFL3 but truncated")
    for e in entries["artifacts"]:
        if e["file"] == bad.name:
            e["sha256"], e["bytes"] = hashlib.sha256(bad.read_bytes()).hexdigest(), bad.stat().st_size
    (folder / "manifest.json").write_text(json.dumps(entries))
    assert main(["bench", str(folder), "--device", "host", *FAST]) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert "edgepkd: error: tflite-fp32/ensemble-1-2.tflite cannot run on device 'host'" in err
    assert err.count("edgepkd: error") == 1 and err.strip().count("\n") == 0
    stored = json.loads((run_copy / "bench" / "host.json").read_text())
    assert len(stored["results"]) == 4 and list(stored["errors"]) == ["tflite-fp32/ensemble-1-2.tflite"]


def results_of(run: Path) -> dict[str, bytes]:
    """Every earlier result of a run: bench/*.json and selection.json, byte for byte."""
    return {p.relative_to(run).as_posix(): p.read_bytes()
            for p in [*sorted((run / "bench").glob("*.json")), run / "selection.json"] if p.is_file()}


@pytest.mark.parametrize("tamper", ["one byte changed", "truncated copy"])
def test_changed_or_truncated_artifact_is_refused_and_results_stay(run_copy, tmp_path, capsys, tamper):
    """bench, pick and the runner compare each artifact with its manifest (size, sha256) before using it: a file
    changed after export is refused in one line naming it and saying how to re-export it, and the earlier bench
    results and selection stay byte-identical. The re-export it names makes it usable again."""
    mcu = ["--device", "mcu-estimated", "--devices-dir", str(devices_dir(tmp_path, **{"mcu-estimated": MCU}))]
    assert main(["pick", str(run_copy), "--device", "host", "--latency-ms", "1000", *FAST]) == 0
    assert main(["pick", str(run_copy), *mcu]) == 0
    capsys.readouterr()
    before = results_of(run_copy)
    assert sorted(before) == ["bench/host.json", "bench/mcu-estimated.json", "selection.json"]
    path = run_copy / "export" / "tflite-fp32" / "chain-s1.tflite"
    blob = path.read_bytes()
    if tamper == "one byte changed":
        changed = bytearray(blob)
        changed[len(changed) // 2] ^= 0x01
        path.write_bytes(bytes(changed))
        why = "but " + str(path.parent / "manifest.json") + " says " + manifest(run_copy, "tflite-fp32")[
            path.name]["sha256"][:12] + "... (changed since export)"
    else:
        truncated = tmp_path / "truncated.tflite"
        truncated.write_bytes(blob[:len(blob) // 3])
        shutil.copy(truncated, path)
        why = f"{len(blob) // 3:,} bytes, but {path.parent / 'manifest.json'} says {len(blob):,} (truncated"
    fix = "re-export it: edgepkd export " + str(run_copy) + " --target tflite-fp32 --model 'chain/s1'"
    cases = [
        ["bench", str(run_copy), "--device", "host", *FAST],           # a run directory
        ["bench", str(path), "--device", "host", *FAST],               # the file itself
        ["bench", str(run_copy), *mcu],                                # estimated: never run, still checked
        ["pick", str(run_copy), "--device", "host", "--latency-ms", "1000", "--no-bench"],  # results are current
        ["pick", str(run_copy), "--device", "host", "--latency-ms", "1000", *FAST],
        ["pick", str(run_copy), *mcu],
    ]
    for args in cases:
        assert main(args) == 2, args
        err = one_line_error(capsys)
        assert err.startswith(f"edgepkd: error: {path}: ") and why in err and err.rstrip().endswith(fix), err
        assert results_of(run_copy) == before, args
    # the runner on its own (as on a device): one line, exit 2, nothing timed
    code, (out,), err = run_runner(sys.executable, str(RUNNER), str(path), *FAST)
    assert code == 2 and out["kind"] == "integrity" and "re-export it" in out["error"] and "latency_ms" not in out
    assert err.startswith("runner: error: ") and err.count("\n") == 1
    # the command the error names rewrites the file and its manifest entry; bench and pick take it again
    assert main(shlex.split(fix.split(": ", 1)[1])[1:]) == 0
    assert main(["bench", str(path), "--device", "host", *FAST]) == 0
    assert main(["pick", str(run_copy), "--device", "host", "--latency-ms", "1000", *FAST]) == 0


def test_device_without_numpy_is_one_line(run_copy, tmp_path, capsys):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    results = run_copy / "bench" / "host.json"
    assert main(["bench", str(run_copy / "export" / "tflite-fp32"), "--device", "host", "--python",
                 str(bare / "bin" / "python"), *FAST]) == 1
    err = one_line_error(capsys)
    assert "device 'host': numpy is not installed for" in err and "pip install 'numpy<2' tflite-runtime" in err
    assert not results.exists()


# -------------------------------------------------------------------------------------------- bench: estimated
def test_estimated_device_is_marked_and_follows_the_calibration(run_copy, tmp_path, capsys):
    folder = devices_dir(tmp_path, **{"mcu-estimated": MCU})
    assert main(["bench", str(run_copy), "--device", "mcu-estimated", "--devices-dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATED" in out and " est." in out
    rate = MCU["calibration"]["macs_per_second"]
    stored = json.loads((run_copy / "bench" / "mcu-estimated.json").read_text())
    assert stored["results"]
    for key, r in stored["results"].items():
        target, file = key.split("/")
        entry = manifest(run_copy, target)[file]
        assert r["estimated"] is True and r["runs"] == 0 and r["accuracy"] is None
        assert r["latency_ms"]["p90"] == pytest.approx(1e3 * entry["flops"] / 2 / rate)
        blob = (run_copy / "export" / key).read_bytes()
        assert r["memory"]["activation_bytes"] == runner_module.tflite_activation_bytes(blob)


# ------------------------------------------------------------------------------------------------------ pick
def estimated(**budget) -> dict:
    return {"runtime": "tflite", "connect": "none", "precisions": ["fp32"],
            "calibration": {"macs_per_second": 1e8, "source": "test"}, "budget": budget}


def test_pick_differs_between_budgets_and_explains_nothing_fits(run_copy, tmp_path, capsys):
    # the students only: the tiny teacher is both the most accurate and the smallest in activations (7.5 KB)
    path = run_copy / "export" / "tflite-fp32" / "manifest.json"
    data = json.loads(path.read_text())
    data["artifacts"] = [e for e in data["artifacts"] if e["model"] != "teacher"]
    path.write_text(json.dumps(data))
    (path.parent / "teacher.tflite").unlink()
    fp32 = manifest(run_copy, "tflite-fp32")
    act = {f: runner_module.tflite_activation_bytes((run_copy / "export" / "tflite-fp32" / f).read_bytes())
           for f in fp32}
    best = max(fp32, key=lambda f: fp32[f]["verification"]["accuracy"])
    # a RAM budget just under the most accurate model's activations
    tight_ram = (act[best] - 1) / MIB
    fits = [f for f in fp32 if act[f] <= act[best] - 1]
    assert fits, f"fixture: no model is smaller than the most accurate one ({act})"
    expected = max(fits, key=lambda f: (fp32[f]["verification"]["accuracy"], -fp32[f]["flops"]))
    smallest = min(fp32, key=lambda f: fp32[f]["bytes"])
    folder = devices_dir(tmp_path, roomy=estimated(latency_ms=1e3, ram_mib=1e3, storage_mib=1e3),
                         tight=estimated(latency_ms=1e3, ram_mib=tight_ram, storage_mib=1e3),
                         tiny=estimated(latency_ms=1e3, ram_mib=1e3, storage_mib=1e-3))
    picks = {}
    for name in ("roomy", "tight"):
        assert main(["pick", str(run_copy), "--device", name, "--devices-dir", str(folder)]) == 0
        out = capsys.readouterr().out
        assert "*" in out and "chosen: the most accurate" in out and "ESTIMATED" in out
        picks[name] = json.loads((run_copy / "selection.json").read_text())["devices"][name]
    assert picks["roomy"]["choice"]["file"] == f"export/tflite-fp32/{best}"
    assert picks["tight"]["choice"]["file"] == f"export/tflite-fp32/{expected}" != picks["roomy"]["choice"]["file"]
    verdicts = {c["file"]: c["verdict"] for c in picks["tight"]["candidates"]}
    assert verdicts[f"export/tflite-fp32/{best}"].startswith("too big (RAM)")
    assert all(c["estimated"] for c in picks["tight"]["candidates"])
    selection = (run_copy / "selection.json").read_bytes()

    assert main(["pick", str(run_copy), "--device", "tiny", "--devices-dir", str(folder)]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("too big (storage)") == len(fp32)
    err = captured.err
    assert err.count("\n") == 1 and "nothing fits device 'tiny'" in err
    assert f"storage is binding: {fp32[smallest]['model']} (tflite-fp32) meets every other budget" in err
    assert (run_copy / "selection.json").read_bytes() == selection  # the earlier choices are kept
    suggested = float(re.search(r"a profile with storage_mib >= (\S+) would admit it", err)[1])
    devices_dir(tmp_path, tiny=estimated(latency_ms=1e3, ram_mib=1e3, storage_mib=suggested))
    assert main(["pick", str(run_copy), "--device", "tiny", "--devices-dir", str(folder)]) == 0  # it does
    capsys.readouterr()
    tiny = json.loads((run_copy / "selection.json").read_text())["devices"]["tiny"]
    assert tiny["choice"]["file"] == f"export/tflite-fp32/{smallest}"

    assert main(["pick", str(run_copy), "--device", "roomy", "--devices-dir", str(folder),
                 "--min-accuracy", "100"]) == 1
    assert "accuracy is binding: the most accurate candidate within the other budgets" in capsys.readouterr().err


def test_the_teacher_is_a_candidate_and_pick_says_when_it_wins(run_copy, tmp_path, capsys):
    folder = devices_dir(tmp_path, roomy=estimated(latency_ms=1e3, ram_mib=1e3, storage_mib=1e3))
    path = run_copy / "export" / "tflite-fp32" / "manifest.json"
    data = json.loads(path.read_text())
    for e in data["artifacts"]:  # make the teacher the most accurate, whatever the tiny run reached
        if e["model"] == "teacher":
            e["verification"]["accuracy"] = 100.0
    path.write_text(json.dumps(data))
    students = [e for e in data["artifacts"] if e["model"] != "teacher"]
    best_student = max(students, key=lambda e: (e["verification"]["accuracy"], -e["flops"]))
    assert main(["pick", str(run_copy), "--device", "roomy", "--devices-dir", str(folder)]) == 0
    out = capsys.readouterr().out
    sel = json.loads((run_copy / "selection.json").read_text())["devices"]["roomy"]
    assert sel["choice"]["model"] == "teacher"
    assert "The teacher itself fits and is the most accurate: no distilled model is needed" in sel["why"]
    assert f"the best student, {best_student['model']} (tflite-fp32)" in sel["why"] and "picked teacher" in out
    # a tighter latency budget than the teacher's estimate: a student is chosen, and the teacher says why not
    teacher_ms = 1e3 * next(e for e in data["artifacts"] if e["model"] == "teacher")["flops"] / 2 / 1e8
    devices_dir(tmp_path, roomy=estimated(latency_ms=teacher_ms * 0.99, ram_mib=1e3, storage_mib=1e3))
    assert main(["pick", str(run_copy), "--device", "roomy", "--devices-dir", str(folder)]) == 0
    capsys.readouterr()
    sel = json.loads((run_copy / "selection.json").read_text())["devices"]["roomy"]
    assert sel["choice"]["model"] != "teacher" and "itself fits" not in sel["why"]
    verdict = next(c["verdict"] for c in sel["candidates"] if c["model"] == "teacher")
    assert verdict.startswith("too slow")


def test_bench_writes_the_accuracy_vs_latency_plot_and_pick_names_it(run_copy, tmp_path, capsys):
    folder = devices_dir(tmp_path, roomy=estimated(latency_ms=1e3, ram_mib=1e3, storage_mib=1e3))
    assert main(["pick", str(run_copy), "--device", "roomy", "--devices-dir", str(folder)]) == 0
    out = capsys.readouterr().out
    png = run_copy / "bench" / "roomy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {png}" in out
    from edgepkd.measure.plot import points

    pts = points(json.loads((run_copy / "bench" / "roomy.json").read_text()))
    assert {p["model"] for p in pts} >= {"teacher", "chain/s1", "ensemble[1..2]"}
    assert all(p["estimated"] and p["accuracy"] is not None for p in pts)


def test_pick_on_host_benches_what_is_missing_then_reuses_it(run_copy, capsys):
    assert main(["pick", str(run_copy), "--device", "host", "--no-bench"]) == 2
    assert "have no current bench result on device 'host'" in one_line_error(capsys)
    assert main(["pick", str(run_copy), "--device", "host", "--latency-ms", "1000", *FAST]) == 0
    captured = capsys.readouterr()
    assert "bench on 'host': 6 candidate(s)" in captured.out  # the teacher, 2 students, 2 prefixes; 1 int8
    sel = json.loads((run_copy / "selection.json").read_text())["devices"]["host"]
    accuracies = [c["accuracy"] for c in sel["candidates"]]
    assert sel["choice"]["accuracy"] == max(accuracies) and sel["budget"]["latency_p90_ms"] == 1000
    assert len(sel["candidates"]) == 6 and all(c["verdict"] for c in sel["candidates"])
    assert "teacher" in {c["model"] for c in sel["candidates"]}
    bench_file = (run_copy / "bench" / "host.json").read_bytes()
    assert main(["pick", str(run_copy), "--device", "host", "--latency-ms", "1000", "--no-bench"]) == 0
    assert (run_copy / "bench" / "host.json").read_bytes() == bench_file  # nothing measured again


def fake_early_exit(run: Path, threads: int = 1) -> Path:
    """Two 'members' (copies of exported students, listed in the manifest as an ensemble's members) and an
    early-exit result for them with a synthetic θ sweep: mean 0.001 ms at 50 %, 500 ms at 100 %, 5 s at 100 %."""
    folder = run / "export" / "tflite-fp32"
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    for e in data["artifacts"]:  # the single artifacts below 100 %, whatever the tiny run reached
        e["verification"]["accuracy"] = min(e["verification"]["accuracy"], 90.0)
    sources = [e for e in data["artifacts"] if e["model"] in ("chain/s1", "chain/s2")]
    files = []
    for i, src in enumerate(sources, 1):
        name = f"ensemble-e{i}.tflite"
        shutil.copy(folder / src["file"], folder / name)
        data["artifacts"].append({**src, "file": name, "model": f"ensemble/e{i}",
                                  "ensemble_member": {"index": i - 1, "members": ["ensemble/e1", "ensemble/e2"],
                                                      "shrinkage": 0.5}})
        files.append({"file": name, "bytes": src["bytes"], "sha256": src["sha256"]})
    path.write_text(json.dumps(data))
    images = sources[0]["verification"]["images"]
    rows = [{"theta": t, "accuracy": a, "mean_ms": m, "p50_ms": m, "p90_ms": 2 * m, "max_ms": 3 * m}
            for t, a, m in ((0.5, 50.0, 0.001), (0.9, 100.0, 500.0), (1.0, 100.0, 5000.0))]
    res = {"target": "tflite-fp32", "format": "tflite", "precision": "fp32", "device": "local1", "threads": threads,
           "images": images, "members": ["ensemble/e1", "ensemble/e2"], "files": files, "ram_bytes": 1 << 20,
           "sweep": rows, "all_members_ms": {"mean": 5000.0, "p90": 6000.0, "max": 7000.0}}
    out = run / "bench" / "early-exit-tflite-fp32.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res))
    return out


def test_pick_chooses_early_exit_theta_by_mean_latency_and_shows_its_worst_case(run_copy, tmp_path, capsys):
    result = fake_early_exit(run_copy)
    local = {"runtime": "tflite", "threads": 1, "precisions": ["fp32"],
             "budget": {"latency_ms": 1000, "ram_mib": 64, "storage_mib": 16}}
    folder = devices_dir(tmp_path, local1=local)
    args = ["pick", str(run_copy), "--device", "local1", "--devices-dir", str(folder), *FAST]
    assert main(args) == 0
    out = capsys.readouterr().out
    sel = json.loads((run_copy / "selection.json").read_text())["devices"]["local1"]
    # budget 1000 ms: θ = 0.9 (mean 500 ms, 100 %) beats every single artifact (<= 90 %); θ = 1 (mean 5 s) is out
    assert sel["choice"]["kind"] == "early-exit" and sel["choice"]["theta"] == 0.9, sel["choice"]
    assert sel["choice"]["worst_case_ms"] == {"mean": 5000.0, "p90": 6000.0, "max": 7000.0}
    assert "judged by mean latency, single artifacts by p90" in sel["choice"]["verdict"]
    assert "worst case, all 2 members: p90 6000.0 ms, max 7000.0 ms (over the 1000.0 ms budget)" in out
    assert "picked early exit ensemble/e1..e2 θ=0.9" in out and "500.0 mean" in out
    assert all(c["verdict"].startswith(("fits, but the early-exit ensemble", "dominated", "fits, less"))
               for c in sel["candidates"]), [c["verdict"] for c in sel["candidates"]]
    # budget 100 ms: only θ = 0.5 (50 %) meets it by mean; the single artifact wins, and says it
    assert main([*args, "--latency-ms", "100", "--no-bench"]) == 0
    capsys.readouterr()
    sel = json.loads((run_copy / "selection.json").read_text())["devices"]["local1"]
    assert "kind" not in sel["choice"] and sel["early_exit"][0]["theta"] == 0.5
    assert "not more accurate than" in sel["early_exit"][0]["verdict"]
    assert "worst case, all 2 members" in sel["early_exit"][0]["verdict"]
    # --no-early-exit: single artifacts only
    assert main([*args, "--no-early-exit", "--no-bench"]) == 0
    capsys.readouterr()
    sel = json.loads((run_copy / "selection.json").read_text())["devices"]["local1"]
    assert "kind" not in sel["choice"] and sel["early_exit"] == []
    # measured with another thread count: still a candidate, and it says so
    fake_early_exit(run_copy, threads=2)
    assert main([*args, "--no-bench"]) == 0
    assert "measured with 2 thread(s); 'local1' uses 1" in capsys.readouterr().out
    # a member exported again since: stale, not a candidate
    res = json.loads(result.read_text())
    res["files"][0]["sha256"] = "0" * 64
    result.write_text(json.dumps(res))
    assert main([*args, "--no-bench"]) == 0
    out = capsys.readouterr().out
    sel = json.loads((run_copy / "selection.json").read_text())["devices"]["local1"]
    assert "kind" not in sel["choice"] and "stale: ensemble-e1.tflite exported again" in out


def test_pick_weighs_the_cascades_each_by_its_own_stages(run_copy, tmp_path, capsys):
    result = fake_early_exit(run_copy)
    res = json.loads(result.read_text())
    entries = {e["model"]: e for e in json.loads((run_copy / "export" / "tflite-fp32" / "manifest.json").read_text())
               ["artifacts"]}
    worst = {"mean": 900.0, "p90": 950.0, "max": 990.0}
    res["sweep"] = [{**r, "mean_ms": 5000.0} for r in res["sweep"]]       # the ensemble alone is too slow
    res["reference"] = {"model": "chain/s1", "accuracy": 100.0, "mean_ms": 800.0, "p50_ms": 800.0, "p90_ms": 800.0}
    res["stage_files"] = {m: {k: entries[m][k] for k in ("file", "bytes", "sha256")} for m in ("chain/s1", "chain/s2")}
    row = {"p50_ms": 1.0, "p90_ms": 700.0, "max_ms": 990.0, "reference_share": 0.1, "worst": worst}
    res["cascade"] = [{**row, "after": 1, "theta": 0.9, "accuracy": 99.0, "mean_ms": 400.0,
                       "stages": ["ensemble/e1", "chain/s1"], "ram_bytes": 2 << 20}]
    res["chain_cascade"] = [{**row, "theta": 0.9, "accuracy": 100.0, "mean_ms": 500.0,
                             "stages": ["chain/s2", "chain/s1"], "ram_bytes": 1 << 30}]   # 1 GiB
    result.write_text(json.dumps(res))
    local = {"runtime": "tflite", "threads": 1, "precisions": ["fp32"],
             "budget": {"latency_ms": 1000, "ram_mib": 2048, "storage_mib": 16}}
    folder = devices_dir(tmp_path, local1=local)
    # every budget roomy: the chain cascade (100 %, mean 500 ms) beats the singles (<= 90 %) and the ensemble
    assert main(["pick", str(run_copy), "--device", "local1", "--devices-dir", str(folder), *FAST]) == 0
    out = capsys.readouterr().out
    sel = json.loads((run_copy / "selection.json").read_text())["devices"]["local1"]
    assert sel["choice"]["kind"] == "cascade" and sel["choice"]["members"] == ["chain/s2", "chain/s1"]
    assert sel["choice"]["files"] == [f"export/tflite-fp32/{entries[m]['file']}" for m in ("chain/s2", "chain/s1")]
    assert sel["choice"]["ram_bytes"] == 1 << 30 and sel["choice"]["worst_case_ms"] == worst
    assert "picked cascade chain/s2 -> chain/s1 θ=0.9" in out and "worst case, every stage (2)" in out
    ensemble = next(e for e in sel["early_exit"] if e["kind"] == "early-exit")
    assert ensemble["verdict"].startswith("too slow")
    # 4 GiB: the chain cascade no longer fits the 2 GiB budget; the members' one (99 %) does
    res["chain_cascade"][0]["ram_bytes"] = 4 << 30
    result.write_text(json.dumps(res))
    assert main(["pick", str(run_copy), "--device", "local1", "--devices-dir", str(folder), "--no-bench"]) == 0
    capsys.readouterr()
    sel = json.loads((run_copy / "selection.json").read_text())["devices"]["local1"]
    assert sel["choice"]["kind"] == "cascade" and sel["choice"]["members"] == ["ensemble/e1", "chain/s1"]
    # every cascade fast enough only with more RAM than the budget: too big, not too slow
    res["cascade"][0]["ram_bytes"] = 4 << 30
    result.write_text(json.dumps(res))
    assert main(["pick", str(run_copy), "--device", "local1", "--devices-dir", str(folder), "--no-bench"]) == 0
    capsys.readouterr()
    sel = json.loads((run_copy / "selection.json").read_text())["devices"]["local1"]
    cascade = next(e for e in sel["early_exit"] if e["kind"] == "cascade")
    assert sel["choice"].get("kind") != "cascade" and cascade["verdict"].startswith("too big (RAM)"), cascade
    res["cascade"][0]["ram_bytes"] = 2 << 20
    # a stage exported again since: the cascades are stale, the ensemble result as such is not
    res["stage_files"]["chain/s2"]["sha256"] = "0" * 64
    result.write_text(json.dumps(res))
    assert main(["pick", str(run_copy), "--device", "local1", "--devices-dir", str(folder), "--no-bench"]) == 0
    out = capsys.readouterr().out
    sel = json.loads((run_copy / "selection.json").read_text())["devices"]["local1"]
    assert sel["choice"].get("kind") != "cascade" and f"stale: {entries['chain/s2']['file']} exported again" in out


@pytest.mark.parametrize("content", ["{", json.dumps({"target": "tflite-fp32"}),
                                     json.dumps({"sweep": [{"theta": 0.5}]}),
                                     json.dumps({"chain_cascade": [{"theta": 0.5, "accuracy": 99.0, "mean_ms": 1.0,
                                                                    "p90_ms": 1.0, "max_ms": 1.0,
                                                                    "stages": ["chain/s9"]}]})])
def test_a_malformed_early_exit_result_is_one_line(run_copy, tmp_path, capsys, content):
    result = fake_early_exit(run_copy)
    if content.startswith(('{"sweep"', '{"chain_cascade"')):   # one bad part in an otherwise good result
        content = json.dumps({**json.loads(result.read_text()), **json.loads(content)})
    result.write_text(content)
    selection = (run_copy / "selection.json").read_bytes() if (run_copy / "selection.json").exists() else None
    folder = devices_dir(tmp_path, roomy=estimated(latency_ms=1e3, ram_mib=1e3, storage_mib=1e3))
    assert main(["pick", str(run_copy), "--device", "roomy", "--devices-dir", str(folder)]) == 2
    err = one_line_error(capsys)
    assert str(result) in err and "not an early-exit result edgepkd wrote" in err and "--no-early-exit" in err
    assert ((run_copy / "selection.json").read_bytes() if selection is not None else None) == selection
    assert main(["pick", str(run_copy), "--device", "roomy", "--devices-dir", str(folder), "--no-early-exit"]) == 0


def test_distill_with_device_goes_from_recipe_to_a_picked_artifact(tmp_path, tiny_recipe, capsys):
    folder = devices_dir(tmp_path, board={**estimated(latency_ms=1e3, ram_mib=1e3, storage_mib=1e3),
                                          "runtime": "onnxruntime", "export_targets": ["onnx-fp32"]})
    assert main(["distill", str(tiny_recipe), "--out", str(tmp_path / "runs"), "--quiet", "--device", "board",
                 "--devices-dir", str(folder), "--set", "distill.train.epochs=1", "--set",
                 "teacher.train.epochs=1"]) == 0
    run = tmp_path / "runs" / "tiny"
    sel = json.loads((run / "selection.json").read_text())["devices"]["board"]
    assert sel["choice"]["file"].startswith("export/onnx-fp32/") and (run / sel["choice"]["file"]).is_file()
    assert len(sel["candidates"]) == 5 and sel["mode"] == "estimated"  # the teacher, 2 students, 2 prefixes
    assert "teacher" in {c["model"] for c in sel["candidates"]}
    stored = json.loads((run / "bench" / "board.json").read_text())["results"]
    assert all(r["memory"]["activation_bytes"] > 0 for r in stored.values())  # ONNX activations estimated
    out = capsys.readouterr().out
    assert "chosen: the most accurate" in out and "exporting" not in out  # --quiet: the table, no progress
    # the answer is the last lines, as edgepkd pick prints it: picked ..., selection: ... (and the plot)
    lines = out.rstrip("\n").splitlines()
    i = max(k for k, line in enumerate(lines) if line.startswith("picked "))
    assert lines[i + 1] == f"selection: {run / 'selection.json'}" and len(lines) - i <= 3
    assert all(line.startswith("plot: ") for line in lines[i + 2:])
    # from Python: the same chain gives the same choice
    from edgepkd import workflow

    again = workflow.deploy(run, "board", devices_dir=[str(folder)], log=lambda *a: None)
    assert again.path == run / "selection.json"
    assert {k: again.choice.as_dict()[k] for k in ("model", "target", "file", "accuracy")} == \
        {k: sel["choice"][k] for k in ("model", "target", "file", "accuracy")}
    assert main(["distill", str(tiny_recipe), "--out", str(tmp_path / "runs2"), "--device", "nope"]) == 2
    assert "unknown device 'nope'" in one_line_error(capsys)
    assert not (tmp_path / "runs2").exists()  # failed before training


# ------------------------------------------------------------------------------------------------------- ssh
@pytest.fixture
def sshd(tmp_path):
    """OpenSSH's sshd on a free 127.0.0.1 port, a throwaway host key and client key; skips when it cannot start."""
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(binary) or not shutil.which("ssh") or not shutil.which("scp"):
        pytest.skip("needs OpenSSH's sshd, ssh and scp (apt-get install openssh-server; .ci/run installs it)")
    d = tmp_path / "sshd"
    d.mkdir()
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nStrictModes no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\n"
        "Subsystem sftp internal-sftp\nLogLevel ERROR\n")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    proc = subprocess.Popen([binary, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE, text=True)
    user = getpass.getuser()
    options = ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR"]
    login = ["ssh", "-i", str(d / "client_key"), "-p", str(port), "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
             *[x for o in options for x in ("-o", o)], f"{user}@127.0.0.1", "true"]
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                pytest.skip(f"sshd did not start: {proc.stderr.read().strip()[-300:]}")
            if subprocess.run(login, capture_output=True).returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.skip(f"cannot log in to the test sshd as {user} with a key")
            time.sleep(0.2)
        yield {"connect": f"ssh://{user}@127.0.0.1:{port}", "python": sys.executable,
               "ssh": {"identity_file": str(d / "client_key"), "options": options, "connect_timeout_s": 5}}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_bench_over_ssh_copies_runs_and_brings_json_back(run_copy, tmp_path, sshd, capsys):
    folder = devices_dir(tmp_path, loop={"runtime": "tflite", "threads": 1, **sshd,
                                         "budget": {"latency_ms": 1000, "ram_mib": 1000, "storage_mib": 1000}})
    leftovers = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("edgepkd-bench.*"))
    assert main(["bench", str(run_copy), "--device", "loop", "--devices-dir", str(folder), *FAST]) == 0
    out = capsys.readouterr().out
    assert f"device 'loop' ({sshd['connect']})" in out
    stored = json.loads((run_copy / "bench" / "loop.json").read_text())
    assert len(stored["results"]) == 6 and stored["errors"] == {}  # the teacher too
    for key, r in stored["results"].items():
        entry = manifest(run_copy, key.split("/")[0])[key.split("/")[1]]
        assert r["sha256"] == entry["sha256"] and r["path"] == key  # ran on the copy, under its remote name
        assert r["accuracy"]["top1"] == pytest.approx(entry["verification"]["accuracy"])
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("edgepkd-bench.*")) == leftovers  # cleaned up
    before = (run_copy / "bench" / "loop.json").read_bytes()
    # pick uses what came back over ssh without measuring again
    assert main(["pick", str(run_copy), "--device", "loop", "--devices-dir", str(folder), "--no-bench"]) == 0
    chosen = json.loads((run_copy / "selection.json").read_text())["devices"]["loop"]["choice"]
    assert chosen["accuracy"] == pytest.approx(max(r["accuracy"]["top1"] for r in stored["results"].values()))
    assert (run_copy / "bench" / "loop.json").read_bytes() == before


# ------------------------------------------------------------------------------------- tflite-runtime 2.14
def tflite_runtime_214() -> str:
    """A venv holding only numpy<2 and tflite-runtime 2.14 (what a Raspberry Pi user installs), built once under
    the cache dir; skips with the reason when pip cannot provide it (offline, or no wheel for this Python)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgepkd"
    venv = cache / f"venv-tflite-runtime-2.14-py{sys.version_info.major}{sys.version_info.minor}"
    python = venv / "bin" / "python"
    if not python.exists():
        cache.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(venv, ignore_errors=True)
        steps = [[sys.executable, "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", "-q", "numpy<2", "tflite-runtime==2.14.0"]]
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                why = (proc.stderr.strip().splitlines() or ["?"])[-1]
                pytest.skip(f"cannot build a tflite-runtime 2.14 venv for Python {sys.version.split()[0]}: {why}")
    check = subprocess.run([str(python), "-c", "import torch"], capture_output=True)
    assert check.returncode != 0, "the tflite-runtime venv must not hold torch"
    return str(python)


def test_tflite_runtime_214_venv_matches_the_manifest(run_copy, tmp_path, capsys):
    """tflite-fp32 and tflite-int8-weights (int8 constants behind DEQUANTIZE) run on tflite-runtime 2.14 with the
    manifest's top-1; tflite-int8 does not run there."""
    python = tflite_runtime_214()
    folder = run_copy / "export" / "tflite-fp32"
    loose = tmp_path / "targets"
    loose.mkdir()
    target = yaml.safe_load((BUILTIN_DIR / "tflite-int8-weights.yaml").read_text())
    (loose / "loose-tflite-int8-weights.yaml").write_text(yaml.safe_dump({**target, "name": "loose-tflite-int8-weights",
                                                  "verify": {"max_accuracy_drop": 100.0}}))
    assert main(["export", str(run_copy), "--target", "loose-tflite-int8-weights", "--model", "chain/s1",
                 "--targets-dir", str(loose)]) == 0
    capsys.readouterr()
    assert main(["bench", str(run_copy), "--device", "host", "--python", python, *FAST]) == 1
    captured = capsys.readouterr()
    err = captured.err
    # tflite-int8 (dynamic-range) uses FULLY_CONNECTED v12, which 2.14 does not have: one line that says so
    assert "loose-tflite-int8/chain-s2.tflite cannot run on device 'host'" in err and err.count("\n") == 1
    assert "op version newer than this runtime knows" in err
    stored = json.loads((run_copy / "bench" / "host.json").read_text())
    assert sorted(stored["results"]) == sorted([f"tflite-fp32/{f}" for f in manifest(run_copy, "tflite-fp32")] +
                                               ["loose-tflite-int8-weights/chain-s1.tflite"])
    for key, r in stored["results"].items():
        assert (r["runtime"], r["runtime_version"]) == ("tflite_runtime", "2.14.0")
        assert r["host"]["numpy"].startswith("1.")
        entry = manifest(run_copy, key.split("/")[0])[key.split("/")[1]]
        print(key, r["accuracy"]["top1"], entry["verification"]["accuracy"])
        assert r["accuracy"]["top1"] == pytest.approx(entry["verification"]["accuracy"])
    assert folder.is_dir()


# ------------------------------------------------------------------------------------- runs remember their data
@pytest.mark.data
def test_a_data_backed_run_remembers_where_its_data_is(tmp_path, monkeypatch, capsys):
    """An MNIST run made with --data-dir records the location; export, bench, pick and evaluate then read the data
    there without --data-dir (and say so), while --data-dir and $EDGEPKD_DATA still override it."""
    from conftest import TINY_RECIPE, data_dir

    root = data_dir()
    if root is None or not (root / "MNIST" / "raw").is_dir():
        pytest.skip("needs MNIST under $EDGEPKD_DATA (MNIST/raw in torchvision's layout, as ../shared/data)")
    monkeypatch.delenv("EDGEPKD_DATA")
    monkeypatch.chdir(tmp_path)  # nothing under ./ or ~/.cache/edgepkd/data is what finds it
    recipe = {**TINY_RECIPE, "name": "mnist-tiny",
              "data": {"dataset": "mnist", "train_limit": 600, "download": False},
              "students": {"sizes": [{"d_model": 16, "depth": 1, "d_state": 4, "patch_size": 7},
                                     {"d_model": 8, "depth": 1, "d_state": 2, "patch_size": 7}]}}
    (tmp_path / "mnist-tiny.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["distill", "mnist-tiny.yaml", "--data-dir", str(root), "--out", "runs", "--set",
                 "teacher.train.epochs=1", "--set", "distill.train.epochs=1"]) == 0
    assert f"data: {root} (--data-dir)" in capsys.readouterr().err
    run = tmp_path / "runs" / "mnist-tiny"
    assert json.loads((run / "state.json").read_text())["data_dir"] == str(root.absolute())
    recorded = f"data: {root.absolute()} (recorded by the run in {Path('runs/mnist-tiny/state.json')}"

    assert main(["export", "runs/mnist-tiny", "--target", "tflite-fp32", "--model", "chain/s2"]) == 0
    assert recorded in capsys.readouterr().out
    assert main(["bench", "runs/mnist-tiny", "--device", "host", *FAST]) == 0
    assert recorded in capsys.readouterr().out
    (result,) = json.loads((run / "bench" / "host.json").read_text())["results"].values()
    assert result["accuracy"]["images"] == 10000  # MNIST's test split, read from the recorded location
    assert result["accuracy"]["top1"] == pytest.approx(
        manifest(run, "tflite-fp32")["chain-s2.tflite"]["verification"]["accuracy"])
    shutil.rmtree(run / "bench")
    assert main(["pick", "runs/mnist-tiny", "--device", "host", "--latency-ms", "1000", *FAST]) == 0
    assert recorded in capsys.readouterr().out
    assert json.loads((run / "selection.json").read_text())["devices"]["host"]["choice"]["model"] == "chain/s2"
    assert main(["evaluate", "runs/mnist-tiny"]) == 0
    assert recorded in capsys.readouterr().out
    assert main(["distill", "mnist-tiny.yaml", "--out", "runs", "--resume", "--set", "teacher.train.epochs=1",
                 "--set", "distill.train.epochs=1"]) == 0  # every stage finished: reloaded, evaluated again
    assert recorded in capsys.readouterr().err

    nowhere = tmp_path / "nowhere"
    assert main(["evaluate", "runs/mnist-tiny", "--data-dir", str(nowhere)]) == 2  # --data-dir overrides it
    assert f"MNIST not found: put {nowhere}/MNIST/raw/" in one_line_error(capsys)
    monkeypatch.setenv("EDGEPKD_DATA", str(nowhere))                                # and so does $EDGEPKD_DATA
    assert main(["export", "runs/mnist-tiny", "--target", "tflite-fp32", "--model", "chain/s2"]) == 2
    assert f"MNIST not found: put {nowhere}/MNIST/raw/" in one_line_error(capsys)
    assert (run / "export" / "tflite-fp32" / "chain-s2.tflite").is_file()  # the earlier export is intact


def test_device_speed_floor_and_cost_fit(tiny_run, tmp_path):
    """benchmarks/device_speed.py's per-invoke floor exports and runs in both runtimes, and its cost fit recovers
    a known price per op and rate of FLOPs (and declines with fewer than 3 students)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("ai_edge_litert")
    sys.path.insert(0, str(REPO / "benchmarks"))
    import device_speed

    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    floors = device_speed.export_floor(run, ["tflite-fp32", "tflite-int8-static", "onnx-fp32"])
    assert [(f["format"], f["base_target"]) for f in floors] == [("tflite", "tflite-fp32"), ("onnx", "onnx-fp32")]
    device_speed.time_interleaved(floors, rounds=1, min_seconds=0.0, min_runs=5)
    assert all(f["p50_ms"] > 0 for f in floors)

    def row(ops, mflops):  # p50 - floor = 0.5 µs per op + 10 µs per MFLOP (100 GFLOP/s)
        return {"base_target": "onnx-fp32", "precision": "fp32", "model": f"chain/s{ops}", "format": "onnx",
                "profile": {"Mul": {"nodes": ops}}, "mflops": mflops, "beyond_floor_ms": (0.5 * ops + 10 * mflops) / 1e3}

    fit = device_speed.cost_fits([row(72, 3.5), row(40, 1.3), row(39, 0.1)])["onnx-fp32"]
    assert fit["us_per_op"] == pytest.approx(0.5) and fit["gflops_per_s"] == pytest.approx(100)
    assert fit["worst_residual_us"] < 1e-9
    assert device_speed.cost_fits([row(72, 3.5), row(40, 1.3)]) == {}
