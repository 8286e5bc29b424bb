"""The ``edgepkd`` command. Heavy imports (torch, torchvision, rich) live inside the commands so that
``edgepkd --help`` answers instantly."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from edgepkd import __version__
from edgepkd.errors import ConfigError, EdgepkdError

EXAMPLES = """\
examples:
  edgepkd demo                                   digits teacher -> 4 Mamba students, chain + ensemble (~2 min)
  edgepkd distill recipes/mnist.yaml --data-dir ../shared/data
  edgepkd distill recipes/mnist.yaml --set distill.train.epochs=2 --set teacher.train.epochs=1 --name mnist-quick
  edgepkd distill recipes/cifar10.yaml --dry-run  students and their FLOPs, without training
  edgepkd distill recipes/mnist.yaml --resume    continue an interrupted run from its last finished epoch
  edgepkd export runs/digits --target onnx-int8  quantize, export and verify every student
  edgepkd export --list-targets
  edgepkd evaluate runs/digits                   re-evaluate saved weights on the test split
  edgepkd list teachers

exit codes: 0 ok, 1 failure, 2 bad input (recipe, data, run directory), 130 interrupted (resumable)
"""


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", metavar="KEY.PATH=VALUE", action="append", default=[],
                   help="override a recipe field, type-checked (repeatable), e.g. --set distill.temperature=2")
    p.add_argument("--name", help="run name (directory under --out); default: the recipe's name")
    p.add_argument("--out", default="runs", help="parent directory of run directories (default: runs)")
    p.add_argument("--data-dir", help="where datasets live (default: $EDGEPKD_DATA, else ~/.cache/edgepkd/data)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run of the same name from its last finished epoch (same recipe and --set)")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe, load the data, print the "
                   "students with their FLOPs, and stop")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON on stdout "
                   "(progress still goes to stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgepkd", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Distill an image classifier into a family of progressively smaller Mamba students.")
    parser.add_argument("--version", action="version", version=f"edgepkd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="run the embedded digits recipe (offline, a few minutes on 2 CPU cores)",
                       description="Distill the embedded default recipe (scikit-learn's 8x8 digits; the same as "
                       "recipes/digits.yaml): a CNN teacher, 4 Mamba students as a chain and as an ensemble. "
                       "Writes runs/digits/ with metrics.json, report.md and a plot.")
    _add_run_args(p)

    p = sub.add_parser("distill", help="train a teacher and distill it into Mamba students",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run a recipe: train (or load) the teacher, then distill progressively smaller "
                       "Mamba students as a chain and/or an ensemble of weak learners.\nWrites runs/NAME/: recipe.yaml "
                       "(resolved), weights/*.safetensors, metrics.json, report.md, accuracy_vs_mflops.png.\n"
                       "Ctrl-C leaves a checkpoint; --resume continues from the last finished epoch.")
    p.add_argument("recipe", metavar="RECIPE", help="recipe YAML file (see recipes/)")
    _add_run_args(p)

    p = sub.add_parser("export", help="export a run's students to ONNX / TFLite / PyTorch, quantized and verified",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Export every student and ensemble prefix of RUN (or --model NAME) for a target "
                       "(export/*.yaml), verify each artifact in its own runtime on the test split against the "
                       "PyTorch fp32 model, and write RUN/export/TARGET/ with the artifacts and manifest.json.\n"
                       "Verification fails by default when the target's tolerance is missed (fp32: max |logit "
                       "diff|; int8: accuracy drop); nothing is written for a failed model.")
    p.add_argument("run", metavar="RUN", nargs="?", help="run directory, e.g. runs/digits")
    p.add_argument("--target", action="append", default=[], metavar="NAME",
                   help="export target (repeatable); see --list-targets")
    p.add_argument("--model", metavar="NAME", help="export only this model (e.g. chain/s2, ensemble[1..3], teacher)")
    p.add_argument("--list-targets", action="store_true", help="list the export targets and exit")
    p.add_argument("--targets-dir", action="append", default=[], metavar="DIR",
                   help="another folder of target YAML files (./export/ is always read)")
    p.add_argument("--no-verify", action="store_true", help="skip verification (says loudly that nothing was "
                   "checked; the manifest records it)")
    p.add_argument("--data-dir", help="where datasets live (default: $EDGEPKD_DATA, else ~/.cache/edgepkd/data)")
    p.add_argument("--json", action="store_true", help="print the manifest entries as JSON")

    p = sub.add_parser("evaluate", help="re-evaluate a run's saved weights on its test split",
                       description="Rebuild every model of RUN from its safetensors file, evaluate it on the test "
                       "split of the run's dataset and compare with metrics.json. Exits 1 on a mismatch.")
    p.add_argument("run", metavar="RUN", help="run directory, e.g. runs/digits")
    p.add_argument("--data-dir", help="where datasets live (default: $EDGEPKD_DATA, else ~/.cache/edgepkd/data)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")

    p = sub.add_parser("report", help="re-render report.md and the plot from a run's metrics.json",
                       description="Rewrite RUN/report.md and RUN/accuracy_vs_mflops.png from RUN/metrics.json.")
    p.add_argument("run", metavar="RUN", help="run directory")

    p = sub.add_parser("list", help="list registered teachers, students, datasets, scan backends",
                       description="List registered names: teachers, datasets and scan backends as a recipe uses "
                       "them; students are presets for Python use (edgepkd.models.STUDENTS.get(name)(...)).")
    p.add_argument("kind", choices=["teachers", "students", "datasets", "scan-backends"])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except EdgepkdError as e:
        print(f"edgepkd: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # e.g. `edgepkd ... --json | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        if args.command in ("distill", "demo") and not getattr(args, "dry_run", False):
            print("\nedgepkd: interrupted; the last finished epoch is checkpointed: rerun the same command "
                  "with --resume to continue", file=sys.stderr)
        else:
            print("\nedgepkd: interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------------------- commands
def cmd_demo(args) -> int:
    return _distill(None, args)


def cmd_distill(args) -> int:
    return _distill(args.recipe, args)


def _environment(scan_backend: str) -> dict:
    import platform

    import torch

    return {"machine": f"{platform.system()} {platform.machine()}", "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "edgepkd": __version__,
            "scan_backend": scan_backend, "cuda": torch.cuda.is_available()}


def _distill(recipe_path: str | None, args) -> int:
    import torch

    from edgepkd.config import to_dict
    from edgepkd.data import load_dataset
    from edgepkd.distill.pipeline import Distiller, check_recipe, evaluate_members
    from edgepkd.distill.trainer import DistContext
    from edgepkd.models.scan import resolve_backend
    from edgepkd.progress import RichReporter
    from edgepkd.recipe import load_recipe
    from edgepkd.report import FLOP_CONVENTION, write_report
    from edgepkd.rundir import RunDir

    recipe = load_recipe(recipe_path, args.set)
    dist = DistContext(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    backend = resolve_backend(recipe.scan_backend, dist.device)
    data = load_dataset(recipe.data, recipe.seed, args.data_dir)
    try:
        plan = check_recipe(recipe, data)
    except ConfigError as e:
        raise ConfigError(f"{recipe_path or '<demo recipe>'}: {e}") from None
    if args.dry_run:
        return _print_plan(recipe, data, plan, args.json)

    run = RunDir(Path(args.out) / (args.name or recipe.name))
    run.create(to_dict(recipe), resume=args.resume)
    reporter = None if args.quiet else RichReporter()
    t0 = time.perf_counter()
    members = Distiller(recipe, data, run, reporter=reporter, dist=dist).run_all(plan)
    metrics = {
        "recipe": recipe.name, "run": str(run.path), "edgepkd_version": __version__,
        "dataset": {"name": data.name, "train": len(data.train), "val": len(data.val), "test": len(data.test),
                    "input_shape": list(data.input_shape), "classes": data.classes,
                    "preprocessing": data.preprocessing()},
        "flop_convention": FLOP_CONVENTION,
        "wall_time_s": time.perf_counter() - t0,
        "environment": _environment(backend),
        **evaluate_members(members, data, device=dist.device),
    }
    write_report(run.path, metrics)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        _print_summary(metrics)
    return 0


def _print_plan(recipe, data, plan, as_json: bool) -> int:
    rows = [{"student": i + 1, **spec, "params": f.params, "macs": f.macs, "mflops": f.flops / 1e6}
            for i, (spec, f) in enumerate(plan)]
    if as_json:
        print(json.dumps({"recipe": recipe.name, "dataset": data.name, "students": rows}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{recipe.name}: {len(rows)} students on {data.name} "
                  f"({len(data.train)}/{len(data.val)}/{len(data.test)} images)")
    for col in ("#", "d_model", "depth", "d_state", "patch", "params", "MACs", "MFLOPs"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["student"]), str(r["d_model"]), str(r["depth"]), str(r["d_state"]),
                      str(r["patch_size"]), f"{r['params']:,}", f"{r['macs']:,}", f"{r['mflops']:.3f}")
    Console().print(table)
    return 0


def _print_summary(metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{metrics['recipe']}: test accuracy vs compute  ({metrics['run']})")
    for col in ("model", "params", "MFLOPs", "% teacher", "test acc %"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for r in metrics["models"] + metrics["ensemble_prefixes"]:
        acc = "n/a" if r["test_acc"] is None else f"{r['test_acc']:.2f}"
        table.add_row(r["name"], f"{r['params']:,}", f"{r['mflops']:.3f}", f"{r['pct_teacher_flops']:.2f}", acc)
    console = Console()
    console.print(table)
    console.print(f"report: {metrics['run']}/report.md   wall time {metrics['wall_time_s']:.0f} s")


def cmd_evaluate(args) -> int:
    from edgepkd.data import load_dataset
    from edgepkd.distill.trainer import accuracy, eval_mode, predict
    from edgepkd.models import load_model, set_scan_backend
    from edgepkd.recipe import load_recipe
    from edgepkd.report import load_metrics
    from edgepkd.rundir import RunDir

    run = RunDir(args.run)
    run.require_complete()
    recipe = load_recipe(run.recipe_path)
    data = load_dataset(recipe.data, recipe.seed, args.data_dir)
    metrics = load_metrics(run.path)
    results, worst = [], 0.0
    logits = {}
    for row in metrics["models"]:
        path = run.weights_path(row["name"])
        if not path.exists() and row["name"] == "teacher" and recipe.teacher.checkpoint:
            continue  # a loaded teacher is not copied into the run
        model, _ = load_model(path)
        if row["arch"] == "mamba":
            set_scan_backend(model, recipe.scan_backend)
        logits[row["name"]] = predict(eval_mode([model]), data, data.test.x)
        acc = accuracy(logits[row["name"]], data.test.y)
        results.append({"name": row["name"], "test_acc": acc, "recorded": row["test_acc"]})
    for p in metrics["ensemble_prefixes"]:
        acc = accuracy(sum(logits[m] for m in p["members"]), data.test.y)
        results.append({"name": p["name"], "test_acc": acc, "recorded": p["test_acc"]})
    for r in results:
        r["diff"] = abs(r["test_acc"] - r["recorded"])
        worst = max(worst, r["diff"])
    if args.json:
        print(json.dumps({"run": args.run, "results": results, "max_diff": worst}, indent=2))
    else:
        for r in results:
            print(f"{r['name']:<18} test acc {r['test_acc']:6.2f}  (metrics.json {r['recorded']:6.2f})")
        print(f"max difference {worst:.4f} points")
    # identical weights and data give identical predictions; allow float noise in logits only
    return 0 if worst < 1e-6 else 1


def cmd_export(args) -> int:
    from edgepkd.compress.targets import load_targets

    targets = load_targets(args.targets_dir)
    if args.list_targets:
        for name, t in targets.items():
            print(f"{name:<14} {t.format:<7} {t.precision:<5} {t.description}")
        return 0
    if not args.run:
        raise ConfigError("export: give a run directory (e.g. edgepkd export runs/digits --target onnx-fp32)")
    if not args.target:
        raise ConfigError(f"export: give --target NAME (targets: {', '.join(targets.names())})")
    chosen = [targets.get(name) for name in args.target]
    from edgepkd.compress.export import export_run

    if args.no_verify:
        print("edgepkd: WARNING: --no-verify: the exported files are NOT checked against PyTorch; "
              "the manifest marks them unverified", file=sys.stderr)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    entries = []
    for target in chosen:
        log(f"{target.name}: exporting {args.run}")
        entries += export_run(args.run, target, model=args.model, do_verify=not args.no_verify,
                              data_dir=args.data_dir, log=log)
        log(f"  manifest: {args.run}/export/{target.name}/manifest.json")
    if args.json:
        print(json.dumps(entries, indent=2))
    return 0


def cmd_report(args) -> int:
    from edgepkd.report import load_metrics, write_report
    from edgepkd.rundir import RunDir

    path = Path(args.run)
    RunDir(path).require_complete()
    write_report(path, load_metrics(path))
    print(f"wrote {path}/report.md and {path}/accuracy_vs_mflops.png")
    return 0


def cmd_list(args) -> int:
    if args.kind == "teachers":
        from edgepkd.models import TEACHERS as reg
    elif args.kind == "students":
        from edgepkd.models import STUDENTS as reg
    elif args.kind == "datasets":
        from edgepkd.data import DATASETS as reg
    else:
        from edgepkd.models.scan import backend_names

        print("\n".join(backend_names()))
        return 0
    print("\n".join(reg.names()))
    return 0


COMMANDS = {"demo": cmd_demo, "distill": cmd_distill, "export": cmd_export, "evaluate": cmd_evaluate,
            "report": cmd_report, "list": cmd_list}
