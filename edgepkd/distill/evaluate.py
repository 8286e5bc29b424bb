"""``edgepkd evaluate RUN``: rebuild every model of a run from its safetensors file, re-evaluate it on the test
split and compare with metrics.json.

On the device kind the run trained on, identical weights, data and device give identical predictions: the
default tolerance is exact (1e-6 points). On another kind (a GPU run checked on a CPU) float differences flip
borderline images, so 0.1 points are allowed unless the caller says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgepkd.errors import ConfigError, RunError


@dataclass
class Evaluation:
    run: str
    device: str                     # where it was evaluated: cpu | cuda
    trained_on: str                 # the device kind metrics.json records
    tolerance: float                # largest accepted |accuracy difference| in points
    results: list[dict] = field(default_factory=list)   # {name, test_acc, recorded, diff}
    missing: list[str] = field(default_factory=list)    # models whose weights file is missing
    max_diff: float = 0.0

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.tolerance

    def as_dict(self) -> dict:
        return {"run": self.run, "device": self.device, "trained_on": self.trained_on, "tolerance": self.tolerance,
                "results": self.results, "missing": self.missing, "max_diff": self.max_diff, "ok": self.ok}


def evaluate_run(run_path: str, *, data_dir: str | None = None, device: str = "auto", tolerance: float | None = None,
                 skip_missing: bool = False, log=print) -> Evaluation:
    """Re-evaluate every model and ensemble prefix of ``run_path`` (``device``: auto, cpu or cuda); missing
    weights fail unless ``skip_missing``."""
    import torch

    from edgepkd.data import load_run_dataset
    from edgepkd.distill.trainer import accuracy, ensemble_predictor, predict
    from edgepkd.models import load_model, set_scan_backend
    from edgepkd.models.ensemble import combine
    from edgepkd.recipe import load_recipe
    from edgepkd.report import load_metrics
    from edgepkd.rundir import RunDir

    run = RunDir(run_path)
    run.require_complete()
    recipe = load_recipe(run.recipe_path)
    metrics = load_metrics(run.path)
    env = metrics.get("environment", {})
    trained_on = env.get("device") or ("cuda" if env.get("cuda") else "cpu")
    device = device if device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("evaluate --device cuda: torch sees no CUDA GPU here; use --device cpu")
    tolerance = tolerance if tolerance is not None else 1e-6 if device == trained_on else 0.1
    missing = [row["name"] for row in metrics["models"] if not run.weights_path(row["name"]).exists()
               and not (row["name"] == "teacher" and recipe.teacher.checkpoint)]
    if missing and not skip_missing:
        raise RunError(f"{run.path}: weights missing for {', '.join(missing)} "
                       f"(expected {run.weights_path(missing[0])}); --skip-missing evaluates the others")
    data = load_run_dataset(run, recipe, data_dir, log=log)
    out = Evaluation(str(run_path), device, trained_on, tolerance, missing=missing)
    logits = {}
    for row in metrics["models"]:
        path = run.weights_path(row["name"])
        if not path.exists():
            continue  # missing (listed above) or a loaded teacher, which is not copied into the run
        model, _ = load_model(path)
        set_scan_backend(model, recipe.scan_backend)
        logits[row["name"]] = predict(ensemble_predictor([model.to(device)]), data, data.test.x,
                                      device=device)                                        # (N, K)
        acc = accuracy(logits[row["name"]], data.test.y)
        out.results.append({"name": row["name"], "test_acc": acc, "recorded": row["test_acc"]})
    for p in metrics["ensemble_prefixes"]:
        if all(m in logits for m in p["members"]):
            acc = accuracy(combine([logits[m] for m in p["members"]], p.get("shrinkage", 1.0)), data.test.y)
            out.results.append({"name": p["name"], "test_acc": acc, "recorded": p["test_acc"]})
    for r in out.results:
        r["diff"] = abs(r["test_acc"] - r["recorded"])
        out.max_diff = max(out.max_diff, r["diff"])
    return out
