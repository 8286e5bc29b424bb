"""Students against their teacher on the device runtimes, side by side in one run (issue #13).

    python benchmarks/device_speed.py runs/digits [runs/mnist ...] [--data-dir ../shared/data]
        # writes benchmarks/results/device-speed-<run>.md / .json (--suffix S: device-speed-<run>S.*)

    python benchmarks/device_speed.py runs/mnist --with-run runs/mnist-depth1
        # also RUN2's chain students (a design distilled from the same teacher) in the last run's rounds

For each run, the teacher and every chain student are exported (into RUN/export/speed-<target>[-<scan>]/,
removed when the run's results are written unless ``--keep-exports``: they are verified to report, not to gate,
so ``edgepkd bench`` and ``pick`` must not find them among the run's exports) to
TFLite (fp32, int8-static) and ONNX (fp32, int8), by default (``--targets``: any registered targets, ExecuTorch's
included, timed in executorch.runtime with XNNPACK); the fp32 targets also with the previous export form of the scan
(``--before-scan``, default 'torch': the reference's own layout; 'default-form': ONNX also without its entry in
``edgepkd.models.mamba.EXPORT_FORMS``, i.e. as TFLite exports it) so that before and after are measured in the
same run; ``--before-rev REV`` adds the students of the run's recipe at that git revision (random weights, fp32,
the previous scan form), e.g. the students before issue #13. Every artifact is then timed in its own runtime (ai_edge_litert's interpreter with XNNPACK,
onnxruntime's CPU EP), 1 thread, batch 1, one standard-normal input, in ``--rounds`` interleaved rounds of
``--min-seconds`` each: round 1 times every artifact, then round 2 every artifact again, ... so that drift on a
shared machine hits all of them alike. Reported per artifact: the median of the per-round p50s, p90 over all
runs, MFLOPs (analytic, metrics.json), effective GFLOP/s (MFLOPs / p50), the ratio to the teacher's p50 in the
same target, and 'repeat': the slowest round's p50 over the fastest, the noise of every ratio in that row.

Where the time goes:
  * onnxruntime: session profiling (``SessionOptions.enable_profiling``) over ``--profile-runs`` runs: kernel
    time per op type per inference, and each type's share of the summed kernel time.
  * TFLite: ai_edge_litert's Python API exposes no op profiler (TFLite's is in the C++ benchmark_model tool),
    so per op type we report counts and what runs outside the XNNPACK delegate: the delegate partitions (the
    DELEGATE nodes) and the ops whose outputs no partition produces, by type.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgepkd.compress.export import export_targets  # noqa: E402
from edgepkd.compress.targets import VerifyConfig, load_targets  # noqa: E402
from edgepkd.compress.verify import CROSS_CHECK_AGREEMENT  # noqa: E402
from edgepkd.compress.runtimes import ExecuTorchModel, OnnxModel, TFLiteModel  # noqa: E402
from edgepkd.report import load_metrics  # noqa: E402

TARGETS = ["tflite-fp32", "tflite-int8-static", "onnx-fp32", "onnx-int8"]
DEFAULT_FORM = "default-form"  # --before-scan value: the format's export form without its EXPORT_FORMS entry
MODELS = {"tflite": TFLiteModel, "onnx": OnnxModel, "executorch": ExecuTorchModel}


def export_all(run: Path, models: list[str], before_scan: str | None, data_dir: str | None,
               targets: list[str] = TARGETS) -> list[dict]:
    """Export ``models`` for every target (and the fp32 targets with ``before_scan``); manifest entries with
    the target's base name and scan form added."""
    from edgepkd.compress import verify
    from edgepkd.models import mamba

    registry = load_targets()
    variants = []
    for name in targets:
        base = registry.get(name)
        before = before_scan if before_scan != DEFAULT_FORM or base.format in mamba.EXPORT_FORMS else None
        scans = [base.scan] + ([before] if before and base.precision == "fp32" else [])
        for scan in scans:
            t = dataclasses.replace(base, name=f"speed-{name}" + ("" if scan == base.scan else f"-{scan}"),
                                    scan=base.scan if scan == DEFAULT_FORM else scan)
            t.verify = VerifyConfig(max_abs_diff=1e9, max_accuracy_drop=100.0)  # report every number, do not gate
            variants.append((t, name, scan))
    entries = []
    for t, name, scan in variants:
        forms, agreement = mamba.EXPORT_FORMS, verify.CROSS_CHECK_AGREEMENT
        if scan == DEFAULT_FORM:  # the form every format exported before EXPORT_FORMS (conv1d, 'ssd')
            mamba.EXPORT_FORMS = {}
        verify.CROSS_CHECK_AGREEMENT = 0.0  # int8 second opinions (TFLite's builtin kernels) report, not gate
        try:
            written, _ = export_targets(str(run), [t], models=models, data_dir=data_dir,
                                        log=lambda line: print(line, file=sys.stderr) if ": exporting " in line
                                        else None)
        finally:
            mamba.EXPORT_FORMS, verify.CROSS_CHECK_AGREEMENT = forms, agreement
        for e in written:
            entries.append({**e, "base_target": name, "scan": scan, "format": t.format,
                            "path": str(run / "export" / t.name / e["file"])})
    return entries


def export_before(run: Path, rev: str, scan: str) -> list[dict]:
    """The students of the run's recipe as it was at git revision ``rev`` (random weights: latency does not
    depend on them), exported to tflite-fp32 and onnx-fp32 with scan form ``scan``: the 'before' rows."""
    import importlib
    import subprocess

    import torch
    import yaml

    from edgepkd.config import to_dict
    from edgepkd.models.flops import count_flops
    from edgepkd.models import STUDENT_ARCH, build_model, export_mode
    from edgepkd.recipe import Recipe, load_recipe

    recipe = load_recipe(run / "recipe.yaml")
    root = Path(__file__).resolve().parents[1]
    old = subprocess.run(["git", "show", f"{rev}:recipes/{recipe.name}.yaml"], cwd=root, capture_output=True,
                         text=True, check=True).stdout
    from edgepkd.config import from_dict

    sizes = from_dict(Recipe, yaml.safe_load(old)).students.sizes
    meta = json.loads((run / "metrics.json").read_text())["dataset"]
    c, h, _ = meta["input_shape"]
    registry = load_targets()
    entries = []
    for name in ("tflite-fp32", "onnx-fp32"):
        target = dataclasses.replace(registry.get(name), scan=scan)
        exporter = target.export_format
        folder = run / "export" / f"speed-before-{rev}-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, spec in enumerate(sizes):
            torch.manual_seed(0)
            net = build_model(STUDENT_ARCH, to_dict(spec), len(meta["classes"]), c, h).eval()
            f = count_flops(net, (c, h, h))
            path = folder / f"s{i + 1}{target.suffix}"
            with export_mode(net, scan=scan):
                exporter.export(net, torch.randn(1, c, h, h), path, target, lambda: iter(()),
                                {"model": f"before/s{i + 1}"})
            entries.append({"model": f"before/s{i + 1}", "file": path.name, "path": str(path), "format": target.format,
                            "precision": "fp32", "base_target": name, "scan": scan, "flops": f.flops,
                            "input": {"shape": [1, c, h, h]}, "verification": {"accuracy": None},
                            "spec": to_dict(spec)})
    return entries


def export_floor(run: Path, targets: list[str]) -> list[dict]:
    """The per-invoke floor of each format among ``targets``: the cheapest graph with the run's input and output
    (a mean per input channel and a Linear to the classes: 2 or 3 ops), exported with the format's fp32 target,
    random weights. Its p50 is what an invoke costs before any model work (input copy, dispatch, output), the
    bound of the smallest students (issue #13)."""
    import torch

    from edgepkd.errors import ConfigError
    from edgepkd.measure.latency_table import fp32_target
    from edgepkd.models.flops import count_flops

    class InvokeFloor(torch.nn.Module):
        def __init__(self, chans: int, classes: int):
            super().__init__()
            self.fc = torch.nn.Linear(chans, classes)

        def forward(self, x):                                               # x: (B, C, H, W)
            return self.fc(x.mean((2, 3)))                                  # (B, classes)

    meta = json.loads((run / "metrics.json").read_text())["dataset"]
    c, h, w = meta["input_shape"]
    registry = load_targets()
    entries, seen = [], set()
    for name in targets:
        fmt = registry.get(name).format
        if fmt in seen:
            continue
        seen.add(fmt)
        try:
            fp32 = fp32_target(fmt, "host")   # what latency tables time candidates as
        except ConfigError:                   # a format with no fp32 target (TFLite Micro): no floor
            continue
        torch.manual_seed(0)
        net = InvokeFloor(c, len(meta["classes"])).eval()
        folder = run / "export" / f"speed-floor-{fp32.name}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"floor{fp32.suffix}"
        fp32.export_format.export(net, torch.randn(1, c, h, w), path, fp32, lambda: iter(()), {"model": "floor"})
        entries.append({"model": "floor", "file": path.name, "path": str(path), "format": fmt, "precision": "fp32",
                        "base_target": fp32.name, "scan": "floor", "flops": count_flops(net, (c, h, w)).flops,
                        "input": {"shape": [1, c, h, w]}, "verification": {"accuracy": None}})
    return entries


def time_interleaved(entries: list[dict], rounds: int, min_seconds: float, min_runs: int = 100) -> None:
    """Adds p50_ms (median of per-round p50s), p90_ms (all runs), repeat (max/min per-round p50) to each entry."""
    loaded = []
    for e in entries:
        m = MODELS[e["format"]](e["path"], 1, "auto")
        x = m.prepare(np.random.default_rng(0).standard_normal(e["input"]["shape"]).astype(np.float32))
        for _ in range(20):
            m.run(x)
        loaded.append((e, m, x, []))
    for _ in range(rounds):
        for e, m, x, per_round in loaded:
            times, start = [], time.perf_counter()
            while len(times) < min_runs or time.perf_counter() - start < min_seconds:
                t0 = time.perf_counter()
                m.run(x)
                times.append(time.perf_counter() - t0)
            per_round.append(times)
    for e, _, _, per_round in loaded:
        p50s = [1e3 * statistics.median(t) for t in per_round]
        pooled = np.array([v for t in per_round for v in t]) * 1e3
        e.update(p50_ms=statistics.median(p50s), p90_ms=float(np.percentile(pooled, 90)),
                 repeat=max(p50s) / min(p50s), runs=len(pooled))


def onnx_profile(path: str, runs: int) -> dict:
    """Kernel microseconds per inference by op type, from onnxruntime's session profiler (1 thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = os.path.join(tmp, "ort")
        s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        inp = s.get_inputs()[0]
        x = np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in inp.shape])
        for _ in range(runs):
            s.run(None, {inp.name: x.astype(np.float32)})
        events = json.loads(Path(s.end_profiling()).read_text())
    per_type: dict[str, float] = collections.defaultdict(float)
    nodes: dict[str, set] = collections.defaultdict(set)
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            op = ev["args"].get("op_name", "?")
            per_type[op] += ev["dur"] / runs
            nodes[op].add(ev["name"])
    total = sum(per_type.values())
    return {op: {"us": us, "share": us / total, "nodes": len(nodes[op])}
            for op, us in sorted(per_type.items(), key=lambda kv: -kv[1])}


def tflite_partitions(path: str) -> dict:
    """Op counts by type, XNNPACK delegate partitions, and the ops that run outside the delegate."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=path, num_threads=1)
    it.allocate_tensors()
    ops = it._get_ops_details()
    delegates = [o for o in ops if o["op_name"] == "DELEGATE"]
    original = [o for o in ops if o["op_name"] != "DELEGATE"]
    delegate_out = {int(t) for o in delegates for t in o["outputs"]}
    delegate_in = {int(t) for o in delegates for t in o["inputs"]}
    producer = {int(t): o for o in original for t in o["outputs"]}
    graph_out = {d["index"] for d in it.get_output_details()}
    # an op runs outside the delegate iff a tensor it makes is consumed outside (a partition's input or the
    # graph's output) without being a partition's output; walk back from those
    outside: dict[int, dict] = {}
    stack = [producer[t] for t in delegate_in | graph_out if t in producer and t not in delegate_out]
    while stack:
        o = stack.pop()
        if o["index"] in outside:
            continue
        outside[o["index"]] = o
        stack += [producer[int(t)] for t in o["inputs"] if int(t) in producer and int(t) not in delegate_out]
    return {"ops": len(original), "partitions": len(delegates),
            "by_type": dict(collections.Counter(o["op_name"] for o in original).most_common()),
            "outside_delegate": dict(collections.Counter(o["op_name"] for o in outside.values()).most_common())}


def executorch_partitions(path: str) -> dict:
    """A .pte's forward by instruction: XNNPACK delegate calls and the kernels that run outside them, by op."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(Path(path).read_bytes())
    program = getattr(program, "program", program)                     # 1.5: a PTEFile holding the Program
    plan = next(p for p in program.execution_plan if p.name == "forward")
    outside: collections.Counter = collections.Counter()
    delegates = 0
    for instruction in plan.chains[0].instructions:
        args = instruction.instr_args
        if type(args).__name__ == "DelegateCall":
            delegates += 1
        elif type(args).__name__ == "KernelCall":
            op = plan.operators[args.op_index]
            outside[op.name.split("::")[-1] + (f".{op.overload}" if op.overload else "")] += 1
    return {"partitions": delegates, "outside_delegate": dict(outside.most_common())}


def variant_entries(other: Path, args) -> list[dict]:
    """``other``'s chain students exported as in ``export_all`` (no before form), named '<run name>/chain/sK', to
    be timed beside another run's teacher (--with-run: a student design distilled from the same teacher)."""
    metrics = load_metrics(other)
    rows = {r["name"]: r for r in metrics["models"]}
    entries = export_all(other, [n for n, r in rows.items() if r["role"] == "chain"], None, args.data_dir,
                         args.targets.split(","))
    for e in entries:
        e["flops"] = rows[e["model"]]["flops"]
        e["spec"] = rows[e["model"]].get("spec")
        e["model"] = f"{other.name}/{e['model']}"
    return entries


def bench_run(run: Path, args, with_runs: list[Path] = ()) -> dict:
    metrics = load_metrics(run)
    rows = {r["name"]: r for r in metrics["models"]}
    models = ["teacher"] + [r["name"] for r in metrics["models"] if r["role"] == "chain"]
    entries = export_all(run, models, args.before_scan, args.data_dir, args.targets.split(","))
    for other in with_runs:
        entries += variant_entries(other, args)
    if args.before_rev:
        entries += export_before(run, args.before_rev, args.before_scan or "unrolled")
    floors = export_floor(run, args.targets.split(","))
    time_interleaved(entries + floors, args.rounds, args.min_seconds)
    floor = {e["format"]: e for e in floors}
    teacher = {(e["base_target"], e["scan"]): e for e in entries if e["model"] == "teacher"}
    for e in entries:
        e["bytes"] = Path(e["path"]).stat().st_size
    fp32_bytes = {(e["model"], e["format"]): e["bytes"] for e in entries
                  if e["precision"] == "fp32" and e["scan"] == "auto"}
    for e in entries:
        ref = fp32_bytes.get((e["model"], e["format"]))
        e["bytes_vs_fp32"] = e["bytes"] / ref if ref else None
        e["mflops"] = (rows[e["model"]]["flops"] if e["model"] in rows else e["flops"]) / 1e6
        e["gflops_per_s"] = e["mflops"] / e["p50_ms"]
        t = teacher.get((e["base_target"], e["scan"])) or next(v for (b, _), v in teacher.items()
                                                               if b == e["base_target"])
        e["vs_teacher"] = e["p50_ms"] / t["p50_ms"]
        e["eff_vs_teacher"] = e["gflops_per_s"] / t["gflops_per_s"]
        f = floor.get(e["format"])
        if f is not None:  # the model's work beyond an invoke's floor, and its efficiency there vs the teacher's
            e["floor_ms"] = f["p50_ms"]
            e["beyond_floor_ms"] = e["p50_ms"] - f["p50_ms"]
            t_beyond = t["p50_ms"] - f["p50_ms"]
            e["eff_beyond_floor_vs_teacher"] = ((e["mflops"] / e["beyond_floor_ms"]) / (t["mflops"] / t_beyond)
                                                if e["beyond_floor_ms"] > 0 and t_beyond > 0 else None)
        e["acc"] = e["verification"].get("accuracy")
        checks = e["verification"].get("cross_checks") or []
        e["second_opinion_agreement"] = min((c["agreement"] for c in checks), default=None)
        if e["precision"] == "fp32" and e["format"] == "onnx":
            e["profile"] = onnx_profile(e["path"], args.profile_runs)
        if e["format"] == "tflite":
            e["partitions"] = tflite_partitions(e["path"])
        if e["format"] == "executorch":
            e["partitions"] = executorch_partitions(e["path"])
    for f in floors:
        f.update(bytes=Path(f["path"]).stat().st_size, mflops=f["flops"] / 1e6)
    for e in entries:
        e["ops"] = op_count(e)
    return {"run": run.name, "floors": [{k: f[k] for k in ("format", "base_target", "file", "bytes", "mflops",
                                                           "p50_ms", "p90_ms", "repeat")} for f in floors],
            "teacher_arch": metrics.get("teacher", {}).get("arch") if isinstance(
        metrics.get("teacher"), dict) else None, "rows": [{k: v for k, v in e.items() if k not in (
            "preprocessing", "classes", "provenance", "input", "output", "verification")} for e in entries]}


def _ops(d: dict, n: int = 5) -> str:
    return ", ".join(f"{k} {v}" for k, v in list(d.items())[:n]) or "none"


def int8_table(rows: list[dict]) -> list[str]:
    """Each int8 artifact against the same model's fp32 one in the same runtime and run (scan 'auto'): fp32 p50 /
    int8 p50 (above 1: int8 is faster) and the file ratio."""
    fp32 = {(r["model"], r["format"]): r for r in rows if r["precision"] == "fp32" and r["scan"] == "auto"}
    pairs = [(r, fp32[(r["model"], r["format"])]) for r in rows
             if r["precision"] != "fp32" and r["scan"] == "auto" and (r["model"], r["format"]) in fp32]
    if not pairs:
        return []
    lines = ["## int8 against fp32, same runtime, same rounds", "",
             "fp32 p50 / int8 p50 (above 1: the int8 artifact is faster; the rows' repeat is the noise) and int8 "
             "file bytes / fp32 file bytes.", "",
             "| model | int8 target | fp32 target | fp32 p50 ms | int8 p50 ms | speed-up | repeat (worst) | file / fp32 "
             "| second opinion agrees (%) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r, f in sorted(pairs, key=lambda p: (p[0]["base_target"], p[0]["model"] != "teacher", p[0]["model"])):
        lines.append(f"| {r['model']} | {r['base_target']} | {f['base_target']} | {f['p50_ms']:.4f} | "
                     f"{r['p50_ms']:.4f} | {f['p50_ms'] / r['p50_ms']:.2f} | {max(r['repeat'], f['repeat']):.2f} | "
                     f"{r['bytes'] / f['bytes']:.2f} | {_pct(r.get('second_opinion_agreement'))} |")
    return lines + ["", "Second opinion: top-1 agreement of the format's other kernels on the same file (TFLite's "
                        "builtin kernels against XNNPACK) on the verification's first images; `edgepkd export` "
                        f"refuses an int8 file below {CROSS_CHECK_AGREEMENT:g} % (here it reports).", ""]


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def floor_table(result: dict) -> list[str]:
    """The per-invoke floor per format and each model's p50 against it (scan 'auto')."""
    floors = result.get("floors") or []
    rows = [r for r in result["rows"] if r.get("floor_ms") is not None and r["scan"] == "auto"]
    if not floors or not rows:
        return []
    lines = ["## The per-invoke floor", "",
             "The cheapest graph with the same input and output (a mean per channel and a Linear to the classes, "
             "exported with the format's fp32 target), timed in the same rounds: what one invoke costs before any "
             "model work. 'floor share': floor / p50; 'eff. beyond floor': MFLOPs / (p50 - floor) over the "
             "teacher's, the same in the same target (int8 targets are set against their format's fp32 floor).", "",
             "| format | floor target | floor p50 ms | repeat | file (B) |", "|---|---|---:|---:|---:|"]
    lines += [f"| {f['format']} | {f['base_target']} | {f['p50_ms']:.4f} | {f['repeat']:.2f} | {f['bytes']:,} |"
              for f in floors]
    lines += ["", "| model | target | MFLOPs | p50 ms | floor share | p50 - floor ms | eff. beyond floor / teacher |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["base_target"], r["model"] != "teacher", r["model"])):
        eff = r.get("eff_beyond_floor_vs_teacher")
        lines.append(f"| {r['model']} | {r['base_target']} | {r['mflops']:.3f} | {r['p50_ms']:.4f} | "
                     f"{r['floor_ms'] / r['p50_ms']:.2f} | {r['beyond_floor_ms']:.4f} | "
                     f"{'-' if eff is None else format(eff, '.2f')} |")
    fits = cost_fits(rows)
    if fits:
        lines += ["", "A least-squares fit over the chain students of each fp32 target, p50 - floor = a x ops + b x "
                  "MFLOPs (ops: the TFLite graph's, or onnxruntime's nodes after its optimisation): the price of "
                  "an op and the rate of the FLOPs beyond it.", "",
                  "| target | students | µs per op (a) | GFLOP/s beyond the ops (1/b) | worst residual µs |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {t} | {f['n']} | {f['us_per_op']:.3f} | "
                  f"{'-' if f['gflops_per_s'] is None else format(f['gflops_per_s'], '.0f')} | "
                  f"{f['worst_residual_us']:.1f} |" for t, f in fits.items()]
    return lines + [""]


def op_count(r: dict) -> int | None:
    """A row's op count: its TFLite graph's ops, or onnxruntime's nodes (profiled fp32 rows)."""
    if r.get("partitions") and r["format"] == "tflite":
        return r["partitions"]["ops"]
    if r.get("profile"):
        return sum(v["nodes"] for v in r["profile"].values())
    return None


def cost_fits(rows: list[dict]) -> dict[str, dict]:
    """Per fp32 target: p50 - floor ~ a x ops + b x MFLOPs over the chain students (at least 3 of them)."""
    fits = {}
    for target in sorted({r["base_target"] for r in rows if r["precision"] == "fp32"}):
        sel = [r for r in rows if r["base_target"] == target and r["model"].startswith("chain/")
               and op_count(r) is not None]
        if len(sel) < 3:
            continue
        X = np.array([[op_count(r), r["mflops"]] for r in sel], dtype=float)
        y = np.array([1e3 * r["beyond_floor_ms"] for r in sel])          # µs
        (a, b), *_ = np.linalg.lstsq(X, y, rcond=None)
        fits[target] = {"n": len(sel), "us_per_op": float(a),
                        "gflops_per_s": float(1e3 / b) if b > 0 else None,   # b: µs per MFLOP
                        "worst_residual_us": float(np.abs(X @ [a, b] - y).max())}
    return fits


def render(result: dict, env: dict, command: str, args) -> str:
    rows = result["rows"]
    lines = [f"# Device speed: {result['run']}", "",
             f"`{command}` on {env['machine']} ({env['cpu']}"
             + (f"; {', '.join(env['simd']) or 'none of ' + ', '.join(SIMD_FLAGS)}" if env.get("simd") is not None
                else "") + f"), {env['cpus']} CPUs; onnxruntime "
             f"{env['onnxruntime']}, ai-edge-litert {env['ai_edge_litert']}"
             + (f", executorch {env['executorch']}" if env.get("executorch") else "")
             + f". 1 thread, batch 1; {args.rounds} interleaved rounds of >= {args.min_seconds} s per artifact. "
             "p50: median of the per-round p50s; "
             "repeat: slowest round's p50 / fastest (the noise of the row's ratios); GFLOP/s: analytic MFLOPs / p50; "
             "'eff.': GFLOP/s over the teacher's in the same target; file / fp32: the artifact's bytes over the same "
             "model's fp32 file in its format. Scan 'auto' is the targets' export form "
             "('ssd' for headed students, else 'unrolled'; in ONNX 'ssd_onnx', the conv as a (1, K) Conv2d and the projections as W @ x, "
             f"edgepkd.models.mamba.EXPORT_FORMS), '{args.before_scan}' the form compared with it (before"
             + ("; 'default-form': ONNX without EXPORT_FORMS, i.e. 'ssd' and a Conv1d" if args.before_scan ==
                DEFAULT_FORM else "") + ").", ""]
    for target in args.targets.split(","):
        sel = [r for r in rows if r["base_target"] == target]
        if not sel:
            continue
        lines += [f"## {target}", "", "| model | scan | MFLOPs | p50 ms | p90 ms | repeat | GFLOP/s | p50 / teacher "
                  "| eff. / teacher | acc (%) | file (B) | file / fp32 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(sel, key=lambda r: (r["model"].startswith("before/"), r["scan"] == args.before_scan,
                                            r["model"] != "teacher", r["model"])):
            lines.append(f"| {r['model']} | {r['scan']} | {r['mflops']:.3f} | {r['p50_ms']:.4f} | {r['p90_ms']:.4f} | "
                         f"{r['repeat']:.2f} | {r['gflops_per_s']:.1f} | {r['vs_teacher']:.2f} | "
                         f"{r['eff_vs_teacher']:.2f} | {'-' if r['acc'] is None else format(r['acc'], '.2f')} | "
                         f"{r['bytes']:,} | {'-' if r['bytes_vs_fp32'] is None else format(r['bytes_vs_fp32'], '.2f')} |")
        lines.append("")
    lines += int8_table(rows)
    lines += floor_table(result)
    lines += ["## Where the time goes: onnxruntime kernel time per op type (µs per inference, share)", "",
              "| model | scan | nodes | top op types |", "|---|---|---:|---|"]
    for r in rows:
        if "profile" in r:
            top = ", ".join(f"{op} {v['us']:.1f} ({100 * v['share']:.0f} %, {v['nodes']} nodes)"
                            for op, v in list(r["profile"].items())[:5])
            lines.append(f"| {r['model']} | {r['scan']} | {sum(v['nodes'] for v in r['profile'].values())} | "
                         f"{top} |")
    lines += ["", "## TFLite: ops, XNNPACK partitions, ops outside the delegate", "",
              "| model | target | scan | ops | partitions | outside XNNPACK | op types |", "|---|---|---|---:|---:|---|---|"]
    for r in rows:
        if "partitions" in r and r["format"] == "tflite":
            p = r["partitions"]
            lines.append(f"| {r['model']} | {r['base_target']} | {r['scan']} | {p['ops']} | {p['partitions']} | "
                         f"{_ops(p['outside_delegate'])} | {_ops(p['by_type'], 6)} |")
    et = [r for r in rows if "partitions" in r and r["format"] == "executorch"]
    if et:
        lines += ["", "## ExecuTorch: XNNPACK delegate calls and the kernels outside them (the .pte's forward)", "",
                  "| model | target | scan | delegate calls | kernels outside XNNPACK |", "|---|---|---|---:|---|"]
        lines += [f"| {r['model']} | {r['base_target']} | {r['scan']} | {r['partitions']['partitions']} | "
                  f"{_ops(r['partitions']['outside_delegate'], 8)} |" for r in et]
    return "\n".join(lines) + "\n"


# the x86 flags int8 speed depends on: XNNPACK's and onnxruntime's int8 kernels gain from VNNI; without it
# tflite-int8-static ran slower than fp32 and onnxruntime's u8s8 kernels saturated 8-bit weights (2026-12-08)
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def simd_flags() -> list[str] | None:
    """Which of ``SIMD_FLAGS`` /proc/cpuinfo lists (None where there is no /proc/cpuinfo)."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return None
    flags = next((line.split(":", 1)[1].split() for line in info.read_text().splitlines()
                  if line.startswith("flags")), [])
    return [f for f in SIMD_FLAGS if f in flags]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--suffix", default="", help="results go to device-speed-<run><suffix>.md / .json (e.g. "
                    "-onnx-int8 for a run of other --targets, beside the default one)")
    ap.add_argument("--data-dir", help="where datasets live (default: $EDGEPKD_DATA, else ~/.cache/edgepkd/data)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated (default: %(default)s)")
    ap.add_argument("--min-seconds", type=float, default=2.0, help="per artifact per round")
    ap.add_argument("--profile-runs", type=int, default=300)
    ap.add_argument("--before-scan", default="torch", help="the fp32 targets also with this scan ('' for none; "
                    f"'{DEFAULT_FORM}': formats with an EXPORT_FORMS entry (ONNX) also without it)")
    ap.add_argument("--before-rev", help="also time the students of the run's recipe at this git revision (random "
                    "weights, fp32, --before-scan): the previous students, in the same rounds")
    ap.add_argument("--with-run", action="append", default=[], metavar="RUN",
                    help="also time RUN's chain students in the last run's rounds, against its teacher (a student "
                         "design distilled from the same teacher, e.g. benchmarks/recipes/mnist-depth1.yaml); "
                         "repeatable")
    ap.add_argument("--keep-exports", action="store_true",
                    help="keep RUN/export/speed-*/ (exported without gating verification; edgepkd bench and pick "
                         "would take them as candidates)")
    args = ap.parse_args()
    import ai_edge_litert
    import onnxruntime

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    env = {"machine": f"{platform.system()} {platform.machine()}", "cpu": cpu, "simd": simd_flags(),
           "cpus": os.cpu_count(),
           "onnxruntime": onnxruntime.__version__, "ai_edge_litert": getattr(ai_edge_litert, "__version__", "?"),
           "load_average": os.getloadavg()}
    if any(load_targets().get(t).format == "executorch" for t in args.targets.split(",")):
        import importlib.metadata

        env["executorch"] = importlib.metadata.version("executorch")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [Path(r) for r in args.runs]
    for run in runs:
        with_runs = [Path(r) for r in args.with_run] if run == runs[-1] else []
        result = bench_run(run, args, with_runs)
        env["load_average_after"] = os.getloadavg()
        command = (f"python benchmarks/device_speed.py {run}" + (f" --data-dir {args.data_dir}" if args.data_dir
                   else "") + f" --rounds {args.rounds} --min-seconds {args.min_seconds}" +
                   (f" --before-rev {args.before_rev}" if args.before_rev else "") +
                   (f" --targets {args.targets}" if args.targets != ",".join(TARGETS) else "") +
                   (f" --before-scan '{args.before_scan}'" if args.before_scan != "torch" else "") +
                   (f" --suffix={args.suffix}" if args.suffix else "") +
                   "".join(f" --with-run {r}" for r in with_runs))
        stem = f"device-speed-{run.name}{args.suffix}"
        (out / f"{stem}.json").write_text(json.dumps({"environment": env, "command": command, **result},
                                                     indent=2) + "\n")
        (out / f"{stem}.md").write_text(render(result, env, command, args))
        print(render(result, env, command, args))
        if not args.keep_exports:
            for folder in sorted({f for r in [run, *with_runs] for f in (r / "export").glob("speed-*")}):
                shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
