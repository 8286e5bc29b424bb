#!/usr/bin/env python3
"""edgepkd's device runner: time exported models in the runtime a device actually has.

Two files, nothing else of edgepkd: this one and the runtime adapters it opens artifacts with
(``edgepkd/compress/runtimes.py``, which export verification uses too), on the standard library, numpy and one
runtime (``tflite_runtime``, ``ai_edge_litert`` or ``tensorflow`` for .tflite; ``onnxruntime`` for .onnx;
``executorch_numpy_runtime``, or ``executorch`` (which imports torch) for .pte). Copy both into one folder on a
device (``edgepkd bench`` does, over ssh) and run

    python3 runner.py chain-s2.tflite [more.tflite ...] [--images test-images.npz] [--threads 4]

For each artifact it prints one JSON object on a line of stdout (JSON Lines): load time, latency percentiles
(p50 / p90 / p99, mean, std, min, max, in ms), peak RSS, file size, runtime name and version, thread count,
whether torch was imported, and top-1 accuracy when ``--images`` is given. Errors are one line on stderr (and a
JSON object with "error").

Conventions (TFLite's benchmark_model; MLPerf single-stream):
  * batch 1; warm-up for at least ``--warmup-runs`` (1) runs and ``--warmup-seconds`` (0.5 s), then time runs
    until both ``--min-runs`` (50) runs and ``--min-seconds`` (1 s) are reached, or ``--max-seconds`` (150 s)
    have passed; p90 is MLPerf single-stream's latency metric.
  * one timed run = set the input tensor, invoke, read the output; preprocessing is done once, ahead.
  * inputs: the ``--images`` test images (an .npz with uint8 ``images`` (N, C, H, W) and ``labels`` (N,)),
    cycled through, preprocessed as the manifest says (scale, mean, std); else one standard-normal input.
    int8 inputs are quantized with the scale and zero point the interpreter reports.
  * memory: ``peak_rss_bytes`` is the process's high-water RSS; ``model_rss_bytes`` is its growth from just
    before the model was loaded (the runtime and numpy already imported) to after its first run on one input,
    before the timing inputs are prepared (N preprocessed test images are the benchmark's, not the model's).
  * metadata: ``manifest.json`` next to the artifact (edgepkd export writes it), else the artifact's own
    metadata (TFLite metadata entry 'edgepkd', ONNX metadata_props, the .pte's constant method
    'edgepkd_metadata': the JSON as uint8 bytes).
  * integrity: an artifact listed in ``manifest.json`` runs only when its size and sha256 are the manifest's
    (a truncated or changed file is refused in one line: re-export it, or copy it again).
  * threads: ``--threads`` sets the interpreter / intra-op threads, and ExecuTorch's thread pool under
    ``executorch``; ``executorch_numpy_runtime`` cannot set it (XNNPACK uses ExecuTorch's default pool): its
    results say ``"threads": null``.

With several artifacts each one runs in its own child process, so each peak RSS is its own.
ExecuTorch: ``executorch_numpy_runtime`` (pip install executorch-numpy-runtime; numpy only, Python >= 3.12,
manylinux x86_64 / aarch64 and Windows wheels; built on ExecuTorch 1.3.1 and runs edgepkd's 1.5.1 programs) keeps
the runner torch-free. The ``executorch`` wheel's runtime imports torch (its pybindings link libtorch), so a device
using it needs torch too. ``"torch_imported"`` in each result says which was the case.

Exit status: 0 all ran, 2 an artifact could not be run (or is not the file its manifest describes), 3 this
device lacks numpy or a runtime (or runtimes.py is not beside this file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import struct
import subprocess
import sys
import time


def _load_runtimes():
    """compress/runtimes.py, the runtime adapters this runner runs artifacts with: from the package when this is
    ``edgepkd.measure.runner``; run as a script, the copy beside this file (a device: edgepkd bench copies both)
    or else edgepkd's own (``python edgepkd/measure/runner.py``), never some other installed edgepkd's."""
    if __package__:
        import edgepkd.compress.runtimes as runtimes
        return runtimes
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    for path in (os.path.join(here, "runtimes.py"), os.path.join(here, os.pardir, "compress", "runtimes.py")):
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location("runtimes", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    sys.stderr.write("runner: error: runtimes.py is missing: copy it next to runner.py (edgepkd/compress/"
                     "runtimes.py; edgepkd bench copies both)\n")
    sys.exit(3)


runtimes = _load_runtimes()
RunnerError, EnvironmentMissing = runtimes.RunnerError, runtimes.EnvironmentMissing
artifact_format, open_model = runtimes.artifact_format, runtimes.open_model


def device_files() -> list[str]:
    """What a device needs to run this runner, copied into one folder: this file and the runtimes.py it loads."""
    return [os.path.abspath(__file__), os.path.abspath(runtimes.__file__)]


class ArtifactChanged(RunnerError):
    """The file is not the one its manifest.json entry describes (truncated, changed, or a failed copy)."""


def integrity_problem(size: int, digest: str, entry: dict) -> str | None:
    """Why a file of ``size`` bytes with sha256 ``digest`` is not the one ``entry`` (its manifest.json entry)
    describes, or None when it is (edgepkd bench and pick check artifacts with this too)."""
    want_size, want_sha = entry.get("bytes"), entry.get("sha256")
    if not isinstance(want_size, int) or not isinstance(want_sha, str):
        return "its manifest.json entry records no bytes and sha256 to check it against"
    if size != want_size:
        return f"{size:,} bytes, but manifest.json says {want_size:,} (truncated or changed since export)"
    if digest != want_sha:
        return f"sha256 {digest[:12]}..., but manifest.json says {want_sha[:12]}... (changed since export)"
    return None


# ----------------------------------------------------------------------------------------------- flatbuffers
# Just enough of the TFLite flatbuffer (schema.fbs) to read edgepkd's metadata entry and the tensor table,
# without the tflite schema package (tflite_runtime does not ship it).
class _Table:
    def __init__(self, buf: bytes, pos: int):
        self.buf, self.pos = buf, pos
        self.vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vtable_size = struct.unpack_from("<H", buf, self.vtable)[0]

    def _field(self, index: int) -> int:
        slot = 4 + 2 * index
        if slot >= self.vtable_size:
            return 0
        off = struct.unpack_from("<H", self.buf, self.vtable + slot)[0]
        return self.pos + off if off else 0

    def scalar(self, index: int, fmt: str, default=0):
        at = self._field(index)
        return struct.unpack_from("<" + fmt, self.buf, at)[0] if at else default

    def _indirect(self, index: int) -> int:
        at = self._field(index)
        return at + struct.unpack_from("<I", self.buf, at)[0] if at else 0

    def string(self, index: int) -> str:
        at = self._indirect(index)
        if not at:
            return ""
        n = struct.unpack_from("<I", self.buf, at)[0]
        return self.buf[at + 4:at + 4 + n].decode("utf-8", "replace")

    def vector(self, index: int) -> tuple[int, int]:
        """(start of the elements, length); (0, 0) when absent."""
        at = self._indirect(index)
        return (at + 4, struct.unpack_from("<I", self.buf, at)[0]) if at else (0, 0)

    def tables(self, index: int) -> list[_Table]:
        start, n = self.vector(index)
        return [_Table(self.buf, start + 4 * i + struct.unpack_from("<I", self.buf, start + 4 * i)[0])
                for i in range(n)]

    def scalars(self, index: int, fmt: str) -> list:
        start, n = self.vector(index)
        size = struct.calcsize("<" + fmt)
        return [struct.unpack_from("<" + fmt, self.buf, start + size * i)[0] for i in range(n)]


def _tflite_model(buf: bytes) -> _Table:
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise RunnerError("not a TFLite flatbuffer (no 'TFL3' identifier)")
    return _Table(buf, struct.unpack_from("<I", buf, 0)[0])


def _buffer_bytes(buf: bytes, model: _Table, index: int) -> bytes:
    """Model.buffers[index] (field 4): inline ``data`` (field 0), or ``offset``/``size`` (fields 1, 2) past 2 GB."""
    entry = model.tables(4)[index]
    start, n = entry.vector(0)
    if n:
        return buf[start:start + n]
    offset, size = entry.scalar(1, "Q"), entry.scalar(2, "Q")
    return buf[offset:offset + size] if offset > 1 else b""


def tflite_metadata(buf: bytes, key: str = "edgepkd") -> dict:
    """The JSON of Model.metadata (field 6) entry ``key``; {} when absent."""
    model = _tflite_model(buf)
    for entry in model.tables(6):           # Metadata: name (0), buffer (1)
        if entry.string(0) == key:
            return json.loads(_buffer_bytes(buf, model, entry.scalar(1, "I")).decode())
    return {}


# TensorType enum of schema.fbs -> bytes per element
_TENSOR_BYTES = {0: 4, 1: 2, 2: 4, 3: 1, 4: 8, 6: 1, 7: 2, 8: 8, 9: 1, 10: 8, 11: 16, 12: 8, 15: 4, 16: 2,
                 17: 0.5, 18: 2}


def tflite_activation_bytes(buf: bytes) -> int:
    """Sum of the bytes of every non-constant tensor of the main subgraph: an upper bound on the tensor arena
    an interpreter needs (TFLite Micro's planner reuses memory between tensors whose lifetimes do not overlap)."""
    model = _tflite_model(buf)
    subgraphs = model.tables(2)
    if not subgraphs:
        return 0
    total = 0.0
    for tensor in subgraphs[0].tables(0):   # Tensor: shape (0), type (1), buffer (2)
        if _buffer_bytes(buf, model, tensor.scalar(2, "I")):
            continue                        # constant: weights stay in flash / the file
        count = 1
        for dim in tensor.scalars(0, "i"):
            count *= max(dim, 1)
        total += count * _TENSOR_BYTES.get(tensor.scalar(1, "b"), 4)
    return int(total)


# ------------------------------------------------------------------------------------------- measurement
def metadata_for(path: str) -> tuple[dict, str]:
    """(manifest entry or embedded metadata, where it came from)."""
    manifest = os.path.join(os.path.dirname(os.path.abspath(path)), "manifest.json")
    if os.path.isfile(manifest):
        try:
            with open(manifest) as f:
                artifacts = json.load(f).get("artifacts", [])
        except (ValueError, AttributeError):
            raise RunnerError(f"{manifest}: not a manifest edgepkd wrote (invalid JSON)") from None
        for entry in artifacts:
            if entry.get("file") == os.path.basename(path):
                return entry, "manifest.json"
    if artifact_format(path) == "tflite":
        with open(path, "rb") as f:
            meta = tflite_metadata(f.read())
        return meta, "embedded" if meta else "none"
    return {}, "none"  # ONNX, .pte: read from the loaded model (custom metadata, the metadata method)


def preprocess(images, pre: dict):
    """uint8 (N, C, H, W) -> float32 (N, C, H, W), exactly as edgepkd's Dataset.normalize: x/255, -mean, /std."""
    np = sys.modules["numpy"]
    c, h, w = pre["input_shape"]
    if tuple(images.shape[1:]) != (c, h, w):
        raise RunnerError(f"the images are {tuple(images.shape[1:])} (C, H, W) but the model takes {(c, h, w)}; "
                          "resize them first (edgepkd bench writes them at the model's size)")
    inv = 1.0 / pre["scale"]
    x = images.astype(np.float32)
    # x / 255 (not x * (1/255)): the same float32 operations as the PyTorch preprocessing, so top-1 matches
    x = x / np.float32(round(inv)) if abs(inv - round(inv)) < 1e-6 else x * np.float32(pre["scale"])
    mean = np.array(pre["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.array(pre["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return (x - mean) / std


def peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux/Android


def timed_loop(step, n_inputs: int, min_runs: int, min_seconds: float, max_seconds: float) -> tuple[list, float]:
    """Run ``step(i)`` until both ``min_runs`` and ``min_seconds`` are reached (or ``max_seconds`` passed)."""
    clock = time.perf_counter
    times = []
    start = clock()
    i = 0
    while True:
        t0 = clock()
        step(i % n_inputs)
        t1 = clock()
        times.append(t1 - t0)
        i += 1
        elapsed = t1 - start
        if (i >= min_runs and elapsed >= min_seconds) or elapsed >= max_seconds:
            return times, elapsed


def summarize(times: list) -> dict:
    np = sys.modules["numpy"]
    ms = np.asarray(times, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(ms.mean()),
            "std": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0, "min": float(ms.min()), "max": float(ms.max())}


def measure_artifact(path: str, args) -> dict:
    """The JSON object of one artifact (see the module docstring); RunnerError when it cannot run."""
    try:
        import numpy as np
    except ImportError:
        raise EnvironmentMissing(f"numpy is not installed for {sys.executable}: "
                                 f"{runtimes.INSTALL[artifact_format(path)]}") from None
    if not os.path.isfile(path):
        raise RunnerError(f"{path}: no such file")
    fmt = artifact_format(path)
    meta, meta_source = metadata_for(path)
    images = labels = None
    if args.images:
        with np.load(args.images) as data:
            images, labels = data["images"], data["labels"]
    with open(path, "rb") as f:
        blob = f.read()
    digest = hashlib.sha256(blob).hexdigest()
    if meta_source == "manifest.json":
        problem = integrity_problem(len(blob), digest, meta)
        if problem:
            raise ArtifactChanged(f"{path}: {problem}; re-export it (edgepkd export RUN --target TARGET), or copy "
                                  "it again with its manifest.json")
    runtimes.import_runtime(fmt, args.runtime)  # imported before the baseline: its code is not the model's memory

    baseline = peak_rss_bytes()
    t0 = time.perf_counter()
    model = open_model(path, args.threads, args.runtime)
    load_ms = (time.perf_counter() - t0) * 1e3
    if fmt == "onnx" and not meta:
        meta = model.metadata()
        meta_source = "embedded" if meta else "none"
    if fmt == "executorch" and not meta:
        try:
            meta = model.metadata()
        except (ValueError, UnicodeDecodeError, RuntimeError) as e:
            raise RunnerError(f"{path}: its '{runtimes.PTE_METADATA_METHOD}' method does not hold edgepkd's JSON "
                              f"({runtimes.one_line(e)[:200]})") from None
        meta_source = "embedded" if meta else "none"

    io = model.io()
    shape = [int(s) if isinstance(s, int) or str(s).isdigit() else 1 for s in io["input"]["shape"]]
    pre = meta.get("preprocessing")
    if images is not None and not pre:
        raise RunnerError(f"{path}: no manifest.json next to it and no embedded metadata: cannot preprocess "
                          "--images (copy manifest.json next to the artifact)")
    # the model's memory: loaded and run once (arenas and delegate workspaces are allocated by the first run),
    # before the timing inputs exist, so that N preprocessed test images are not counted as the model's RAM
    first = (preprocess(images[:1], pre) if images is not None                   # (1, C, H, W) float32
             else np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32))
    with runtimes.quiet_stderr():
        model.run(model.prepare(first))
    loaded = peak_rss_bytes()
    if images is not None:
        x = preprocess(images, pre)                                       # (N, C, H, W) float32
        inputs = [model.prepare(x[i:i + 1]) for i in range(len(x))]       # each (1, C, H, W)
        source = f"{len(inputs)} test images"
    else:
        x = np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32)
        inputs = [model.prepare(x)]
        source = f"one standard-normal input (seed {args.seed})"

    # warm-up (benchmark_model: --warmup_runs, --warmup_min_secs); ExecuTorch logs its cpuinfo probes on the first run
    with runtimes.quiet_stderr():
        warm, warm_s = timed_loop(lambda i: model.run(inputs[i]), len(inputs), args.warmup_runs,
                                  args.warmup_seconds, args.max_seconds)
    accuracy = None
    if labels is not None:
        preds = np.array([int(np.argmax(model.logits(model.run(p)))) for p in inputs])
        correct = int((preds == labels.astype(np.int64)).sum())
        accuracy = {"images": len(labels), "correct": correct, "top1": 100.0 * correct / len(labels)}
    times, duration = timed_loop(lambda i: model.run(inputs[i]), len(inputs), args.min_runs,
                                 args.min_seconds, args.max_seconds)
    peak = peak_rss_bytes()
    return {
        "artifact": os.path.basename(path), "path": path, "format": fmt, "bytes": len(blob),
        "sha256": digest, "model": meta.get("model"),
        "precision": meta.get("precision"), "metadata": meta_source,
        "runtime": model.runtime, "runtime_version": model.version,
        "threads": model.threads if fmt == "executorch" else args.threads, "threads_requested": args.threads,
        "torch_imported": "torch" in sys.modules,
        "input": io["input"], "inputs": source, "load_ms": load_ms,
        "warmup": {"runs": len(warm), "seconds": warm_s},
        "runs": len(times), "duration_s": duration, "latency_ms": summarize(times),
        "accuracy": accuracy,
        "memory": {"peak_rss_bytes": peak, "baseline_rss_bytes": baseline,
                   "model_rss_bytes": None if loaded is None else max(loaded - baseline, 0),
                   "model_rss_rule": "peak RSS growth from before the model is loaded to after its first run"},
        "host": {"machine": platform.machine(), "system": platform.system(), "release": platform.release(),
                 "python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count()},
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="runner.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time exported models (.tflite, .onnx, .pte) at batch 1 in this device's runtime; print JSON "
                    "Lines.",
        epilog="Needs numpy and one runtime: tflite-runtime, ai-edge-litert or tensorflow (TFLite); onnxruntime; "
               "executorch-numpy-runtime (torch-free) or executorch (ExecuTorch .pte).")
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT", help=".tflite, .onnx or .pte file (manifest.json "
                   "next to it supplies preprocessing; else the artifact's embedded metadata)")
    p.add_argument("--images", metavar="NPZ", help="uint8 'images' (N, C, H, W) and 'labels' (N,): time on these "
                   "and report top-1 accuracy (default: one random input, no accuracy)")
    p.add_argument("--threads", type=int, default=1, help="interpreter / intra-op / ExecuTorch thread-pool threads "
                   "(default 1; executorch_numpy_runtime cannot set them)")
    p.add_argument("--runtime", default="auto", help="auto (default: the first found, in this order), tflite_runtime, "
                   "ai_edge_litert, tensorflow, onnxruntime, executorch_numpy_runtime, executorch")
    p.add_argument("--warmup-runs", type=int, default=1, help="at least this many warm-up runs (default 1)")
    p.add_argument("--warmup-seconds", type=float, default=0.5, help="and at least this long (default 0.5)")
    p.add_argument("--min-runs", type=int, default=50, help="time at least this many runs (default 50)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="and for at least this long (default 1)")
    p.add_argument("--max-seconds", type=float, default=150.0, help="but stop after this long (default 150)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")
    p.add_argument("--in-process", action="store_true", help="run several artifacts in this process (their peak "
                   "RSS then overlaps)")
    args = p.parse_args(argv)
    for name in ("threads", "min_runs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _run_child(path: str, argv: list) -> tuple[int, dict]:
    """Run one artifact in a child process (its own peak RSS); returns (exit code, its JSON object)."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), path, *argv, "--in-process"],
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if lines:
        return proc.returncode, json.loads(lines[-1])
    why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    if proc.returncode < 0:
        why = f"crashed (signal {-proc.returncode}): {why}"
    return 2, {"artifact": os.path.basename(path), "path": path, "error": f"{os.path.basename(path)}: {why}",
               "kind": "artifact"}


def main(argv=None) -> int:
    args = parse_args(argv)
    options = ["--threads", str(args.threads), "--runtime", args.runtime, "--warmup-runs", str(args.warmup_runs),
               "--warmup-seconds", repr(args.warmup_seconds), "--min-runs", str(args.min_runs),
               "--min-seconds", repr(args.min_seconds), "--max-seconds", repr(args.max_seconds),
               "--seed", str(args.seed)] + (["--images", args.images] if args.images else [])
    status = 0
    for path in args.artifacts:
        if len(args.artifacts) > 1 and not args.in_process:
            code, obj = _run_child(path, options)
        else:
            try:
                code, obj = 0, measure_artifact(path, args)
            except RunnerError as e:
                kind = ("environment" if isinstance(e, EnvironmentMissing) else
                        "integrity" if isinstance(e, ArtifactChanged) else "artifact")
                code, obj = e.exit_code, {"artifact": os.path.basename(path), "path": path, "error": str(e),
                                          "kind": kind}
        if "error" in obj:
            sys.stderr.write(f"runner: error: {obj['error']}\n")
        _emit(obj)
        status = max(status, code)
    return status


if __name__ == "__main__":
    sys.exit(main())
