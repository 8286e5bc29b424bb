"""Run a dataset's recipe end to end and put our numbers beside the paper's (issue #5).

    python benchmarks/reproduce.py mnist   --data-dir ../shared/data   # recipes/mnist.yaml   (<= 60 min, 2 cores)
    python benchmarks/reproduce.py cifar10 --data-dir ../shared/data   # recipes/cifar10.yaml (<= 90 min, 2 cores)
    python benchmarks/reproduce.py mnist --from-run runs/mnist         # only re-derive and re-write the results
    python benchmarks/reproduce.py mnist --reuse-stages runs/old       # train only what the recipe changed
    python benchmarks/reproduce.py cifar10 --recipe recipes/cifar10-gpu.yaml --data-dir DIR  # one CUDA GPU

Results go to benchmarks/results/<recipe file's stem>.{md,json,png}; the run to <--out>/<that stem>.

Steps: ``edgepkd distill recipes/<dataset>.yaml`` (timed, wall clock), then ``edgepkd evaluate`` rebuilds every
model from its safetensors file and re-evaluates it on the test split (the results are written only when every
re-derived accuracy equals metrics.json), then benchmarks/results/<dataset>.md and .json: the paper's table
(numbers from its abstract, ../shared/seed/) side by side with ours, the goals of issue #5 checked, the machine,
the wall time and the command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepkd.report import MODEL_HEADER, architecture_table, load_metrics, model_row  # noqa: E402
from edgepkd.rundir import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402
from ensemble_ablation import goals as ensemble_goals  # noqa: E402  (benchmarks/ is the script's folder)

RESULTS = ROOT / "benchmarks" / "results"

# From the paper's abstract ("Mamba base PKD for efficient knowledge compression", 2025). It states accuracies
# and FLOPs only as percentages of its own teacher; absolute FLOPs and parameters are not given.
PAPER = {
    "mnist": [
        {"model": "teacher", "pct_teacher_flops": 100.0, "acc": 98.0},
        {"model": "group of 7 students", "pct_teacher_flops": 63.0, "acc": 98.0},
        {"model": "smallest student", "pct_teacher_flops": 1.0, "acc": 72.0},
    ],
    "cifar10": [
        {"model": "teacher", "pct_teacher_flops": 100.0, "acc": 51.0,
         "note": "inferred: the 50 % student is '1 % less accurate than the teacher'"},
        {"model": "small student", "pct_teacher_flops": 5.0, "acc": 50.0},
    ],
}
PAPER_TEACHER = {"mnist": 98.0, "cifar10": 51.0}


def singles(metrics: dict) -> list[dict]:
    """Standalone students: chain students and the first ensemble member (ensemble[1..1]); later ensemble
    members are residual learners, meaningful only inside their prefix."""
    rows = [r for r in metrics["models"] if r["role"] == "chain"]
    return rows + [p for p in metrics["ensemble_prefixes"] if len(p["members"]) == 1]


def best_within(rows: list[dict], mflops: float) -> dict | None:
    fit = [r for r in rows if r["mflops"] <= mflops]
    return max(fit, key=lambda r: r["test_acc"]) if fit else None


def goals(dataset: str, metrics: dict) -> list[dict]:
    teacher = next(r for r in metrics["models"] if r["role"] == "teacher")
    students = singles(metrics)
    anytime = students + metrics["ensemble_prefixes"]

    def row(goal: str, model: dict | None, need: float) -> dict:
        got = None if model is None else model["test_acc"]
        return {"goal": goal, "model": None if model is None else model["name"],
                "mflops": None if model is None else model["mflops"], "acc": got, "need": need,
                "met": got is not None and got >= need}

    if dataset == "mnist":
        return [row("teacher >= 99.3 %", teacher, 99.3),
                row("a single student with <= 0.5 MFLOPs >= 97.5 %", best_within(students, 0.5), 97.5),
                row("best student or ensemble prefix with <= 5 MFLOPs >= 99.0 %", best_within(anytime, 5.0), 99.0)]
    best = max(students, key=lambda r: r["test_acc"])
    return [row("teacher >= 85 %", teacher, 85.0),
            row("a student with <= 10 MFLOPs >= 70 %", best_within(students, 10.0), 70.0),
            row(f"best student >= paper's teacher ({PAPER_TEACHER['cifar10']:.0f} %) + 20 points", best,
                PAPER_TEACHER["cifar10"] + 20)]


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "os": platform.platform(), "cuda": torch.cuda.is_available(), "gpu": gpu}


def evaluated_note(ev: dict | None) -> str:
    if not ev:
        return ""
    note = ""
    if ev["device"] != ev["trained_on"]:
        note += f"; trained on {ev['trained_on']}, re-evaluated on {ev['device']}, tolerance {ev['tolerance']:g}"
    if ev["missing"]:
        note += f"; not re-derived, weights not at hand: {', '.join(ev['missing'])}"
    return note


def render(dataset: str, res: dict, stem: str) -> str:
    m = res["metrics"]
    env = m["environment"]
    teacher = next(r for r in m["models"] if r["role"] == "teacher")
    lines = [f"# {dataset}: the paper vs edgepkd", "",
             f"Produced by `{res['command']}` on {res['date']}.", "",
             f"{'Trained on' if res.get('trained_here', True) else 'Results written (models re-evaluated) on'}: "
             f"{res['machine']['cpu']}, {res['machine']['cores']} cores, "
             f"{'GPU ' + res['machine']['gpu'] if res['machine'].get('gpu') else 'no GPU'}; torch {res['machine']['torch']}, Python "
             f"{res['machine']['python']}. "
             + ("" if res.get('trained_here', True) else
                f"Trained on: {env['machine']}, {env['cpus']} CPUs, "
                f"{'GPU ' + (env.get('gpu') or '(CUDA)') if env.get('cuda') else 'no GPU'}, torch {env['torch']}, "
                f"Python {env['python']}, scan backend {env['scan_backend']}. ")
             + f"Recipe `{res['recipe']}`; "
             + (f"wall time of the last, resumed process: {res['wall_time_s'] / 60:.1f} min; training time of "
                f"all models summed over every process: **{res['train_time_s'] / 60:.1f} min**"
                if m.get("resumed") else
                f"wall time of the whole recipe (teacher, baselines, both strategies, evaluation): "
                f"**{res['wall_time_s'] / 60:.1f} min**")
             + (f" (load average while it ran: {res['load']})" if res.get("load") else "") + ".", "",
             *([res["note"], ""] if res.get("note") else []),
             "## The paper (from its abstract; FLOPs only as % of its own teacher)", "",
             "| model | % teacher FLOPs | accuracy (%) |", "|---|---:|---:|"]
    for p in PAPER[dataset]:
        lines.append(f"| {p['model']} | {p['pct_teacher_flops']:.0f} | {p['acc']:.0f}"
                     + (f" ({p['note']})" if p.get("note") else "") + " |")
    lines += ["", f"## edgepkd (teacher: {teacher['arch']}, {teacher['mflops']:.2f} MFLOPs)", "",
              "FLOPs per image = 2 x MACs of conv/linear layers + the selective scan (9·L·D·N + 2·L·D; a headed student's the FLOPs of its ssd form, README \"FLOPs\"). "
              "Test-split top-1 accuracy, re-derived from the saved weights by `edgepkd evaluate` "
              f"(max difference to metrics.json: {res['evaluate_max_diff']:.2g} points"
              + evaluated_note(res.get("evaluate")) + ").", "",
              ] + MODEL_HEADER + [model_row(r) for r in m["models"] if r["role"] != "ensemble"]
    lines += ["", "Ensemble prefixes (anytime models: members 1..k trained smallest first, logits summed):", ""]
    lines += MODEL_HEADER + [model_row(p) for p in m["ensemble_prefixes"]]
    lines += ensemble_section(dataset, m)
    lines += ["", "Student architectures:", ""] + architecture_table([r for r in m["models"] if r["role"] == "chain"])
    lines += ["", "## Goals (issue #5)", "", "| goal | model | MFLOPs | accuracy (%) | met |", "|---|---|---:|---:|---|"]
    for g in res["goals"]:
        lines.append(f"| {g['goal']} | {g['model'] or '—'} | "
                     f"{'—' if g['mflops'] is None else format(g['mflops'], '.3f')} | "
                     f"{'—' if g['acc'] is None else format(g['acc'], '.2f')} | {'yes' if g['met'] else '**no**'} |")
    lines += ["", "![accuracy vs MFLOPs](" + f"{stem}.png)", ""]
    return "\n".join(lines)


def ensemble_section(dataset: str, m: dict) -> list[str]:
    """Each ensemble prefix against the most accurate chain student of no more FLOPs (issue #15), with the drop
    from the prefix before; the goal checks for MNIST, whose recipe issue #15 sets them for."""
    prefixes = m["ensemble_prefixes"]
    chain = [r for r in m["models"] if r["role"] == "chain"]
    if not prefixes or not chain:
        return []
    g = ensemble_goals(prefixes, chain)
    lines = ["", "## The ensemble against the chain (issue #15)", "",
             "| prefix | MFLOPs | acc (%) | best chain student <= MFLOPs | its acc (%) | gap (points) | "
             "change from the prefix before (points) |", "|---|---:|---:|---|---:|---:|---:|"]
    for i, r in enumerate(g["rows"]):
        drop = "—" if i == 0 else f"{r['test_acc'] - prefixes[i - 1]['test_acc']:+.2f}"
        lines.append(f"| {r['name']} | {r['mflops']:.3f} | {r['test_acc']:.2f} | {r['best_chain'] or '—'} | "
                     + ("— | —" if r["gap"] is None else f"{r['best_chain_acc']:.2f} | {r['gap']:+.2f}")
                     + f" | {drop} |")
    best = max(chain, key=lambda c: c["test_acc"])
    lines += ["", f"Worst gap over prefixes k >= 2: "
              + ("—" if g["worst_gap_k2"] is None else f"{g['worst_gap_k2']:+.2f} points")
              + f"; largest drop from one prefix to the next: {g['max_drop']:.2f} points; the full ensemble {g['full']:.2f} % at {prefixes[-1]['mflops']:.3f} MFLOPs against the best "
              f"chain student, {best['name']}, {best['test_acc']:.2f} % at {best['mflops']:.3f} MFLOPs."]
    if dataset == "mnist":
        lines += ["", "| goal (issue #15, MNIST) | met |", "|---|---|"]
        lines += [f"| {goal} | {'yes' if met else '**no**'} |" for goal, met in g["met"].items()]
    return lines


def reuse_stages(source: Path, run_dir: Path, recipe: str, overrides: list[str]) -> list[str]:
    """Start ``run_dir`` from a copy of ``source``'s finished teacher, baseline and chain stages, when the two
    recipes differ only in ``distill.ensemble_*`` keys: no such stage reads those keys (each stage is seeded by
    its name and trained from the stages before it), so the copied stages are those this recipe would train.
    The ensemble is then trained by ``distill --resume``. Returns the stages copied."""
    sys.path.insert(0, str(ROOT))
    import yaml

    from edgepkd.config import to_dict
    from edgepkd.recipe import load_recipe

    new = to_dict(load_recipe(ROOT / recipe if (ROOT / recipe).is_file() else Path(recipe), overrides))
    old = to_dict(load_recipe(source / "recipe.yaml"))
    strip = lambda r: {**r, "distill": {k: v for k, v in r["distill"].items()  # noqa: E731
                                        if not k.startswith("ensemble_")}}
    if strip(new) != strip(old):
        raise SystemExit(f"reproduce: --reuse-stages {source}: its recipe differs from {recipe} outside "
                         "distill.ensemble_*; nothing can be reused")
    if run_dir.exists():
        raise SystemExit(f"reproduce: --reuse-stages: {run_dir} exists; move it away first")
    state = json.loads((source / "state.json").read_text())
    keep = {k: v for k, v in state["stages"].items() if not k.startswith("ensemble/")}
    tmp = run_dir.parent / f".{run_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "weights").mkdir(parents=True)
    for stage in keep:
        shutil.copy2(source / "weights" / f"{stage.replace('/', '-')}.safetensors", tmp / "weights")
    atomic_write_json(tmp / "state.json", {**state, "stages": keep})
    atomic_write_text(tmp / "recipe.yaml", yaml.safe_dump(new, sort_keys=False))
    os.replace(tmp, run_dir)
    return list(keep)


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    print("+", shlex.join(cmd), file=sys.stderr, flush=True)
    # Sleeping (not spinning) OpenMP workers: on a 2-core machine shared with anything else, spinning workers
    # made training 5x slower when measured here; on an idle machine the two policies are within noise.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    return subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=sorted(PAPER))
    ap.add_argument("--data-dir", help="where MNIST/ and cifar10-jpg/ live (default: $EDGEPKD_DATA)")
    ap.add_argument("--recipe", help="recipe YAML (default: recipes/DATASET.yaml); its file stem names the run "
                    "and the results files")
    ap.add_argument("--out", default="runs", help="parent of the run directory (default: runs)")
    ap.add_argument("--from-run", metavar="RUN", help="skip training: re-evaluate RUN and write the results")
    ap.add_argument("--skip-missing", action="store_true",
                    help="with --from-run: models whose weights are missing are listed as not re-derived")
    ap.add_argument("--note", help="a sentence for the results (e.g. how an interrupted run was resumed)")
    ap.add_argument("--reuse-stages", metavar="RUN",
                    help="copy RUN's teacher, baseline and chain stages when its recipe differs only in "
                         "distill.ensemble_* keys, and train the rest (the results say so)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override passed to distill (recorded in the command line of the results)")
    args = ap.parse_args()

    recipe = args.recipe or f"recipes/{args.dataset}.yaml"
    if not (ROOT / recipe).is_file() and not Path(recipe).is_file():
        print(f"reproduce: --recipe {recipe}: no such file (see recipes/)", file=sys.stderr)
        return 2
    stem = Path(recipe).stem
    data_args = ["--data-dir", args.data_dir] if args.data_dir else []
    command = shlex.join(["python", "benchmarks/reproduce.py", args.dataset]
                         + (["--recipe", recipe] if args.recipe else []) + data_args
                         + [a for s in args.set for a in ("--set", s)]
                         + (["--reuse-stages", args.reuse_stages] if args.reuse_stages else []))
    exe = [sys.executable, "-m", "edgepkd"]
    if args.from_run:
        run_dir = Path(args.from_run)
        wall, load = None, None
    else:
        run_dir = Path(args.out) / stem
        if args.reuse_stages:
            copied = reuse_stages(Path(args.reuse_stages), run_dir, recipe, args.set)
            args.note = ((args.note + " ") if args.note else "") + (
                f"Stages {', '.join(copied)} were copied from `{args.reuse_stages}`, whose recipe differs only in "
                "`distill.ensemble_*` keys, which none of them reads; this command trained the ensemble.")
        start = time.time()
        p = run(exe + ["distill", recipe, "--name", stem, "--out", args.out, "--quiet"] + data_args
                + [a for s in args.set for a in ("--set", s)] + (["--resume"] if run_dir.exists() else []))
        wall = time.time() - start
        load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
        if p.returncode != 0:
            print(f"reproduce: distill failed (exit {p.returncode})", file=sys.stderr)
            return p.returncode
    run_dir = run_dir if run_dir.is_absolute() else ROOT / run_dir
    metrics = load_metrics(run_dir)
    p = run(exe + ["evaluate", str(run_dir), "--json"] + data_args
            + (["--skip-missing"] if args.skip_missing else []))
    if p.returncode != 0:
        print(p.stdout, file=sys.stderr)
        print("reproduce: re-evaluating the saved weights does not reproduce metrics.json", file=sys.stderr)
        return 1
    evaluated = json.loads(p.stdout)
    res = {"dataset": args.dataset, "recipe": recipe, "command": command,
           "date": dt.date.today().isoformat(), "machine": machine(),
           "wall_time_s": wall if wall is not None else metrics["wall_time_s"], "load": load,
           "trained_here": not args.from_run, "evaluate_max_diff": evaluated["max_diff"],
           "evaluate": {k: evaluated[k] for k in ("device", "trained_on", "tolerance", "missing")},
           "train_time_s": sum(r.get("train_time_s") or 0.0 for r in metrics["models"]), "note": args.note,
           "metrics": metrics, "paper": PAPER[args.dataset],
           "goals": goals(args.dataset, metrics)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    markdown = render(args.dataset, res, stem)
    atomic_write_json(RESULTS / f"{stem}.json", res)
    atomic_write_text(RESULTS / f"{stem}.md", markdown)
    png = run_dir / "accuracy_vs_mflops.png"
    if png.exists():
        atomic_write_bytes(RESULTS / f"{stem}.png", png.read_bytes())
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
