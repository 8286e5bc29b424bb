"""``RUN/bench/<device>.png``: accuracy against measured p50 latency on one device (issue #13).

One point per benched artifact of the run: the teacher, baselines, chain students and ensemble prefixes, one
marker per export target. Accuracy is the artifact's top-1 on the device (the bench's test images), else the
accuracy verified at export. Written by ``edgepkd bench`` after each bench, named by ``edgepkd pick``.
"""

from __future__ import annotations

import io
from pathlib import Path

KINDS = (("teacher", "k", "teacher"), ("baseline", "tab:green", "baselines"), ("chain", "tab:blue", "chain students"),
         ("ensemble", "tab:red", "ensemble prefixes"))
MARKERS = "o^sDvP*X<>"


def kind(model: str) -> str:
    if model == "teacher":
        return "teacher"
    if model.startswith("baseline/"):
        return "baseline"
    return "ensemble" if model.startswith("ensemble[") else "chain"


def points(bench: dict) -> list[dict]:
    """(model, target, p50 ms, accuracy %) of every result that has both."""
    out = []
    for key, r in sorted(bench.get("results", {}).items()):
        acc = (r.get("accuracy") or {}).get("top1")
        if acc is None:
            acc = r.get("export_accuracy")
        model = r.get("model") or key
        if acc is not None and r.get("latency_ms"):
            out.append({"model": model, "target": r.get("target", key.split("/")[0]),
                        "p50": r["latency_ms"]["p50"], "accuracy": acc, "estimated": bool(r.get("estimated"))})
    return out


def render_device_plot(bench: dict, title: str) -> bytes | None:
    """The PNG, or None when no result has a latency and an accuracy."""
    pts = points(bench)
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    targets = sorted({p["target"] for p in pts})
    for k, color, label in KINDS:
        for i, t in enumerate(targets):
            sel = sorted((p for p in pts if kind(p["model"]) == k and p["target"] == t), key=lambda p: p["p50"])
            if not sel:
                continue
            ax.scatter([p["p50"] for p in sel], [p["accuracy"] for p in sel], c=color, marker=MARKERS[i % 10],
                       s=120 if k == "teacher" else 36, zorder=3, label=f"{label} ({t})")
            if k in ("chain", "ensemble") and len(sel) > 1:
                ax.plot([p["p50"] for p in sel], [p["accuracy"] for p in sel], c=color, lw=0.8, alpha=0.6)
    ax.set_xscale("log")
    estimated = any(p["estimated"] for p in pts)
    ax.set_xlabel("p50 latency per image, ms (log)" + (", ESTIMATED" if estimated else ", measured"))
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_device_plot(bench_path: Path, bench: dict) -> Path | None:
    """``bench/<device>.png`` next to ``bench/<device>.json`` (atomically), or None when nothing to plot."""
    from edgepkd.rundir import atomic_write_bytes

    png = render_device_plot(bench, f"{bench_path.parent.parent.name} on '{bench.get('device')}': "
                                    "accuracy vs latency")
    if png is None:
        return None
    path = bench_path.with_suffix(".png")
    atomic_write_bytes(path, png)
    return path
