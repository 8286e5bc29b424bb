"""Issue #15's early-exit goal, measured: the anytime ensemble run member by member in TFLite (1 thread), against
the most accurate single student timed beside it on the same test images.

    python benchmarks/early_exit.py runs/mnist --data-dir ../shared/data          # tflite-fp32
    python benchmarks/early_exit.py runs/digits --target tflite-int8
    python benchmarks/early_exit.py runs/mnist --data-dir ../shared/data --exits all --exits 3,5,7 --exits 3,7

The same library call as ``edgepkd early-exit RUN --target T`` (``edgepkd.workflow.early_exit``: exports what
is missing, the ensemble's members and the most accurate chain student, verified as any export, then
``edgepkd.measure.early_exit.measure``), plus the goal's verdict and a results file. Goal: at the best single
student's accuracy, the ensemble's mean latency is at most 0.7x that student's; checked for the ensemble alone, for
the cascade whose last stage is that student (``early_exit.cascade_sweep``), and for the chain cascade (one or two
cheaper chain students, then that student: ``early_exit.chain_cascade_sweep``; not the ensemble). Results:
benchmarks/results/early-exit-<run name>.{md,json}.

``--exits`` (repeatable): exit-point sets measured one after another, each a full run of ``edgepkd early-exit
--exits`` with the reference timed beside it (``all``: every member, the default); the chain cascade is timed with
the first set only. The table compares them at the reference's accuracy; the run's bench/early-exit-TARGET.json
is left holding the set that was fastest there (what ``edgepkd pick`` reads).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepkd.rundir import atomic_write_json, atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--target", default="tflite-fp32")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--targets-dir", default=None, help="more export targets (YAML), as edgepkd export takes")
    ap.add_argument("--repeats", type=int, default=3, help="passes over the test split (median per step)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N test images")
    ap.add_argument("--exits", action="append", default=None, metavar="LIST",
                    help="an exit-point set, e.g. 3,5,7, or 'all' (every member; default); repeatable")
    args = ap.parse_args(argv)

    from edgepkd import workflow
    from edgepkd.measure import early_exit as ee
    from edgepkd.rundir import atomic_write_json as write_result

    run = Path(args.run)
    sets = [None if e == "all" else [int(v) for v in e.split(",")] for e in (args.exits or ["all"])]
    # what edgepkd early-exit does: export the missing members (segments) and the reference (the most accurate
    # chain student), then measure; the chain cascade with the first set only (it does not depend on the set)
    measured = []
    for i, exits in enumerate(sets):
        r = workflow.early_exit(run, args.target, targets_dir=[args.targets_dir] if args.targets_dir else (),
                                repeats=args.repeats, limit=args.limit, data_dir=args.data_dir, exits=exits,
                                chain=i == 0)
        measured.append(r)
        print(ee.render_early_exit(r))
    ratio = lambda r: (r.get("at_reference_accuracy") or {}).get("mean_ratio", float("inf"))  # noqa: E731
    best = min(measured, key=ratio)
    res = measured[0]
    if len(measured) > 1:
        write_result(ee.result_path(run, args.target), best)      # pick reads the fastest set's result
    text = "\n\n".join(ee.render_early_exit(r) for r in measured)
    at = best.get("at_reference_accuracy")
    goal = at is not None and at["mean_ratio"] <= 0.7
    cas = res.get("cascade_at_reference_accuracy")
    cascade_goal = cas is not None and cas["mean_ratio"] <= 0.7
    chain = res.get("chain_cascade_at_reference_accuracy")
    chain_goal = (chain is not None and chain["mean_ratio"] <= 0.7) if "chain_cascade" in res else None
    cmd = shlex.join(["python", "benchmarks/early_exit.py", *(argv if argv is not None else sys.argv[1:])])
    table = ["| exit points | steps | θ at the reference's accuracy | acc (%) | mean ms | reference mean ms | "
             "mean / reference | p90 ms | max ms | no exit: mean ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in measured:
        a = r.get("at_reference_accuracy")
        cells = ["—"] * 7 if a is None else [f"{a['theta']:g}", f"{a['accuracy']:.2f}", f"{a['mean_ms']:.4f}",
                                             f"{r['reference']['mean_ms']:.4f}", f"{a['mean_ratio']:.2f}x",
                                             f"{a['p90_ms']:.4f}", f"{a['max_ms']:.4f}"]
        table.append(f"| {', '.join(str(e) for e in r['exits'])} | {len(r['members'])} | " + " | ".join(cells)
                     + f" | {r['all_members_ms']['mean']:.4f} |")
    exits_of = lambda r: ", ".join(str(e) for e in r["exits"])  # noqa: E731
    md = [f"# Early exit: {run.name} ({args.target})", "",
          f"Produced by `{cmd}` on {dt.date.today().isoformat()}. {res['timing']}; {res['repeats']} passes"
          + (", one exit-point set after another, each beside its own timing of the reference" if len(measured) > 1
             else "") + ".", "", *table, "",
          "```", text, "```", "",
          f"Goal (issue #15): at the best single student's accuracy, mean latency <= 0.7x that student's: "
          + ("**met**" if goal else "**not met**")
          + ("" if at is None else f" ({at['mean_ratio']:.2f}x at θ = {at['theta']:g}"
             + (f", exit points {exits_of(best)}" if len(measured) > 1 else "") + ")") + " by the ensemble "
          "alone; with that student as the cascade's last stage (members 1..K, then the student on the images none "
          "of them is sure of): " + ("**met**" if cascade_goal else "**not met**")
          + ("" if cas is None else f" ({cas['mean_ratio']:.2f}x at K = {cas['after']}, θ = {cas['theta']:g})")
          + ". The chain cascade (one or two cheaper chain students, each on its own, then that student; not the "
          "ensemble): " + ("**met**" if chain_goal else "**not met**" if "chain_cascade" in res else "not measured")
          + ("" if chain is None else f" ({chain['mean_ratio']:.2f}x with {' -> '.join(chain['stages'])}, "
                                      f"θ = {chain['theta']:g})") + ".", ""]
    stem = f"early-exit-{run.name}"
    # a run directory's own path is this machine's: the results keep runs/<name>, as the command is documented
    atomic_write_json(RESULTS / f"{stem}.json", {**res, "run": f"runs/{run.name}", "command": cmd, "goal_met": goal,
                                                 "cascade_goal_met": cascade_goal,
                                                 "chain_cascade_goal_met": chain_goal,
                                                 "exit_point_sets": [{**r, "run": f"runs/{run.name}"}
                                                                     for r in measured[1:]],
                                                 "fastest_exit_points": best["exits"]})
    atomic_write_text(RESULTS / f"{stem}.md", "\n".join(md))
    print(f"results: benchmarks/results/{stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
