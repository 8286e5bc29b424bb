"""Early exit for an anytime ensemble, measured in the device's runtime.

The members of the largest prefix are exported one file each (``edgepkd export RUN --target T --model
ensemble-members``). On each test image they run one after another; after member k the running prefix
P_k = s · P_{k-1} + f_k (``models.ensemble.combine``, here in numpy) is checked, and the image exits at the
first k whose confidence, the maximum softmax probability of P_k, is at least θ. θ = 1 never exits early: the
answer is the full prefix's.

How it is timed: every image runs every member in order, and each member's step (input quantization, invoke,
output dequantization, the combine and the confidence check) is timed as it ran. Members whose input tensors
agree (shape, dtype, quantization: always, for members of one export target) share one prepared input, as a
device would quantize the image once; its cost is in the first member's step. An image's latency at θ is the
sum of its steps up to its exit member; a member after the exit would not have run. So one pass over the test
split gives the whole θ sweep. A reference model (by default the most accurate single student in the same
export folder) runs on the same image, just before the members or just after them, alternating per image, so
the two are compared side by side under the same machine load. The same trace gives the cascade whose last stage
is the reference (``cascade_sweep``): members 1..K, then the reference on the images none of them is sure of.

Chain cascade (``chain_cascade_sweep``): the run's other chain students ("stages"), timed beside the reference on
the same images, each on its own logits; an image runs one or two of them, cheapest first by their measured step,
and the reference only when none is sure (confidence >= θ). It is not the ensemble: it is the same exit
rule over the chain the run also trains, the classic cascade of one cheap and one accurate model.

Exit points (``exits``): the prefix sizes after which an image may leave, e.g. 3, 5, 7 of 7 members. Between two
exit points the members run as one graph, a segment (``ensemble[1..3]`` is prefix 3; ``ensemble[4..5]`` is
members 4 and 5 combined as ``combine`` weighs them inside the segment, ``compress.export.ensemble_segment``), and
the runner adds it to the damped prefix before it: P_b = s^(b-a+1) · P_(a-1) + segment(a..b). Fewer invokes pay
less of the runtime's fixed cost per invoke (in ai_edge_litert here the smallest MNIST member's whole step took
0.048 ms against chain/s1's 0.128 ms: mostly that cost), at the price of fewer chances to leave. Default: every member is an exit point.

Everything here needs only numpy and the runtime (compress/runtimes.py's adapters), as on the device.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

# Up to 1 - 1e-6 below 1: members distilled from a teacher are often this sure, so a grid that stops at 0.999
# leaves only θ = 1 (no exit) for the accuracy of the most accurate student (issue #15)
DEFAULT_THETAS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 0.99999, 0.999999, 1.0)


def confidence(logits) -> float:
    """Maximum softmax probability of one logit vector (K,), in float64: 1 / sum(exp(z - max z)).

    It runs once per member and image inside the timed step, where a device computes it in a few instructions;
    numpy's per-call overhead on a 10-vector (about 5 to 10 µs here, as much as a small member's invoke) would be
    the host's cost, not the device's. So small vectors go through Python floats (about 1 µs), large ones
    through numpy; both are float64."""
    z = logits.tolist() if hasattr(logits, "tolist") else list(logits)
    if len(z) <= 64:
        top = max(z)
        return 1.0 / math.fsum(math.exp(v - top) for v in z)
    import numpy as np

    a = np.asarray(z, dtype=np.float64)
    return float(1.0 / np.exp(a - a.max()).sum())


@dataclass
class Trace:
    """Per image and member: the time of member k's step (s), the prefix's prediction and confidence."""

    step_s: "object"        # (N, M) float64
    pred: "object"          # (N, M) int
    conf: "object"          # (N, M) float64
    ref_s: "object"         # (N,) float64, or None without a reference
    ref_pred: "object"      # (N,) int, or None
    stage_s: "object" = None     # (N, S) float64: each chain stage's own step (prepare, invoke, logits, confidence)
    stage_pred: "object" = None  # (N, S) int: each stage's own prediction
    stage_conf: "object" = None  # (N, S) float64: each stage's own confidence


def trace(members: list, x, shrinkage, reference=None, repeats: int = 3, stages: list = ()) -> Trace:
    """Run ``members`` (runtime adapters: prepare/run/logits) in order on every image of ``x`` (N, C, H, W)
    float32, and ``reference`` and the chain ``stages`` (adapters, each on its own) beside them, ``repeats``
    passes; each step's time is its median over the passes (one pass alone catches page faults and scheduler
    hiccups in single images). ``shrinkage``: the factor on the prefix before each step adds its logits, one
    float for all steps (one member each) or one per step (segments: s to the power of the segment's length)."""
    import numpy as np

    passes = [_trace_once(members, x, shrinkage, reference, stages) for _ in range(max(1, repeats))]
    first = passes[0]
    return Trace(np.median([p.step_s for p in passes], axis=0), first.pred, first.conf,
                 None if reference is None else np.median([p.ref_s for p in passes], axis=0), first.ref_pred,
                 np.median([p.stage_s for p in passes], axis=0) if stages else None, first.stage_pred,
                 first.stage_conf)


def _trace_once(members: list, x, shrinkage, reference=None, stages: list = ()) -> Trace:
    import numpy as np

    from edgepkd.models.ensemble import combine

    n, m, s = len(x), len(members), len(stages)
    scales = [float(shrinkage)] * m if isinstance(shrinkage, (int, float)) else [float(v) for v in shrinkage]
    step_s, pred = np.zeros((n, m)), np.zeros((n, m), dtype=np.int64)
    conf = np.zeros((n, m))
    ref_s = np.zeros(n) if reference is not None else None
    ref_pred = np.zeros(n, dtype=np.int64) if reference is not None else None
    stage_s, stage_pred, stage_conf = np.zeros((n, s)), np.zeros((n, s), dtype=np.int64), np.zeros((n, s))
    clock = time.perf_counter
    shared = all(mdl.io()["input"] == members[0].io()["input"] for mdl in members)

    def run_reference(i):
        t0 = clock()
        out = reference.logits(reference.run(reference.prepare(x[i:i + 1])))     # (1, K)
        ref_s[i] = clock() - t0
        ref_pred[i] = int(out[0].argmax())
        for j, stage in enumerate(stages):   # each on its own: its own input, its own logits
            t0 = clock()
            out = stage.logits(stage.run(stage.prepare(x[i:i + 1])))             # (1, K)
            c = confidence(out[0])
            stage_s[i, j] = clock() - t0
            stage_pred[i, j], stage_conf[i, j] = int(out[0].argmax()), c

    for i in range(n):
        if reference is not None and i % 2 == 0:
            run_reference(i)
        prefix = inp = None
        for k, model in enumerate(members):
            t0 = clock()
            if inp is None or not shared:
                inp = model.prepare(x[i:i + 1])                                    # (1, C, H, W) runtime dtype
            f = model.logits(model.run(inp))                                       # (1, K)
            prefix = f if prefix is None else combine([prefix, f], scales[k])      # (1, K)
            c = confidence(prefix[0])
            step_s[i, k] = clock() - t0
            conf[i, k], pred[i, k] = c, int(prefix[0].argmax())
        if reference is not None and i % 2 == 1:
            run_reference(i)
    return Trace(step_s, pred, conf, ref_s, ref_pred, stage_s, stage_pred, stage_conf)


def exits(tr: Trace, theta: float):
    """Index of each image's exit member at ``theta`` (N,): the first k with confidence >= theta; the last
    member when none is, and always when theta >= 1."""
    import numpy as np

    last = tr.conf.shape[1] - 1
    if theta >= 1.0:
        return np.full(len(tr.conf), last)
    hit = tr.conf >= theta                                                         # (N, M)
    return np.where(hit.any(1), hit.argmax(1), last)


def sweep(tr: Trace, labels, thetas=DEFAULT_THETAS) -> list[dict]:
    """One row per θ: accuracy, mean / p50 / p90 latency (ms), members run on average, and the worst case."""
    import numpy as np

    cum = np.cumsum(tr.step_s, axis=1)                                             # (N, M)
    rows = []
    for theta in thetas:
        k = exits(tr, theta)
        lat = cum[np.arange(len(k)), k] * 1e3                                      # (N,) ms
        rows.append({"theta": float(theta), "accuracy": 100.0 * float((tr.pred[np.arange(len(k)), k] == labels)
                                                                        .mean()),
                     "mean_ms": float(lat.mean()), "p50_ms": float(np.percentile(lat, 50)),
                     "p90_ms": float(np.percentile(lat, 90)), "max_ms": float(lat.max()),
                     "mean_members": float(k.mean() + 1),
                     "exit_histogram": np.bincount(k, minlength=cum.shape[1]).tolist()})
    return rows


def _staged(step_s, pred, conf, ref_s, ref_pred, labels, theta: float) -> dict:
    """One cascade at θ: stages (the columns of ``step_s``, ``pred``, ``conf``, (N, K), in the order they run),
    each image leaving at the first stage whose confidence reaches θ, the reference after the last one otherwise
    (θ >= 1: always). Accuracy, latency (the steps that ran, ms), the share reaching the reference, and the worst
    case (every stage and the reference)."""
    import numpy as np

    n, k = conf.shape
    idx = np.arange(n)
    cum = np.cumsum(step_s, axis=1)                                                # (N, K)
    hit = conf >= theta if theta < 1.0 else np.zeros((n, k), dtype=bool)           # (N, K)
    exited, at = hit.any(1), hit.argmax(1)                                         # (N,), (N,)
    lat = np.where(exited, cum[idx, at], cum[:, -1] + ref_s) * 1e3                 # (N,) ms
    out = np.where(exited, pred[idx, at], ref_pred)                                # (N,)
    worst = (cum[:, -1] + ref_s) * 1e3                                             # (N,) ms
    return {"theta": float(theta), "accuracy": 100.0 * float((out == labels).mean()), "mean_ms": float(lat.mean()),
            "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
            "max_ms": float(lat.max()), "reference_share": float(1.0 - exited.mean()),
            "worst": {"mean": float(worst.mean()), "p90": float(np.percentile(worst, 90)), "max": float(worst.max())}}


def cascade_sweep(tr: Trace, labels, thetas=DEFAULT_THETAS, members: list[str] | None = None,
                  reference: str | None = None) -> list[dict]:
    """Early exit with the reference as the last stage: members 1..K run as in ``sweep``; an image on which no
    prefix k <= K reaches θ then runs the reference and takes its answer (a device runs the small members first
    and the single student only on the images they are unsure of). One row per (K, θ), K < M, from the same
    trace: the reference's time on an image is the one measured beside the members. θ = 1 runs the reference on
    every image after K members: its accuracy, K members slower. With the names of the ``members`` and the
    ``reference``, each row lists the models it loads (``stages``), as ``pick`` needs."""
    m = tr.conf.shape[1]
    rows = []
    for after in range(1, m):
        for theta in thetas:
            row = {"after": after, **_staged(tr.step_s[:, :after], tr.pred[:, :after], tr.conf[:, :after],
                                             tr.ref_s, tr.ref_pred, labels, theta)}
            if members is not None and reference is not None:
                row["stages"] = [*members[:after], reference]
            rows.append(row)
    return rows


def chain_cascade_sweep(tr: Trace, labels, names: list[str], reference: str, thetas=DEFAULT_THETAS,
                        most: int = 2) -> list[dict]:
    """The chain cascade: one or two (``most``) of the single students ``names`` (the trace's stages, each on its
    own logits), cheapest first by their measured mean step, then the reference on the images none of them is
    sure of. One row per stage set and θ, each with its ``stages`` (the reference last)."""
    import itertools

    import numpy as np

    order = sorted(range(len(names)), key=lambda j: float(np.mean(tr.stage_s[:, j])))
    rows = []
    for size in range(1, min(most, len(names)) + 1):
        for chosen in itertools.combinations(order, size):   # keeps the cheapest-first order
            cols = list(chosen)
            for theta in thetas:
                rows.append({"stages": [*(names[j] for j in cols), reference],
                             **_staged(tr.stage_s[:, cols], tr.stage_pred[:, cols], tr.stage_conf[:, cols],
                                       tr.ref_s, tr.ref_pred, labels, theta)})
    return rows


def choose(rows: list[dict], mean_ms: float | None = None, min_accuracy: float | None = None) -> dict | None:
    """The most accurate θ whose mean latency fits ``mean_ms`` (ties: the faster); with ``min_accuracy``
    instead, the fastest θ that reaches it. None when nothing fits."""
    fit = [r for r in rows if (mean_ms is None or r["mean_ms"] <= mean_ms)
           and (min_accuracy is None or r["accuracy"] >= min_accuracy)]
    if not fit:
        return None
    if min_accuracy is not None and mean_ms is None:
        return min(fit, key=lambda r: (r["mean_ms"], -r["accuracy"]))
    return max(fit, key=lambda r: (r["accuracy"], -r["mean_ms"]))


def segments(exits, m: int) -> list[tuple[int, int]]:
    """The segments (first, last member, 1-based) that run between the exit points ``exits`` of an m-member
    ensemble; the last member is always one (appended when missing). A ConfigError names a bad list."""
    from edgepkd.errors import ConfigError

    exits = [int(e) for e in exits]
    points = sorted(set(exits))
    if not points or points[0] < 1 or points[-1] > m or len(points) != len(exits):
        raise ConfigError(f"--exits {','.join(str(e) for e in exits)}: give distinct prefix sizes between 1 and "
                          f"{m} (the ensemble's members), e.g. 3,5,{m}")
    if points[-1] != m:
        points.append(m)
    return [(a + 1, b) for a, b in zip([0, *points[:-1]], points)]


def fused_exits(res: dict) -> list[int] | None:
    """A result's exit points when some members ran fused (segments), else None (every member an exit point);
    results written before exit points existed have every member as one."""
    if len(res.get("ensemble", res["members"])) == len(res["members"]):
        return None
    return res["exits"]


def every_step(res: dict) -> str:
    """'all 7 members', or 'all 3 segments (7 members)': what the worst case runs."""
    n = len(res["members"])
    return f"all {n} members" if fused_exits(res) is None else f"all {n} segments ({len(res['ensemble'])} members)"


def segment_name(first: int, last: int, members: list[str]) -> str:
    """The model one segment exports as: a member itself, prefix ``ensemble[1..b]``, or ``ensemble[a..b]``."""
    if first == last:
        return members[first - 1]
    return f"ensemble[{first}..{last}]"


def segment_entries(folder: Path, members: list[str], spans: list[tuple[int, int]]) -> tuple[list[dict],
                                                                                            list[dict]]:
    """(the manifest entries of the segments ``spans`` in order, the entries that are none of the ensemble's)
    of an export folder: a segment's entry is the one whose members are the segment's."""
    from edgepkd.errors import RunError

    manifest = folder / "manifest.json"
    entries = json.loads(manifest.read_text())["artifacts"] if manifest.is_file() else []
    found, missing = [], []
    for a, b in spans:
        want = members[a - 1:b]
        hit = [e for e in entries if e.get("members") == want and (folder / e["file"]).is_file()]
        hit.sort(key=lambda e: "ensemble_member" not in e)                 # a member's own tagged entry first
        if hit:
            found.append(hit[0])
        else:
            missing.append(segment_name(a, b, members))
    if missing:
        raise RunError(f"{folder}: segments not exported: {', '.join(missing)}; run edgepkd export "
                       f"{folder.parent.parent} --target {folder.name} " + " ".join(f"--model '{n}'" for n in missing))
    used = {e["file"] for e in found}
    ensemble = set(members)
    return found, [e for e in entries if e["file"] not in used and "ensemble_member" not in e
                   and not set(e.get("members") or []) & ensemble]


def member_entries(folder: Path) -> tuple[list[dict], list[dict]]:
    """(the ensemble's member entries in order, the other entries) of an export folder's manifest."""
    from edgepkd.errors import RunError

    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise RunError(f"{folder}: no manifest.json; export first (edgepkd export RUN --target {folder.name} "
                       "--model ensemble-members)")
    entries = json.loads(manifest.read_text())["artifacts"]
    members = sorted((e for e in entries if "ensemble_member" in e), key=lambda e: e["ensemble_member"]["index"])
    if not members:
        raise RunError(f"{folder}: no ensemble members exported; run edgepkd export {folder.parent.parent} "
                       f"--target {folder.name} --model ensemble-members")
    want = members[0]["ensemble_member"]["members"]
    if [e["model"] for e in members] != want:
        missing = [m for m in want if m not in {e["model"] for e in members}]
        raise RunError(f"{folder}: ensemble members missing from the export: {', '.join(missing)}; export them "
                       "again with --model ensemble-members")
    return members, [e for e in entries if "ensemble_member" not in e]


def result_path(run: Path, target: str) -> Path:
    return Path(run) / "bench" / f"early-exit-{target}.json"


_RAM_CHILD = """
import json, os, sys
from edgepkd.compress import runtimes as r
paths, threads, shape = json.loads(sys.argv[1])
r.import_runtime(r.artifact_format(paths[0]), "auto")   # before the baseline, as the runner does
import numpy as np

def rss():   # current RSS: a child's peak RSS can start at its parent's (kept across exec), so not the peak
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

base = rss()
models = [r.open_model(p, threads) for p in paths]
for m in models:
    m.run(m.prepare(np.zeros(shape, dtype=np.float32)))
print(json.dumps(max(rss() - base, 0)))
"""


def members_ram_bytes(paths: list[str], threads: int, input_shape: list[int]) -> int | None:
    """RAM of all members loaded at once, in a fresh child process: the growth of its resident set from just
    before the models are opened (runtime and numpy imported, as bench's runner does) to after one run of each
    (Linux /proc; None elsewhere or when the child fails)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _RAM_CHILD, json.dumps([paths, threads, input_shape])],
                          capture_output=True, text=True, timeout=300)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    except (ValueError, IndexError):
        return None


def measure(run_path: str, target: str, *, reference: str | None = None, thetas=DEFAULT_THETAS,
            threads: int = 1, limit: int | None = None, repeats: int = 3, data_dir: str | None = None,
            device: str | None = None, chain: bool = True, exits=None, log=print) -> dict:
    """Trace the run's exported ensemble members (export folder ``target``) on the test split in this machine's
    runtime, sweep θ, and write ``RUN/bench/early-exit-<target>.json``. ``reference``: the single model timed
    beside them (default: the most accurate chain student exported there). ``device``: the name of the (local)
    device profile whose settings (``threads``) this measures, recorded so that ``pick`` knows what it is for.
    ``chain``: also time the other chain students exported there (verified ones) beside the reference, for
    ``chain_cascade_sweep``. ``exits``: the exit points (prefix sizes; default every member), each segment
    between two of them one exported graph (see the module docstring).

    Every member file is checked against its manifest entry first (size and sha256; the result records them, so
    a member exported again later makes the result stale for ``pick``). RAM: ``members_ram_bytes``, all members
    loaded at once in a child process, and for each cascade row its own stages (``ram_bytes`` in the row)."""
    import numpy as np

    from edgepkd.errors import RunError
    from edgepkd.measure.bench import Artifact, check_artifact, test_images
    from edgepkd.compress.runtimes import open_model
    from edgepkd.measure.runner import preprocess
    from edgepkd.report import load_metrics
    from edgepkd.rundir import atomic_write_json

    run = Path(run_path)
    folder = run / "export" / target
    if exits is None:
        members, others = member_entries(folder)
        ensemble = members[0]["ensemble_member"]["members"]
        shrinkage = members[0]["ensemble_member"]["shrinkage"]
        spans = [(k, k) for k in range(1, len(members) + 1)]
    else:
        last = load_metrics(run)["ensemble_prefixes"][-1]
        ensemble, shrinkage = last["members"], last.get("shrinkage", 1.0)
        spans = segments(exits, len(ensemble))
        members, others = segment_entries(folder, ensemble, spans)
    scales = [shrinkage ** (b - a + 1) for a, b in spans]                        # on the prefix before each step
    for e in members:
        check_artifact(Artifact(folder / e["file"], e, target, run))
    singles = [e for e in others if str(e.get("model", "")).startswith("chain/")]
    if reference is not None:
        singles = [e for e in others if reference in (e["model"], Path(e["file"]).stem)]
        if not singles:
            raise RunError(f"--reference {reference}: not exported in {folder} (exported: "
                           f"{', '.join(e['model'] for e in others) or 'nothing else'})")
    ref = max(singles, key=lambda e: e.get("verification", {}).get("accuracy") or -1) if singles else None
    stages = [] if ref is None or not chain else [
        e for e in others if str(e.get("model", "")).startswith("chain/") and e["model"] != ref["model"]
        and e.get("verification", {}).get("passed") and (folder / e["file"]).is_file()]
    for e in stages + ([ref] if ref is not None else []):
        check_artifact(Artifact(folder / e["file"], e, target, run))
    with np.load(test_images(run, data_dir, log)) as z:
        images, labels = z["images"], z["labels"]
    if limit:
        images, labels = images[:limit], labels[:limit]
    x = preprocess(images, members[0]["preprocessing"])                           # (N, C, H, W) float32
    ram = members_ram_bytes([str(folder / e["file"]) for e in members], threads, list(x[:1].shape))
    models = [open_model(str(folder / e["file"]), threads) for e in members]
    ref_model = open_model(str(folder / ref["file"]), threads) if ref is not None else None
    stage_models = [open_model(str(folder / e["file"]), threads) for e in stages]
    for mdl in models + ([ref_model] if ref_model else []) + stage_models:        # warm up every interpreter
        mdl.run(mdl.prepare(x[:1]))
    log(f"early exit: {len(members)} {'members' if len(members) == len(ensemble) else 'segments'} of {target}, "
        f"{len(x)} test images"
        + (f", beside {ref['model']}" if ref else "")
        + (f" and {', '.join(e['model'] for e in stages)} (chain cascade)" if stages else ""))
    tr = trace(models, x, scales, ref_model, repeats, stage_models)
    rows = sweep(tr, labels, thetas)
    all_ms = tr.step_s.sum(1) * 1e3                                               # (N,)
    out = {"run": str(run), "target": target, "format": members[0].get("format"),
           "precision": members[0].get("precision"), "device": device,
           "runtime": f"{models[0].runtime} {models[0].version}",
           "threads": threads, "images": int(len(x)), "repeats": repeats, "members": [e["model"] for e in members],
           "ensemble": list(ensemble), "exits": [b for _, b in spans],
           "files": [{"file": e["file"], "bytes": e["bytes"], "sha256": e["sha256"]} for e in members],
           "ram_bytes": ram,
           "shrinkage": shrinkage, "sweep": rows,
           "member_step_ms": (tr.step_s.mean(0) * 1e3).tolist(),
           "full_prefix_accuracy": 100.0 * float((tr.pred[:, -1] == labels).mean()),
           "all_members_ms": {"mean": float(all_ms.mean()), "p90": float(np.percentile(all_ms, 90)),
                              "max": float(all_ms.max())},                     # the worst case: no exit
           "timing": "per image, each member's step timed as it ran (median of the passes); latency at θ = "
                     "the steps up to the exit"}
    if ref is not None:
        lat = tr.ref_s * 1e3
        out["reference"] = {"model": ref["model"], "file": ref["file"],
                            "accuracy": 100.0 * float((tr.ref_pred == labels).mean()),
                            "mean_ms": float(lat.mean()), "p50_ms": float(np.percentile(lat, 50)),
                            "p90_ms": float(np.percentile(lat, 90))}
        out["at_reference_accuracy"] = _at(rows, out["reference"])
        single = {e["model"]: e for e in [ref, *stages]}
        out["stage_files"] = {name: {"file": e["file"], "bytes": e["bytes"], "sha256": e["sha256"]}
                              for name, e in single.items()}
        out["cascade"] = cascade_sweep(tr, labels, thetas, [e["model"] for e in members], ref["model"])
        out["cascade_at_reference_accuracy"] = _at(out["cascade"], out["reference"])
        if stages:
            out["stage_step_ms"] = dict(zip((e["model"] for e in stages), (tr.stage_s.mean(0) * 1e3).tolist()))
            out["stage_accuracy"] = {e["model"]: 100.0 * float((tr.stage_pred[:, j] == labels).mean())
                                     for j, e in enumerate(stages)}
            out["chain_cascade"] = chain_cascade_sweep(tr, labels, [e["model"] for e in stages], ref["model"],
                                                       thetas)
            out["chain_cascade_at_reference_accuracy"] = _at(out["chain_cascade"], out["reference"])
        # RAM per cascade: its stages loaded at once (members_ram_bytes), once per distinct stage set
        path_of = {**{e["model"]: e["file"] for e in members}, **{n: e["file"] for n, e in single.items()}}
        ram: dict[tuple, int | None] = {}
        for row in [*out["cascade"], *out.get("chain_cascade", [])]:
            key = tuple(row["stages"])
            if key not in ram:
                ram[key] = members_ram_bytes([str(folder / path_of[n]) for n in key], threads, list(x[:1].shape))
            row["ram_bytes"] = ram[key]
    atomic_write_json(result_path(run, target), out)
    return out


def _at(rows: list[dict], reference: dict) -> dict | None:
    """The fastest row at the reference's accuracy, with its mean over the reference's."""
    best = choose(rows, min_accuracy=reference["accuracy"])
    return None if best is None else {**best, "mean_ratio": best["mean_ms"] / reference["mean_ms"]}


def load_result(path: Path) -> dict:
    """RUN/bench/early-exit-TARGET.json as ``measure`` wrote it, checked; anything else is a one-line RunError
    naming the file and how to fix it."""
    from edgepkd.errors import RunError
    from edgepkd.rundir import read_json

    path = Path(path)
    target = path.stem[len("early-exit-"):]
    fix = (f"measure it again (edgepkd early-exit {path.parent.parent} --target {target}), or move it away "
           "(edgepkd pick --no-early-exit ignores it)")
    res = read_json(path, {"target": str, "format": str, "precision": str, "threads": int, "images": int,
                           "members": list, "files": list, "sweep": list, "all_members_ms": dict},
                    "an early-exit result", fix)
    number = (int, float)
    if not res["sweep"] or not all(isinstance(r, dict) and all(isinstance(r.get(k), number) for k in
                                                                 ("theta", "accuracy", "mean_ms", "p90_ms", "max_ms"))
                                   for r in res["sweep"]):
        raise RunError(f"{path}: not an early-exit result edgepkd wrote (sweep rows need theta, accuracy, mean_ms, "
                       f"p90_ms, max_ms); {fix}")
    if not all(isinstance(res["all_members_ms"].get(k), number) for k in ("mean", "p90", "max")):
        raise RunError(f"{path}: not an early-exit result edgepkd wrote (all_members_ms needs mean, p90, max); {fix}")
    if len(res["files"]) != len(res["members"]) or not all(
            isinstance(f, dict) and isinstance(f.get("file"), str) and isinstance(f.get("sha256"), str)
            and isinstance(f.get("bytes"), int) for f in res["files"]):
        raise RunError(f"{path}: not an early-exit result edgepkd wrote (files needs file, bytes, sha256 per "
                       f"member); {fix}")
    stage_files = res.get("stage_files", {})
    if not isinstance(stage_files, dict):
        raise RunError(f"{path}: not an early-exit result edgepkd wrote (stage_files must map each model to its "
                       f"file); {fix}")
    known = {m for m in res["members"] if isinstance(m, str)} | set(stage_files)
    for key in ("cascade", "chain_cascade"):
        rows = res.get(key, [])
        ok = isinstance(rows, list) and all(
            isinstance(r, dict) and all(isinstance(r.get(k), number) for k in ("theta", "accuracy", "mean_ms",
                                                                               "p90_ms", "max_ms"))
            and (r.get("ram_bytes") is None or isinstance(r["ram_bytes"], int))
            and (("stages" not in r and key == "cascade") or (
                isinstance(r.get("stages"), list) and all(isinstance(n, str) for n in r["stages"])
                and set(r["stages"]) <= known
                and isinstance(r.get("worst"), dict) and all(isinstance(r["worst"].get(k), number)
                                                             for k in ("mean", "p90", "max"))))
            for r in rows)
        if not ok:
            raise RunError(f"{path}: not an early-exit result edgepkd wrote ({key} rows need theta, accuracy, "
                           f"mean_ms, p90_ms, max_ms, and stages among the members and stage_files, with their "
                           f"worst case); {fix}")
    if not all(isinstance(f, dict) and all(isinstance(f.get(k), t) for k, t in (("file", str), ("bytes", int),
                                                                                  ("sha256", str)))
               for f in stage_files.values()):
        raise RunError(f"{path}: not an early-exit result edgepkd wrote (stage_files needs file, bytes, sha256 per "
                       f"model); {fix}")
    return res


def render_early_exit(res: dict, picked: dict | None = None) -> str:
    """The θ sweep as a table, the worst case (every member), and the reference beside it."""
    on = f" for device '{res['device']}'" if res.get("device") else ""
    every, fused = every_step(res), fused_exits(res)
    exits = "" if fused is None else f", exits after {', '.join(str(e) for e in fused)}"
    lines = [f"early exit: {' -> '.join(res['members'])} (shrinkage {res['shrinkage']:g}{exits}), {res['target']}, "
             f"{res['runtime']}, {res['threads']} thread(s){on}, {res['images']} test images"]
    lines.append(f"{'theta':>7} {'acc %':>7} {'mean ms':>8} {'p50 ms':>8} {'p90 ms':>8} {'max ms':>8} "
                 f"{'members' if not exits else 'segments':>8}")
    for r in res["sweep"]:
        mark = "  <- picked" if picked is not None and r["theta"] == picked["theta"] else ""
        lines.append(f"{r['theta']:>7g} {r['accuracy']:>7.2f} {r['mean_ms']:>8.4f} {r['p50_ms']:>8.4f} "
                     f"{r['p90_ms']:>8.4f} {r['max_ms']:>8.4f} {r['mean_members']:>8.2f}{mark}")
    worst = res["all_members_ms"]
    lines.append(f"worst case, {every} (no exit): mean {worst['mean']:.4f} ms, p90 "
                 f"{worst['p90']:.4f} ms, max {worst['max']:.4f} ms")
    if res.get("reference"):
        ref = res["reference"]
        lines.append(f"reference {ref['model']}: acc {ref['accuracy']:.2f} %, mean {ref['mean_ms']:.4f} ms, "
                     f"p90 {ref['p90_ms']:.4f} ms (same images, same run)")
        at = res.get("at_reference_accuracy")
        lines.append("at the reference's accuracy: " + ("no θ reaches it" if at is None else
                     f"θ = {at['theta']:g}, acc {at['accuracy']:.2f} %, mean {at['mean_ms']:.4f} ms = "
                     f"{at['mean_ratio']:.2f}x the reference's"))
        at = res.get("cascade_at_reference_accuracy")
        if "cascade" in res:
            lines.append(f"with {ref['model']} as the last stage (members 1..K, then {ref['model']} on the images "
                         "none of them is sure of), at its accuracy: " + (
                             "no K and θ reach it" if at is None else
                             f"K = {at['after']}, θ = {at['theta']:g}, acc {at['accuracy']:.2f} %, mean "
                             f"{at['mean_ms']:.4f} ms = {at['mean_ratio']:.2f}x, p90 {at['p90_ms']:.4f} ms, "
                             f"{100 * at['reference_share']:.1f} % of the images reach {ref['model']}"))
        if res.get("chain_cascade"):
            lines.extend(_render_chain_cascade(res))
    if picked is not None:
        lines.append(f"picked θ = {picked['theta']:g}: mean {picked['mean_ms']:.4f} ms, acc "
                     f"{picked['accuracy']:.2f} %; worst case, {every}: p90 "
                     f"{worst['p90']:.4f} ms, max {worst['max']:.4f} ms")
    return "\n".join(lines)


def _render_chain_cascade(res: dict) -> list[str]:
    """The chain cascade: each stage on its own, then per stage set its fastest θ at the reference's accuracy."""
    ref = res["reference"]
    lines = [f"chain cascade (cheaper chain students first, each on its own logits, then {ref['model']} on the images "
             "none of them is sure of):",
             "  alone: " + ", ".join(f"{name} {res['stage_accuracy'][name]:.2f} % {ms:.4f} ms"
                                     for name, ms in res["stage_step_ms"].items())]
    sets: dict[tuple, list[dict]] = {}
    for r in res["chain_cascade"]:
        sets.setdefault(tuple(r["stages"]), []).append(r)
    best = []
    for stages, rows in sets.items():
        at = choose(rows, min_accuracy=ref["accuracy"])
        best.append((at["mean_ms"] if at else float("inf"), stages, at))
    for _, stages, at in sorted(best, key=lambda b: b[0])[:8]:
        lines.append(f"  {' -> '.join(stages)}: " + ("no θ reaches the reference's accuracy" if at is None else
                     f"θ = {at['theta']:g}, acc {at['accuracy']:.2f} %, mean {at['mean_ms']:.4f} ms = "
                     f"{at['mean_ms'] / ref['mean_ms']:.2f}x, p90 {at['p90_ms']:.4f} ms, "
                     f"{100 * at['reference_share']:.1f} % reach {ref['model']}"))
    at = res.get("chain_cascade_at_reference_accuracy")
    lines.append("chain cascade at the reference's accuracy: " + (
        "no stage set and θ reach it" if at is None else
        f"{' -> '.join(at['stages'])}, θ = {at['theta']:g}, mean {at['mean_ratio']:.2f}x the reference's"))
    return lines
