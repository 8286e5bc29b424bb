"""Runtime adapters: an exported artifact opened in its runtime, run one batch at a time, with the runtime's I/O
quantization. Export verification (``compress/formats.py``), the device runner (``measure/runner.py``), bench,
early exit and the benchmarks all run artifacts through these classes, so input quantization, output
dequantization and the I/O description are written once.

No edgepkd imports: the standard library, numpy and one runtime, imported when a model is opened. The device
runner loads this file from beside itself (``edgepkd bench`` copies both to an ssh device), so it must stay
standalone.

    m = open_model("chain-s1.tflite", threads=1)       # TFLiteModel, OnnxModel or ExecuTorchModel, by suffix
    logits = m(x)                                       # float32 (1, C, H, W) -> float32 (1, K)
    raw = m.run(m.prepare(x)); logits = m.logits(raw)  # the same in steps: only ``run`` is timed on a device

Each adapter has ``prepare(x)`` (float32 (1, C, H, W) -> the runtime's input: int8 inputs quantized with the
scale and zero point the runtime reports), ``run(prepared)`` (one inference), ``logits(raw)`` (-> float32 (1, K),
int8 outputs dequantized), ``io()`` (input and output: shape, dtype, quantization), ``runtime`` (the module's
name) and ``version``. ``TorchProgramModel`` runs a torch.export program (.pt2) in PyTorch for export
verification (no device runs .pt2); TFLite Micro's adapter is ``compress/tflm.py``'s ``TFLMModel``, on the same
``quantize`` / ``dequantize``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile

# the device runtimes of each format, in the order ``runtime="auto"`` tries them; what to install when none is there
RUNTIMES = {"tflite": ("tflite_runtime", "ai_edge_litert", "tensorflow"), "onnx": ("onnxruntime",),
            "executorch": ("executorch_numpy_runtime", "executorch")}
INSTALL = {"tflite": "pip install 'numpy<2' tflite-runtime (or ai-edge-litert)", "onnx": "pip install onnxruntime",
           "executorch": "pip install executorch-numpy-runtime (Python >= 3.12, torch-free), or pip install "
                         "executorch==1.5.1 torch==2.14.1"}
SUFFIXES = {".tflite": "tflite", ".onnx": "onnx", ".pte": "executorch"}
PTE_METADATA_METHOD = "edgepkd_metadata"   # the .pte's constant method holding edgepkd's metadata (JSON bytes)


class RunnerError(Exception):
    """An artifact cannot be run here; the message is one line, starting with the file's name."""

    exit_code = 2


class EnvironmentMissing(RunnerError):
    """This device lacks numpy or the runtime."""

    exit_code = 3


def artifact_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext in SUFFIXES:
        return SUFFIXES[ext]
    raise RunnerError(f"{path}: not a .tflite, .onnx or .pte file (the runner runs TFLite, ONNX and ExecuTorch "
                      "artifacts)")


@contextlib.contextmanager
def quiet_stderr(captured: list | None = None):
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


def one_line(e: BaseException) -> str:
    """``e``'s message on one line (whitespace runs collapsed: runtimes put the reason on later lines), or its
    type's name. This file needs only numpy and a runtime, so it keeps its own copy of edgepkd.errors.first_line's
    job."""
    return " ".join(str(e).split()) or type(e).__name__


def _native_reason(text: str) -> str:
    """The last line an ExecuTorch runtime logged as an error ('E ... program.cpp:114] File size is too small...',
    or '[program.cpp:114] ...'), without its prefix; '' when none."""
    lines = [line.strip() for line in text.splitlines() if "] " in line and not line.lstrip().startswith("I ")]
    return lines[-1].split("] ", 1)[1] if lines else ""


def import_runtime(fmt: str, wanted: str):
    """(module name, version, Interpreter class or runtime module) of ``wanted``, or with "auto" of the first of
    ``RUNTIMES[fmt]`` found."""
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

    with warnings.catch_warnings(), quiet_stderr():
        warnings.simplefilter("ignore")
        import executorch.runtime
        from executorch.version import __version__
    return __version__, executorch.runtime


# ------------------------------------------------------------------------------------------ I/O quantization
def quantize(x, dtype, scale: float, zero_point: int):
    """float ``x`` -> integer ``dtype`` (int8, uint8): round(x / scale) + zero_point, clipped to the type's range."""
    import numpy as np

    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(dtype)


def dequantize(q, scale: float, zero_point: int):
    """Integer ``q`` -> float32: (q - zero_point) * scale."""
    import numpy as np

    return (q.astype(np.float32) - zero_point) * scale


def describe(shape, dtype, quantization: tuple[float, int] | None) -> dict:
    """One side of ``io()``: shape, dtype name, and the scale and zero point of an integer tensor."""
    import numpy as np

    out = {"shape": [int(s) for s in shape], "dtype": np.dtype(dtype).name}
    if quantization is not None:
        out["quantization"] = {"scale": float(quantization[0]), "zero_point": int(quantization[1])}
    return out


class Adapter:
    """What every adapter has: ``model(x)`` is ``logits(run(prepare(x)))``."""

    runtime: str
    version: str

    def __call__(self, x):
        """float32 (1, C, H, W) -> float32 logits (1, K)."""
        return self.logits(self.run(self.prepare(x)))


# ------------------------------------------------------------------------------------------------ adapters
class TFLiteModel(Adapter):
    """A .tflite in ``tflite_runtime``, ``ai_edge_litert`` or ``tensorflow``'s Interpreter; int8 / uint8 inputs and
    outputs (de)quantized with the scale and zero point the interpreter reports."""

    def __init__(self, path: str, threads: int = 1, runtime: str = "auto", kernels: str = "default"):
        """``kernels``: 'default' (the interpreter's default delegate, XNNPACK) or 'builtin' (TFLite's own kernels,
        no default delegate: what runs where XNNPACK is off or a delegate falls back)."""
        import sys

        import numpy as np

        self.np = np
        self.runtime, self.version, interpreter = import_runtime("tflite", runtime)
        extra = {}
        if kernels == "builtin":
            resolver = getattr(sys.modules[interpreter.__module__], "OpResolverType", None)
            if resolver is None:
                raise RunnerError(f"{os.path.basename(path)}: {self.runtime} {self.version} cannot choose its "
                                  "kernels (no OpResolverType)")
            extra["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            self.runtime += " (builtin kernels)"
        try:
            with quiet_stderr():
                self.interpreter = interpreter(model_path=str(path), num_threads=threads, **extra)
                self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            detail = one_line(e)
            hint = (": the model uses an op version newer than this runtime knows (install ai-edge-litert, or "
                    "bench an export target this runtime supports)" if "version" in detail and "builtin" in detail
                    else "")
            raise RunnerError(f"{os.path.basename(path)}: {self.runtime} {self.version} cannot run it{hint} "
                              f"({detail[:300]})") from None
        self.inp = self.interpreter.get_input_details()[0]
        self.out = self.interpreter.get_output_details()[0]

    def _float(self, d) -> bool:
        return d["dtype"] in (self.np.float32, self.np.float16)

    def io(self) -> dict:
        return {side: describe(d["shape"], d["dtype"], None if self._float(d) else d["quantization"])
                for side, d in (("input", self.inp), ("output", self.out))}

    def prepare(self, x):
        """float (1, C, H, W) -> the input tensor's dtype (int8/uint8 quantized with the interpreter's scale)."""
        if self._float(self.inp):
            return x.astype(self.inp["dtype"])
        return quantize(x, self.inp["dtype"], *self.inp["quantization"])

    def run(self, prepared):
        self.interpreter.set_tensor(self.inp["index"], prepared)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.out["index"])

    def logits(self, raw):
        if raw.dtype in (self.np.float32, self.np.float16):
            return raw.astype(self.np.float32)
        return dequantize(raw, *self.out["quantization"])


class OnnxModel(Adapter):
    """An .onnx in onnxruntime's CPU provider, ``threads`` intra-op threads (float in and out: edgepkd's int8 ONNX
    files quantize inside the graph)."""

    def __init__(self, path: str, threads: int = 1, runtime: str = "auto"):
        import numpy as np

        self.np = np
        self.runtime, self.version, ort = import_runtime("onnx", runtime)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types (InvalidGraph, Fail, ...)
            detail = one_line(e)
            raise RunnerError(f"{os.path.basename(path)}: onnxruntime {self.version} cannot load it "
                              f"({detail[:300]})") from None
        self.inp = self.session.get_inputs()[0]
        self.out = self.session.get_outputs()[0]

    def io(self) -> dict:
        def side(d):
            return {"name": d.name, "shape": [s if isinstance(s, int) else str(s) for s in d.shape],
                    "dtype": d.type.replace("tensor(", "").replace(")", "").replace("float", "float32")}

        return {"input": side(self.inp), "output": side(self.out)}

    def prepare(self, x):
        return x.astype(self.np.float32)

    def run(self, prepared):
        return self.session.run(None, {self.inp.name: prepared})[0]

    def logits(self, raw):
        return raw.astype(self.np.float32)

    def metadata(self) -> dict:
        """The model's metadata_props, each value JSON (what edgepkd export embeds)."""
        custom = self.session.get_modelmeta().custom_metadata_map
        return {k: json.loads(v) for k, v in custom.items()}


class ExecuTorchModel(Adapter):
    """A .pte program's ``forward`` in ``executorch_numpy_runtime`` (numpy in and out, no torch) or in the
    ``executorch`` wheel's ``executorch.runtime`` (torch tensors in and out; the runtime imports torch itself).
    float32 in and out: edgepkd's int8 programs quantize inside the graph. ``threads`` None leaves ExecuTorch's
    thread pool as it is; ``m.threads`` is the pool's size, None where the runtime cannot tell;
    ``m.metadata()`` is the embedded metadata."""

    def __init__(self, path: str, threads: int | None = 1, runtime: str = "auto"):
        import numpy as np

        self.np = np
        self.runtime, self.version, rt = import_runtime("executorch", runtime)
        self.numpy_runtime = self.runtime == "executorch_numpy_runtime"
        self.threads = None
        log: list[str] = []
        try:
            with quiet_stderr(log):  # ExecuTorch logs cpuinfo probes and the reason of a failed load
                self.program = rt.Runtime.get().load_program(str(path))
                if not self.numpy_runtime:
                    self.threads = self._set_threads(threads)
                self.forward = self.program.load_method("forward")
        except Exception as e:  # the runtimes' own types: ProgramLoadError, RuntimeError ('error: 0x:23')
            detail = one_line(e)
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
            self.torch = sys.modules["torch"]  # imported by executorch.runtime, not by this module

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
        with quiet_stderr():
            method = self.program.load_method(PTE_METADATA_METHOD)
            raw = method([]) if self.numpy_runtime else method.execute([])
        data = raw[0] if self.numpy_runtime else raw[0].numpy()
        return json.loads(self.np.asarray(data, dtype=self.np.uint8).tobytes().decode())


class TorchProgramModel(Adapter):
    """A torch.export program (.pt2, torchao-quantized or not) in PyTorch on this host: export verification of the
    torch targets (no device runtime runs .pt2). ``threads`` is not applied: torch's thread count is
    process-wide, and this model shares the process."""

    runtime = "torch.export"

    def __init__(self, path: str, threads: int | None = None):
        import numpy as np
        import torch

        try:
            import torchao  # noqa: F401  (registers the quantized tensor subclasses the program refers to)
        except ImportError:
            pass
        self.np, self.torch, self.version = np, torch, torch.__version__
        try:
            self.module = torch.export.load(str(path)).module()
        except Exception as e:
            raise RunnerError(f"{os.path.basename(path)}: torch.export.load cannot load it "
                              f"({one_line(e)[:300]})") from None

    def io(self) -> dict:
        return {"input": {"dtype": "float32"}, "output": {"dtype": "float32"}}

    def prepare(self, x):
        return self.torch.from_numpy(x.astype(self.np.float32))

    def run(self, prepared):
        with self.torch.no_grad():
            return self.module(prepared)

    def logits(self, raw):
        return raw.numpy()


def open_model(path: str, threads: int | None = 1, runtime: str = "auto"):
    """The adapter for ``path`` by its suffix: TFLiteModel, OnnxModel or ExecuTorchModel (``runtime``: one of
    ``RUNTIMES[format]``, or "auto" for the first found)."""
    fmt = artifact_format(path)
    if fmt == "executorch":
        return ExecuTorchModel(path, threads, runtime)
    return (TFLiteModel if fmt == "tflite" else OnnxModel)(path, threads or 1, runtime)
