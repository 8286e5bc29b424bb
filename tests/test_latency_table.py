"""Student design by measured latency (issue #13): ``students.progression.by: latency`` and its latency table."""

import json

import pytest
import yaml

from edgepkd.cli import main

pytestmark = pytest.mark.slow

PROGRESSION = ("students.progression={start: {d_model: 32, depth: 2, d_state: 8}, count: 3, by: latency, "
               "latency_ratio: 0.5, max_measured: 4}")


def devices(tmp_path, **profiles):
    folder = tmp_path / "devices"
    folder.mkdir(exist_ok=True)
    for name, body in profiles.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, **body}))
    return folder


ESTIMATED = {"runtime": "tflite", "connect": "none", "precisions": ["fp32"],
             "calibration": {"macs_per_second": 1e8, "source": "test"},
             "budget": {"latency_ms": 10, "ram_mib": 10, "storage_mib": 10}}


def dry_run(tiny_recipe, tmp_path, *extra):
    return main(["distill", str(tiny_recipe), "--out", str(tmp_path / "runs"), "--quiet", "--dry-run", "--json",
                 "--set", "students.sizes=null", "--set", PROGRESSION, *extra])


def test_latency_progression_on_an_estimated_device_steps_by_latency_and_caches(tiny_recipe, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.setenv("EDGEPKD_CACHE", str(tmp_path / "cache"))
    folder = devices(tmp_path, mcu=ESTIMATED)
    assert dry_run(tiny_recipe, tmp_path, "--device", "mcu", "--devices-dir", str(folder)) == 0
    out = capsys.readouterr()
    plan = json.loads(out.out)["students"]
    ms = [s["p50_ms"] for s in plan]
    assert len(ms) == 3 and all(b < a for a, b in zip(ms, ms[1:])), ms
    # estimated: p50 = (FLOPs / 2) / MAC/s, and each step is the timed candidate nearest half the previous p50
    for s in plan:
        assert s["p50_ms"] == pytest.approx(1e3 * s["mflops"] * 1e6 / 2 / 1e8)
    assert all(0.3 < b / a < 0.75 for a, b in zip(ms, ms[1:])), ms
    table = json.loads((tmp_path / "cache" / "latency" / "mcu.json").read_text())
    assert len(table["entries"]) >= 3 and "timing" in out.err
    # the second plan reads the table: nothing is timed again, and the plan is the same
    assert dry_run(tiny_recipe, tmp_path, "--device", "mcu", "--devices-dir", str(folder)) == 0
    again = capsys.readouterr()
    assert json.loads(again.out)["students"] == plan and "timing" not in again.err


def test_latency_progression_reads_the_device_from_the_recipe(tiny_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGEPKD_CACHE", str(tmp_path / "cache"))
    folder = devices(tmp_path, mcu=ESTIMATED)
    assert dry_run(tiny_recipe, tmp_path, "--devices-dir", str(folder),
                   "--set", "students.progression.device=mcu") == 0
    assert len(json.loads(capsys.readouterr().out)["students"]) == 3


def test_latency_progression_without_a_device_is_one_line(tiny_recipe, tmp_path, capsys):
    assert dry_run(tiny_recipe, tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "students.progression.by: latency needs a device" in err[0] and "--device" in err[0]


@pytest.mark.export
def test_latency_progression_times_real_exports_on_the_host(tiny_recipe, tmp_path, capsys, monkeypatch):
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("litert_torch")
    monkeypatch.setenv("EDGEPKD_CACHE", str(tmp_path / "cache"))
    code = main(["distill", str(tiny_recipe), "--out", str(tmp_path / "runs"), "--quiet", "--dry-run", "--json",
                 "--set", "students.sizes=null", "--device", "host",
                 "--set", "students.progression={start: {d_model: 16, depth: 1, d_state: 4}, count: 2, "
                          "by: latency, max_measured: 2}"])
    out, err = capsys.readouterr()
    # the plan follows what was measured: a second student only if a measured candidate ran faster than the
    # first (these tiny students are within timing noise of each other), else the one-line refusal
    if code == 0:
        plan = json.loads(out)["students"]
        assert len(plan) == 2 and plan[1]["p50_ms"] < plan[0]["p50_ms"]
    else:
        assert code == 2, err
        lines = [line for line in err.splitlines() if line.startswith("edgepkd: error:")]
        assert len(lines) == 1 and "only 1 students fit below" in lines[0] and " ms with min_d_model" in lines[0]
    table = json.loads((tmp_path / "cache" / "latency" / "host.json").read_text())
    assert all(not e["estimated"] and e["p50_ms"] > 0 for e in table["entries"].values())


def test_latency_table_times_candidates_as_the_devices_fp32_target_or_says_it_has_none():
    from edgepkd.errors import ConfigError
    from edgepkd.measure.latency_table import fp32_target

    assert {fmt: fp32_target(fmt, "d").name for fmt in ("tflite", "onnx", "executorch")} == {
        "tflite": "tflite-fp32", "onnx": "onnx-fp32", "executorch": "executorch-fp32"}
    with pytest.raises(ConfigError, match=r"device 'cortex-m7' runs tflite-micro files, which no fp32 export "
                                          r"target has: use by: flops"):
        fp32_target("tflite-micro", "cortex-m7")
