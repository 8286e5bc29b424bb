"""Issue #15's early-exit goal, measured: the anytime ensemble run member by member in TFLite (1 thread), against
the most accurate single student timed beside it on the same test images.

    python benchmarks/early_exit.py runs/mnist --data-dir ../shared/data          # tflite-fp32
    python benchmarks/early_exit.py runs/digits --target tflite-int8

The same library call as ``edgepkd early-exit RUN --target T`` (``edgepkd.workflow.early_exit``: exports what
is missing, the ensemble's members and the most accurate chain student, verified as any export, then
``edgepkd.measure.early_exit.measure``), plus the goal's verdict and a results file. Goal: at the best single
student's accuracy, the ensemble's mean latency is at most 0.7x that student's; checked for the ensemble alone, for
the cascade whose last stage is that student (``early_exit.cascade_sweep``), and for the chain cascade (one or two
cheaper chain students, then that student: ``early_exit.chain_cascade_sweep``; not the ensemble). Results:
benchmarks/results/early-exit-<run name>.{md,json}.
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
    args = ap.parse_args(argv)

    from edgepkd import workflow
    from edgepkd.measure import early_exit as ee

    run = Path(args.run)
    # what edgepkd early-exit does: export the missing members and the reference (the most accurate chain
    # student), then measure
    res = workflow.early_exit(run, args.target, targets_dir=[args.targets_dir] if args.targets_dir else (),
                              repeats=args.repeats, limit=args.limit, data_dir=args.data_dir)
    text = ee.render_early_exit(res)
    print(text)
    at = res.get("at_reference_accuracy")
    goal = at is not None and at["mean_ratio"] <= 0.7
    cas = res.get("cascade_at_reference_accuracy")
    cascade_goal = cas is not None and cas["mean_ratio"] <= 0.7
    chain = res.get("chain_cascade_at_reference_accuracy")
    chain_goal = (chain is not None and chain["mean_ratio"] <= 0.7) if "chain_cascade" in res else None
    cmd = shlex.join(["python", "benchmarks/early_exit.py", *(argv if argv is not None else sys.argv[1:])])
    md = [f"# Early exit: {run.name} ({args.target})", "",
          f"Produced by `{cmd}` on {dt.date.today().isoformat()}. {res['timing']}; {res['repeats']} passes.", "",
          "```", text, "```", "",
          f"Goal (issue #15): at the best single student's accuracy, mean latency <= 0.7x that student's: "
          + ("**met**" if goal else "**not met**")
          + ("" if at is None else f" ({at['mean_ratio']:.2f}x at θ = {at['theta']:g})") + " by the ensemble "
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
                                                 "chain_cascade_goal_met": chain_goal})
    atomic_write_text(RESULTS / f"{stem}.md", "\n".join(md))
    print(f"results: benchmarks/results/{stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
