#!/usr/bin/env python3
"""edgepkd's device runner: time exported models in the runtime a device actually has.

One file, no edgepkd imports: the standard library, numpy and one runtime (``tflite_runtime``,
``ai_edge_litert`` or ``tensorflow`` for .tflite; ``onnxruntime`` for .onnx; ``executorch_numpy_runtime``, or
``executorch`` (which imports torch) for .pte). Copy it to a device and run

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
    before the model was loaded (the runtime and numpy already imported, the inputs already prepared).
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
device lacks numpy or a runtime.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time

RUNTIMES = {"tflite": ("tflite_runtime", "ai_edge_litert", "tensorflow"), "onnx": ("onnxruntime",),
            "executorch": ("executorch_numpy_runtime", "executorch")}
INSTALL = {"tflite": "pip install 'numpy<2' tflite-runtime (or ai-edge-litert)", "onnx": "pip install onnxruntime",
           "executorch": "pip install executorch-numpy-runtime (Python >= 3.12, torch-free), or pip install "
                         "executorch==1.5.1 torch==2.14.1"}
SUFFIXES = {".tflite": "tflite", ".onnx": "onnx", ".pte": "executorch"}
PTE_METADATA_METHOD = "edgepkd_metadata"   # the .pte's constant method holding edgepkd's metadata (JSON bytes)


class RunnerError(Exception):
    """An artifact cannot be run here; the message is one line."""

    exit_code = 2


class EnvironmentMissing(RunnerError):
    """This device lacks numpy or the runtime."""

    exit_code = 3


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


def artifact_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext in SUFFIXES:
        return SUFFIXES[ext]
    raise RunnerError(f"{path}: not a .tflite, .onnx or .pte file (the runner runs TFLite, ONNX and ExecuTorch "
                      "artifacts)")


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


# ------------------------------------------------------------------------------------------------ runtimes
@contextlib.contextmanager
def _quiet_stderr(captured: list | None = None):
    """TFLite's native code prints 'INFO: Created TensorFlow Lite XNNPACK delegate' straight to fd 2; the executorch
    wheel's runtime logs through Python's sys.stderr. Both are kept out of the output; with ``captured``, what was
    written is appended to it (a load error's native reason)."""
    sys.stderr.flush()
    saved = os.dup(2)
    python_level = io.StringIO()
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stderr(python_level):
                yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if captured is not None:
                sink.seek(0)
                captured.append(sink.read().decode("utf-8", "replace") + python_level.getvalue())


def _detail(e: BaseException) -> str:
    """``e``'s message on one line (whitespace runs collapsed: runtimes put the reason on later lines), or its
    type's name. This file needs only numpy and a runtime, so it keeps its own copy of edgepkd.errors.first_line's
    job."""
    return " ".join(str(e).split()) or type(e).__name__


def _native_reason(text: str) -> str:
    """The last line an ExecuTorch runtime logged as an error ('E ... program.cpp:114] File size is too small...',
    or '[program.cpp:114] ...'), without its prefix; '' when none."""
    lines = [line.strip() for line in text.splitlines() if "] " in line and not line.lstrip().startswith("I ")]
    return lines[-1].split("] ", 1)[1] if lines else ""


def _import_runtime(fmt: str, wanted: str):
    """(module name, version, Interpreter class or onnxruntime module) of the first runtime found."""
    names = RUNTIMES[fmt] if wanted == "auto" else (wanted,)
    if wanted != "auto" and wanted not in RUNTIMES[fmt]:
        raise RunnerError(f"--runtime {wanted} does not run {fmt} files (use one of {', '.join(RUNTIMES[fmt])})")
    for name in names:
        try:
            if name == "tflite_runtime":
                import tflite_runtime
                from tflite_runtime.interpreter import Interpreter
                return name, tflite_runtime.__version__, Interpreter
            if name == "ai_edge_litert":
                import ai_edge_litert
                from ai_edge_litert.interpreter import Interpreter
                return name, getattr(ai_edge_litert, "__version__", "unknown"), Interpreter
            if name == "tensorflow":
                import tensorflow as tf
                return name, tf.__version__, tf.lite.Interpreter
            if name == "executorch_numpy_runtime":
                import executorch_numpy_runtime as etnp
                return name, f"{etnp.__version__} (ExecuTorch {etnp.__et_version__})", etnp
            if name == "executorch":
                return name, *_official_executorch()
            import onnxruntime
            return name, onnxruntime.__version__, onnxruntime
        except ImportError:
            continue
    raise EnvironmentMissing(f"no {fmt} runtime on this device (tried {', '.join(names)}): {INSTALL[fmt]}")


def _official_executorch():
    """(version, executorch.runtime module) of the ``executorch`` wheel, whose runtime imports torch (its pybindings
    link libtorch); its import-time notices (an experimental-API warning, torch's logging) are silenced."""
    import warnings

    with warnings.catch_warnings(), _quiet_stderr():
        warnings.simplefilter("ignore")
        import executorch.runtime
        from executorch.version import __version__
    return __version__, executorch.runtime


class TFLiteModel:
    def __init__(self, path: str, threads: int, runtime: str):
        import numpy as np

        self.np = np
        self.runtime, self.version, interpreter = _import_runtime("tflite", runtime)
        try:
            with _quiet_stderr():
                self.interpreter = interpreter(model_path=path, num_threads=threads)
                self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            detail = _detail(e)
            hint = (": the model uses an op version newer than this runtime knows (install ai-edge-litert, or "
                    "bench an export target this runtime supports)" if "version" in detail and "builtin" in detail
                    else "")
            raise RunnerError(f"{os.path.basename(path)}: {self.runtime} {self.version} cannot run it{hint} "
                              f"({detail[:300]})") from None
        self.inp = self.interpreter.get_input_details()[0]
        self.out = self.interpreter.get_output_details()[0]

    def io(self) -> dict:
        def describe(d):
            out = {"shape": [int(s) for s in d["shape"]], "dtype": self.np.dtype(d["dtype"]).name}
            if d["dtype"] not in (self.np.float32, self.np.float16):
                out["quantization"] = {"scale": float(d["quantization"][0]), "zero_point": int(d["quantization"][1])}
            return out

        return {"input": describe(self.inp), "output": describe(self.out)}

    def prepare(self, x):
        """float (1, C, H, W) -> the input tensor's dtype (int8/uint8 quantized with the interpreter's scale)."""
        np = self.np
        if self.inp["dtype"] in (np.float32, np.float16):
            return x.astype(self.inp["dtype"])
        scale, zero = self.inp["quantization"]
        info = np.iinfo(self.inp["dtype"])
        return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(self.inp["dtype"])

    def run(self, prepared):
        self.interpreter.set_tensor(self.inp["index"], prepared)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.out["index"])

    def logits(self, raw):
        if raw.dtype in (self.np.float32, self.np.float16):
            return raw.astype(self.np.float32)
        scale, zero = self.out["quantization"]
        return (raw.astype(self.np.float32) - zero) * scale


class OnnxModel:
    def __init__(self, path: str, threads: int, runtime: str):
        import numpy as np

        self.np = np
        self.runtime, self.version, ort = _import_runtime("onnx", runtime)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types (InvalidGraph, Fail, ...)
            detail = _detail(e)
            raise RunnerError(f"{os.path.basename(path)}: onnxruntime {self.version} cannot load it "
                              f"({detail[:300]})") from None
        self.inp = self.session.get_inputs()[0]
        self.out = self.session.get_outputs()[0]

    def io(self) -> dict:
        def describe(d):
            return {"name": d.name, "shape": [s if isinstance(s, int) else str(s) for s in d.shape],
                    "dtype": d.type.replace("tensor(", "").replace(")", "").replace("float", "float32")}

        return {"input": describe(self.inp), "output": describe(self.out)}

    def prepare(self, x):
        return x.astype(self.np.float32)

    def run(self, prepared):
        return self.session.run(None, {self.inp.name: prepared})[0]

    def logits(self, raw):
        return raw.astype(self.np.float32)


class ExecuTorchModel:
    """A .pte program's ``forward`` in ``executorch_numpy_runtime`` (numpy in and out, no torch) or in the
    ``executorch`` wheel's ``executorch.runtime`` (torch tensors in and out; the runtime imports torch itself).

    The adapter for a .pte anywhere (edgepkd's export verification and the benchmarks use it too):
    ``m = ExecuTorchModel(path, threads=1, runtime="auto")``, then ``m.logits(m.run(m.prepare(x)))`` for a
    float32 (1, C, H, W) array ``x``; ``m.metadata()`` is the embedded metadata. ``threads`` None leaves
    ExecuTorch's thread pool as it is; ``m.threads`` is the pool's size, None where the runtime cannot tell."""

    def __init__(self, path: str, threads: int | None = 1, runtime: str = "auto"):
        import numpy as np

        self.np = np
        self.runtime, self.version, rt = _import_runtime("executorch", runtime)
        self.numpy_runtime = self.runtime == "executorch_numpy_runtime"
        self.threads = None
        log: list[str] = []
        try:
            with _quiet_stderr(log):  # ExecuTorch logs cpuinfo probes and the reason of a failed load
                self.program = rt.Runtime.get().load_program(path)
                if not self.numpy_runtime:
                    self.threads = self._set_threads(threads)
                self.forward = self.program.load_method("forward")
        except Exception as e:  # the runtimes' own types: ProgramLoadError, RuntimeError ('error: 0x:23')
            detail = _detail(e)
            reason = _native_reason("".join(log))
            raise RunnerError(f"{os.path.basename(path)}: {self.runtime} {self.version} cannot load it "
                              f"({detail[:200]}{'; ' + reason[:200] if reason else ''})") from None
        if self.numpy_runtime:
            meta = self.forward.metadata
            self.in_shape = list(meta["inputs"][0]["shape"])
            self.out_shape = list(meta["outputs"][0]["shape"])
        else:
            meta = self.forward.metadata
            self.in_shape = list(meta.input_tensor_meta(0).sizes())
            self.out_shape = list(meta.output_tensor_meta(0).sizes())
            self.torch = sys.modules["torch"]  # imported by executorch.runtime, not by this runner

    @staticmethod
    def _set_threads(threads: int | None) -> int | None:
        from executorch.extension.pybindings import portable_lib

        if threads is not None and portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)
        return portable_lib._threadpool_get_thread_count()

    def io(self) -> dict:
        return {"input": {"shape": self.in_shape, "dtype": "float32"},
                "output": {"shape": self.out_shape, "dtype": "float32"}}

    def prepare(self, x):
        x = self.np.ascontiguousarray(x, dtype=self.np.float32)
        return x if self.numpy_runtime else self.torch.from_numpy(x)

    def run(self, prepared):
        if self.numpy_runtime:
            return self.forward([prepared])[0]
        return self.forward.execute([prepared])[0]

    def logits(self, raw):
        return (raw if self.numpy_runtime else raw.numpy()).astype(self.np.float32)

    def metadata(self) -> dict:
        """The JSON of the constant method 'edgepkd_metadata' (uint8 bytes); {} when the program has none."""
        names = self.program.method_names
        if PTE_METADATA_METHOD not in names:
            return {}
        with _quiet_stderr():
            method = self.program.load_method(PTE_METADATA_METHOD)
            raw = method([]) if self.numpy_runtime else method.execute([])
        data = raw[0] if self.numpy_runtime else raw[0].numpy()
        return json.loads(self.np.asarray(data, dtype=self.np.uint8).tobytes().decode())


def open_model(path: str, threads: int | None = 1, runtime: str = "auto"):
    """The runner's model for ``path`` by its suffix (TFLiteModel, OnnxModel or ExecuTorchModel), each with
    ``prepare(x)`` (float32 (1, C, H, W) -> the runtime's input), ``run(prepared)`` (one timed inference),
    ``logits(raw)`` (-> float32 (1, K)), ``io()``, ``runtime`` and ``version``."""
    fmt = artifact_format(path)
    if fmt == "executorch":
        return ExecuTorchModel(path, threads, runtime)
    return (TFLiteModel if fmt == "tflite" else OnnxModel)(path, threads or 1, runtime)


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


def bench(path: str, args) -> dict:
    try:
        import numpy as np
    except ImportError:
        raise EnvironmentMissing(f"numpy is not installed for {sys.executable}: "
                                 f"{INSTALL[artifact_format(path)]}") from None
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
    _import_runtime(fmt, args.runtime)  # imported before the baseline: its code is not the model's memory

    baseline = peak_rss_bytes()
    t0 = time.perf_counter()
    model = open_model(path, args.threads, args.runtime)
    load_ms = (time.perf_counter() - t0) * 1e3
    if fmt == "onnx" and not meta:
        custom = model.session.get_modelmeta().custom_metadata_map
        meta = {k: json.loads(v) for k, v in custom.items()}
        meta_source = "embedded" if meta else "none"
    if fmt == "executorch" and not meta:
        try:
            meta = model.metadata()
        except (ValueError, UnicodeDecodeError, RuntimeError) as e:
            raise RunnerError(f"{path}: its '{PTE_METADATA_METHOD}' method does not hold edgepkd's JSON "
                              f"({_detail(e)[:200]})") from None
        meta_source = "embedded" if meta else "none"

    io = model.io()
    shape = [int(s) if isinstance(s, int) or str(s).isdigit() else 1 for s in io["input"]["shape"]]
    if images is not None:
        pre = meta.get("preprocessing")
        if not pre:
            raise RunnerError(f"{path}: no manifest.json next to it and no embedded metadata: cannot preprocess "
                              "--images (copy manifest.json next to the artifact)")
        x = preprocess(images, pre)                                       # (N, C, H, W) float32
        inputs = [model.prepare(x[i:i + 1]) for i in range(len(x))]       # each (1, C, H, W)
        source = f"{len(inputs)} test images"
    else:
        x = np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32)
        inputs = [model.prepare(x)]
        source = f"one standard-normal input (seed {args.seed})"

    # warm-up (benchmark_model: --warmup_runs, --warmup_min_secs); ExecuTorch logs its cpuinfo probes on the first run
    with _quiet_stderr():
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
                   "model_rss_bytes": None if peak is None else max(peak - baseline, 0)},
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
                code, obj = 0, bench(path, args)
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
