"""metrics.json -> report.md (the paper's table) and accuracy_vs_mflops.png."""

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
    lines = ["| model | d_model | depth | d_state | expand | patch | stem | bidirectional |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in models:
        if r["role"] in ("chain", "ensemble"):
            s = r["spec"]
            lines.append(f"| {r['name']} | {s['d_model']} | {s['depth']} | {s['d_state']} | {s['expand']} | "
                         f"{s['patch_size']} | {s.get('stem', 'patch')} | {s['bidirectional']} |")
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
