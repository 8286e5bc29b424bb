"""Export formats: one registered class per format holds every fact about it. Adding a format is adding a class
here (its facts and ``open_runtime``: the runtime adapter of compress/runtimes.py that verification runs it in) and
its exporter module (``export``, ``read_metadata``); targets (``export/*.yaml``) and device profiles
(``devices/*.yaml``) are validated against this registry.

    FORMATS.get("onnx").suffix      '.onnx'
    FORMATS.get("tflite").methods   ('none', 'pt2e', 'weights')
    runtime_format("onnxruntime")   'onnx'
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from edgepkd.compress import runtimes
from edgepkd.errors import EdgepkdError
from edgepkd.registry import Registry


class ExportFormat:
    """What edgepkd knows about one file format."""

    name: str                       # a target's ``format``
    suffix: str                     # the artifact's file suffix
    needs: tuple[str, ...]          # modules the export and its verification need (all in the 'export' extra)
    methods: tuple[str, ...]        # the ``quantization.method`` values a target of this format accepts
    runtime: str | None             # the device runtime (a profile's ``runtime``) that runs it; None: no device
    module: str                     # the exporter: export(), read_metadata(); optional companions(): files
                                    # written next to a verified artifact

    def missing(self) -> list[str]:
        """The needed modules this Python lacks."""
        return [m for m in self.needs if importlib.util.find_spec(m) is None]

    def exporter(self):
        return importlib.import_module(self.module)

    def export(self, model, example, path: Path, target, calibration, metadata: dict) -> None:
        """Write ``model`` to ``path`` for ``target`` (quantized as it says, ``metadata`` embedded)."""
        self.exporter().export(model, example, path, target, calibration, metadata)

    def open(self, path: Path):
        """The artifact in its runtime for verification: an adapter (``model(x) -> logits``, ``io()``, ``runtime``,
        ``version``); a one-line EdgepkdError naming ``path`` when the runtime cannot load it."""
        try:
            return self.open_runtime(path)
        except runtimes.RunnerError as e:
            raise EdgepkdError(f"{path}: {str(e).removeprefix(Path(path).name + ': ')}") from None

    def open_runtime(self, path: Path):
        """The runtime adapter that verification runs this format's artifacts in."""
        raise NotImplementedError(self.name)

    def second_opinions(self, path: Path) -> list:
        """Other ways a device may run this format's artifacts (adapters, as ``open``), cross-checked on part of the
        test split by ``verify``; [] for most formats."""
        return []

    def read_metadata(self, path: Path) -> dict:
        """The metadata an artifact carries (preprocessing, labels, provenance)."""
        return self.exporter().read_metadata(path)

    def companions(self, tmp: Path, final: Path, model, entry: dict) -> dict:
        """Once ``tmp`` passed verification in ``model`` (``open``'s adapter) and before it is renamed to ``final``:
        write the format's companion files next to ``final`` and return the fields they add to the manifest entry
        ({} for most formats)."""
        write = getattr(self.exporter(), "companions", None)
        return write(tmp, final, model, entry) if write is not None else {}


FORMATS: Registry[ExportFormat] = Registry("export format")


def _register(cls: type[ExportFormat]) -> type[ExportFormat]:
    FORMATS.register(cls.name, cls())
    return cls


@_register
class Onnx(ExportFormat):
    name, suffix, runtime = "onnx", ".onnx", "onnxruntime"
    needs = ("onnx", "onnxscript", "onnxruntime")
    methods = ("none", "ort_static", "ort_dynamic", "weights")
    module = "edgepkd.compress.onnx_export"

    def open_runtime(self, path: Path):
        return runtimes.OnnxModel(str(path), threads=1, runtime="onnxruntime")


@_register
class TFLite(ExportFormat):
    name, suffix, runtime = "tflite", ".tflite", "tflite"
    needs = ("litert_torch", "ai_edge_litert")
    methods = ("none", "pt2e", "weights")
    module = "edgepkd.compress.tflite_export"

    def open_runtime(self, path: Path):
        return runtimes.TFLiteModel(str(path), threads=1, runtime="ai_edge_litert")

    def second_opinions(self, path: Path) -> list:
        # TFLite's builtin kernels, as where XNNPACK is off or a GPU/NNAPI delegate falls back: they run some ops
        # in place, and a graph whose buffers alias wrongly gives other logits there (issue #13 found one)
        return [runtimes.TFLiteModel(str(path), threads=1, runtime="ai_edge_litert", kernels="builtin")]


@_register
class TFLiteMicro(ExportFormat):
    # the same flatbuffer as tflite, restricted to TFLite Micro's ops and verified in its interpreter; the C/C++
    # firmware sources are written next to each file
    name, suffix, runtime = "tflite-micro", ".tflite", "tflite-micro"
    needs = ("litert_torch", "ai_edge_litert", "tflite_micro")
    methods = ("none", "pt2e")
    module = "edgepkd.compress.tflm_export"

    def open_runtime(self, path: Path):
        """TFLite Micro's interpreter at the exact arena (found by bisection first; TFLMError, one line, when the
        file does not load at all)."""
        from edgepkd.compress import tflm

        return tflm.TFLMModel(path, tflm.find_arena(path))


@_register
class Torch(ExportFormat):
    name, suffix, runtime = "torch", ".pt2", None     # torch.export programs: for PyTorch hosts, not benched
    needs = ("torchao",)
    methods = ("none", "torchao")
    module = "edgepkd.compress.torch_export"

    def open_runtime(self, path: Path):
        return runtimes.TorchProgramModel(str(path))


@_register
class ExecuTorch(ExportFormat):
    name, suffix, runtime = "executorch", ".pte", "executorch"
    needs = ("executorch", "torchao")
    methods = ("none", "pt2e")
    module = "edgepkd.compress.executorch_export"

    def open_runtime(self, path: Path):
        # the executorch wheel's runtime (torch is here anyway); its thread pool left at its default
        return runtimes.ExecuTorchModel(str(path), threads=None, runtime="executorch")


def device_runtimes() -> list[str]:
    """Every device runtime some format runs in."""
    return sorted({f.runtime for _, f in FORMATS.items() if f.runtime})


def runtime_format(runtime: str) -> str:
    """The format a device runtime runs ('onnxruntime' -> 'onnx')."""
    return next(name for name, f in FORMATS.items() if f.runtime == runtime)


def quant_methods() -> list[str]:
    """Every quantization method some format accepts."""
    return sorted({m for _, f in FORMATS.items() for m in f.methods})
