"""TFLite Micro (issue #14): the op check at export, the exact arena, the firmware sources, a missing tflite-micro
package, and the goal: every artifact that ``pick --device cortex-m7`` can choose loads and runs in TFLite Micro
with the top-1 its export verified."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import invoke, loose_target, manifest, one_line_error
from edgepkd.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.export]
for module in ("litert_torch", "ai_edge_litert", "torchao", "tflite_micro"):
    pytest.importorskip(module)

from edgepkd.compress import tflm  # noqa: E402


@pytest.fixture(scope="module")
def tflm_run(tiny_run, tmp_path_factory) -> tuple[Path, str]:
    """A copy of the tiny run with every model (teacher, students, prefixes) exported to a copy of
    tflite-micro-int8 with its accuracy tolerance opened (a 60-image synthetic split), as cortex-m7 sees it."""
    root = tmp_path_factory.mktemp("tflm")
    run = root / "tiny"
    shutil.copytree(tiny_run, run)
    name = loose_target("tflite-micro-int8", root / "targets", 50.0)
    code, _, err = invoke("export", run, "--target", name, "--targets-dir", root / "targets")
    assert code == 0, err
    return run, name


def test_every_artifact_pick_can_choose_runs_in_tflite_micro(tflm_run, capsys):
    """The goal: pick --device cortex-m7's candidates are exactly the TFLite Micro exports, and each loads in
    TFLite Micro at its manifest's arena and reproduces its verified top-1 there, as bench measures it too."""
    from edgepkd.measure.devices import load_devices
    from edgepkd.measure.pick import pick_candidates
    from edgepkd.measure.runner import preprocess

    run, target = tflm_run
    profile = load_devices().get("cortex-m7")
    chosen = pick_candidates(run, profile)
    entries = manifest(run, target)
    assert sorted(c.artifact.path.name for c in chosen) == sorted(entries)
    assert {"teacher.tflite", "chain-s1.tflite", "ensemble-1-2.tflite"} <= set(entries)
    with _images(run) as f:
        images, labels = f["images"], f["labels"]
    for c in chosen:
        e = c.artifact.entry
        assert not tflm.problems(c.artifact.path.read_bytes()), e["file"]
        model = tflm.TFLMModel(c.artifact.path, e["tflite_micro"]["arena_bytes"])
        x = preprocess(images, e["preprocessing"])                           # (N, C, H, W)
        pred = np.array([model(x[i:i + 1]).argmax() for i in range(len(x))])
        acc = 100.0 * float((pred == labels).mean())
        print(e["file"], "arena", e["tflite_micro"]["arena_bytes"], "top-1", acc, "verified", e["verification"]["accuracy"])
        assert acc == pytest.approx(e["verification"]["accuracy"], abs=1e-9)
    assert main(["bench", str(run), "--device", "cortex-m7"]) == 0
    out = capsys.readouterr().out
    assert "TFLite Micro" in out and "ESTIMATED (per-op)" in out and " est." in out
    stored = json.loads((run / "bench" / "cortex-m7.json").read_text())
    assert len(stored["results"]) == len(chosen) and not stored["errors"]
    for key, r in stored["results"].items():
        e = entries[key.split("/")[1]]
        assert r["memory"]["arena_bytes"] == e["tflite_micro"]["arena_bytes"] and r["op_coverage"] == 1.0
        assert r["accuracy"]["top1"] == pytest.approx(e["verification"]["accuracy"], abs=1e-9)
        assert r["estimated"] is True and r["flash_bytes"] >= e["bytes"]
        # latency per op (edgepkd/measure/opcost.py): the sum of the breakdown over the profile's clock
        est = r["latency_estimate"]
        assert est["method"] == "per-op" and "latency estimated (per-op)" in r["method"] and not est["not_modelled"]
        assert sum(row["cycles"] for row in est["by_op"].values()) == pytest.approx(est["cycles"])
        assert r["latency_ms"]["p50"] == pytest.approx(1e3 * est["cycles"] / (est["clock_mhz"] * 1e6))
    code = main(["pick", str(run), "--device", "cortex-m7"])
    assert code in (0, 1)                     # a choice, or nothing fits; either way judged on measured arenas
    sel = json.loads((run / "selection.json").read_text())["devices"]["cortex-m7"] if code == 0 else None
    if sel is not None:
        chosen_entry = entries[Path(sel["choice"]["file"]).name]
        assert sel["choice"]["ram_bytes"] == chosen_entry["tflite_micro"]["arena_bytes"]


def _images(run: Path):
    from edgepkd.measure.bench import test_images

    return np.load(test_images(run, None, log=lambda *_: None))


def test_arena_is_exact(tflm_run):
    """find_arena's answer allocates and invokes; one byte less does not."""
    run, target = tflm_run
    path = run / "export" / target / "chain-s2.tflite"
    arena = tflm.find_arena(path)
    assert arena == manifest(run, target)["chain-s2.tflite"]["tflite_micro"]["arena_bytes"]
    assert tflm._fits(str(path), arena, sys.executable)
    assert not tflm._fits(str(path), arena - 1, sys.executable)


def test_no_concatenation_is_wider_than_tflite_micro_takes(tflm_run):
    """The converter folds the scan's concat tree into one L-input CONCATENATION; the export splits it (an 8x8
    image at patch 2 gives L = 16 > 10)."""
    run, target = tflm_run
    widths = [n for name, n in tflm.ops((run / "export" / target / "chain-s1.tflite").read_bytes())
              if name == "CONCATENATION"]
    assert widths and max(widths) <= tflm.MAX_CONCAT_INPUTS and len(widths) >= 2


def test_unsupported_op_fails_in_one_line(tmp_path):
    """A graph with an op TFLite Micro lacks (torch's own softplus lowers to SELECT) is refused at export with one
    line naming the op and the module it came from; nothing is written."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from edgepkd.compress import tflm_export
    from edgepkd.compress.targets import load_targets

    class Soft(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return F.softplus(self.proj(x.flatten(1)))

    target = load_targets().get("tflite-micro-int8")
    with pytest.raises(tflm_export.UnsupportedOp) as info:
        tflm_export.export(Soft().eval(), torch.randn(1, 1, 2, 2), tmp_path / "soft.tflite", target,
                           lambda: (np.random.randn(1, 1, 2, 2).astype(np.float32) for _ in range(4)),
                           {"model": "soft"})
    message = str(info.value)
    print(message)
    assert "\n" not in message and message.startswith("soft: the graph has op ")
    assert "op SELECT, which TFLite Micro does not have, from module Soft;" in message


def test_firmware_sources_compile_and_hold_the_model(tflm_run, tmp_path):
    """<model>_data.cc compiles with the host g++; a program linked with it finds the array 16-byte aligned and
    byte-identical to the .tflite, and the header's arena and input quantization are the manifest's. _main.cc
    registers exactly the model's ops."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no host C++ compiler (g++) to compile the generated sources")
    run, target = tflm_run
    folder = run / "export" / target
    e = manifest(run, target)["chain-s1.tflite"]
    assert e["tflite_micro"]["sources"] == ["chain-s1_data.cc", "chain-s1_data.h", "chain-s1_main.cc"]
    subprocess.run([gxx, "-std=c++17", "-c", str(folder / "chain-s1_data.cc"), "-o", str(tmp_path / "data.o")],
                   check=True)
    (tmp_path / "check.cc").write_text("""
#include <cstdint>
#include <cstdio>
#include "chain-s1_data.h"
int main() {
  if (reinterpret_cast<uintptr_t>(chain_s1_model) % 16 != 0) return 3;
  std::printf("%zu %.9g %d %s %d\\n", chain_s1_arena_size, chain_s1_input_scale, chain_s1_input_zero_point,
              chain_s1_labels[0], chain_s1_num_classes);
  std::fwrite(chain_s1_model, 1, chain_s1_model_len, stderr);
  return 0;
}
""")
    subprocess.run([gxx, "-std=c++17", "-I", str(folder), str(tmp_path / "check.cc"), str(tmp_path / "data.o"),
                    "-o", str(tmp_path / "check")], check=True)
    done = subprocess.run([str(tmp_path / "check")], capture_output=True, check=True)
    assert done.stderr == (folder / "chain-s1.tflite").read_bytes()
    arena, scale, zero, label, classes = done.stdout.decode().split()
    q = e["input"]["quantization"]
    assert int(arena) == e["tflite_micro"]["arena_bytes"] and float(scale) == pytest.approx(q["scale"], rel=1e-6)
    assert int(zero) == q["zero_point"] and label == e["classes"][0] and int(classes) == len(e["classes"])
    main_cc = (folder / "chain-s1_main.cc").read_text()
    registered = sorted(line.split("resolver.")[1].split("(")[0] for line in main_cc.splitlines()
                        if "resolver.Add" in line)
    assert registered == sorted(tflm.TFLM_OPS[op] for op in e["tflite_micro"]["ops"])
    assert f"MicroMutableOpResolver<{len(registered)}>" in main_cc


def test_missing_tflite_micro_is_one_line_with_the_pip_command(tflm_run, monkeypatch, capsys):
    """Without the tflite-micro package, export to a TFLite Micro target and bench on cortex-m7 each stop with one
    line naming `pip install tflite-micro`, before anything runs or is written."""
    run, target = tflm_run
    for name in [m for m in sys.modules if m == "tflite_micro" or m.startswith("tflite_micro.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tflite_micro", None)      # import tflite_micro raises ImportError
    before = (run / "export" / target / "manifest.json").read_bytes()
    assert main(["export", str(run), "--target", "tflite-micro-int8", "--model", "chain/s2"]) == 1
    assert "pip install tflite-micro" in one_line_error(capsys)
    bench_file = run / "bench" / "cortex-m7.json"
    stored = bench_file.read_bytes() if bench_file.is_file() else None
    assert main(["bench", str(run), "--device", "cortex-m7"]) != 0
    assert "pip install tflite-micro" in one_line_error(capsys)
    assert (run / "export" / target / "manifest.json").read_bytes() == before
    assert (bench_file.read_bytes() if bench_file.is_file() else None) == stored
