"""int8 vs fp32, side by side in one run: file size, latency per image in onnxruntime and the TFLite
interpreter (1 thread, batch 1, 50 warm-up runs then at least 200 timed runs, median), accuracy delta.

    python benchmarks/export.py runs/digits [runs/mnist ...]   # writes benchmarks/results/export-<run>.md/.json
    python benchmarks/export.py runs/mnist --students-only --data-dir ../shared/data   # chain students only

Artifacts are exported (and verified, with tolerances opened so every number is reported) into
RUN/export/bench-<target>/. Goal (issue #3): int8 files <= 0.3x fp32, int8 not slower, accuracy drop <= 0.5.
Each file's bytes are split into constant data (weights, as stored) and the rest (graph, names, metadata): the
rest is what int8 cannot shrink, and for students of a few thousand parameters it is most of the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgepkd.compress.export import export_targets  # noqa: E402
from edgepkd.compress.formats import FORMATS  # noqa: E402
from edgepkd.compress.targets import VerifyConfig, load_targets  # noqa: E402
from edgepkd.report import load_metrics  # noqa: E402

PAIRS = [("onnx-fp32", "onnx-int8"), ("onnx-fp32", "onnx-int8-dynamic"), ("onnx-fp32", "onnx-int8-weights"),
         ("tflite-fp32", "tflite-int8"), ("tflite-fp32", "tflite-int8-static"), ("tflite-fp32", "tflite-int8-weights")]


@functools.cache
def constant_bytes(path: Path) -> int:
    """Bytes of constant tensor data in an artifact: ONNX initializers, TFLite buffers (not the metadata's)."""
    if path.suffix == ".onnx":
        import onnx

        return sum(len(t.raw_data) or len(t.SerializeToString()) for t in onnx.load(str(path)).graph.initializer)
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    meta = {m.buffer for m in model.metadata or []}
    return sum(len(b.data) for i, b in enumerate(model.buffers) if b.data is not None and i not in meta)


def latency_ms(model, shape, warmup=50, runs=200, min_seconds=1.0) -> float:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(warmup):
        model(x)
    times, start = [], time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_run(run: Path, students_only: bool = False, data_dir: str | None = None) -> dict:
    targets = load_targets()
    metrics = load_metrics(run)
    models = [r["name"] for r in metrics["models"] if r["role"] == "chain"] if students_only else None
    bench_targets = []
    for name in sorted({t for pair in PAIRS for t in pair}):
        t = dataclasses.replace(targets.get(name), name=f"bench-{name}")
        t.verify = VerifyConfig(max_abs_diff=1e9, max_accuracy_drop=100.0)  # report, do not gate
        bench_targets.append(t)
    written, _ = export_targets(str(run), bench_targets, models=models, data_dir=data_dir,
                                log=lambda line: print(line, file=sys.stderr) if ": exporting " in line else None)
    entries: dict[str, dict] = {}                                           # target -> model -> manifest entry
    for e in written:
        entries.setdefault(e["target"].removeprefix("bench-"), {})[e["model"]] = e
    rows = []
    for fp32, int8 in PAIRS:
        fmt = targets.get(fp32).format
        for model, a in entries[fp32].items():
            b = entries[int8][model]
            folder = lambda n: run / "export" / f"bench-{n}"
            shape = a["input"]["shape"]
            # interleave: fp32, int8, fp32, int8 -> medians of medians, so drift hits both alike
            la, lb = [], []
            for _ in range(2):
                la.append(latency_ms(FORMATS.get(fmt).open(folder(fp32) / a["file"]), shape))
                lb.append(latency_ms(FORMATS.get(fmt).open(folder(int8) / b["file"]), shape))
            data = [constant_bytes(folder(fp32) / a["file"]), constant_bytes(folder(int8) / b["file"])]
            va, vb = a["verification"], b["verification"]
            rows.append({"model": model, "fp32": fp32, "int8": int8,
                         "fp32_bytes": a["bytes"], "int8_bytes": b["bytes"], "size_ratio": b["bytes"] / a["bytes"],
                         "fp32_data_bytes": data[0], "int8_data_bytes": data[1], "data_ratio": data[1] / data[0],
                         "fp32_rest_bytes": a["bytes"] - data[0],
                         "fp32_ms": min(la), "int8_ms": min(lb), "latency_ratio": min(lb) / min(la),
                         "fp32_repeat_ratio": max(la) / min(la),
                         "fp32_acc": va["accuracy"], "int8_acc": vb["accuracy"],
                         "acc_delta": vb["accuracy"] - va["accuracy"]})
            r = rows[-1]
            print(f"  {model:<16} {int8:<19} size x{r['size_ratio']:.2f}  latency x{r['latency_ratio']:.2f} "
                  f"(fp32 repeat x{r['fp32_repeat_ratio']:.2f})  acc {r['acc_delta']:+.2f}", file=sys.stderr)
    return {"run": run.name, "rows": rows}


def render(result: dict, env: dict, command: str) -> str:
    lines = [f"# int8 vs fp32: {result['run']}", "",
             f"`{command}` on {env['machine']}, {env['cpus']} CPUs; onnxruntime {env['onnxruntime']}, "
             f"ai-edge-litert {env['ai_edge_litert']}. Latency: 1 thread, batch 1, 50 warm-up runs then >= 200 "
             "runs (and >= 1 s), median; fp32 and int8 interleaved twice, the lower median kept. 'data': constant "
             "tensor bytes (weights as stored); 'rest': the fp32 file's other bytes (graph, names, metadata), "
             "which int8 does not shrink. 'fp32 repeat': the slower of the two fp32 medians over the faster, the "
             "noise of the latency ratio.", "",
             "| model | int8 target | fp32 bytes | of which rest | int8 bytes | size int8/fp32 | data int8/fp32 "
             "| fp32 ms | int8 ms | latency int8/fp32 | fp32 repeat | fp32 acc | int8 acc | delta |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['int8']} | {r['fp32_bytes']:,} | {r['fp32_rest_bytes']:,} | "
                     f"{r['int8_bytes']:,} | {r['size_ratio']:.2f} | {r['data_ratio']:.2f} | "
                     f"{r['fp32_ms']:.3f} | {r['int8_ms']:.3f} | {r['latency_ratio']:.2f} | "
                     f"{r['fp32_repeat_ratio']:.2f} | {r['fp32_acc']:.2f} | {r['int8_acc']:.2f} | "
                     f"{r['acc_delta']:+.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--data-dir", help="where datasets live (default: $EDGEPKD_DATA, else ~/.cache/edgepkd/data)")
    ap.add_argument("--students-only", action="store_true", help="the chain students, not the ensemble prefixes")
    args = ap.parse_args()
    import ai_edge_litert
    import onnxruntime

    env = {"machine": f"{platform.system()} {platform.machine()}", "cpus": os.cpu_count(),
           "onnxruntime": onnxruntime.__version__, "ai_edge_litert": getattr(ai_edge_litert, "__version__", "?")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for run in map(Path, args.runs):
        result = bench_run(run, args.students_only, args.data_dir)
        command = f"python benchmarks/export.py {run}" + (" --students-only" if args.students_only else "") + \
            (f" --data-dir {args.data_dir}" if args.data_dir else "")
        (out / f"export-{run.name}.json").write_text(json.dumps({"environment": env, "command": command, **result},
                                                                indent=2) + "\n")
        (out / f"export-{run.name}.md").write_text(render(result, env, command))
        print(render(result, env, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
