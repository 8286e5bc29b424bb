"""Training throughput of `edgepkd distill` in 1 process against N processes (DDP, gloo on CPU), side by side.

    python benchmarks/ddp.py                  # writes benchmarks/results/ddp.md and ddp.json
    python benchmarks/ddp.py --repeats 1      # one run per configuration, for a smoke run

The digits recipe with fewer epochs (teacher and the 4 chain students), run as a user runs it,
`edgepkd distill recipes/digits.yaml [--nproc N]`, in three configurations:

    1 process, all cores      torch's default threads (one per core)
    1 process, cores/N        OMP_NUM_THREADS = cores / N: separates the effect of fewer threads per process
    N processes, cores/N      --nproc N (which sets OMP_NUM_THREADS = cores / N for each process)

taken in turn, repeat after repeat, so a change in the machine's load hits all alike; each figure is the median
over the repeats. Images/s of a stage = images trained (epochs x steps x global batch) / the training time
rank 0 records in state.json (its training loops: waiting for the other ranks' gradients counts; validation
and start-up do not). The wall time of the whole command (start-up, teacher-logit cache, evaluation) is
reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgepkd.distill.distributed import cpu_cores  # noqa: E402
from edgepkd.recipe import load_recipe  # noqa: E402

RECIPE = REPO / "recipes" / "digits.yaml"
SETTINGS = ["teacher.train.epochs=4", "distill.train.epochs=4", "distill.strategies=[chain]"]


def configurations(nproc: int) -> list[dict]:
    cores = cpu_cores()
    share = max(1, cores // nproc)
    return [{"name": f"1 process, {cores} threads", "nproc": 1, "threads": None, "threads_each": cores},
            {"name": f"1 process, {share} thread{'s' * (share > 1)}", "nproc": 1, "threads": share,
             "threads_each": share},
            {"name": f"{nproc} processes, {share} thread{'s' * (share > 1)} each", "nproc": nproc, "threads": None,
             "threads_each": share}]


def run_once(config: dict, workdir: Path) -> dict:
    """One `edgepkd distill` run; per-stage images/s from its state.json, and the command's wall time."""
    out = workdir / f"run-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "edgepkd", "distill", str(RECIPE), "--quiet", "--json", "--out", str(out),
           "--nproc", str(config["nproc"])] + [a for s in SETTINGS for a in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if config["threads"] is not None:
        env["OMP_NUM_THREADS"] = str(config["threads"])
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"benchmarks/ddp.py: {' '.join(cmd[1:])} failed (exit {res.returncode}):\n{res.stderr}")
    metrics = json.loads(res.stdout)
    state = json.loads((out / "digits" / "state.json").read_text())
    recipe = load_recipe(RECIPE, SETTINGS)
    stages = {}
    for stage, info in state["stages"].items():
        batch = (recipe.teacher.train if stage == "teacher" else recipe.distill.train).batch_size
        images = len(info["history"]) * max(1, metrics["dataset"]["train"] // batch) * batch  # steps x global batch
        stages[stage] = {"images": images, "train_s": info["train_time_s"],
                         "images_per_s": images / info["train_time_s"]}
    return {"config": config["name"], "wall_s": wall, "stages": stages,
            "test_acc": {m["name"]: m["test_acc"] for m in metrics["models"]},
            "world_size": metrics["distributed"]["world_size"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="processes to compare with one (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per configuration (default 3)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    configs = configurations(args.nproc)
    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for config in configs:
                r = run_once(config, Path(tmp))
                runs.append(r)
                print(f"run {i + 1}/{args.repeats}, {config['name']}: wall {r['wall_s']:.1f} s, "
                      + ", ".join(f"{s} {v['images_per_s']:.0f} img/s" for s, v in r["stages"].items()),
                      file=sys.stderr)
    load_after = os.getloadavg()
    recipe = load_recipe(RECIPE, SETTINGS)
    summary = {}
    for config in configs:
        mine = [r for r in runs if r["config"] == config["name"]]
        summary[config["name"]] = {
            "wall_s": statistics.median(r["wall_s"] for r in mine),
            "images_per_s": {s: statistics.median(r["stages"][s]["images_per_s"] for r in mine)
                             for s in mine[0]["stages"]},
            "test_acc": mine[0]["test_acc"]}
    env = {"machine": f"{platform.system()} {platform.machine()}", "cpus": cpu_cores(), "torch": torch.__version__,
           "python": platform.python_version(),
           "load_average_before": [round(x, 2) for x in load_before],
           "load_average_after": [round(x, 2) for x in load_after]}
    data = {"environment": env, "recipe": str(RECIPE.relative_to(REPO)), "settings": SETTINGS,
            "batch_sizes": {"teacher": recipe.teacher.train.batch_size, "students": recipe.distill.train.batch_size},
            "nproc": args.nproc, "repeats": args.repeats, "configurations": configs, "summary": summary,
            "runs": runs, "command": "python benchmarks/ddp.py"
            + (f" --nproc {args.nproc}" if args.nproc != 2 else "")
            + (f" --repeats {args.repeats}" if args.repeats != 3 else "")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ddp.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "ddp.md").write_text(render(data))
    print(render(data))
    return 0


def render(data: dict) -> str:
    env = data["environment"]
    names = [c["name"] for c in data["configurations"]]
    base = data["summary"][names[0]]
    lines = [f"# Distributed training: 1 process against {data['nproc']} (DDP, gloo on CPU)", "",
             f"`{data['command']}` on {env['machine']}, {env['cpus']} CPUs, torch {env['torch']}. Load average "
             f"(1/5/15 min) {'/'.join(map(str, env['load_average_before']))} before, "
             f"{'/'.join(map(str, env['load_average_after']))} after. Recipe `{data['recipe']}` with "
             + ", ".join(f"`{s}`" for s in data["settings"]) + f"; global batch {data['batch_sizes']['teacher']} "
             f"(teacher) and {data['batch_sizes']['students']} (students). Median of {data['repeats']} runs per "
             "configuration, taken in turn. Training images/s per stage (rank 0's training loops); x is the speed-up "
             "over the first column.", "",
             "| stage | " + " | ".join(f"{n} img/s (x)" for n in names) + " |", "|---|" + "---:|" * len(names)]
    for stage, ref in base["images_per_s"].items():
        lines.append(f"| {stage} | " + " | ".join(
            f"{data['summary'][n]['images_per_s'][stage]:.0f} ({data['summary'][n]['images_per_s'][stage] / ref:.2f})"
            for n in names) + " |")
    lines.append("| whole command, wall time s | " + " | ".join(
        f"{data['summary'][n]['wall_s']:.1f} ({base['wall_s'] / data['summary'][n]['wall_s']:.2f})" for n in names)
        + " |")
    lines += ["", "Test accuracy (%) of each configuration's first run, for the record:", "",
              "| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for model in base["test_acc"]:
        lines.append(f"| {model} | " + " | ".join(f"{data['summary'][n]['test_acc'][model]:.2f}" for n in names)
                     + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
