"""Issue #15's ablation: each ensemble switch of the recipe on and off, against the chain students.

    python benchmarks/ensemble_ablation.py runs/mnist --data-dir ../shared/data          # recipes/mnist.yaml
    python benchmarks/ensemble_ablation.py runs/mnist --variants live,shrink --jobs 2    # some variants only

BASE_RUN is a finished run of the recipe (``benchmarks/reproduce.py mnist`` makes one). Its teacher weights are
the teacher of every variant (``teacher.checkpoint``), its chain students are the single students the prefixes
are held against, and its own ensemble is the row of whatever switches its recipe has. Every other variant is an
ensemble-only run (``distill.strategies=[ensemble]``, no baselines) under OUT/<variant>, with the switches of
that variant set on the recipe by ``--set``:

    live        distill.ensemble_residual=live, ensemble_augment=crop: frozen members and teacher on each batch
    shrink      distill.ensemble_shrinkage=0.5 (BoostNet's factor)
    corrective  distill.ensemble_corrective_epochs=2 (joint fine-tune, best validation epoch kept)

A variant that only adds the corrective step to another variant (``X+corrective``) continues a copy of X's run:
the corrective step comes after the last member, and no member's training reads its settings, so the members
are those a fresh run would train (stages are seeded by name; resume is bit-identical, tests/test_distill.py).
The script rewrites the copy's recipe.yaml to the variant's and resumes it: only the corrective stage trains.

Results: benchmarks/results/ensemble-ablation-<recipe>.{md,json}; runs stay under --out (default
runs/ablation-<recipe>); a variant whose metrics.json exists is read, not retrained.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepkd.config import to_dict  # noqa: E402
from edgepkd.recipe import load_recipe  # noqa: E402
from edgepkd.rundir import atomic_write_json, atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SWITCHES = {
    "live": {"distill.ensemble_residual": "live", "distill.ensemble_augment": "crop"},
    "shrink": {"distill.ensemble_shrinkage": 0.5},
    "corrective": {"distill.ensemble_corrective_epochs": 2},
}
OFF = {"distill.ensemble_residual": "cached", "distill.ensemble_augment": None, "distill.ensemble_shrinkage": 1.0,
       "distill.ensemble_corrective_epochs": 0}
DEFAULT_VARIANTS = ["off", "live", "shrink", "corrective", "live+shrink", "live+shrink+corrective"]


def settings(variant: str) -> dict:
    out = dict(OFF)
    for s in ([] if variant == "off" else variant.split("+")):
        if s not in SWITCHES:
            raise SystemExit(f"ensemble_ablation: unknown switch '{s}' in '{variant}' (switches: "
                             f"{', '.join(SWITCHES)})")
        out.update(SWITCHES[s])
    return out


def base_settings(recipe: dict) -> dict:
    """The switches' values in a resolved recipe.yaml (a run older than the switches has them off)."""
    d = recipe["distill"]
    return {k: d.get(k.split(".", 1)[1], v) for k, v in OFF.items()}


def parent_of(variant: str) -> str | None:
    """The variant that ``variant`` adds only the corrective step to, or None."""
    parts = variant.split("+")
    return "+".join(p for p in parts if p != "corrective") or "off" if "corrective" in parts else None


def variant_of(recipe: dict) -> str:
    """The name of the switches a resolved recipe has on ('off' when none)."""
    s = base_settings(recipe)
    on = [name for name, sw in SWITCHES.items() if all(s[k] == v for k, v in sw.items())]
    return "+".join(on) or "off"


def set_args(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        out += ["--set", f"{k}={'null' if v is None else v}"]
    return out


def run_variant(variant: str, base: Path, out: Path, data_args: list[str], log, known: dict) -> Path:
    run = out / variant
    if (run / "metrics.json").is_file():
        log(f"{variant}: {run}/metrics.json exists, read as is")
        return run
    exe = [sys.executable, "-m", "edgepkd", "distill", str(base / "recipe.yaml"), "--name", variant,
           "--out", str(out), "--quiet", *data_args,
           "--set", "distill.strategies=[ensemble]", "--set", "baselines=[]",
           "--set", f"teacher.checkpoint={(base / 'weights' / 'teacher.safetensors').resolve()}",
           *set_args(settings(variant))]
    parent = parent_of(variant)
    if parent is not None and not (run / "recipe.yaml").exists():
        src = Path(known[parent]) if parent in known else out / parent
        if not (src / "metrics.json").is_file():
            raise SystemExit(f"ensemble_ablation: {variant} continues {parent}, which has no finished run at {src}")
        tmp = out / f".{variant}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "weights").mkdir()
        state = json.loads((src / "state.json").read_text())
        state["stages"] = {k: v for k, v in state["stages"].items() if k.startswith("ensemble/e")}
        for stage in state["stages"]:
            shutil.copy2(src / "weights" / f"{stage.replace('/', '-')}.safetensors", tmp / "weights")
        atomic_write_json(tmp / "state.json", state)
        os.replace(tmp, run)
        # the recipe this variant resolves to, as `edgepkd distill` resolves the same --set values
        overrides = [a for a, prev in zip(exe[1:], exe) if prev == "--set"]
        atomic_write_text(run / "recipe.yaml", yaml.safe_dump(to_dict(load_recipe(base / "recipe.yaml", overrides)),
                                                              sort_keys=False))
        log(f"{variant}: continues a copy of {src}'s members; only the corrective step trains")
    if (run / "recipe.yaml").exists():
        exe.append("--resume")
    log("+ " + shlex.join(exe))
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    p = subprocess.run(exe, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode:
        raise SystemExit(f"ensemble_ablation: {variant}: distill failed (exit {p.returncode}): "
                         f"{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
    log(f"{variant}: done in {(time.perf_counter() - t0) / 60:.1f} min")
    return run


def goals(prefixes: list[dict], chain: list[dict]) -> dict:
    """Issue #15's MNIST goals for one variant's prefixes."""
    def best_chain(mflops: float) -> dict | None:
        fit = [c for c in chain if c["mflops"] <= mflops + 1e-12]
        return max(fit, key=lambda c: c["test_acc"]) if fit else None

    rows, worst_gap = [], None
    for p in prefixes:
        b = best_chain(p["mflops"])
        gap = None if b is None else p["test_acc"] - b["test_acc"]
        rows.append({"name": p["name"], "mflops": p["mflops"], "test_acc": p["test_acc"],
                     "best_chain": None if b is None else b["name"], "best_chain_acc": None if b is None else
                     b["test_acc"], "gap": gap})
        if len(p["members"]) >= 2 and gap is not None:
            worst_gap = gap if worst_gap is None else min(worst_gap, gap)
    drops = [prefixes[i - 1]["test_acc"] - prefixes[i]["test_acc"] for i in range(1, len(prefixes))]
    return {"rows": rows, "worst_gap_k2": worst_gap, "full": prefixes[-1]["test_acc"],
            "max_drop": max([0.0, *drops]),
            "met": {"prefixes >= best chain - 0.1": worst_gap is not None and worst_gap >= -0.1,
                    "full ensemble >= 99.0 %": prefixes[-1]["test_acc"] >= 99.0,
                    "no drop > 0.05": max([0.0, *drops]) <= 0.05}}


def render(res: dict) -> str:
    lines = [f"# Ensemble ablation: {res['recipe']} (issue #15)", "",
             f"Produced by `{res['command']}` on {res['date']}. Base run `{res['base']}` (teacher and chain "
             "students); every variant trains the ensemble's members on that teacher. Test-split top-1 (%).", "",
             "Switches: **live** = frozen members' and teacher's logits computed on each training batch as the new "
             "member sees it, augmented with random crops (off: a table over the clean training set); **shrink** "
             "= prefix k = 0.5 x prefix k-1 + member k (off: plain sum); **corrective** = 2 epochs of joint "
             "fine-tuning on the sum of per-prefix losses, best validation epoch kept (off: none).", ""]
    names = [v["variant"] for v in res["variants"]]
    k = max(len(v["prefixes"]) for v in res["variants"])
    lines += ["| prefix | MFLOPs | best chain student <= MFLOPs | " + " | ".join(names) + " |",
              "|---|---:|---|" + "---:|" * len(names)]
    first = res["variants"][0]
    for i in range(k):
        g = first["goals"]["rows"][i]
        cells = [f"{v['prefixes'][i]['test_acc']:.2f}" if i < len(v["prefixes"]) else "—" for v in res["variants"]]
        best = "—" if g["best_chain"] is None else f"{g['best_chain']} {g['best_chain_acc']:.2f}"
        lines.append(f"| ensemble[1..{i + 1}] | {g['mflops']:.3f} | {best} | " + " | ".join(cells) + " |")
    lines += ["", "| goal | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for goal in first["goals"]["met"]:
        lines.append(f"| {goal} | " + " | ".join("yes" if v["goals"]["met"][goal] else "**no**"
                                                for v in res["variants"]) + " |")
    lines.append("| worst gap, prefixes k >= 2, to the best chain student (points) | " +
                 " | ".join("—" if v["goals"]["worst_gap_k2"] is None else f"{v['goals']['worst_gap_k2']:+.2f}"
                            for v in res["variants"]) + " |")
    lines.append("| largest drop from one prefix to the next (points) | " +
                 " | ".join(f"{v['goals']['max_drop']:.2f}" for v in res["variants"]) + " |")
    lines.append("| ensemble training time (min, members + corrective) | " +
                 " | ".join(f"{v['train_time_s'] / 60:.1f}" for v in res["variants"]) + " |")
    lines += ["", "The chain students (base run):", "", "| model | MFLOPs | test acc |", "|---|---:|---:|"]
    lines += [f"| {c['name']} | {c['mflops']:.3f} | {c['test_acc']:.2f} |" for c in res["chain"]]
    return "\n".join(lines) + "\n"


def shown(path: Path) -> str:
    """``path`` as the results print it: relative to the working directory when under it (no machine's home in
    committed results), else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base_run", help="a finished run of the recipe: teacher weights and chain students")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated, switches joined by '+' (default: {','.join(DEFAULT_VARIANTS)})")
    ap.add_argument("--out", default=None, help="where the variants' runs go (default: runs/ablation-<recipe>)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--jobs", type=int, default=1, help="variants trained at once (each with 1 torch thread)")
    ap.add_argument("--use", action="append", default=[], metavar="VARIANT=RUN",
                    help="a finished run that already is this variant (e.g. the shipped recipe's own run)")
    ap.add_argument("--train-only", action="store_true",
                    help="train the variants that need no other run (not 'X+corrective') as soon as BASE_RUN has "
                         "its teacher weights; write no results")
    args = ap.parse_args(argv)
    base = Path(args.base_run).resolve()
    if args.train_only and not (base / "weights" / "teacher.safetensors").is_file():
        print(f"ensemble_ablation: {base}: no teacher weights yet (weights/teacher.safetensors)", file=sys.stderr)
        return 2
    if not args.train_only and not (base / "metrics.json").is_file():
        print(f"ensemble_ablation: {base}: not a finished run (no metrics.json)", file=sys.stderr)
        return 2
    base_recipe = yaml.safe_load((base / "recipe.yaml").read_text())
    base_variant = variant_of(base_recipe)
    out = Path(args.out or ROOT / "runs" / f"ablation-{base_recipe['name']}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_args = ["--data-dir", str(Path(args.data_dir).resolve())] if args.data_dir else []
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        settings(v)
    log = lambda msg: print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)  # noqa: E731
    if args.jobs > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    runs = {base_variant: base}
    for use in args.use:
        name, _, path = use.partition("=")
        got = variant_of(yaml.safe_load((Path(path) / "recipe.yaml").read_text()))
        if got != name or not (Path(path) / "metrics.json").is_file():
            print(f"ensemble_ablation: --use {use}: {path} is not a finished run of variant {name} (its switches: "
                  f"{got})", file=sys.stderr)
            return 2
        runs[name] = Path(path).resolve()
    todo = [v for v in variants if v not in runs]
    plain = [v for v in todo if parent_of(v) is None]
    later = [v for v in todo if v not in plain]
    for group in (plain,) if args.train_only else (plain, later):     # 'X+corrective' continues X: X first
        with cf.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            futures = {v: pool.submit(run_variant, v, base, out, data_args, log, dict(runs)) for v in group}
            for v, f in futures.items():
                runs[v] = f.result()
    if args.train_only:
        return 0
    metrics = json.loads((base / "metrics.json").read_text())
    chain = [{"name": r["name"], "mflops": r["mflops"], "test_acc": r["test_acc"]}
             for r in metrics["models"] if r["role"] == "chain"]
    res = {"recipe": base_recipe["name"], "base": shown(base), "date": dt.date.today().isoformat(),
           "command": shlex.join(["python", "benchmarks/ensemble_ablation.py", *(argv or sys.argv[1:])]),
           "chain": chain, "variants": []}
    for v in variants:
        m = json.loads((Path(runs[v]) / "metrics.json").read_text())
        prefixes = m["ensemble_prefixes"]
        res["variants"].append({"variant": v, "run": shown(runs[v]), "prefixes": prefixes,
                                "train_time_s": prefixes[-1]["train_time_s"], "goals": goals(prefixes, chain),
                                "corrective": m.get("ensemble_corrective")})
    stem = f"ensemble-ablation-{base_recipe['name']}"
    atomic_write_json(RESULTS / f"{stem}.json", res)
    atomic_write_text(RESULTS / f"{stem}.md", render(res))
    print(render(res))
    print(f"results: benchmarks/results/{stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
