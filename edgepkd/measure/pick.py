"""``edgepkd pick RUN --device NAME``: the most accurate exported model that fits the device's budgets.

Candidates: every exported model of the run (chain students, ensemble prefixes, and the teacher and baselines,
which ``edgepkd export`` exports by default), at every precision the device uses, in the format its runtime runs
(``runs/<run>/export/*/manifest.json``). When the teacher fits and is the most accurate, pick chooses it and
says so: no student is hidden behind, and no student is promoted over, the model it was distilled from. Accuracy is the one verified at export (the
artifact in its runtime, on the test split); latency (p90), RAM and storage come from ``edgepkd bench`` on that
device (run here for candidates without a current result). The choice is the highest accuracy within every
budget (ties: lower p90, then fewer bytes); each other candidate is told why it lost (too slow, too big,
below the accuracy floor, dominated, or simply less accurate). When nothing fits, the error names the binding
budget and what the closest candidate needs. Every candidate's file is checked against its manifest (size and
sha256) first: a truncated or changed one stops pick with one line (re-export it), selection.json untouched.

Early exit: when ``edgepkd early-exit`` measured the run's ensemble member by member for the device's format
(RUN/bench/early-exit-TARGET.json), it is one more candidate, at the θ whose MEAN latency meets the latency
budget with the highest accuracy (``early_exit.choose``); its cascades (members 1..K, or one or two cheaper chain
students, then the reference on the images none is sure of) are one more, at the most accurate stage set and θ
whose mean meets the budget and whose own files and RAM (its stages loaded at once) fit. They are judged by their
mean, single artifacts by their p90: an exit-early model is fast on most images and slow (every member) on a few,
so its p90 and its worst case are shown beside it, never hidden. Either is chosen only when strictly more
accurate than the best single artifact within the budgets (a tie goes to the single artifact, whose p90 bounds
nine images in ten).

    runs/<run>/selection.json   {"devices": {NAME: the choice, budgets, and every candidate with its verdict}}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from edgepkd.errors import EdgepkdError, RunError
from edgepkd.measure.bench import Artifact, BenchOptions, BenchStore, _manifest, _ms, bench_artifacts, \
    check_artifact, format_table, now, plot_path, ram_bytes, resolve
from edgepkd.measure.devices import MIB, DeviceProfile
from edgepkd.rundir import RunDir, atomic_write_json, read_json


class NothingFits(EdgepkdError):
    """No candidate meets every budget; ``selection`` holds the candidates and why each lost."""

    exit_code = 1

    def __init__(self, message: str, selection: "Selection | None" = None):
        super().__init__(message)
        self.selection = selection


@dataclass
class PickCandidate:
    """One exported artifact weighed for a device: its bench result (or why it cannot run there) and verdict."""

    artifact: Artifact
    result: dict | None = None
    error: str | None = None
    verdict: str = ""
    fits: bool = False
    pareto: bool = False

    @property
    def label(self) -> str:
        return self.artifact.label

    @property
    def accuracy(self) -> float | None:
        v = self.artifact.entry.get("verification") or {}
        return v.get("accuracy") if v.get("passed") else None

    @property
    def p90(self) -> float:
        return self.result["latency_ms"]["p90"]

    @property
    def ram(self) -> int:
        return ram_bytes(self.result) or 0

    @property
    def bytes(self) -> int:
        return self.result["bytes"]

    def as_dict(self) -> dict:
        e = self.artifact.entry
        return {"model": e.get("model"), "target": self.artifact.target, "precision": e.get("precision"),
                "file": f"export/{self.artifact.key}", "sha256": e.get("sha256"), "accuracy": self.accuracy,
                "latency_p90_ms": None if self.result is None else self.p90,
                "ram_bytes": None if self.result is None else ram_bytes(self.result),
                "bytes": None if self.result is None else self.bytes,
                "estimated": None if self.result is None else bool(self.result.get("estimated")),
                "fits": self.fits, "pareto": self.pareto, "verdict": self.verdict}


@dataclass
class Limits:
    latency_ms: float
    ram_mib: float
    storage_mib: float
    min_accuracy: float | None = None

    def violations(self, c: PickCandidate) -> dict[str, tuple[float, float, float]]:
        """constraint -> (value, limit, how far off as a ratio >= 1)."""
        out = {}
        if c.p90 > self.latency_ms:
            out["latency"] = (c.p90, self.latency_ms, c.p90 / self.latency_ms)
        if c.ram > self.ram_mib * MIB:
            out["RAM"] = (c.ram / MIB, self.ram_mib, c.ram / (self.ram_mib * MIB))
        if c.bytes > self.storage_mib * MIB:
            out["storage"] = (c.bytes / MIB, self.storage_mib, c.bytes / (self.storage_mib * MIB))
        if self.min_accuracy is not None and c.accuracy < self.min_accuracy:
            out["accuracy"] = (c.accuracy, self.min_accuracy, self.min_accuracy / max(c.accuracy, 1e-9))
        return out

    def describe(self) -> str:
        text = f"p90 <= {self.latency_ms:g} ms, RAM <= {self.ram_mib:g} MiB, storage <= {self.storage_mib:g} MiB"
        return text + (f", accuracy >= {self.min_accuracy:g}%" if self.min_accuracy is not None else "")


@dataclass
class Selection:
    profile: DeviceProfile
    limits: Limits
    candidates: list[PickCandidate] = field(default_factory=list)
    choice: PickCandidate | None = None
    explanation: str = ""
    path: Path | None = None            # RUN/selection.json once ``record`` wrote it
    plot: Path | None = None            # RUN/bench/DEVICE.png (accuracy vs p50), when bench drew it
    early_exits: list["EarlyExit"] = field(default_factory=list)  # edgepkd early-exit results for this device

    def as_dict(self) -> dict:
        p = self.profile
        mode = ("tflite-micro: arena and accuracy measured, latency estimated" if p.runtime == "tflite-micro"
                else "estimated" if p.estimated else "measured")
        return {"device": p.name, "mode": mode, "runtime": p.runtime,
                "threads": p.threads, "connect": p.connect,
                "budget": {"latency_p90_ms": self.limits.latency_ms, "ram_mib": self.limits.ram_mib,
                           "storage_mib": self.limits.storage_mib, "min_accuracy": self.limits.min_accuracy},
                "choice": None if self.choice is None else self.choice.as_dict(),
                "why": self.explanation, "candidates": [c.as_dict() for c in self.candidates],
                "early_exit": [e.as_dict() for e in self.early_exits], "created": now()}


def _round_up(v: float, digits: int = 3) -> str:
    """``v`` rounded up to ``digits`` significant digits, so that a budget of that value admits ``v``."""
    step = 10.0 ** (math.floor(math.log10(v)) - digits + 1)
    return f"{math.ceil(v / step) * step:.{digits}g}"


def _admit_hint(constraint: str, value: float) -> str:
    """The option or profile change that would admit a candidate needing ``value`` of ``constraint``."""
    if constraint == "accuracy":
        return f"--min-accuracy {math.floor(value * 100) / 100:.2f} would admit it"
    option = {"latency": "--latency-ms", "RAM": "a profile with ram_mib >=",
              "storage": "a profile with storage_mib >="}[constraint]
    return f"{option} {_round_up(value)} would admit it"


def _amount(constraint: str, v: float) -> str:
    """What a candidate needs of ``constraint``, in words: 'p90 1.23 ms', '0.5 MiB of RAM'."""
    return {"latency": f"p90 {_ms(v)} ms", "RAM": f"{v:.3g} MiB of RAM", "storage": f"{v:.3g} MiB of storage",
            "accuracy": f"accuracy {v:.2f}%"}[constraint]


def _budget_text(constraint: str, v: float) -> str:
    """A budget of ``constraint`` with its unit: '2 ms', '0.25 MiB'."""
    return {"latency": f"{_ms(v)} ms", "RAM": f"{v:g} MiB", "storage": f"{v:g} MiB", "accuracy": f"{v:g}%"}[constraint]


def _nothing_fits(sel: Selection) -> str:
    runnable = [c for c in sel.candidates if c.result is not None and c.accuracy is not None]
    head = f"nothing fits device '{sel.profile.name}' ({sel.limits.describe()})"
    if not runnable:
        errors = [c for c in sel.candidates if c.error]
        if errors:
            return f"{head}: none of the {len(sel.candidates)} candidates runs there; {errors[0].label}: {errors[0].error}"
        return f"{head}: no verified candidate (export without --no-verify)"
    single: dict[str, list[tuple[float, PickCandidate, tuple]]] = {}
    for c in runnable:
        v = sel.limits.violations(c)
        if len(v) == 1:
            (name, info), = v.items()
            single.setdefault(name, []).append((info[2], c, info))
    if single:
        parts = []
        for name, items in sorted(single.items(), key=lambda kv: min(x[0] for x in kv[1])):
            _, c, (value, limit, _) = min(items, key=lambda x: x[0])
            if name == "accuracy":
                parts.append(f"accuracy is binding: the most accurate candidate within the other budgets, "
                             f"{c.label}, reaches {value:.2f}% (floor {limit:g}%); {_admit_hint(name, value)}")
            else:
                parts.append(f"{name} is binding: {c.label} meets every other budget but needs "
                             f"{_amount(name, value)} (budget {_budget_text(name, limit)}); {_admit_hint(name, value)}")
        return f"{head}: " + "; ".join(parts)
    closest = min(runnable, key=lambda c: max(x[2] for x in sel.limits.violations(c).values()))
    needs = " and ".join(f"{_amount(n, v)} (budget {_budget_text(n, lim)})"
                         for n, (v, lim, _) in sel.limits.violations(closest).items())
    return f"{head}: every candidate misses two or more budgets; the closest, {closest.label}, needs {needs}"


def _violation(name: str, value: float, limit: float) -> str:
    if name == "accuracy":
        return f"below --min-accuracy: {value:.2f}% < {limit:g}%"
    why = {"latency": "too slow", "RAM": "too big (RAM)", "storage": "too big (storage)"}[name]
    return f"{why}: {_amount(name, value)} > {_budget_text(name, limit)}"


def _dominates(a: PickCandidate, b: PickCandidate) -> bool:
    ge = a.accuracy >= b.accuracy and a.p90 <= b.p90 and a.ram <= b.ram and a.bytes <= b.bytes
    return ge and (a.accuracy > b.accuracy or a.p90 < b.p90 or a.ram < b.ram or a.bytes < b.bytes)


def choose(sel: Selection) -> Selection:
    """Fill verdicts, the Pareto flags and the choice (or the nothing-fits explanation)."""
    runnable = [c for c in sel.candidates if c.result is not None and c.accuracy is not None]
    for c in sel.candidates:
        if c.accuracy is None:
            c.verdict = "not verified at export (exported with --no-verify): not a candidate"
        elif c.error is not None:
            c.verdict = f"does not run on the device: {c.error}"
    for c in runnable:
        c.pareto = not any(_dominates(d, c) for d in runnable if d is not c)
        v = sel.limits.violations(c)
        c.fits = not v
        if v:
            c.verdict = "; ".join(_violation(n, val, lim) for n, (val, lim, _) in v.items())
    fitting = sorted((c for c in runnable if c.fits), key=lambda c: (-c.accuracy, c.p90, c.bytes, c.ram))
    if not fitting:
        sel.explanation = _nothing_fits(sel)
        return sel
    best = sel.choice = fitting[0]
    best.verdict = f"chosen: the most accurate of {len(fitting)} candidate(s) within every budget"
    sel.explanation = (f"{best.label}: {best.accuracy:.2f}% verified accuracy, p90 {_ms(best.p90)} ms, "
                       f"{best.ram / MIB:.2f} MiB RAM, {best.bytes / 1024:.1f} KiB; {sel.limits.describe()}")
    if not is_student(best):
        student = next((c for c in fitting if is_student(c)), None)
        sel.explanation += (f". The {best.artifact.entry.get('model')} itself fits and is the most accurate: no "
                            "distilled model is needed within these budgets" +
                            (f"; the best student, {student.label}, reaches {student.accuracy:.2f}% at p90 "
                             f"{_ms(student.p90)} ms" if student else "; no student fits"))
    for c in fitting[1:]:
        dominator = best if _dominates(best, c) else next((d for d in runnable if _dominates(d, c)), None)
        if dominator is not None:
            c.verdict = f"dominated by {dominator.label}"
        elif c.accuracy < best.accuracy:
            c.verdict = f"fits, less accurate than the choice ({c.accuracy:.2f}% < {best.accuracy:.2f}%)"
        else:
            c.verdict = f"fits, as accurate as the choice but slower or bigger (p90 {_ms(c.p90)} ms)"
    return sel


def _choose_all(sel: Selection) -> Selection:
    """``choose`` among the single artifacts, then the early-exit candidates against that choice."""
    choose(sel)
    if sel.early_exits:
        weigh_early_exit(sel)
    return sel


def is_student(c: PickCandidate) -> bool:
    """A chain student or an ensemble prefix; not the teacher or a baseline (which pick weighs all the same)."""
    model = str(c.artifact.entry.get("model", ""))
    return model.startswith(("chain/", "ensemble["))


def pick_candidates(run: Path, profile: DeviceProfile) -> list[PickCandidate]:
    if not (run / "export").is_dir():
        raise RunError(f"{run}: nothing exported yet; export first (edgepkd export {run} --target "
                       f"{profile.format}-fp32), or run edgepkd distill RECIPE --device {profile.name}")
    return [PickCandidate(a) for a in resolve([str(run)], profile)]


def pick(run_path: str, profile: DeviceProfile, *, latency_ms: float | None = None,
         min_accuracy: float | None = None, options: BenchOptions | None = None, run_bench: bool = True,
         early_exit: bool = True, log=print) -> Selection:
    """Gather candidates, bench the ones without a current result on this device, and choose. ``early_exit``:
    the run's early-exit results for this device compete too (False: single artifacts only)."""
    run = Path(run_path)
    RunDir(run).require_complete()
    limits = Limits(latency_ms if latency_ms is not None else profile.budget.latency_ms, profile.budget.ram_mib,
                    profile.budget.storage_mib, min_accuracy)
    if limits.latency_ms <= 0:
        raise EdgepkdError(f"--latency-ms {latency_ms}: must be positive")
    sel = Selection(profile, limits, pick_candidates(run, profile))
    if early_exit:
        sel.early_exits = early_exit_candidates(run, profile)
    for c in sel.candidates:
        check_artifact(c.artifact)  # a stored result describes the file of this sha256; a changed file is refused
    options = options or BenchOptions()
    store = BenchStore(run, profile, options)
    todo = []
    for c in sel.candidates:
        c.result, c.error = store.current(c.artifact)
        if c.result is None and c.error is None and c.accuracy is not None:
            todo.append(c)
    if todo and not run_bench:
        raise RunError(f"{run}: {len(todo)} candidate(s) have no current bench result on device '{profile.name}' "
                       f"(e.g. {todo[0].artifact.key}); run: edgepkd bench {run} --device {profile.name}")
    if todo:
        log(f"bench on '{profile.name}': {len(todo)} candidate(s) without a current result")
        outcome = bench_artifacts([c.artifact for c in todo], profile, options, log=log)
        got = {id(a): r for a, r in outcome.results}
        err = {id(a): e for a, e in outcome.errors}
        for c in todo:
            c.result, c.error = got.get(id(c.artifact)), err.get(id(c.artifact))
    return _choose_all(sel)


def write_selection(run: Path, sel: Selection) -> Path:
    """runs/<run>/selection.json: this device's entry replaced, the other devices' kept."""
    path = Path(run) / "selection.json"
    data = read_json(path, {"devices": dict}, "a selection file", "move it away", default={"devices": {}})
    data["devices"][sel.profile.name] = sel.as_dict()
    atomic_write_json(path, data)
    return path


def record(sel: Selection, run: Path) -> Selection:
    """The end of ``pick`` and ``distill --device``: the choice written to RUN/selection.json (``sel.path``, and
    ``sel.plot`` when bench drew one), or NothingFits with the reason (selection.json left as it was)."""
    if sel.choice is None:
        raise NothingFits(sel.explanation, sel)
    plot = plot_path(run, sel.profile)
    sel.path, sel.plot = write_selection(run, sel), plot if plot.is_file() else None
    return sel


def render_selection(sel: Selection) -> str:
    p = sel.profile
    mode = ("TFLite Micro on this host: RAM (arena) and accuracy measured, latency ESTIMATED"
            if p.runtime == "tflite-micro" else "ESTIMATED" if p.estimated else f"measured, {p.threads} thread(s)")
    rows = []
    order = sorted(sel.candidates, key=lambda c: (c is not sel.choice, -(c.accuracy or -1),
                                                   c.p90 if c.result else float("inf")))
    for c in order:
        est = c.result is not None and c.result.get("estimated")
        rows.append(["*" if c is sel.choice else "", str(c.artifact.entry.get("model")), c.artifact.target,
                     "-" if c.accuracy is None else f"{c.accuracy:.2f}",
                     "-" if c.result is None else _ms(c.p90) + (" est." if est else ""),
                     "-" if c.result is None else f"{c.ram / MIB:.2f}",
                     "-" if c.result is None else f"{c.bytes / 1024:.1f}",
                     "yes" if c.pareto else "", c.verdict])
    for e in sorted(sel.early_exits, key=lambda e: e is not sel.choice):
        row = ["*" if e is sel.choice else "", e.model, e.target,
               "-" if e.row is None else f"{e.accuracy:.2f}", "-" if e.row is None else f"{_ms(e.mean_ms)} mean",
               "-" if e.ram is None else f"{e.ram / MIB:.2f}", f"{e.bytes / 1024:.1f}", "", e.verdict]
        rows.insert(0, row) if e is sel.choice else rows.append(row)
    head = f"pick for device '{p.name}' ({p.runtime}, {mode}): {sel.limits.describe()}"
    table = format_table(["", "model", "target", "acc %", "p90 ms", "RAM MiB", "KiB", "pareto", "verdict"], rows,
                         right={3, 4, 5, 6})
    return f"{head}\n{table}"



# ------------------------------------------------------------------------------------------------- early exit
@dataclass
class EarlyExit:
    """The run's ensemble run member by member (``edgepkd early-exit``), as a pick candidate: its θ sweep, and
    the θ chosen for the latency budget (judged by MEAN latency; see the module docstring). ``kind`` "cascade":
    the same result's cascades instead (members 1..K or one or two cheaper chain students, then the reference on
    the images none of them is sure of), one candidate whose chosen row names its stages."""

    path: Path                          # RUN/bench/early-exit-TARGET.json
    result: dict
    kind: str = "ensemble"              # "ensemble" (the θ sweep) or "cascade" (a cascade row)
    notes: list[str] = field(default_factory=list)   # how it was measured, where not the device's own settings
    excluded: str | None = None         # why it is not a candidate for this device (stale, other device, subset)
    row: dict | None = None             # the chosen θ's sweep row (with "stages" for a cascade)
    verdict: str = ""
    fits: bool = False

    @property
    def target(self) -> str:
        return self.result["target"]

    def rows(self) -> list[dict]:
        if self.kind == "ensemble":
            return self.result["sweep"]
        return [*self.result.get("cascade", []), *self.result.get("chain_cascade", [])]

    @property
    def stages(self) -> list[str]:
        """The models this candidate loads: the members, or the chosen cascade's stages (the reference last)."""
        if self.kind == "ensemble":
            return self.result["members"]
        return [] if self.row is None else self.row["stages"]

    @property
    def model(self) -> str:
        theta = "" if self.row is None else f" θ={self.row['theta']:g}"
        if self.kind == "cascade":
            ref = (self.result.get("reference") or {}).get("model", "the reference")
            return f"cascade {' -> '.join(self.stages)}{theta}" if self.row else f"cascade ... -> {ref}"
        from edgepkd.measure.early_exit import fused_exits

        m, fused = self.result.get("ensemble", self.result["members"]), fused_exits(self.result)
        exits = "" if fused is None else f" exits {','.join(str(e) for e in fused)}"
        return f"early exit {m[0]}..{m[-1].split('/')[-1]}{exits}{theta}"

    @property
    def label(self) -> str:
        return f"{self.model} ({self.target})"

    @property
    def accuracy(self) -> float | None:
        return None if self.row is None else self.row["accuracy"]

    @property
    def mean_ms(self) -> float:
        return self.row["mean_ms"]

    @property
    def worst(self) -> dict:
        """Every member (every stage, for a cascade) run, no image exiting: mean, p90, max (ms)."""
        if self.kind == "cascade":
            return self.row["worst"] if self.row else {"mean": math.nan, "p90": math.nan, "max": math.nan}
        return self.result["all_members_ms"]

    def files(self, row: dict | None = None) -> list[dict]:
        """The file records ({file, bytes, sha256}) of every model the candidate (or a cascade ``row``) loads."""
        if self.kind == "ensemble":
            return self.result["files"]
        table = {**dict(zip(self.result["members"], self.result["files"])), **self.result.get("stage_files", {})}
        if row is None:
            return list({f["file"]: f for f in table.values()}.values())
        return [table[name] for name in row["stages"]]

    def ram_of(self, row: dict | None) -> int | None:
        if self.kind == "ensemble":
            return self.result.get("ram_bytes")
        return None if row is None else row.get("ram_bytes")

    @property
    def ram(self) -> int | None:
        return self.ram_of(self.row)

    def loaded(self) -> list[dict]:
        """The file records the candidate loads: every member, or the chosen cascade's stages (none unchosen)."""
        if self.kind == "ensemble":
            return self.files()
        return self.files(self.row) if self.row else []

    @property
    def bytes(self) -> int:
        return sum(f["bytes"] for f in self.loaded())

    def worst_case(self) -> str:
        w = self.worst
        from edgepkd.measure.early_exit import every_step

        every = every_step(self.result) if self.kind == "ensemble" else f"every stage ({len(self.stages)})"
        return f"worst case, {every}: p90 {_ms(w['p90'])} ms, max {_ms(w['max'])} ms"

    def as_dict(self) -> dict:
        return {"kind": "early-exit" if self.kind == "ensemble" else "cascade", "model": self.model,
                "target": self.target, "members": self.result["members"] if self.kind == "ensemble" else self.stages,
                "file": str(Path("bench") / self.path.name),
                "files": [f"export/{self.target}/{f['file']}" for f in self.loaded()],
                "theta": None if self.row is None else self.row["theta"], "accuracy": self.accuracy,
                "latency_mean_ms": None if self.row is None else self.mean_ms,
                "latency_p90_ms": None if self.row is None else self.row["p90_ms"],
                "worst_case_ms": self.worst if self.row is not None or self.kind == "ensemble" else None,
                "judged_by": "mean latency",
                "ram_bytes": self.ram,
                "bytes": self.bytes, "threads": self.result["threads"], "device": self.result.get("device"),
                "runtime": self.result.get("runtime"), "images": self.result["images"], "notes": self.notes,
                "fits": self.fits, "verdict": self.verdict}


def early_exit_candidates(run: Path, profile: DeviceProfile) -> list[EarlyExit]:
    """The run's early-exit results (RUN/bench/early-exit-*.json) in the device's format and precisions: each one
    candidate for its ensemble's θ sweep and, when it recorded cascades with their stages, one for its cascades.
    A malformed one stops pick with one line; one measured elsewhere, on part of the test split, or with files
    exported again since is shown with the reason and does not compete."""
    from edgepkd.measure.early_exit import fused_exits, load_result

    out = []
    for path in sorted((run / "bench").glob("early-exit-*.json")):
        res = load_result(path)
        if res["format"] != profile.format or res["precision"] not in profile.precisions:
            continue
        kinds = ["ensemble"]
        cascades = [*res.get("cascade", []), *res.get("chain_cascade", [])]
        if cascades and all("stages" in r and "worst" in r for r in cascades) and "stage_files" in res:
            kinds.append("cascade")
        for kind in kinds:
            e = EarlyExit(path, res, kind)
            measured_for = res.get("device")
            fused = fused_exits(res)
            again = (f"edgepkd early-exit {run} --target {res['target']} --device {profile.name}"
                     + ("" if fused is None else f" --exits {','.join(str(x) for x in fused)}"))
            if profile.connect != "local" and measured_for != profile.name:
                e.excluded = (f"measured on this machine{f' for device {measured_for!r}' if measured_for else ''}, "
                              f"not on '{profile.name}' ({'estimated' if profile.estimated else profile.connect}): "
                              "not a candidate")
            if measured_for not in (None, profile.name):
                e.notes.append(f"measured for device '{measured_for}'")
            if res["threads"] != profile.threads:
                e.notes.append(f"measured with {res['threads']} thread(s); '{profile.name}' uses {profile.threads}")
            folder = run / "export" / res["target"]
            entries = {x["file"]: x for x in _manifest_entries(folder)}
            files = e.files()
            changed = [f["file"] for f in files if entries.get(f["file"], {}).get("sha256") != f["sha256"]]
            if changed and e.excluded is None:
                e.excluded = (f"stale: {', '.join(changed)} exported again (or removed) since it was measured; "
                              f"measure again: {again}")
            split = next((entries[f["file"]].get("verification", {}).get("images") for f in files
                          if f["file"] in entries), None)
            if e.excluded is None and split is not None and res["images"] < split:
                e.excluded = (f"measured on {res['images']} of the {split} test images (--limit): its accuracy is "
                              f"not comparable with the verified accuracies; measure again without --limit: {again}")
            if e.excluded is None:
                for f in files:
                    check_artifact(Artifact(folder / f["file"], entries[f["file"]], res["target"], run))
            out.append(e)
    return out


def _manifest_entries(folder: Path) -> list[dict]:
    """bench's manifest reading, or [] for a folder without a manifest."""
    return _manifest(folder) if (folder / "manifest.json").is_file() else []


def weigh_early_exit(sel: Selection) -> None:
    """Choose θ for each early-exit candidate (the most accurate whose mean latency meets the budget), check the
    other budgets, and let the best one take the choice when it is strictly more accurate than the single
    artifact chosen (or when no single artifact fits)."""
    from edgepkd.measure.early_exit import choose as choose_theta

    lim = sel.limits

    def small(e: EarlyExit, row: dict) -> bool:   # a cascade row's own files and RAM within the budgets
        ram = e.ram_of(row)
        return (ram is None or ram <= lim.ram_mib * MIB) and \
            sum(f["bytes"] for f in e.files(row)) <= lim.storage_mib * MIB

    for e in sel.early_exits:
        if e.excluded:
            e.verdict = e.excluded
            continue
        rows = e.rows()
        e.row = choose_theta(rows, mean_ms=lim.latency_ms)
        if e.kind == "cascade":   # each row loads its own models: the most accurate that fits every budget, else
            e.row = choose_theta([r for r in rows if small(e, r)], mean_ms=lim.latency_ms) or e.row  # (too big) any
        if e.row is None:
            fastest = min(rows, key=lambda r: r["mean_ms"])
            what = (f"θ ({fastest['theta']:g})" if e.kind == "ensemble" else
                    f"cascade ({' -> '.join(fastest['stages'])}, θ = {fastest['theta']:g})")
            e.verdict = f"too slow: the fastest {what} has mean {_ms(fastest['mean_ms'])} ms > {_ms(lim.latency_ms)} ms"
            continue
        why = []
        if e.ram is not None and e.ram > lim.ram_mib * MIB:
            why.append(f"too big (RAM): {e.ram / MIB:.3g} MiB > {lim.ram_mib:g} MiB")
        if e.bytes > lim.storage_mib * MIB:
            why.append(f"too big (storage): {e.bytes / MIB:.3g} MiB > {lim.storage_mib:g} MiB")
        if lim.min_accuracy is not None and e.accuracy < lim.min_accuracy:
            why.append(f"below --min-accuracy: {e.accuracy:.2f}% < {lim.min_accuracy:g}%")
        e.fits = not why
        e.verdict = "; ".join(why)
    fitting = sorted((e for e in sel.early_exits if e.fits), key=lambda e: (-e.accuracy, e.mean_ms))
    single = sel.choice
    for i, e in enumerate(fitting):
        rule = (f"θ = {e.row['theta']:g}: mean {_ms(e.mean_ms)} ms <= {_ms(lim.latency_ms)} ms (early exit is "
                "judged by mean latency, single artifacts by p90)")
        tail = f"; p90 {_ms(e.row['p90_ms'])} ms; {e.worst_case()}" + (
            f" (over the {_ms(lim.latency_ms)} ms budget)" if e.worst["p90"] > lim.latency_ms else "") + (
            f"; {'; '.join(e.notes)}" if e.notes else "")
        if i == 0 and (single is None or e.accuracy > single.accuracy):
            than = ("no single artifact fits" if single is None else
                    f"more accurate than the best single artifact, {single.label} ({single.accuracy:.2f}%)")
            e.verdict = f"chosen: {rule}; {than}{tail}"
            for c in sel.candidates:   # the single artifacts' verdicts said "the choice" of the single best
                if c.fits and not c.verdict.startswith("dominated"):
                    c.verdict = f"fits, less accurate than the choice ({c.accuracy:.2f}% < {e.accuracy:.2f}%)"
            if single is not None:
                single.verdict = (f"fits, but the {'early-exit ensemble' if e.kind == 'ensemble' else 'cascade'} "
                                  f"is more accurate ({e.accuracy:.2f}% at mean "
                                  f"{_ms(e.mean_ms)} ms)")
            sel.choice = e
            sel.explanation = (f"{e.label}: {e.accuracy:.2f}% on {e.result['images']} test images in "
                               f"{e.result.get('runtime', 'the runtime')}, {rule}{tail}; "
                               f"{e.bytes / 1024:.1f} KiB in {len(e.loaded())} files; {lim.describe()}")
        elif i == 0:
            e.verdict = (f"fits ({rule}), but not more accurate than {single.label} ({e.accuracy:.2f}% <= "
                         f"{single.accuracy:.2f}%), which meets the budget at p90: a tie goes to the single "
                         f"artifact{tail}")
        else:
            e.verdict = f"fits ({rule}), less accurate than {fitting[0].label}{tail}"
