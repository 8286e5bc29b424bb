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

    runs/<run>/selection.json   {"devices": {NAME: the choice, budgets, and every candidate with its verdict}}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from edgepkd.errors import EdgepkdError, RunError
from edgepkd.measure.bench import Artifact, BenchOptions, BenchStore, _ms, bench, check_artifact, \
    format_table, now, plot_path, ram_bytes, resolve
from edgepkd.measure.devices import MIB, DeviceProfile
from edgepkd.rundir import RunDir, atomic_write_json, read_json


class NothingFits(EdgepkdError):
    """No candidate meets every budget; ``selection`` holds the candidates and why each lost."""

    exit_code = 1

    def __init__(self, message: str, selection: "Selection | None" = None):
        super().__init__(message)
        self.selection = selection


@dataclass
class Candidate:
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

    def violations(self, c: Candidate) -> dict[str, tuple[float, float, float]]:
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
    candidates: list[Candidate] = field(default_factory=list)
    choice: Candidate | None = None
    explanation: str = ""
    path: Path | None = None            # RUN/selection.json once ``record`` wrote it
    plot: Path | None = None            # RUN/bench/DEVICE.png (accuracy vs p50), when bench drew it

    def as_dict(self) -> dict:
        p = self.profile
        mode = ("tflite-micro: arena and accuracy measured, latency estimated" if p.runtime == "tflite-micro"
                else "estimated" if p.estimated else "measured")
        return {"device": p.name, "mode": mode, "runtime": p.runtime,
                "threads": p.threads, "connect": p.connect,
                "budget": {"latency_p90_ms": self.limits.latency_ms, "ram_mib": self.limits.ram_mib,
                           "storage_mib": self.limits.storage_mib, "min_accuracy": self.limits.min_accuracy},
                "choice": None if self.choice is None else self.choice.as_dict(),
                "why": self.explanation, "candidates": [c.as_dict() for c in self.candidates], "created": now()}


def _round_up(v: float, digits: int = 3) -> str:
    """``v`` rounded up to ``digits`` significant digits, so that a budget of that value admits ``v``."""
    step = 10.0 ** (math.floor(math.log10(v)) - digits + 1)
    return f"{math.ceil(v / step) * step:.{digits}g}"


def _fix(constraint: str, value: float) -> str:
    if constraint == "accuracy":
        return f"--min-accuracy {math.floor(value * 100) / 100:.2f} would admit it"
    option = {"latency": "--latency-ms", "RAM": "a profile with ram_mib >=",
              "storage": "a profile with storage_mib >="}[constraint]
    return f"{option} {_round_up(value)} would admit it"


def _value(constraint: str, v: float) -> str:
    return {"latency": f"p90 {_ms(v)} ms", "RAM": f"{v:.3g} MiB of RAM", "storage": f"{v:.3g} MiB of storage",
            "accuracy": f"accuracy {v:.2f}%"}[constraint]


def _limit(constraint: str, v: float) -> str:
    return {"latency": f"{_ms(v)} ms", "RAM": f"{v:g} MiB", "storage": f"{v:g} MiB", "accuracy": f"{v:g}%"}[constraint]


def _nothing_fits(sel: Selection) -> str:
    runnable = [c for c in sel.candidates if c.result is not None and c.accuracy is not None]
    head = f"nothing fits device '{sel.profile.name}' ({sel.limits.describe()})"
    if not runnable:
        errors = [c for c in sel.candidates if c.error]
        if errors:
            return f"{head}: none of the {len(sel.candidates)} candidates runs there; {errors[0].label}: {errors[0].error}"
        return f"{head}: no verified candidate (export without --no-verify)"
    single: dict[str, list[tuple[float, Candidate, tuple]]] = {}
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
                             f"{c.label}, reaches {value:.2f}% (floor {limit:g}%); {_fix(name, value)}")
            else:
                parts.append(f"{name} is binding: {c.label} meets every other budget but needs "
                             f"{_value(name, value)} (budget {_limit(name, limit)}); {_fix(name, value)}")
        return f"{head}: " + "; ".join(parts)
    closest = min(runnable, key=lambda c: max(x[2] for x in sel.limits.violations(c).values()))
    needs = " and ".join(f"{_value(n, v)} (budget {_limit(n, lim)})"
                         for n, (v, lim, _) in sel.limits.violations(closest).items())
    return f"{head}: every candidate misses two or more budgets; the closest, {closest.label}, needs {needs}"


def _violation(name: str, value: float, limit: float) -> str:
    if name == "accuracy":
        return f"below --min-accuracy: {value:.2f}% < {limit:g}%"
    why = {"latency": "too slow", "RAM": "too big (RAM)", "storage": "too big (storage)"}[name]
    return f"{why}: {_value(name, value)} > {_limit(name, limit)}"


def _dominates(a: Candidate, b: Candidate) -> bool:
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


def is_student(c: Candidate) -> bool:
    """A chain student or an ensemble prefix; not the teacher or a baseline (which pick weighs all the same)."""
    model = str(c.artifact.entry.get("model", ""))
    return model.startswith(("chain/", "ensemble["))


def candidates(run: Path, profile: DeviceProfile) -> list[Candidate]:
    if not (run / "export").is_dir():
        raise RunError(f"{run}: nothing exported yet; export first (edgepkd export {run} --target "
                       f"{profile.format}-fp32), or run edgepkd distill RECIPE --device {profile.name}")
    return [Candidate(a) for a in resolve([str(run)], profile)]


def pick(run_path: str, profile: DeviceProfile, *, latency_ms: float | None = None,
         min_accuracy: float | None = None, options: BenchOptions | None = None, run_bench: bool = True,
         log=print) -> Selection:
    """Gather candidates, bench the ones without a current result on this device, and choose."""
    run = Path(run_path)
    RunDir(run).require_complete()
    limits = Limits(latency_ms if latency_ms is not None else profile.budget.latency_ms, profile.budget.ram_mib,
                    profile.budget.storage_mib, min_accuracy)
    if limits.latency_ms <= 0:
        raise EdgepkdError(f"--latency-ms {latency_ms}: must be positive")
    sel = Selection(profile, limits, candidates(run, profile))
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
        outcome = bench([c.artifact for c in todo], profile, options, log=log)
        got = {id(a): r for a, r in outcome.results}
        err = {id(a): e for a, e in outcome.errors}
        for c in todo:
            c.result, c.error = got.get(id(c.artifact)), err.get(id(c.artifact))
    return choose(sel)


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


def render(sel: Selection) -> str:
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
    head = f"pick for device '{p.name}' ({p.runtime}, {mode}): {sel.limits.describe()}"
    table = format_table(["", "model", "target", "acc %", "p90 ms", "RAM MiB", "KiB", "pareto", "verdict"], rows,
                         right={3, 4, 5, 6})
    return f"{head}\n{table}"

