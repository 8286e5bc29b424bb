"""The ``edgepkd`` command: a click application that parses, calls one library function per command and prints.

Heavy imports (torch, torchvision, rich) live inside the commands so that ``edgepkd --help`` answers at once.
Every error the user can fix is one line on stderr (``edgepkd: error: ...``) with the exit code of its kind;
usage errors too (exit 2).
"""

from __future__ import annotations

import json
import os
import sys

import click

from edgepkd import __version__
from edgepkd.errors import ConfigError, EdgepkdError
from edgepkd.measure.early_exit import DEFAULT_THETAS  # numbers only: the module imports json, math, time

EXAMPLES = """\b
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
  edgepkd export runs/digits --target tflite-micro-int8   TFLite Micro files + firmware sources (pip install tflite-micro)
  edgepkd pick runs/digits --device cortex-m7    the most accurate model within the device's budgets (TFLite Micro arena)
  edgepkd early-exit runs/digits --target tflite-fp32 --device host   the ensemble member by member: θ sweep
  edgepkd distill recipes/digits.yaml --device host   recipe -> exported, benchmarked, picked artifact
  edgepkd evaluate runs/digits                   re-evaluate saved weights on the test split
  edgepkd list recipes                           the shipped recipes (a wheel carries them)

\b
exit codes: 0 ok, 1 failure, 2 bad input (recipe, data, run directory), 130 interrupted (resumable)
shell completion (bash; zsh and fish alike): eval "$(_EDGEPKD_COMPLETE=bash_source edgepkd)"
"""

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 118}


def _stderr(*a) -> None:
    print(*a, file=sys.stderr)


def _quiet(*a) -> None:
    pass


# --------------------------------------------------------------------------------- completion of registry names
def _complete(load):
    def complete(ctx, param, incomplete):
        try:
            return [n for n in load(ctx) if n.startswith(incomplete)]
        except EdgepkdError:
            return []
    return complete


def _target_names(ctx):
    from edgepkd.compress.targets import load_targets

    return load_targets(list(ctx.params.get("targets_dir") or ())).names()


def _device_names(ctx):
    from edgepkd.measure.devices import load_devices

    return load_devices(list(ctx.params.get("devices_dir") or ())).names()


def _recipe_names(ctx):
    from edgepkd.recipe import builtin_recipes

    return list(builtin_recipes())


# ------------------------------------------------------------------------- options shared by several commands
def data_dir_option(of_run: bool = False):
    recorded = ("where the run read them (recorded in RUN/state.json)" if of_run else
                "with --resume where the run read them")
    return click.option("--data-dir", metavar="DIR", help="where datasets live (default: $EDGEPKD_DATA, else "
                        f"{recorded}, else ~/.cache/edgepkd/data)")


def json_option(what: str):
    return click.option("--json", "as_json", is_flag=True, help=f"print {what} as JSON")


quiet_option = click.option("--quiet", is_flag=True, help="no progress output")
devices_dir_option = click.option("--devices-dir", multiple=True, metavar="DIR", is_eager=True,
                                  help="another folder of device profile YAML files (./devices/ is always read)")
targets_dir_option = click.option("--targets-dir", multiple=True, metavar="DIR", is_eager=True,
                                  help="another folder of target YAML files (./export/ is always read)")


def _device_option(help: str, required: bool = False):
    return click.option("--device", metavar="NAME", required=required, help=help,
                        shell_complete=_complete(_device_names))


def _apply(options):
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


run_options = _apply([
    click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                 help="override a recipe field, type-checked (repeatable), e.g. --set distill.temperature=2"),
    click.option("--name", help="run name (directory under --out); default: the recipe's name"),
    click.option("--out", default="runs", show_default=True, help="parent directory of run directories"),
    data_dir_option(),
    click.option("--resume", is_flag=True,
                 help="continue the run of the same name from its last finished epoch (same recipe and --set)"),
    click.option("--dry-run", is_flag=True,
                 help="validate the recipe, load the data, print the students with their FLOPs, and stop"),
    json_option("the final metrics (progress still goes to stderr)"),
    quiet_option,
    _device_option("then export the device's targets, bench every candidate on it and pick one (as edgepkd "
                   "export, bench and pick do); see edgepkd bench --list-devices"),
    devices_dir_option,
    click.option("--nproc", type=int, metavar="N", help="train with N processes on this machine: "
                 "DistributedDataParallel under torchrun (gloo on CPU, nccl with one GPU each); for several "
                 "machines run torchrun yourself (see the README)"),
])

bench_options = _apply([
    click.option("--threads", type=int, metavar="N", help="runtime threads (default: the profile's)"),
    click.option("--python", metavar="PATH", help="the device's Python with numpy and a runtime (default: the "
                 "profile's; local: this one)"),
    click.option("--random-input", is_flag=True, help="time one random input instead of the run's test images "
                 "(no top-1)"),
    click.option("--min-runs", type=int, default=50, show_default=True, metavar="N", help="timed runs, at least"),
    click.option("--min-seconds", type=float, default=1.0, show_default=True, metavar="S",
                 help="timed seconds, at least"),
    data_dir_option(of_run=True),
])


# ---------------------------------------------------------------------------------------------- the group
class _Group(click.Group):
    """Every error is one line with its exit code: usage errors (2), an EdgepkdError (its own), Ctrl-C (130), a
    reader that left a pipe (141). Click alone would print usage errors over several lines, a traceback for ours,
    'Aborted!' for Ctrl-C, and exit 0 whatever code a command returns."""

    def main(self, args=None, prog_name=None, standalone_mode=True, **extra):
        argv = sys.argv[1:] if args is None else list(args)
        extra.setdefault("obj", {"argv": argv})   # --nproc relaunches the same command under torchrun
        try:
            code = super().main(argv, prog_name or "edgepkd", standalone_mode=False, **extra)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "edgepkd"
            _stderr(f"edgepkd: error: {where}: {e.format_message().rstrip('.')} (see {where} --help)")
            code = e.exit_code
        except click.ClickException as e:
            _stderr(f"edgepkd: error: {e.format_message()}")
            code = e.exit_code
        except click.Abort:
            _stderr("\nedgepkd: interrupted")
            code = 130
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgepkdError as e:
            _stderr(f"edgepkd: error: {e}")
            return e.exit_code
        except BrokenPipeError:  # e.g. `edgepkd ... --json | head`: the reader left; stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except KeyboardInterrupt:
            if ctx.meta.get("edgepkd.resumable"):
                _stderr("\nedgepkd: interrupted; the last finished epoch is checkpointed: rerun the same command "
                        "with --resume to continue")
            else:
                _stderr("\nedgepkd: interrupted")
            return 130


@click.group(name="edgepkd", cls=_Group, context_settings=CONTEXT, epilog=EXAMPLES, invoke_without_command=True)
@click.version_option(__version__, "--version", prog_name="edgepkd", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context):
    """Distill an image classifier into a family of progressively smaller Mamba students."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


def main(argv: list[str] | None = None) -> int:
    """The ``edgepkd`` console script and ``python -m edgepkd``: runs ``argv`` (default: sys.argv[1:]) and returns
    the exit code."""
    return cli.main(argv, "edgepkd", standalone_mode=False)


# ------------------------------------------------------------------------------------------- distill, demo
@cli.command(context_settings=CONTEXT)
@run_options
@click.pass_context
def demo(ctx, **opts):
    """Run the embedded digits recipe (offline, a few minutes on 2 CPU cores).

    Distill the embedded default recipe (scikit-learn's 8x8 digits; the same as recipes/digits.yaml): a CNN
    teacher, 4 Mamba students as a chain and as an ensemble. Writes runs/digits/ with metrics.json, report.md and
    a plot.
    """
    return _distill(ctx, None, **opts)


@cli.command(context_settings=CONTEXT)
@click.argument("recipe", metavar="RECIPE", shell_complete=_complete(_recipe_names))
@run_options
@click.pass_context
def distill(ctx, recipe, **opts):
    """Train a teacher and distill it into Mamba students.

    RECIPE is a recipe YAML file, or a shipped recipe's name (e.g. mnist; see edgepkd list recipes). Train (or
    load) the teacher, then distill progressively smaller Mamba students as a chain and/or an ensemble of weak
    learners. Writes runs/NAME/: recipe.yaml (resolved), weights/*.safetensors, metrics.json, report.md,
    accuracy_vs_mflops.png.

    Trains on cuda:0 when torch sees a GPU (torchrun: one GPU per process), else on the CPU. Ctrl-C leaves a
    checkpoint; --resume continues from the last finished epoch.
    """
    return _distill(ctx, recipe, **opts)


def _distill(ctx, recipe, *, overrides, name, out, data_dir, resume, dry_run, as_json, quiet, device, devices_dir,
             nproc) -> int:
    from edgepkd import workflow
    from edgepkd.distill import distributed

    ctx.meta["edgepkd.resumable"] = not dry_run
    if nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc: {nproc}: give at least 1 process")
    if device:
        workflow.device_profile(device, devices_dir)  # an unknown or malformed profile fails before training
    if nproc and nproc > 1 and not dry_run:
        distributed.check_batch_sizes(workflow.load_recipe(recipe, overrides), nproc)  # before N processes start
        return distributed.launch(nproc, distributed.strip_nproc(ctx.obj["argv"]))
    from edgepkd.progress import RichReporter

    result = workflow.distill(
        recipe, overrides=overrides, out=out, name=name, data_dir=data_dir, resume=resume, dry_run=dry_run,
        device=device, devices_dir=devices_dir, nproc=nproc, reporter=None if quiet else RichReporter(),
        note=None if quiet else _stderr, log=_stderr if as_json or quiet else print)
    if result is None:  # another rank of a distributed run: rank 0 prints
        return 0
    from edgepkd.report import print_plan, print_summary

    if isinstance(result, workflow.Planned):
        print_plan(result.recipe, result.data, result.plan, result.latency, as_json)
        return 0
    if as_json:
        print(json.dumps(result.metrics, indent=2))
    else:
        print_summary(result.metrics)
    if not device:
        return 0
    # the device's exports, bench and pick; progress as --quiet / --json say, the answer always (last lines)
    log = _quiet if quiet else _stderr if as_json else print
    return _show_selection(lambda: workflow.deploy(result.run.path, device, data_dir=data_dir,
                                                   devices_dir=devices_dir, log=log),
                           out=_stderr if as_json else print)


def _show_selection(choose, out) -> int:
    """Print a pick's table, then its answer as the last lines (``picked ...``, ``selection: ...``, the plot)."""
    from edgepkd.measure.pick import NothingFits, render_selection

    try:
        sel = choose()
    except NothingFits as e:
        if e.selection is not None:
            out(render_selection(e.selection))
        raise
    out(render_selection(sel))
    out(f"picked {sel.explanation}\nselection: {sel.path}" +
        (f"\nplot: {sel.plot} (accuracy vs p50 on '{sel.profile.name}')" if sel.plot else ""))
    return 0


# ------------------------------------------------------------------------------------------------- evaluate
@cli.command(context_settings=CONTEXT)
@click.argument("run", metavar="RUN")
@data_dir_option(of_run=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="where to evaluate (auto: cuda when torch sees a GPU, else cpu)")
@click.option("--tolerance", type=float, metavar="POINTS", help="largest accepted accuracy difference in points "
              "(default: exact on the run's device kind, 0.1 on another)")
@click.option("--skip-missing", is_flag=True,
              help="report models whose weights file is missing as not re-derived instead of failing")
@json_option("the results")
def evaluate(run, data_dir, device, tolerance, skip_missing, as_json):
    """Re-evaluate a run's saved weights on its test split.

    Rebuild every model of RUN from its safetensors file, evaluate it on the test split of the run's dataset and
    compare with metrics.json. Exits 1 on a mismatch. On the device kind the run trained on, predictions must
    match exactly; on another (a GPU run checked on a CPU) float differences flip borderline images, so 0.1
    points are allowed unless --tolerance says otherwise.
    """
    from edgepkd.distill.evaluate import evaluate_run

    ev = evaluate_run(run, data_dir=data_dir, device=device, tolerance=tolerance, skip_missing=skip_missing,
                      log=_stderr if as_json else print)
    if as_json:
        print(json.dumps(ev.as_dict(), indent=2))
    else:
        for r in ev.results:
            print(f"{r['name']:<18} test acc {r['test_acc']:6.2f}  (metrics.json {r['recorded']:6.2f})")
        if ev.missing:
            print(f"not re-derived (weights missing): {', '.join(ev.missing)}")
        print(f"max difference {ev.max_diff:.4f} points (evaluated on {ev.device}, trained on {ev.trained_on}; "
              f"tolerance {ev.tolerance:g})")
    return 0 if ev.ok else 1


# --------------------------------------------------------------------------------------------------- export
@cli.command(context_settings=CONTEXT)
@click.argument("run", metavar="RUN", required=False)
@click.option("--target", "target_names", multiple=True, metavar="NAME", shell_complete=_complete(_target_names),
              help="export target (repeatable); see --list-targets")
@click.option("--model", "models", multiple=True, metavar="NAME",
              help="export only this model (repeatable; e.g. chain/s2, ensemble[1..3], teacher; ensemble-members: "
              "the largest prefix's members, one file each, for early exit)")
@click.option("--list-targets", is_flag=True, help="list the export targets and exit")
@targets_dir_option
@click.option("--keep-going", is_flag=True, help="write the models that pass verification, skip (and name) those "
              "that fail; exits 1 when any was skipped. A model refused before with the same weights, target, "
              "code and packages is skipped without exporting it again, unless named with --model")
@click.option("--no-verify", is_flag=True,
              help="skip verification (says loudly that nothing was checked; the manifest records it)")
@data_dir_option(of_run=True)
@json_option("the manifest entries")
def export(run, target_names, models, list_targets, targets_dir, keep_going, no_verify, data_dir, as_json):
    """Export a run's students to ONNX / TFLite / ExecuTorch / PyTorch, quantized and verified.

    Export every student and ensemble prefix of RUN (or --model NAME) for a target (export/*.yaml), verify each
    artifact in its own runtime on the test split against the PyTorch fp32 model, and write RUN/export/TARGET/
    with the artifacts and manifest.json.

    Verification fails by default when the target's tolerance is missed (fp32: a logit differs by more than
    max_abs_diff + max_rel_diff x |its PyTorch value|, or x the largest |logit| of its image with rel_scale: row, as
    the built-in fp32 targets do; int8: accuracy drop); nothing is written for a failed
    model.
    """
    from edgepkd.compress.targets import load_targets

    targets = load_targets(list(targets_dir))
    if list_targets:
        width = max(len(name) for name, _ in targets.items())
        for name, t in targets.items():
            print(f"{name:<{width}} {t.format:<10} {t.precision:<5} {t.description}")
        return 0
    if not run:
        raise ConfigError("export: give a run directory (e.g. edgepkd export runs/digits --target onnx-fp32)")
    if not target_names:
        raise ConfigError(f"export: give --target NAME (targets: {', '.join(targets.names())})")
    chosen = [targets.get(name) for name in target_names]
    from edgepkd.compress.export import VerificationError, export_targets

    if no_verify:
        _stderr("edgepkd: WARNING: --no-verify: the exported files are NOT checked against PyTorch; "
                "the manifest marks them unverified")
    entries, refused = export_targets(run, chosen, models=list(models) or None, do_verify=not no_verify,
                                      data_dir=data_dir, log=_stderr if as_json else print, keep_going=keep_going)
    if as_json:
        print(json.dumps(entries, indent=2))
    if refused:
        raise VerificationError(f"{len(refused)} model(s) failed verification and were not written "
                                f"({', '.join(refused)}); the {len(entries)} that passed were")
    return 0


# ------------------------------------------------------------------------------------------------ bench, pick
def _bench_options(threads, python, random_input, min_runs, min_seconds, data_dir):
    from edgepkd.measure.bench import BenchOptions

    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads}: give at least 1")
    if min_runs < 1 or min_seconds < 0:
        raise ConfigError("--min-runs must be at least 1 and --min-seconds at least 0")
    return BenchOptions(threads=threads, python=python, images=not random_input, data_dir=data_dir,
                        min_runs=min_runs, min_seconds=min_seconds)


@cli.command(context_settings=CONTEXT)
@click.argument("artifacts", metavar="ARTIFACT...", nargs=-1)
@_device_option("device profile (see --list-devices)")
@click.option("--list-devices", is_flag=True, help="list the device profiles and exit")
@devices_dir_option
@bench_options
@json_option("the results")
def bench(artifacts, device, list_devices, devices_dir, as_json, **options):
    """Time exported models on a device, in its runtime (or estimate them).

    Run each ARTIFACT (a file, an export folder, or a run directory: every export of the device's format and
    precisions) on the device of --device: locally, or over ssh (runner, artifacts and test images are copied
    there, the JSON comes back), or estimated from MACs for devices with connect: none; runtime tflite-micro runs
    each file in TFLite Micro's interpreter here (op coverage, exact arena, flash, top-1; latency estimated). Batch 1: warm-up >= 1 run
    and 0.5 s, then >= --min-runs runs and --min-seconds (TFLite benchmark_model's defaults); p50/p90/p99, load
    time, RAM, top-1 on the run's test images.

    RAM is the model's peak-RSS growth (measured), the exact TFLite Micro arena (tflite-micro), or the sum of its
    non-constant tensors (estimated); storage is the file size. Results: RUN/bench/DEVICE.json, written after each
    artifact.
    """
    from edgepkd.measure.devices import load_devices

    devices = load_devices(list(devices_dir))
    if list_devices:
        width = max([18, *(len(name) for name, _ in devices.items())])
        for name, d in devices.items():
            how = "estimated" if d.estimated else d.connect
            print(f"{name:<{width}} {d.runtime:<12} {how:<34} {d.description}")
        return 0
    if not device:
        raise ConfigError(f"bench: give --device NAME (devices: {', '.join(devices.names())})")
    profile = devices.get(device)
    if not artifacts:
        raise ConfigError("bench: give an artifact, an export folder or a run directory "
                          f"(e.g. edgepkd bench runs/digits --device {device})")
    from edgepkd.measure.bench import bench_artifacts, render_bench, resolve

    opts = _bench_options(**options)
    arts = resolve(list(artifacts), profile)
    log = _stderr if as_json else print
    log(f"bench on '{profile.name}': {len(arts)} artifact(s)" +
        (" (TFLite Micro on this host; latency estimated)" if profile.runtime == "tflite-micro"
         else " (estimated)" if profile.estimated else ""))
    outcome = bench_artifacts(arts, profile, opts, log=log)
    if as_json:
        print(json.dumps([{**r, "key": a.key} for a, r in outcome.results], indent=2))
    elif outcome.results:
        print(render_bench(outcome, profile))
    for run in sorted({str(a.run) for a, _ in outcome.results if a.run is not None}):
        log(f"results: {run}/bench/{profile.name}.json")
    if outcome.errors:
        a, why = outcome.errors[0]
        more = f" (and {len(outcome.errors) - 1} more, listed above)" if len(outcome.errors) > 1 else ""
        raise EdgepkdError(f"{a.key} cannot run on device '{profile.name}': {why}{more}")
    return 0


@cli.command(context_settings=CONTEXT)
@click.argument("run", metavar="RUN")
@_device_option("device profile (see edgepkd bench --list-devices)", required=True)
@click.option("--latency-ms", type=float, metavar="X", help="p90 latency budget (default: the profile's)")
@click.option("--min-accuracy", type=float, metavar="Y", help="lowest acceptable verified accuracy (%)")
@click.option("--no-bench", is_flag=True, help="do not run bench for candidates without results; fail")
@click.option("--early-exit/--no-early-exit", default=True, show_default=True,
              help="let the run's edgepkd early-exit results (the ensemble and its cascades) for this device "
                   "compete (judged by mean latency)")
@devices_dir_option
@bench_options
@json_option("the selection")
def pick(run, device, latency_ms, min_accuracy, no_bench, early_exit, devices_dir, as_json, **options):
    """Pick the most accurate exported model that fits a device's budgets.

    Candidates: every exported model of RUN (students, ensemble prefixes, the teacher and baselines) at every
    precision the device uses. Accuracy: verified at export. Latency (p90), RAM and storage: from edgepkd bench on
    the device (run for candidates without a current result). Chooses the highest accuracy within every budget,
    prints the table with the choice marked and why each other candidate lost, writes RUN/selection.json. When
    nothing fits it names the binding budget and what the closest candidate needs, and exits 1.

    Budgets: latency = p90; RAM = the model's peak-RSS growth (measured), the exact TFLite Micro arena
    (tflite-micro), or the sum of its non-constant tensors (estimated); storage = the artifact's bytes.

    Early exit: when edgepkd early-exit measured the run's ensemble for this device's format
    (RUN/bench/early-exit-TARGET.json), it competes at the most accurate θ whose MEAN latency meets the latency
    budget, and so do its cascades (members 1..K, or one or two cheaper chain students, then the most accurate
    student on the images none is sure of) at the most accurate stage set and θ whose mean meets it and whose
    files and RAM fit; the p90 and worst case (every member or stage) are shown beside them. Either is chosen
    only when strictly more accurate than the best single artifact within the budgets.
    """
    from pathlib import Path

    from edgepkd import workflow
    from edgepkd.measure.pick import pick as choose, record

    profile = workflow.device_profile(device, devices_dir)
    if min_accuracy is not None and not 0 <= min_accuracy <= 100:
        raise ConfigError(f"--min-accuracy {min_accuracy}: give a percentage in [0, 100]")
    if latency_ms is not None and latency_ms <= 0:
        raise ConfigError(f"--latency-ms {latency_ms}: must be positive")
    log = _stderr if as_json else print
    sel = choose(run, profile, latency_ms=latency_ms, min_accuracy=min_accuracy,
                 options=_bench_options(**options), run_bench=not no_bench, early_exit=early_exit, log=log)
    if as_json:
        print(json.dumps(sel.as_dict(), indent=2))
        record(sel, Path(run))
        log(f"picked {sel.explanation}\nselection: {sel.path}" +
            (f"\nplot: {sel.plot} (accuracy vs p50 on '{sel.profile.name}')" if sel.plot else ""))
        return 0
    return _show_selection(lambda: record(sel, Path(run)), out=print)


# ------------------------------------------------------------------------------------------------- early exit
def _thetas(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--thetas {text}: give comma-separated numbers in [0, 1], e.g. 0.9,0.99,1") from None
    if not values or not all(0 <= v <= 1 for v in values):
        raise ConfigError(f"--thetas {text}: give comma-separated numbers in [0, 1], e.g. 0.9,0.99,1")
    return sorted(set(values))


def _exits(text: str | None) -> list[int] | None:
    """--exits 3,5,7 -> [3, 5, 7]; the range is checked against the run's ensemble (early_exit.segments)."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--exits {text}: give comma-separated prefix sizes, e.g. 3,5,7") from None


@cli.command(name="early-exit", context_settings=CONTEXT)
@click.argument("run", metavar="RUN")
@click.option("--target", required=True, metavar="NAME", shell_complete=_complete(_target_names),
              help="the export target whose members run (e.g. tflite-fp32)")
@_device_option("a local device profile whose threads to use (default: 1 thread); recorded for edgepkd pick")
@click.option("--thetas", metavar="LIST", help="confidence thresholds to sweep, comma-separated in [0, 1] "
              f"(default: {','.join(format(t, 'g') for t in DEFAULT_THETAS)})")
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="only the first N test images")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, metavar="K",
              help="passes over the images; each step's time is its median over them")
@click.option("--reference", metavar="MODEL", help="the single model timed beside the members (default: the most "
              "accurate chain student; exported when missing)")
@click.option("--chain-cascade/--no-chain-cascade", "chain", default=True, show_default=True,
              help="also time the other chain students beside the reference (exported when missing), for the "
                   "cascade of one or two cheaper students, then the reference on the images they are unsure of")
@click.option("--exits", metavar="LIST", help="exit points: the prefix sizes after which an image may leave, "
              "comma-separated (e.g. 3,5,7; the last member is always one); the members between two run as one "
              "exported graph, one invoke (default: every member)")
@targets_dir_option
@devices_dir_option
@data_dir_option(of_run=True)
@json_option("the result (as written to RUN/bench/early-exit-TARGET.json)")
def early_exit(run, target, device, thetas, limit, repeats, reference, chain, exits, targets_dir, devices_dir,
               data_dir, as_json):
    """Run an ensemble member by member, exiting when confident: the θ sweep.

    Run the members of RUN's largest ensemble prefix one after another in the target's runtime, on this
    machine, on the test images; an image stops at the first prefix whose maximum softmax probability reaches θ
    (θ = 1: all members, the full prefix's answer). One pass gives every θ: accuracy, mean / p50 / p90 / max
    latency, members run, and the worst case (all members), beside the reference timed on the same images.
    The same rule as a cascade: members 1..K, then the reference on the images none of them is sure of; and
    the chain cascade: one or two cheaper chain students, each on its own, then the reference. Exports the
    members (--model ensemble-members), the reference and (with --chain-cascade) the other chain students first
    when they are missing, verified as any export. With --exits, an image may leave only after the prefixes
    listed, and the members between two of them run as one exported graph (ensemble[a..b], exported when
    missing). Writes RUN/bench/early-exit-TARGET.json, which edgepkd pick reads to choose θ (and a cascade) for
    a device.
    """
    from edgepkd import workflow
    from edgepkd.measure.early_exit import render_early_exit, result_path

    log = _stderr if as_json else print
    res = workflow.early_exit(run, target, device=device, devices_dir=devices_dir, targets_dir=targets_dir,
                              reference=reference, thetas=_thetas(thetas), limit=limit, repeats=repeats,
                              data_dir=data_dir, chain=chain, exits=_exits(exits), log=log)
    if as_json:
        print(json.dumps(res, indent=2))
    else:
        print(render_early_exit(res))
    from pathlib import Path

    log(f"results: {result_path(Path(run), res['target'])}")
    return 0


# ------------------------------------------------------------------------------------------------ report, list
@cli.command(context_settings=CONTEXT)
@click.argument("run", metavar="RUN")
def report(run):
    """Re-render report.md and the plot from a run's metrics.json.

    Rewrite RUN/report.md and RUN/accuracy_vs_mflops.png from RUN/metrics.json.
    """
    from pathlib import Path

    from edgepkd.report import load_metrics, write_report
    from edgepkd.rundir import RunDir

    path = Path(run)
    RunDir(path).require_complete()
    write_report(path, load_metrics(path))
    print(f"wrote {path}/report.md and {path}/accuracy_vs_mflops.png")
    return 0


LISTS = ("recipes", "teachers", "students", "datasets", "scan-backends")


@cli.command(name="list", context_settings=CONTEXT)
@click.argument("kind", type=click.Choice(LISTS))
def list_(kind):
    """List the shipped recipes and registered teachers, students, datasets, scan backends.

    The shipped recipes (name and file: edgepkd distill NAME runs one) and registered names: teachers, datasets
    and scan backends as a recipe uses them; students: mamba (a recipe's students) and presets for Python use
    (edgepkd.models.build_model(name, {}, num_classes, in_chans, image_size)).
    """
    if kind == "recipes":
        from edgepkd.recipe import builtin_recipes

        recipes = builtin_recipes()
        width = max(map(len, recipes))
        print("\n".join(f"{name:<{width}}  {path}" for name, path in recipes.items()))
    elif kind == "scan-backends":
        from edgepkd.models.scan import backend_names

        print("\n".join(backend_names()))
    else:
        from edgepkd import data, models

        print("\n".join({"teachers": models.TEACHERS, "students": models.STUDENTS,
                         "datasets": data.DATASETS}[kind].names()))
    return 0
