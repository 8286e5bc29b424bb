"""Training scan backends side by side on a recipe's own students: time per training step, and what it means for
the recipe's wall time.

    python benchmarks/train_backends.py recipes/mnist.yaml --data-dir ../shared/data
    python benchmarks/train_backends.py                     # the digits demo recipe

For every student the recipe plans (random weights, the recipe's batch size, every core, as `edgepkd distill`
trains), one training step (forward, cross-entropy, backward, AdamW step) is timed with each backend in
turn, interleaved over --rounds rounds of >= --min-seconds each; the median step time per backend is the median
of the rounds'. The projection multiplies it by the recipe's steps per epoch and epochs per student, once per
strategy (chain, ensemble): it is the students' training only (no teacher, no baselines, no evaluation, no
distillation targets), an estimate from step times, not a run. Each backend's logits and gradients are also
compared with the reference ('torch') on the same batch. Writes benchmarks/results/train-backends-NAME.md and
.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ["cpp", "ssd", "chunked"]


def step_fn(model, x, y, opt):
    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def agreement(model, x, y, backend: str) -> dict:
    """Max |difference| of the logits and of the parameter gradients between ``backend`` and 'torch'."""
    from edgepkd.models import set_scan_backend

    out = {}
    for name in ("torch", backend):
        set_scan_backend(model, name)
        model.zero_grad(set_to_none=True)
        logits = model(x)
        F.cross_entropy(logits, y).backward()
        out[name] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (ref, ref_g), (got, got_g) = out["torch"], out[backend]
    if set(ref_g) != set(got_g):
        raise SystemExit(f"{backend}: gradients for other parameters than the reference's")
    scale = max(g.abs().max().item() for g in ref_g.values())
    return {"logits": (ref - got).abs().max().item(),
            "grad_rel": max((ref_g[n] - got_g[n]).abs().max().item() for n in ref_g) / max(scale, 1e-12)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", help="a recipe file or shipped recipe name (default: the digits demo)")
    ap.add_argument("--data-dir", help="where the recipe's dataset is (only its size and shape are used)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument("--threads", type=int, help="torch threads (default: distill's, one per core)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    from edgepkd import workflow
    from edgepkd.models import STUDENT_ARCH, build_model, set_scan_backend
    from edgepkd.config import to_dict

    from edgepkd.distill.distributed import cpu_cores
    from edgepkd.models import scan

    args.threads = args.threads or cpu_cores()
    torch.set_num_threads(args.threads)
    if "cpp" in args.backends.split(",") and scan._cpu_kernel() is None:
        raise SystemExit("the cpp scan kernel does not build here ('cpp' would run as 'chunked'): "
                         "give --backends without cpp")
    planned = workflow.distill(args.recipe, data_dir=args.data_dir, dry_run=True, log=lambda *a: None)
    recipe, data = planned.recipe, planned.data
    backends = args.backends.split(",")
    epochs = recipe.students.epochs or [recipe.distill.train.epochs] * len(planned.plan)
    batch = recipe.distill.train.batch_size
    steps = math.ceil(len(data.train) / batch)
    strategies = len(recipe.distill.strategies)
    x = data.normalize(data.train.x[:batch])                               # (batch, C, H, W)
    y = data.train.y[:batch]                                               # (batch,)
    rows = []
    for i, (spec, flops) in enumerate(planned.plan):
        spec = to_dict(spec) if not isinstance(spec, dict) else spec
        torch.manual_seed(0)
        model = build_model(STUDENT_ARCH, spec, data.num_classes, *data.input_shape[:1], data.input_shape[1]).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step = step_fn(model, x, y, opt)
        times: dict[str, list[float]] = {b: [] for b in backends}
        for b in backends:                                                 # warm-up (and the cpp build)
            set_scan_backend(model, b)
            for _ in range(2):
                step()
        for _ in range(args.rounds):
            for b in backends:
                set_scan_backend(model, b)
                t, start = [], time.perf_counter()
                while len(t) < 3 or time.perf_counter() - start < args.min_seconds:
                    t0 = time.perf_counter()
                    step()
                    t.append(time.perf_counter() - t0)
                times[b].append(statistics.median(t))
        row = {"student": f"s{i + 1}", "spec": spec, "mflops": flops.flops / 1e6, "epochs": epochs[i],
               "backends": {}}
        for b in backends:
            med = statistics.median(times[b])
            row["backends"][b] = {"step_ms": 1e3 * med, "repeat": max(times[b]) / min(times[b]),
                                  "projected_min": med * steps * epochs[i] * strategies / 60,
                                  **agreement(model, x[:16], y[:16], b)}
        rows.append(row)
        print(f"s{i + 1}: " + ", ".join(f"{b} {row['backends'][b]['step_ms']:.1f} ms" for b in backends),
              flush=True)
    env = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
           "torch": torch.__version__, "python": platform.python_version()}
    result = {"recipe": recipe.name, "command": "python benchmarks/train_backends.py " + " ".join(sys.argv[1:]),
              "environment": env, "batch_size": batch, "steps_per_epoch": steps, "strategies": strategies,
              "rounds": args.rounds, "min_seconds": args.min_seconds, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"train-backends-{recipe.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"train-backends-{recipe.name}.md").write_text(render(result, backends))
    print(render(result, backends))
    return 0


def render(r: dict, backends: list[str]) -> str:
    e = r["environment"]
    base = backends[0]
    lines = [f"# Training scan backends: {r['recipe']}", "",
             f"`{r['command']}` on {e['machine']}, {e['cpus']} CPUs, {e['threads']} torch threads, torch "
             f"{e['torch']}. One training step (forward, cross-entropy, backward, AdamW) of each student at batch "
             f"{r['batch_size']}, random weights; {r['rounds']} interleaved rounds of >= {r['min_seconds']} s per "
             f"backend; step: median of the rounds' medians; repeat: slowest round / fastest. Projected: step x "
             f"{r['steps_per_epoch']} steps per epoch x the student's epochs x {r['strategies']} strategies "
             "(the students' training only; an estimate from step times, not a run). diff: max |logits - "
             "reference| and max |gradient - reference| / max |reference gradient| on 16 images.", "",
             "| student | MFLOPs | epochs | " + " | ".join(f"{b} ms/step" for b in backends) + " | "
             + " | ".join(f"{b} / {base}" for b in backends[1:]) + " | repeat (max) | "
             + " | ".join(f"{b} diff" for b in backends) + " |",
             "|---|---:|---:|" + "---:|" * (2 * len(backends) - 1) + "---:|" + "---|" * len(backends)]
    total = {b: 0.0 for b in backends}
    for row in r["rows"]:
        bk = row["backends"]
        for b in backends:
            total[b] += bk[b]["projected_min"]
        lines.append(f"| {row['student']} | {row['mflops']:.3f} | {row['epochs']} | "
                     + " | ".join(f"{bk[b]['step_ms']:.1f}" for b in backends) + " | "
                     + " | ".join(f"{bk[b]['step_ms'] / bk[base]['step_ms']:.2f}" for b in backends[1:])
                     + f" | {max(bk[b]['repeat'] for b in backends):.2f} | "
                     + " | ".join(f"{bk[b]['logits']:.1e} / {bk[b]['grad_rel']:.1e}" for b in backends) + " |")
    lines += ["", "Projected students' training, all strategies (min): "
              + ", ".join(f"{b} {total[b]:.1f}" for b in backends) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
