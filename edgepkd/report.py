"""metrics.json -> report.md (the paper's table) and accuracy_vs_mflops.png; the console tables of `distill` and
`distill --dry-run`."""

from __future__ import annotations

import io
from pathlib import Path

from edgepkd.rundir import atomic_write_bytes, atomic_write_text, read_json


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


MODEL_HEADER = ["| model | role | params | MFLOPs | % teacher FLOPs | test acc (%) | train time (s) |",
                "|---|---|---:|---:|---:|---:|---:|"]


def model_row(r: dict) -> str:
    """One line of MODEL_HEADER's table for a model or an ensemble prefix of metrics.json."""
    return (f"| {r['name']} | {r.get('role', 'ensemble')} | {r['params']:,} | {r['mflops']:.3f} | "
            f"{r['pct_teacher_flops']:.2f} | {_fmt(r['test_acc'], '.2f')} | {_fmt(r.get('train_time_s'), '.1f')} |")


def architecture_table(models: list[dict]) -> list[str]:
    """The students' hyper-parameters, one line each (models of metrics.json; the teacher and baselines skipped)."""
    lines = ["| model | d_model | depth | d_state | expand | patch | stem | heads | bidirectional |",
             "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in models:
        if r["role"] in ("chain", "ensemble"):
            s = r["spec"]
            lines.append(f"| {r['name']} | {s['d_model']} | {s['depth']} | {s['d_state']} | {s['expand']} | "
                         f"{s['patch_size']} | {s.get('stem', 'patch')} | {s.get('heads') or '-'} | "
                         f"{s['bidirectional']} |")
    return lines


def render_markdown(metrics: dict) -> str:
    ds = metrics["dataset"]
    lines = [f"# {metrics['recipe']}: progressive distillation into Mamba students", "",
             f"Dataset `{ds['name']}` ({ds['train']} train / {ds['val']} val / {ds['test']} test images, "
             f"input {'x'.join(map(str, ds['input_shape']))}). Accuracy is top-1 on the test split.", "",
             f"FLOP convention: {metrics['flop_convention']}.", ""]
    lines += ["## Models", ""] + MODEL_HEADER + [model_row(r) for r in metrics["models"]]
    if metrics["ensemble_prefixes"]:
        lines += ["", "## Ensemble prefixes (anytime models: logits of members 1..k summed)", ""] + MODEL_HEADER
        lines += [model_row(p) for p in metrics["ensemble_prefixes"]]
    lines += ["", "## Student architectures", ""] + architecture_table(metrics["models"])
    env = metrics["environment"]
    lines += ["", f"Wall time {metrics['wall_time_s']:.0f} s on {env['machine']} ({env['cpus']} CPUs), "
              f"torch {env['torch']}, scan backend `{env['scan_backend']}`, edgepkd {env['edgepkd']}.",
              "", "![accuracy vs MFLOPs](accuracy_vs_mflops.png)", ""]
    return "\n".join(lines)


def render_plot(metrics: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    # Ensemble members alone are residual learners (meaningful only in their prefix): not plotted.
    for role, color, marker, size, label in (("teacher", "k", "*", 160, "teacher"),
                                             ("chain", "tab:blue", "o", 40, "chain students"),
                                             ("baseline", "tab:green", "s", 60, "CNN baselines (labels only)")):
        rows = [r for r in metrics["models"] if r["role"] == role and r["test_acc"] is not None]
        if rows:
            ax.scatter([r["mflops"] for r in rows], [r["test_acc"] for r in rows], c=color, marker=marker,
                       s=size, label=label, zorder=3)
            if role == "chain":
                ax.plot([r["mflops"] for r in rows], [r["test_acc"] for r in rows], c=color, lw=1)
    prefixes = [p for p in metrics["ensemble_prefixes"] if p["test_acc"] is not None]
    if prefixes:
        ax.plot([p["mflops"] for p in prefixes], [p["test_acc"] for p in prefixes], c="tab:red", marker="D",
                ms=5, lw=1.2, label="ensemble prefixes (anytime)", zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel("MFLOPs per image (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{metrics['recipe']}: accuracy vs compute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_report(run_path: Path, metrics: dict) -> None:
    from edgepkd.rundir import atomic_write_json

    atomic_write_json(run_path / "metrics.json", metrics)
    atomic_write_text(run_path / "report.md", render_markdown(metrics))
    atomic_write_bytes(run_path / "accuracy_vs_mflops.png", render_plot(metrics))


def load_metrics(run_path: Path) -> dict:
    return read_json(Path(run_path) / "metrics.json", {"models": list, "ensemble_prefixes": list}, "a metrics file",
                     "run edgepkd evaluate or distill --resume to write it again")


def print_summary(metrics: dict) -> None:
    """The end of ``edgepkd distill``: every model's and prefix's cost and test accuracy, as a console table."""
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


def print_plan(recipe, data, plan, latency=None, as_json: bool = False) -> None:
    """``distill --dry-run``: the planned students with their FLOPs (and p50 on the device when the progression is
    by latency), as a console table or JSON."""
    import json

    rows = [{"student": i + 1, **spec, "params": f.params, "macs": f.macs, "mflops": f.flops / 1e6}
            for i, (spec, f) in enumerate(plan)]
    if latency is not None:
        for r, ms in zip(rows, latency([spec for spec, _ in plan])):
            r["p50_ms"] = ms
    if as_json:
        print(json.dumps({"recipe": recipe.name, "dataset": data.name, "students": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{recipe.name}: {len(rows)} students on {data.name} "
                  f"({len(data.train)}/{len(data.val)}/{len(data.test)} images)")
    cols = ["#", "d_model", "depth", "d_state", "patch", "stem", "heads", "params", "MACs", "MFLOPs"]
    if latency is not None:
        cols.append(f"p50 ms ({latency.profile.name}{', est.' if latency.profile.estimated else ''})")
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["student"]), str(r["d_model"]), str(r["depth"]), str(r["d_state"]),
                      str(r["patch_size"]), r["stem"], str(r.get("heads") or "-"), f"{r['params']:,}",
                      f"{r['macs']:,}", f"{r['mflops']:.3f}",
                      *([f"{r['p50_ms']:.4f}"] if latency is not None else []))
    Console().print(table)
    if latency is not None:
        Console().print(f"latency table: {latency.path} ({latency.measured} timed now, the rest cached)")
    if recipe.baselines:
        Console().print("baselines (trained from labels): " + ", ".join(
            f"{b.arch} {dict(b.args) or ''}{b.train.epochs} epochs" for b in recipe.baselines))
