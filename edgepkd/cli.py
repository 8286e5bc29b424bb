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
from edgepkd.errors import ConfigError, EdgepkdError, RunError

EXAMPLES = """\
examples:
  edgepkd demo                                   digits teacher -> 4 Mamba students, chain + ensemble (~2 min)
  edgepkd distill recipes/mnist.yaml --data-dir ../shared/data
  edgepkd distill mnist --data-dir DIR           a shipped recipe by name (edgepkd list recipes)
  edgepkd distill recipes/mnist.yaml --set distill.train.epochs=2 --set teacher.train.epochs=1 --name mnist-quick
  edgepkd distill recipes/cifar10.yaml --dry-run  students and their FLOPs, without training
  edgepkd distill recipes/mnist.yaml --resume    continue an interrupted run from its last finished epoch
  edgepkd distill recipes/mnist.yaml --nproc 2   2 processes (DDP); more machines: torchrun ... -m edgepkd distill
  edgepkd export runs/digits --target onnx-int8  quantize, export and verify every student
  edgepkd export --list-targets
  edgepkd bench runs/digits --device host        time every exported TFLite model here (the latency table)
  edgepkd bench runs/digits --device host-executorch   the same for the ExecuTorch (.pte) exports
  edgepkd pick runs/digits --device cortex-m7    the most accurate model within the device's budgets
  edgepkd distill recipes/digits.yaml --device host   recipe -> exported, benchmarked, picked artifact
  edgepkd evaluate runs/digits                   re-evaluate saved weights on the test split
  edgepkd list recipes                           the shipped recipes (a wheel carries them)

exit codes: 0 ok, 1 failure, 2 bad input (recipe, data, run directory), 130 interrupted (resumable)
"""


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", metavar="KEY.PATH=VALUE", action="append", default=[],
                   help="override a recipe field, type-checked (repeatable), e.g. --set distill.temperature=2")
    p.add_argument("--name", help="run name (directory under --out); default: the recipe's name")
    p.add_argument("--out", default="runs", help="parent directory of run directories (default: runs)")
    _add_data_dir(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run of the same name from its last finished epoch (same recipe and --set)")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe, load the data, print the "
                   "students with their FLOPs, and stop")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON on stdout "
                   "(progress still goes to stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--device", metavar="NAME", help="then export the device's targets, bench every candidate "
                   "on it and pick one (as edgepkd export, bench and pick do); see edgepkd bench --list-devices")
    _add_devices_dir(p)
    p.add_argument("--nproc", type=int, metavar="N", help="train with N processes on this machine: "
                   "DistributedDataParallel under torchrun (gloo on CPU, nccl with one GPU each); for several "
                   "machines run torchrun yourself (see the README)")


def _add_data_dir(p: argparse.ArgumentParser, of_run: bool = False) -> None:
    recorded = ("where the run read them (recorded in RUN/state.json)" if of_run else
                "with --resume where the run read them")
    p.add_argument("--data-dir", help=f"where datasets live (default: $EDGEPKD_DATA, else {recorded}, else "
                   "~/.cache/edgepkd/data)")


def _add_devices_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices-dir", action="append", default=[], metavar="DIR",
                   help="another folder of device profile YAML files (./devices/ is always read)")


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, metavar="N", help="runtime threads (default: the profile's)")
    p.add_argument("--python", metavar="PATH", help="the device's Python with numpy and a runtime (default: the "
                   "profile's; local: this one)")
    p.add_argument("--random-input", action="store_true", help="time one random input instead of the run's test "
                   "images (no top-1)")
    p.add_argument("--min-runs", type=int, default=50, metavar="N", help="timed runs, at least (default 50)")
    p.add_argument("--min-seconds", type=float, default=1.0, metavar="S", help="timed seconds, at least (default 1)")
    _add_data_dir(p, of_run=True)


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
                       "Trains on cuda:0 when torch sees a GPU (torchrun: one GPU per process), else on the CPU.\n"
                       "Ctrl-C leaves a checkpoint; --resume continues from the last finished epoch.")
    p.add_argument("recipe", metavar="RECIPE", help="recipe YAML file, or a shipped recipe's name (e.g. mnist; "
                   "see edgepkd list recipes)")
    _add_run_args(p)

    p = sub.add_parser("export", help="export a run's students to ONNX / TFLite / ExecuTorch / PyTorch, quantized "
                       "and verified",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Export every student and ensemble prefix of RUN (or --model NAME) for a target "
                       "(export/*.yaml), verify each artifact in its own runtime on the test split against the "
                       "PyTorch fp32 model, and write RUN/export/TARGET/ with the artifacts and manifest.json.\n"
                       "Verification fails by default when the target's tolerance is missed (fp32: max |logit "
                       "diff|; int8: accuracy drop); nothing is written for a failed model.")
    p.add_argument("run", metavar="RUN", nargs="?", help="run directory, e.g. runs/digits")
    p.add_argument("--target", action="append", default=[], metavar="NAME",
                   help="export target (repeatable); see --list-targets")
    p.add_argument("--model", metavar="NAME", action="append",
                   help="export only this model (repeatable; e.g. chain/s2, ensemble[1..3], teacher)")
    p.add_argument("--list-targets", action="store_true", help="list the export targets and exit")
    p.add_argument("--targets-dir", action="append", default=[], metavar="DIR",
                   help="another folder of target YAML files (./export/ is always read)")
    p.add_argument("--keep-going", action="store_true",
                   help="write the models that pass verification, skip (and name) those that fail; exits 1 "
                   "when any was skipped")
    p.add_argument("--no-verify", action="store_true", help="skip verification (says loudly that nothing was "
                   "checked; the manifest records it)")
    _add_data_dir(p, of_run=True)
    p.add_argument("--json", action="store_true", help="print the manifest entries as JSON")

    p = sub.add_parser("bench", help="time exported models on a device, in its runtime (or estimate them)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run each ARTIFACT (a file, an export folder, or a run directory: every export "
                       "of the device's format and precisions) on the device of --device: locally, or over ssh "
                       "(runner, artifacts and test images are copied there, the JSON comes back), or estimated "
                       "from MACs for devices with connect: none. Batch 1: warm-up >= 1 run and 0.5 s, then >= "
                       "--min-runs runs and --min-seconds (TFLite benchmark_model's defaults); p50/p90/p99, "
                       "load time, RAM, top-1 on the run's test images.\nRAM is the model's peak-RSS growth "
                       "(measured) or the sum of its non-constant tensors (estimated); storage is the file size.\n"
                       "Results: RUN/bench/DEVICE.json, written after each artifact.")
    p.add_argument("artifacts", metavar="ARTIFACT", nargs="*", help="artifact file, export folder or run directory")
    p.add_argument("--device", metavar="NAME", help="device profile (see --list-devices)")
    p.add_argument("--list-devices", action="store_true", help="list the device profiles and exit")
    _add_devices_dir(p)
    _add_bench_args(p)
    p.add_argument("--json", action="store_true", help="print the results as JSON")

    p = sub.add_parser("pick", help="pick the most accurate exported model that fits a device's budgets",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Candidates: every exported student and ensemble prefix of RUN at every "
                       "precision the device uses. Accuracy: verified at export. Latency (p90), RAM and storage: "
                       "from edgepkd bench on the device (run for candidates without a current result). Chooses "
                       "the highest accuracy within every budget, prints the table with the choice marked and "
                       "why each other candidate lost, writes RUN/selection.json. When nothing fits it names "
                       "the binding budget and what the closest candidate needs, and exits 1.\nBudgets: latency = "
                       "p90; RAM = the model's peak-RSS growth (measured) or the sum of its non-constant tensors "
                       "(estimated); storage = the artifact's bytes.")
    p.add_argument("run", metavar="RUN", help="run directory, e.g. runs/digits")
    p.add_argument("--device", metavar="NAME", required=True, help="device profile (see edgepkd bench --list-devices)")
    p.add_argument("--latency-ms", type=float, metavar="X", help="p90 latency budget (default: the profile's)")
    p.add_argument("--min-accuracy", type=float, metavar="Y", help="lowest acceptable verified accuracy (%%)")
    p.add_argument("--no-bench", action="store_true", help="do not run bench for candidates without results; fail")
    _add_devices_dir(p)
    _add_bench_args(p)
    p.add_argument("--json", action="store_true", help="print the selection as JSON")

    p = sub.add_parser("evaluate", help="re-evaluate a run's saved weights on its test split",
                       description="Rebuild every model of RUN from its safetensors file, evaluate it on the test "
                       "split of the run's dataset and compare with metrics.json. Exits 1 on a mismatch. "
                       "On the device kind the run trained on, predictions must match exactly; on another "
                       "(a GPU run checked on a CPU) float differences flip borderline images, so 0.1 points "
                       "are allowed unless --tolerance says otherwise.")
    p.add_argument("run", metavar="RUN", help="run directory, e.g. runs/digits")
    _add_data_dir(p, of_run=True)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to evaluate (auto: cuda when torch sees a GPU, else cpu)")
    p.add_argument("--tolerance", type=float, metavar="POINTS",
                   help="largest accepted accuracy difference in points (default: exact on the run's device "
                   "kind, 0.1 on another)")
    p.add_argument("--skip-missing", action="store_true",
                   help="report models whose weights file is missing as not re-derived instead of failing")
    p.add_argument("--json", action="store_true", help="print the results as JSON")

    p = sub.add_parser("report", help="re-render report.md and the plot from a run's metrics.json",
                       description="Rewrite RUN/report.md and RUN/accuracy_vs_mflops.png from RUN/metrics.json.")
    p.add_argument("run", metavar="RUN", help="run directory")

    p = sub.add_parser("list", help="list the shipped recipes and registered teachers, students, datasets, scan "
                       "backends",
                       description="List the shipped recipes (name and file: edgepkd distill NAME runs one) and "
                       "registered names: teachers, datasets and scan backends as a recipe uses them; students "
                       "are presets for Python use (edgepkd.models.STUDENTS.get(name)(...)).")
    p.add_argument("kind", choices=["recipes", "teachers", "students", "datasets", "scan-backends"])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # --nproc relaunches the same command under torchrun
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


def _load_recipe(recipe: str | None, overrides: list[str]):
    """RECIPE of ``distill`` (a file or a shipped recipe's name; None: the demo) with its ``--set`` overrides."""
    from edgepkd.recipe import load_recipe, resolve_recipe

    return load_recipe(None if recipe is None else resolve_recipe(recipe), overrides)


def _environment(scan_backend: str, device: str) -> dict:
    import platform

    import torch

    return {"machine": f"{platform.system()} {platform.machine()}", "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "edgepkd": __version__,
            "scan_backend": scan_backend, "cuda": torch.cuda.is_available(), "device": device,
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}


def _distill(recipe_path: str | None, args) -> int:
    import torch

    from edgepkd.distill import distributed

    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc: {args.nproc}: give at least 1 process")
    if args.device:
        _device_profile(args.device, args.devices_dir)  # an unknown or malformed profile fails before training
    if args.nproc and args.nproc > 1 and not args.dry_run:
        distributed.check_batch_sizes(_load_recipe(recipe_path, args.set), args.nproc)  # before N processes start
        return distributed.launch(args.nproc, distributed.strip_nproc(args.argv))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return distributed.run_rank(lambda dist: _distill_rank(recipe_path, args, dist), device)


def _distill_rank(recipe_path: str | None, args, dist) -> int:
    """One process's part of ``distill``: all of it in a single process; under torchrun rank 0 writes the run
    directory and prints, every rank trains its share (errors before training are agreed and printed once)."""
    from edgepkd.config import to_dict
    from edgepkd.data import data_location, load_dataset, reads_files
    from edgepkd.distill.distributed import check_batch_sizes
    from edgepkd.distill.pipeline import Distiller, check_recipe, evaluate_members
    from edgepkd.models.scan import resolve_backend
    from edgepkd.progress import RichReporter
    from edgepkd.models.flops import FLOP_CONVENTION
    from edgepkd.report import write_report
    from edgepkd.rundir import RunDir

    recipe = dist.agree(lambda: _load_recipe(recipe_path, args.set))
    dist.agree(lambda: check_batch_sizes(recipe, dist.world_size if dist.distributed else args.nproc or 1))
    backend = resolve_backend(recipe.scan_backend, dist.device)
    run = RunDir(Path(args.out) / (args.name or recipe.name))
    # where the dataset's files are; --resume: where the run read them, unless --data-dir / $EDGEPKD_DATA say
    root, why = dist.agree(lambda: data_location(args.data_dir, run if args.resume else None))
    files = reads_files(recipe.data)
    data = dist.agree(lambda: load_dataset(recipe.data, recipe.seed, str(root)), local_first=True)
    if files and dist.is_main and not args.quiet:
        print(f"data: {root} ({why})", file=sys.stderr)  # once found: a failure is the error's one line

    latency = _latency_table(recipe, data, args) if dist.is_main else None

    def check():
        try:
            return check_recipe(recipe, data, latency)
        except ConfigError as e:
            raise ConfigError(f"{recipe_path or '<demo recipe>'}: {e}") from None

    plan = dist.agree(check)
    if args.dry_run:
        return _print_plan(recipe, data, plan, args.json, latency) if dist.is_main else 0

    def create():
        run.create(to_dict(recipe), resume=args.resume)
        if files:  # evaluate, export, bench and pick read the data there by default
            run.record_data_dir(root)

    dist.agree(lambda: create() if dist.is_main else None)
    dist.agree(lambda: dist.is_main or run.recipe_path.is_file() or _unseen(run, dist))
    reporter = None if args.quiet or not dist.is_main else RichReporter()
    t0 = time.perf_counter()
    members = Distiller(recipe, data, run, reporter=reporter, dist=dist).run_all(plan)
    if not dist.is_main:
        return 0
    metrics = {
        "recipe": recipe.name, "run": str(run.path), "edgepkd_version": __version__,
        "dataset": {"name": data.name, "train": len(data.train), "val": len(data.val), "test": len(data.test),
                    "input_shape": list(data.input_shape), "classes": data.classes,
                    "preprocessing": data.preprocessing()},
        "flop_convention": FLOP_CONVENTION,
        "wall_time_s": time.perf_counter() - t0,
        "environment": _environment(backend, dist.device.type),
        "resumed": bool(args.resume),  # wall_time_s then covers this process only; train_time_s of each
                                       # model covers all of its training, across processes
        "distributed": dist.describe(),
        **evaluate_members(members, data, device=dist.device),
    }
    write_report(run.path, metrics)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        _print_summary(metrics)
    if args.device:
        return _deploy(run.path, args)
    return 0


def _deploy(run_path: Path, args) -> int:
    """``distill --device``: export the device's targets, bench every candidate there, pick (see cmd_pick)."""
    from edgepkd.measure.bench import BenchOptions
    from edgepkd.measure.pick import deploy, render

    profile = _device_profile(args.device, args.devices_dir)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    sel = deploy(str(run_path), profile, data_dir=args.data_dir, log=log,
                 options=BenchOptions(data_dir=args.data_dir))
    print(render(sel), file=sys.stderr if args.json else sys.stdout)
    return _settle(sel, run_path, log)


def _unseen(run, dist):
    raise RunError(f"rank {dist.rank} does not see {run.recipe_path}, which rank 0 wrote: put --out on a "
                   "filesystem that every machine of the run shares (ranks resume from the same checkpoint)")


def _latency_table(recipe, data, args):
    """The latency table of ``students.progression.by: latency`` (on --device, else progression.device)."""
    from edgepkd.measure.latency_table import LatencyTable

    prog = recipe.students.progression
    if prog is None or prog.by != "latency":
        return None
    name = args.device or prog.device
    if name is None:
        return None   # check_recipe says what is missing
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json or args.quiet else print
    return LatencyTable(_device_profile(name, args.devices_dir), data.input_shape, data.num_classes, log=log)


def _print_plan(recipe, data, plan, as_json: bool, latency=None) -> int:
    rows = [{"student": i + 1, **spec, "params": f.params, "macs": f.macs, "mflops": f.flops / 1e6}
            for i, (spec, f) in enumerate(plan)]
    if latency is not None:
        for r, ms in zip(rows, latency([spec for spec, _ in plan])):
            r["p50_ms"] = ms
    if as_json:
        print(json.dumps({"recipe": recipe.name, "dataset": data.name, "students": rows}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{recipe.name}: {len(rows)} students on {data.name} "
                  f"({len(data.train)}/{len(data.val)}/{len(data.test)} images)")
    cols = ["#", "d_model", "depth", "d_state", "patch", "stem", "params", "MACs", "MFLOPs"]
    if latency is not None:
        cols.append(f"p50 ms ({latency.profile.name}{', est.' if latency.profile.estimated else ''})")
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["student"]), str(r["d_model"]), str(r["depth"]), str(r["d_state"]),
                      str(r["patch_size"]), r["stem"], f"{r['params']:,}", f"{r['macs']:,}", f"{r['mflops']:.3f}",
                      *([f"{r['p50_ms']:.4f}"] if latency is not None else []))
    Console().print(table)
    if latency is not None:
        Console().print(f"latency table: {latency.path} ({latency.measured} timed now, the rest cached)")
    if recipe.baselines:
        Console().print("baselines (trained from labels): " + ", ".join(
            f"{b.arch} {dict(b.args) or ''}{b.train.epochs} epochs" for b in recipe.baselines))
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
    from edgepkd.data import load_run_dataset
    from edgepkd.distill.trainer import accuracy, eval_mode, predict
    from edgepkd.models import load_model, set_scan_backend
    from edgepkd.recipe import load_recipe
    from edgepkd.report import load_metrics
    from edgepkd.rundir import RunDir

    import torch

    run = RunDir(args.run)
    run.require_complete()
    recipe = load_recipe(run.recipe_path)
    metrics = load_metrics(run.path)
    env = metrics.get("environment", {})
    trained_on = env.get("device") or ("cuda" if env.get("cuda") else "cpu")
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("evaluate --device cuda: torch sees no CUDA GPU here; use --device cpu")
    # identical weights, data and device kind give identical predictions; another kind flips borderline images
    tolerance = args.tolerance if args.tolerance is not None else 1e-6 if device == trained_on else 0.1
    missing = [row["name"] for row in metrics["models"] if not run.weights_path(row["name"]).exists()
               and not (row["name"] == "teacher" and recipe.teacher.checkpoint)]
    if missing and not args.skip_missing:
        raise RunError(f"{run.path}: weights missing for {', '.join(missing)} "
                       f"(expected {run.weights_path(missing[0])}); --skip-missing evaluates the others")
    data = load_run_dataset(run, recipe, args.data_dir, log=print if not args.json else
                            lambda *a: print(*a, file=sys.stderr))
    results, worst = [], 0.0
    logits = {}
    for row in metrics["models"]:
        path = run.weights_path(row["name"])
        if not path.exists():
            continue  # missing (listed above) or a loaded teacher, which is not copied into the run
        model, _ = load_model(path)
        set_scan_backend(model, recipe.scan_backend)
        logits[row["name"]] = predict(eval_mode([model.to(device)]), data, data.test.x, device=device)
        acc = accuracy(logits[row["name"]], data.test.y)
        results.append({"name": row["name"], "test_acc": acc, "recorded": row["test_acc"]})
    for p in metrics["ensemble_prefixes"]:
        if all(m in logits for m in p["members"]):
            acc = accuracy(sum(logits[m] for m in p["members"]), data.test.y)
            results.append({"name": p["name"], "test_acc": acc, "recorded": p["test_acc"]})
    for r in results:
        r["diff"] = abs(r["test_acc"] - r["recorded"])
        worst = max(worst, r["diff"])
    ok = worst <= tolerance
    if args.json:
        print(json.dumps({"run": args.run, "device": device, "trained_on": trained_on, "tolerance": tolerance,
                          "results": results, "missing": missing, "max_diff": worst, "ok": ok}, indent=2))
    else:
        for r in results:
            print(f"{r['name']:<18} test acc {r['test_acc']:6.2f}  (metrics.json {r['recorded']:6.2f})")
        if missing:
            print(f"not re-derived (weights missing): {', '.join(missing)}")
        print(f"max difference {worst:.4f} points (evaluated on {device}, trained on {trained_on}; "
              f"tolerance {tolerance:g})")
    return 0 if ok else 1


def cmd_export(args) -> int:
    from edgepkd.compress.targets import load_targets

    targets = load_targets(args.targets_dir)
    if args.list_targets:
        width = max(len(name) for name, _ in targets.items())
        for name, t in targets.items():
            print(f"{name:<{width}} {t.format:<10} {t.precision:<5} {t.description}")
        return 0
    if not args.run:
        raise ConfigError("export: give a run directory (e.g. edgepkd export runs/digits --target onnx-fp32)")
    if not args.target:
        raise ConfigError(f"export: give --target NAME (targets: {', '.join(targets.names())})")
    chosen = [targets.get(name) for name in args.target]
    from edgepkd.compress.export import export_targets

    if args.no_verify:
        print("edgepkd: WARNING: --no-verify: the exported files are NOT checked against PyTorch; "
              "the manifest marks them unverified", file=sys.stderr)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    entries, refused = export_targets(args.run, chosen, models=args.model, do_verify=not args.no_verify,
                                      data_dir=args.data_dir, log=log, keep_going=args.keep_going)
    if args.json:
        print(json.dumps(entries, indent=2))
    if refused:
        from edgepkd.compress.export import VerificationError

        raise VerificationError(f"{len(refused)} model(s) failed verification and were not written "
                                f"({', '.join(refused)}); the {len(entries)} that passed were")
    return 0


def _device_profile(name: str, dirs: list[str]):
    from edgepkd.measure.devices import load_devices

    return load_devices(dirs).get(name)


def _bench_options(args):
    from edgepkd.measure.bench import BenchOptions

    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: give at least 1")
    if args.min_runs < 1 or args.min_seconds < 0:
        raise ConfigError("--min-runs must be at least 1 and --min-seconds at least 0")
    return BenchOptions(threads=args.threads, python=args.python, images=not args.random_input,
                        data_dir=args.data_dir, min_runs=args.min_runs, min_seconds=args.min_seconds)


def cmd_bench(args) -> int:
    from edgepkd.measure.devices import load_devices

    devices = load_devices(args.devices_dir)
    if args.list_devices:
        width = max([18, *(len(name) for name, _ in devices.items())])
        for name, d in devices.items():
            how = "estimated" if d.estimated else d.connect
            print(f"{name:<{width}} {d.runtime:<12} {how:<34} {d.description}")
        return 0
    if not args.device:
        raise ConfigError(f"bench: give --device NAME (devices: {', '.join(devices.names())})")
    profile = devices.get(args.device)
    if not args.artifacts:
        raise ConfigError("bench: give an artifact, an export folder or a run directory "
                          f"(e.g. edgepkd bench runs/digits --device {args.device})")
    from edgepkd.measure.bench import bench, render, resolve

    options = _bench_options(args)
    arts = resolve(args.artifacts, profile)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    log(f"bench on '{profile.name}': {len(arts)} artifact(s)" + (" (estimated)" if profile.estimated else ""))
    outcome = bench(arts, profile, options, log=log)
    if args.json:
        print(json.dumps([{**r, "key": a.key} for a, r in outcome.results], indent=2))
    elif outcome.results:
        print(render(outcome, profile))
    for run in sorted({str(a.run) for a, _ in outcome.results if a.run is not None}):
        log(f"results: {run}/bench/{profile.name}.json")
    if outcome.errors:
        a, why = outcome.errors[0]
        more = f" (and {len(outcome.errors) - 1} more, listed above)" if len(outcome.errors) > 1 else ""
        raise EdgepkdError(f"{a.key} cannot run on device '{profile.name}': {why}{more}")
    return 0


def cmd_pick(args) -> int:
    from edgepkd.measure.pick import pick, render

    profile = _device_profile(args.device, args.devices_dir)
    if args.min_accuracy is not None and not 0 <= args.min_accuracy <= 100:
        raise ConfigError(f"--min-accuracy {args.min_accuracy}: give a percentage in [0, 100]")
    if args.latency_ms is not None and args.latency_ms <= 0:
        raise ConfigError(f"--latency-ms {args.latency_ms}: must be positive")
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    sel = pick(args.run, profile, latency_ms=args.latency_ms, min_accuracy=args.min_accuracy,
               options=_bench_options(args), run_bench=not args.no_bench, log=log)
    if args.json:
        print(json.dumps(sel.as_dict(), indent=2))
    else:
        print(render(sel))
    return _settle(sel, Path(args.run), log)


def _settle(sel, run: Path, log) -> int:
    """The end of ``pick`` and ``distill --device``: the choice written to selection.json, or NothingFits (exit 1)
    with the reason."""
    from edgepkd.measure.pick import NothingFits, write_selection

    from edgepkd.measure.bench import plot_path

    if sel.choice is None:
        raise NothingFits(sel.explanation)
    plot = plot_path(run, sel.profile)
    log(f"picked {sel.explanation}\nselection: {write_selection(run, sel)}" +
        (f"\nplot: {plot} (accuracy vs p50 on '{sel.profile.name}')" if plot.is_file() else ""))
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
    if args.kind == "recipes":
        from edgepkd.recipe import builtin_recipes

        recipes = builtin_recipes()
        width = max(map(len, recipes))
        print("\n".join(f"{name:<{width}}  {path}" for name, path in recipes.items()))
        return 0
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


COMMANDS = {"demo": cmd_demo, "distill": cmd_distill, "export": cmd_export, "bench": cmd_bench, "pick": cmd_pick,
            "evaluate": cmd_evaluate, "report": cmd_report, "list": cmd_list}
