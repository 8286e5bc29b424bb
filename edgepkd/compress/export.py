"""``edgepkd export RUN --target NAME``: every student and ensemble prefix of a run -> verified artifacts.

    runs/<run>/export/<target>/<model>.<ext>   one file per model (ensemble prefixes are one graph summing
                                               their students' logits)
    runs/<run>/export/<target>/manifest.json   per file: model, target, precision, input/output, preprocessing,
                                               labels, bytes, sha256, MACs, and the verification results

Each artifact is written under a temporary name, verified in its own runtime, and only then renamed into place;
a failed conversion or verification leaves no file behind and the earlier artifacts intact.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

import edgepkd
from edgepkd.compress.targets import ExportTarget
from edgepkd.compress.verify import Verification, verify
from edgepkd.errors import EdgepkdError, RunError, first_line
from edgepkd.models.ensemble import EnsemblePrefix
from edgepkd.rundir import RunDir, atomic_write_json, read_json



class VerificationError(EdgepkdError):
    exit_code = 1


@dataclass
class ExportCandidate:
    """One model of a run to export: a student, the teacher or a baseline, or an ensemble prefix."""

    name: str                 # as in metrics.json: "chain/s1", "ensemble[1..3]"
    file_stem: str            # "chain-s1", "ensemble-1-3"
    members: list[str]
    info: dict = field(default_factory=dict)   # the metrics.json row


def file_stem(name: str) -> str:
    return name.replace("/", "-").replace("[", "-").replace("..", "-").replace("]", "")


def require_runtime(target: ExportTarget) -> None:
    missing = target.export_format.missing()
    if "tflite_micro" in missing:
        from edgepkd.compress.tflm import INSTALL

        raise EdgepkdError(f"export target '{target.name}' needs TFLite Micro's Python interpreter (tflite_micro): "
                           f"{INSTALL}" + (" and pip install -e '.[export]'" if len(missing) > 1 else ""))
    if missing:
        raise EdgepkdError(f"export target '{target.name}' needs {', '.join(missing)}: "
                           "pip install -e '.[export]' (or pip install 'edgepkd[export]')")


def ensemble_members(metrics: dict) -> list[ExportCandidate]:
    """The members of the run's largest ensemble prefix, one standalone artifact each, for early exit on the
    device (``edgepkd.measure.early_exit``): each carries its place and the shrinkage in ``ensemble_member``."""
    if not metrics["ensemble_prefixes"]:
        return []
    last = metrics["ensemble_prefixes"][-1]
    rows = {r["name"]: r for r in metrics["models"]}
    return [ExportCandidate(m, file_stem(m), [m], {**rows[m], "ensemble_member": {
                "index": k + 1, "of": len(last["members"]), "shrinkage": last.get("shrinkage", 1.0),
                "members": last["members"]}})
            for k, m in enumerate(last["members"])]


def ensemble_segment(metrics: dict, name: str) -> ExportCandidate | None:
    """``ensemble[a..b]`` with 1 < a <= b <= M: members a..b of the largest prefix combined as one graph,
    ``combine``'s weights within the segment (member j weighs s^(b-j)), the exit points' unit of early exit
    (``measure.early_exit``: P_b = s^(b-a+1) · P_(a-1) + segment). ``ensemble[1..b]`` is prefix b itself, in
    metrics.json. None when ``name`` is not of that form; a RunError when its bounds are out of range."""
    import re

    hit = re.fullmatch(r"ensemble\[(\d+)\.\.(\d+)\]", name)
    if hit is None or not metrics["ensemble_prefixes"]:
        return None
    a, b = int(hit[1]), int(hit[2])
    last = metrics["ensemble_prefixes"][-1]
    if a == 1:
        return None                                                       # a prefix: listed in metrics.json
    if not 1 < a <= b <= len(last["members"]):
        raise RunError(f"--model {name}: members {a}..{b} are not a segment of the {len(last['members'])}-member "
                       f"ensemble (give ensemble[a..b] with 1 <= a <= b <= {len(last['members'])})")
    rows = {r["name"]: r for r in metrics["models"]}
    members = last["members"][a - 1:b]

    def total(key):
        values = [rows[m].get(key) for m in members]
        return None if any(v is None for v in values) else sum(values)

    info = {"name": name, "role": "ensemble-segment", "members": members, "shrinkage": last.get("shrinkage", 1.0),
            "params": total("params"), "macs": total("macs"), "flops": total("flops"), "mflops": total("mflops"),
            "ensemble_segment": {"first": a, "last": b, "of": len(last["members"])}}
    return ExportCandidate(name, file_stem(name), members, info)


def export_candidates(run: RunDir, metrics: dict, only: list[str] | None = None) -> list[ExportCandidate]:
    """The teacher and baselines (when their weights are in the run: a device choice must see what the
    students compete with), every student and every ensemble prefix (default); or the models named in ``only``,
    by name ('chain/s2') or file stem ('chain-s2'), in that order. ``only`` may name ``ensemble-members``: the
    largest prefix's members as standalone artifacts (early exit)."""
    if only and "ensemble-members" in only:
        rest = [m for m in only if m != "ensemble-members"]
        members = ensemble_members(metrics)
        if not members:
            raise RunError(f"--model ensemble-members: {run.path} has no ensemble")
        chosen = export_candidates(run, metrics, rest) if rest else []
        return chosen + [m for m in members if m.name not in {c.name for c in chosen}]
    def default(r: dict) -> bool:
        return r["role"] == "chain" or (r["role"] in ("teacher", "baseline")
                                        and run.weights_path(r["name"]).is_file())

    rows = [ExportCandidate(r["name"], file_stem(r["name"]), [r["name"]], r) for r in metrics["models"]
            if (only and r["name"] in only) or (not only and default(r))]
    rows += [ExportCandidate(p["name"], file_stem(p["name"]), p["members"], p) for p in metrics["ensemble_prefixes"]]
    if not only:
        return rows
    names = [c.name for c in rows] + [r["name"] for r in metrics["models"]]
    chosen = []
    for wanted in dict.fromkeys(only):
        match = [c for c in rows if wanted in (c.name, c.file_stem)]
        segment = None if match else ensemble_segment(metrics, wanted)
        if segment is not None:
            match = [segment]
        if not match:
            from edgepkd.registry import closest

            raise RunError(f"--model {wanted}: not a model of {run.path}{closest(wanted, names)} "
                           f"(models: {', '.join(dict.fromkeys(names))})")
        chosen += [c for c in match if c not in chosen]
    return chosen


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_run(run_path: str, target: ExportTarget, *, models: list[str] | None = None, do_verify: bool = True,
               data_dir: str | None = None, log=print, refused: list[str] | None = None,
               skip_refused: bool = False) -> list[dict]:
    """Export, verify and describe the models of a run (every student and prefix, or ``models``) for one target;
    returns the manifest entries written.

    With a ``refused`` list, a model that fails verification is logged, skipped (nothing written for it) and
    its name appended, instead of stopping the export: ``edgepkd export --keep-going`` and ``edgepkd distill
    --device`` use it so that the models that pass are written. With ``skip_refused`` too, a model whose
    recorded refusal has its current key (``refusal_key``: the same weights, target, code and packages, so the
    same outcome) is logged and appended without being exported again."""
    from edgepkd.data import load_run_dataset
    from edgepkd.models import export_mode, load_model
    from edgepkd.recipe import load_recipe
    from edgepkd.report import load_metrics

    run = RunDir(run_path)
    run.require_complete()
    require_runtime(target)
    fmt = target.export_format
    metrics = load_metrics(run.path)
    chosen = export_candidates(run, metrics, models)
    loaded: dict[str, nn.Module] = {}
    for c in chosen:
        for m in c.members:
            path = run.weights_path(m)
            if not path.is_file() and m == "teacher":
                raise RunError(f"{run_path}: the teacher was loaded from teacher.checkpoint and is not in the run; "
                               "export it from that file's run")
            if not path.is_file():
                raise RunError(f"{run_path}: incomplete run, weights/{path.name} is missing")
            if m not in loaded:
                loaded[m] = load_model(path)[0]
    recipe = load_recipe(run.recipe_path)
    data = load_run_dataset(run, recipe, data_dir, log)
    x_test = data.normalize(data.test.x)                                    # (N, C, H, W)
    example = x_test[:1]                                                    # (1, C, H, W)

    def calibration():
        n = min(target.quantization.calibration_images, len(data.train))
        for i in range(n):
            yield data.normalize(data.train.x[i:i + 1]).numpy()

    out_dir = run.path / "export" / target.name
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    stored = read_json(manifest_path, {"artifacts": list}, "a manifest", "move it away and export again",
                       default={"artifacts": []})
    previous = list(stored["artifacts"])
    refusals = _refusals(stored)
    entries = []

    def write_manifest():
        keep = [e for e in previous if e["file"] not in {x["file"] for x in entries}]
        atomic_write_json(manifest_path, {"edgepkd_version": edgepkd.__version__, "target": target.name,
                                          "artifacts": sorted(keep + entries, key=lambda e: e["file"]),
                                          **({"refused": sorted(refusals.values(), key=lambda r: r["model"])}
                                             if refusals else {})})
    for c in chosen:
        failures = (_same_refusal(refusals.get(c.name), run, c.members, target)
                    if skip_refused and refused is not None else None)
        if failures is not None:
            log(f"  {c.file_stem + target.suffix:<24} skipped: refused before with the same weights, target, code "
                f"and packages ({'; '.join(failures) or 'see manifest'}); `edgepkd export {run_path} --target "
                f"{target.name} --model {c.name}` exports it again")
            refused.append(c.name)
            continue
        net = (loaded[c.members[0]] if len(c.members) == 1 and c.name in loaded
               else EnsemblePrefix([loaded[m] for m in c.members], c.info.get("shrinkage", 1.0))).eval()
        final = out_dir / f"{c.file_stem}{target.suffix}"
        tmp = out_dir / f".{c.file_stem}.tmp{target.suffix}"
        meta = {"model": c.name, "members": c.members,
                **{k: c.info[k] for k in ("shrinkage", "ensemble_member", "ensemble_segment") if k in c.info},
                "target": target.name, "precision": target.precision,
                "classes": data.classes, "preprocessing": data.preprocessing(),
                "provenance": {"run": run.path.name, "recipe": recipe.name, "dataset": recipe.data.dataset,
                               "edgepkd_version": edgepkd.__version__, "torch_version": torch.__version__}}
        try:
            with export_mode(net, scan=target.scan, fmt=target.form):
                fmt.export(net, example, tmp, target, calibration, meta)
            model = fmt.open(tmp)                                           # in its runtime
            result = (verify(model, net, x_test, data.test.y, target, fmt.second_opinions(tmp)) if do_verify
                      else None)
        except EdgepkdError:
            _cleanup(tmp)
            raise
        except Exception as e:
            _cleanup(tmp)
            raise EdgepkdError(f"export of {c.name} to {target.name} failed: "
                               f"{first_line(e, with_type=True)}") from None
        except BaseException:
            _cleanup(tmp)
            raise
        if result is not None and not result.passed and refused is not None:
            _cleanup(tmp)
            log(f"  {c.file_stem + target.suffix:<24} skipped: failed verification ({'; '.join(result.failures)})")
            refused.append(c.name)
            refusals[c.name] = {"model": c.name, **refusal_key(run, c.members, target),
                                "failures": result.failures}
            write_manifest()
            continue
        if result is not None and not result.passed:
            _cleanup(tmp)
            raise VerificationError(f"{target.name}: {c.name} failed verification on {result.images} test "
                                    f"images: {'; '.join(result.failures)} (nothing written; --no-verify skips "
                                    "this check)")
        entry = _entry(tmp, c, target, model, meta, result)
        entry["file"] = final.name
        try:
            entry.update(fmt.companions(tmp, final, model, entry))    # e.g. tflite-micro's firmware sources
        except BaseException:
            _cleanup(tmp)
            raise
        os.replace(tmp, final)
        entries.append(entry)
        refusals.pop(c.name, None)
        write_manifest()  # follows every replaced file at once, so it never describes an older artifact
        log(_describe(entry))
    return entries


@functools.lru_cache(maxsize=1)
def _code_sha256() -> str:
    """sha256 of edgepkd's own Python sources (its export forms, converters and verification)."""
    root = Path(edgepkd.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


REFUSAL_KEYS = ("weights_sha256", "target_sha256", "code_sha256", "packages")


def refusal_key(run: RunDir, members: list[str], target: ExportTarget) -> dict:
    """What a verification refusal depends on: the members' weights, the target's definition, edgepkd's code (its
    export forms) and the converters' and runtimes' versions. A refusal with the same key would be repeated."""
    import dataclasses
    import json

    spec = json.dumps(dataclasses.asdict(target), sort_keys=True, default=str).encode()
    return {"weights_sha256": {m: sha256(run.weights_path(m)) for m in members},
            "target_sha256": hashlib.sha256(spec).hexdigest(), "code_sha256": _code_sha256(),
            "packages": _package_versions()}


def _package_versions() -> dict[str, str | None]:
    """Versions of the converters and runtimes an export and its verification run through (None: absent)."""
    from importlib import metadata

    out = {}
    for name in ("torch", "onnx", "onnxscript", "onnxruntime", "litert-torch", "ai-edge-litert", "executorch",
                 "torchao", "tflite-micro"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _same_refusal(record: dict | None, run: RunDir, members: list[str], target: ExportTarget) -> list[str] | None:
    """The failures of a refusal ``record`` made under the current ``refusal_key`` (an export would repeat it),
    else None."""
    if record is None or not all(run.weights_path(m).is_file() for m in members) or \
            {k: record.get(k) for k in REFUSAL_KEYS} != refusal_key(run, members, target):
        return None
    failures = record.get("failures")
    return [str(f) for f in failures] if isinstance(failures, list) else []


def _refusals(manifest: dict) -> dict[str, dict]:
    """The manifest's 'refused' records by model; anything malformed is ignored (it only saves a re-export)."""
    listed = manifest.get("refused")
    return {r["model"]: r for r in (listed if isinstance(listed, list) else [])
            if isinstance(r, dict) and isinstance(r.get("model"), str)}


def export_targets(run_path: str, targets: list[ExportTarget], *, models: list[str] | None = None,
                   do_verify: bool = True, data_dir: str | None = None, log=print,
                   keep_going: bool = False) -> tuple[list[dict], list[str]]:
    """``export_run`` for each target in turn (``edgepkd export``, ``distill --device``); returns the entries
    written and, with ``keep_going``, the models refused by verification as 'target: model'. With
    ``keep_going`` and no ``models`` named, a refusal recorded under the current key is not exported again
    (``export_run``'s ``skip_refused``); a model named in ``models`` always is."""
    entries, refused = [], []
    for target in targets:
        log(f"{target.name}: exporting {run_path}")
        skipped: list[str] | None = [] if keep_going else None
        entries += export_run(run_path, target, models=models, do_verify=do_verify, data_dir=data_dir, log=log,
                              refused=skipped, skip_refused=keep_going and not models)
        log(f"  manifest: {run_path}/export/{target.name}/manifest.json")
        refused += [f"{target.name}: {name}" for name in skipped or []]
    return entries, refused


def _cleanup(tmp: Path) -> None:
    for p in (tmp, Path(str(tmp) + ".data")):
        p.unlink(missing_ok=True)


def _entry(path: Path, c: ExportCandidate, target: ExportTarget, model, meta: dict,
           result: Verification | None) -> dict:
    # the runtime's dtypes and quantization; names and shapes are the model's (1, C, H, W) -> (1, K)
    io = {side: {k: v for k, v in d.items() if k not in ("name", "shape")} for side, d in model.io().items()}
    return {
        "file": path.name, "model": c.name, "members": c.members, "target": target.name,
        "format": target.format, "precision": target.precision,
        "input": {"name": "input", "shape": [1, *meta["preprocessing"]["input_shape"]], "dtype": "float32",
                  **io.get("input", {})},
        "output": {"name": "logits", "shape": [1, len(meta["classes"])], "dtype": "float32", **io.get("output", {})},
        "preprocessing": meta["preprocessing"], "classes": meta["classes"],
        "bytes": path.stat().st_size, "sha256": sha256(path),
        "params": c.info.get("params"), "macs": c.info.get("macs"), "flops": c.info.get("flops"),
        "pytorch_test_acc": c.info.get("test_acc"),
        **{k: c.info[k] for k in ("ensemble_member", "ensemble_segment") if k in c.info},
        "verification": result.as_dict() if result is not None else {"passed": None, "skipped": True},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "provenance": meta["provenance"],
    }


def _describe(e: dict) -> str:
    v = e["verification"]
    if v.get("skipped"):
        return f"  {e['file']:<24} {e['bytes']:>9,} B  NOT VERIFIED"
    return (f"  {e['file']:<24} {e['bytes']:>9,} B  acc {v['accuracy']:6.2f}% (PyTorch {v['reference_accuracy']:6.2f}%)"
            f"  agreement {v['agreement']:6.2f}%  max|diff| {v['max_abs_diff']:.2e}  ok")
