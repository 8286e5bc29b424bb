"""A latency table for student design (nn-Meter's idea, measured rather than predicted): the p50 latency of a
student architecture on a device, in that device's runtime.

Each architecture is built with random weights (latency does not depend on their values), exported to the
device's format at fp32 with the default export form of the scan, and timed with the device runner, as
``edgepkd bench`` times any artifact: locally, over ssh, or estimated from FLOPs for ``connect: none`` profiles.
Results are cached in ``$EDGEPKD_CACHE/latency/<device>.json`` (default ``~/.cache/edgepkd``), keyed by the
architecture, input shape, class count, the device's settings (runtime, threads, connection, calibration) and
edgepkd's version, so a recipe's second dry run or a later recipe on the same device measures nothing again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import edgepkd
from edgepkd.measure.devices import DeviceProfile
from edgepkd.rundir import atomic_write_json, read_json

def fp32_target(fmt: str, device: str):
    """The built-in (or ./export/) fp32 target of export format ``fmt``, which candidates are timed as; a one-line
    ConfigError when the format has none (TFLite Micro: int8 only)."""
    from edgepkd.compress.targets import load_targets
    from edgepkd.errors import ConfigError

    found = [t for _, t in load_targets().items() if t.format == fmt and t.precision == "fp32"]
    if not found:
        raise ConfigError(f"students.progression.by: latency times candidates as fp32 exports, and device "
                          f"'{device}' runs {fmt} files, which no fp32 export target has: use by: flops, or a "
                          "device whose runtime runs an fp32 format")
    return next((t for t in found if t.name == f"{fmt}-fp32"), found[0])


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEPKD_CACHE", Path.home() / ".cache" / "edgepkd")) / "latency"


class LatencyTable:
    """``table(specs) -> [p50 ms]`` for student specs on ``profile``; measures the ones not cached."""

    def __init__(self, profile: DeviceProfile, input_shape: tuple[int, int, int], num_classes: int,
                 options=None, log=print, path: Path | None = None):
        from edgepkd.measure.bench import BenchOptions, _settings

        self.profile, self.input_shape, self.num_classes = profile, tuple(input_shape), num_classes
        self.options = options or BenchOptions(images=False)
        self.options.images = False                 # one random input: the timing needs no data
        self.settings = _settings(profile, self.options)
        self.target = fp32_target(profile.format, profile.name)       # checked before any training
        self.log = log
        self.path = path or cache_dir() / f"{profile.name}.json"
        self.data = read_json(self.path, {"entries": dict}, "a latency table", "delete it to measure again",
                              default={"entries": {}})
        self.measured = 0                           # how many this table timed (not from the cache)

    def key(self, spec: dict) -> str:
        blob = json.dumps({"spec": spec, "input_shape": self.input_shape, "classes": self.num_classes,
                           "settings": self.settings, "edgepkd": edgepkd.__version__}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def lookup(self, spec: dict) -> float | None:
        e = self.data["entries"].get(self.key(spec))
        return None if e is None else e["p50_ms"]

    def __call__(self, specs: list[dict]) -> list[float]:
        todo = [s for s in specs if self.lookup(s) is None]
        unique = list({self.key(s): s for s in todo}.values())
        if unique:
            self.log(f"latency table '{self.profile.name}': timing {len(unique)} candidate student(s) "
                     f"({'estimated' if self.profile.estimated else self.profile.runtime})")
            for spec, result in zip(unique, self._measure(unique)):
                self.data["entries"][self.key(spec)] = {
                    "spec": spec, "input_shape": list(self.input_shape), "classes": self.num_classes,
                    "p50_ms": result["latency_ms"]["p50"], "p90_ms": result["latency_ms"]["p90"],
                    "estimated": bool(result.get("estimated")), "flops": result.get("flops")}
                self.measured += 1
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, {"device": self.profile.name, **self.data})
        return [self.lookup(s) for s in specs]

    def _measure(self, specs: list[dict]) -> list[dict]:
        from edgepkd.measure.bench import DeviceError, bench_artifacts
        from edgepkd.models.flops import count_flops

        if self.profile.estimated:   # FLOPs / 2 over the calibrated MAC/s, as edgepkd bench estimates: no export
            out = []
            for spec in specs:
                f = count_flops(self._build(spec), self.input_shape)
                ms = 1e3 * (f.flops / 2) / self.profile.calibration.macs_per_second
                out.append({"latency_ms": {"p50": ms, "p90": ms}, "estimated": True, "flops": f.flops})
            return out
        with tempfile.TemporaryDirectory(prefix="edgepkd-latency-") as tmp:
            arts = self._export(specs, Path(tmp))
            outcome = bench_artifacts(arts, self.profile, self.options, log=lambda *a: None)
            got = {id(a): r for a, r in outcome.results}
            errors = {id(a): e for a, e in outcome.errors}
            missing = [(a, errors.get(id(a))) for a in arts if id(a) not in got]
            if missing:
                raise DeviceError(f"latency table '{self.profile.name}': {missing[0][0].entry['model']} did not "
                                  f"run: {missing[0][1]}")
            return [{**got[id(a)], "flops": a.entry["flops"]} for a in arts]

    def _build(self, spec: dict):
        import torch

        from edgepkd.models import STUDENT_ARCH, build_model

        torch.manual_seed(0)
        c, h, _ = self.input_shape
        return build_model(STUDENT_ARCH, spec, self.num_classes, c, h).eval()

    def _export(self, specs: list[dict], folder: Path) -> list:
        import torch

        from edgepkd.compress.export import sha256
        from edgepkd.measure.bench import Artifact
        from edgepkd.models import export_mode
        from edgepkd.models.flops import count_flops

        target = self.target
        example = torch.randn(1, *self.input_shape)
        entries, arts = [], []
        for i, spec in enumerate(specs):
            net = self._build(spec)
            f = count_flops(net, self.input_shape)
            path = folder / f"candidate-{i}{target.suffix}"
            meta = {"model": f"candidate-{i}", "target": target.name, "precision": "fp32",
                    "classes": [str(k) for k in range(self.num_classes)], "spec": spec}
            with export_mode(net, scan=target.scan, fmt=target.form):
                target.export_format.export(net, example, path, target, lambda: iter(()), meta)
            entry = {"file": path.name, "model": meta["model"], "format": target.format, "precision": "fp32",
                     "target": target.name, "bytes": path.stat().st_size, "sha256": sha256(path),
                     "macs": f.macs, "flops": f.flops, "input": {"shape": [1, *self.input_shape]}}
            entries.append(entry)
            arts.append(Artifact(path, entry, folder.name, None))
        atomic_write_json(folder / "manifest.json", {"target": target.name, "artifacts": entries})
        return arts
