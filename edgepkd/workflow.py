"""The end-to-end chain: recipe -> run directory -> the device's exports -> bench -> pick.

The stages live in their packages (data -> models -> distill -> compress -> measure); this module is the one
place that calls them in order, and the only one above all of them. ``edgepkd distill``, ``demo`` and
``distill --device`` are thin wrappers around it. From Python:

    from edgepkd import workflow

    done = workflow.distill("digits", out="runs")              # Distilled: recipe, run, metrics (metrics.json)
    sel = workflow.deploy(done.run.path, "host")               # export, bench, pick; RUN/selection.json
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from edgepkd.errors import ConfigError, RunError


@dataclass
class Planned:
    """What ``distill(..., dry_run=True)`` answers: the validated recipe, its data and the students' plan."""

    recipe: object                # edgepkd.recipe.Recipe
    data: object                  # edgepkd.data.Dataset
    plan: list                    # [(student spec, FlopReport)], largest first
    latency: object | None        # the LatencyTable of progression.by: latency, else None


@dataclass
class Distilled:
    """A finished ``distill``: the recipe, the run directory and its metrics.json."""

    recipe: object
    run: object                   # edgepkd.rundir.RunDir
    metrics: dict


def load_recipe(recipe: str | None, overrides: Sequence[str] = ()):
    """RECIPE of ``distill`` (a file or a shipped recipe's name; None: the demo) with its ``--set`` overrides."""
    from edgepkd.recipe import load_recipe as load, resolve_recipe

    return load(None if recipe is None else resolve_recipe(recipe), list(overrides))


def device_profile(name: str, devices_dir: Sequence[str] = ()):
    """The device profile ``name`` (built-in, ``./devices/`` or ``devices_dir``); unknown or malformed: one line."""
    from edgepkd.measure.devices import load_devices

    return load_devices(list(devices_dir)).get(name)


def latency_table(recipe, data, device: str | None, devices_dir: Sequence[str] = (), log=print):
    """The latency table of ``students.progression.by: latency`` on ``device`` (else progression.device)."""
    from edgepkd.measure.latency_table import LatencyTable

    prog = recipe.students.progression
    if prog is None or prog.by != "latency":
        return None
    name = device or prog.device
    if name is None:
        return None   # check_recipe says what is missing
    return LatencyTable(device_profile(name, devices_dir), data.input_shape, data.num_classes, log=log)


def distill(recipe: str | None, *, overrides: Sequence[str] = (), out: str = "runs", name: str | None = None,
            data_dir: str | None = None, resume: bool = False, dry_run: bool = False, device: str | None = None,
            devices_dir: Sequence[str] = (), nproc: int | None = None, reporter=None, note: Callable | None = None,
            log: Callable = print) -> Planned | Distilled | None:
    """Run a recipe (a file, a shipped recipe's name, or None for the demo's) into ``out/name``: train (or load)
    the teacher and baselines, distill the students, write metrics.json and the report. In this process, or as
    this process's rank when torchrun started it (then only rank 0 returns the result; the others None).

    ``dry_run``: validate, load the data, plan the students, return ``Planned``. ``device``: the profile that
    ``progression.by: latency`` times candidates on (checked before training); ``deploy`` is the next step.
    ``reporter``: training progress (None: silent); ``note``: where the data was found; ``log``: the latency
    table's messages. ``nproc``: the process count a dry run checks the batch sizes for (torchrun's
    WORLD_SIZE under torchrun; ``distributed.launch`` starts the processes)."""
    import torch

    from edgepkd.distill import distributed

    if device:
        device_profile(device, devices_dir)  # an unknown or malformed profile fails before training
    where = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return distributed.run_rank(lambda dist: _distill_rank(
        recipe, dist, overrides=overrides, out=out, name=name, data_dir=data_dir, resume=resume, dry_run=dry_run,
        device=device, devices_dir=devices_dir, nproc=nproc, reporter=reporter, note=note, log=log), where)


def _distill_rank(recipe_arg: str | None, dist, *, overrides, out, name, data_dir, resume, dry_run, device,
                  devices_dir, nproc, reporter, note, log) -> Planned | Distilled | None:
    """One process's part of ``distill``: all of it in a single process; under torchrun rank 0 writes the run
    directory, every rank trains its share (errors before training are agreed and raised once)."""
    from edgepkd.config import to_dict
    from edgepkd.data import data_location, load_dataset, reads_files
    from edgepkd.distill.distributed import check_batch_sizes
    from edgepkd.distill.metrics import run_metrics
    from edgepkd.distill.pipeline import Distiller, check_recipe
    from edgepkd.models.scan import resolve_backend
    from edgepkd.report import write_report
    from edgepkd.rundir import RunDir

    recipe = dist.agree(lambda: load_recipe(recipe_arg, overrides))
    dist.agree(lambda: check_batch_sizes(recipe, dist.world_size if dist.distributed else nproc or 1))
    backend = resolve_backend(recipe.scan_backend, dist.device)
    run = RunDir(Path(out) / (name or recipe.name))
    # where the dataset's files are; resume: where the run read them, unless data_dir / $EDGEPKD_DATA say
    root, why = dist.agree(lambda: data_location(data_dir, run if resume else None))
    files = reads_files(recipe.data)
    data = dist.agree(lambda: load_dataset(recipe.data, recipe.seed, str(root)), local_first=True)
    if files and dist.is_main and note is not None:
        note(f"data: {root} ({why})")  # once found: a failure is the error's one line

    latency = latency_table(recipe, data, device, devices_dir, log) if dist.is_main else None

    def check():
        try:
            return check_recipe(recipe, data, latency)
        except ConfigError as e:
            raise ConfigError(f"{recipe_arg or '<demo recipe>'}: {e}") from None

    plan = dist.agree(check)
    if dry_run:
        return Planned(recipe, data, plan, latency) if dist.is_main else None

    def create():
        run.create(to_dict(recipe), resume=resume)
        if files:  # evaluate, export, bench and pick read the data there by default
            run.record_data_dir(root)

    dist.agree(lambda: create() if dist.is_main else None)
    dist.agree(lambda: dist.is_main or run.recipe_path.is_file() or _recipe_not_shared(run, dist))
    t0 = time.perf_counter()
    members = Distiller(recipe, data, run, reporter=reporter if dist.is_main else None, dist=dist).run_all(plan)
    if not dist.is_main:
        return None
    metrics = run_metrics(recipe, run, data, members, scan_backend=backend, dist=dist,
                          wall_time_s=time.perf_counter() - t0, resumed=bool(resume))
    write_report(run.path, metrics)
    return Distilled(recipe, run, metrics)


def _recipe_not_shared(run, dist):
    raise RunError(f"rank {dist.rank} does not see {run.recipe_path}, which rank 0 wrote: put --out on a "
                   "filesystem that every machine of the run shares (ranks resume from the same checkpoint)")


def device_targets(profile) -> list:
    """The export targets ``deploy`` writes for a device: the profile's ``export_targets``, else every built-in
    target of its runtime's format at its precisions."""
    from edgepkd.compress.targets import load_targets

    targets = load_targets()
    if profile.export_targets:
        return [targets.get(n) for n in profile.export_targets]
    return [t for _, t in targets.items() if t.format == profile.format and t.precision in profile.precisions]


def deploy(run_path: str | Path, device, *, data_dir: str | None = None, devices_dir: Sequence[str] = (),
           options=None, log: Callable = print):
    """``distill --device`` after training: export the device's targets (``export_targets`` of the profile, else
    every target of its format and precisions; a model failing verification is skipped), bench every candidate
    on the device, pick, and write RUN/selection.json. ``device``: a profile or its name. Returns the Selection;
    NothingFits (with ``.selection``) when no candidate meets every budget."""
    from edgepkd.compress.export import export_targets
    from edgepkd.measure.bench import BenchOptions
    from edgepkd.measure.pick import pick, record

    profile = device_profile(device, devices_dir) if isinstance(device, str) else device
    chosen = device_targets(profile)
    log(f"device '{profile.name}': exporting for {', '.join(t.name for t in chosen)}")
    export_targets(str(run_path), chosen, data_dir=data_dir, log=log, keep_going=True)
    sel = pick(str(run_path), profile, options=options or BenchOptions(data_dir=data_dir), log=log)
    return record(sel, Path(run_path))


def early_exit(run_path: str | Path, target: str, *, device: str | None = None, devices_dir: Sequence[str] = (),
               targets_dir: Sequence[str] = (), reference: str | None = None, thetas: Sequence[float] | None = None,
               limit: int | None = None, repeats: int = 3, data_dir: str | None = None, chain: bool = True,
               exits: Sequence[int] | None = None, log: Callable = print) -> dict:
    """``edgepkd early-exit``: the anytime ensemble run member by member on this machine, θ swept.

    Exports what is missing first, verified as any export: the largest prefix's members (``--model
    ensemble-members``; a member failing verification stops it) and the reference, ``reference`` or else the
    most accurate chain student of metrics.json (one failing verification is left out, and said so); with
    ``chain``, the other chain students too, for the chain cascade (those failing verification are left out). A
    default reference or chain student refused before with the same weights, target, code and packages is not
    exported again (``export_run``'s ``skip_refused``). Then
    ``measure.early_exit.measure``, at the threads of ``device`` (a local profile of the target's format; default
    1 thread), which writes RUN/bench/early-exit-TARGET.json. Returns that result. ``exits``: the exit points
    (prefix sizes); the segments between them are exported too when missing (``ensemble[a..b]``, verified)."""
    from edgepkd.compress.export import export_run, file_stem
    from edgepkd.compress.targets import load_targets
    from edgepkd.measure import early_exit as ee
    from edgepkd.report import load_metrics
    from edgepkd.rundir import RunDir

    run = Path(run_path)
    RunDir(run).require_complete()
    tgt = load_targets(list(targets_dir)).get(target)
    threads = 1
    if device is not None:
        profile = device_profile(device, devices_dir)
        if profile.connect != "local":
            raise ConfigError(f"--device {profile.name}: early exit runs the members here, in this machine's "
                              f"runtime, and '{profile.name}' is " + ("estimated (connect: none)" if
                              profile.estimated else f"reached over {profile.connect}") + "; give a local "
                              "profile (e.g. host)")
        if profile.format != tgt.format:
            raise ConfigError(f"--device {profile.name} runs {profile.runtime}, but target {tgt.name} is "
                              f"{tgt.format}; give a {profile.format} target or another device")
        threads = profile.threads
    metrics = load_metrics(run)
    if not metrics.get("ensemble_prefixes"):
        raise RunError(f"{run}: has no ensemble (distill.strategies without ensemble): nothing to run early")
    manifest = run / "export" / tgt.name / "manifest.json"
    have: set[str] = set()
    if manifest.is_file():
        from edgepkd.rundir import read_json

        listed = read_json(manifest, {"artifacts": list}, "a manifest", "move it away and export again")["artifacts"]
        have = {e["model"] for e in listed if isinstance(e, dict) and isinstance(e.get("model"), str)
                and isinstance(e.get("file"), str) and (manifest.parent / e["file"]).is_file()}
    explicit = reference is not None
    if not explicit:
        students = [r for r in metrics["models"] if r.get("role") == "chain"]
        reference = max(students, key=lambda r: r["test_acc"])["name"] if students else None
    names = metrics["ensemble_prefixes"][-1]["members"]
    spans = ee.segments(exits, len(names)) if exits is not None else [(k, k) for k in range(1, len(names) + 1)]
    singles = {names[a - 1] for a, b in spans if a == b}
    if not singles <= have:
        log(f"early exit: exporting the ensemble's members to {tgt.name}")
        export_run(str(run), tgt, models=["ensemble-members"], data_dir=data_dir, log=log)
    exported = {file_stem(h) for h in have}
    fused = [ee.segment_name(a, b, names) for a, b in spans if a != b]
    missing = [m for m in fused if file_stem(m) not in exported]
    if missing:
        log(f"early exit: exporting the segments {', '.join(missing)} to {tgt.name}")
        export_run(str(run), tgt, models=missing, data_dir=data_dir, log=log)
    if reference is not None and file_stem(reference) not in {file_stem(m) for m in have}:
        refused: list[str] = []                 # a default reference refused before is not exported again
        log(f"early exit: exporting the reference {reference} to {tgt.name}")
        export_run(str(run), tgt, models=[reference], data_dir=data_dir, log=log, refused=refused,
                   skip_refused=not explicit)
        if refused and not explicit:
            log(f"early exit: {reference} failed verification for {tgt.name}: measured beside the most accurate "
                "chain student exported there, if any")
            reference = None
    if chain and reference is not None:
        missing = [r["name"] for r in metrics["models"] if r.get("role") == "chain" and r["name"] != reference
                   and file_stem(r["name"]) not in {file_stem(m) for m in have}]
        if missing:
            log(f"early exit: exporting {', '.join(missing)} to {tgt.name} for the chain cascade")
            refused = []
            export_run(str(run), tgt, models=missing, data_dir=data_dir, log=log, refused=refused,
                       skip_refused=True)
            if refused:
                log(f"early exit: {', '.join(refused)} failed verification for {tgt.name}: left out of the chain "
                    "cascade")
    kwargs = {} if thetas is None else {"thetas": tuple(thetas)}
    return ee.measure(str(run), tgt.name, reference=reference, threads=threads, limit=limit, repeats=repeats,
                      data_dir=data_dir, device=device, chain=chain, exits=exits, log=log, **kwargs)
