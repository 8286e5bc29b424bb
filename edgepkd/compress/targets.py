"""Export targets: ``export/*.yaml`` files loaded into typed dataclasses, looked up through a registry.

Built-in targets live in the repository's ``export/`` folder (an installed wheel carries a copy: see
``edgepkd/builtins.py``); a user adds one by dropping a YAML file into
``./export/`` (or ``--targets-dir``). A target names the format, the precision, the quantization method with its
settings, and the verification tolerances.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edgepkd.builtins import builtin_dir
from edgepkd.compress.formats import FORMATS, ExportFormat
from edgepkd.config import check, load_named_dirs
from edgepkd.registry import Registry, closest

BUILTIN_DIR = builtin_dir("export")



@dataclass
class QuantConfig:
    method: str = "none"                           # one of the format's methods (formats.py); weights: int8
                                                   # storage of every float constant, float compute (weights.py)
    op_types: list[str] = field(default_factory=lambda: ["Conv", "MatMul", "Gemm"])  # ort_*: ops to quantize
    per_channel: bool = True
    calibration_images: int = 256                       # training images run through the model to calibrate
    exclude_modules: list[str] = field(default_factory=list)  # ort_*, pt2e: glob patterns of module paths kept float
    calibration_method: Literal["minmax", "percentile", "entropy"] = "percentile"  # ort_static activation ranges
    modules: list[Literal["linear", "conv"]] = field(default_factory=lambda: ["linear", "conv"])  # pt2e
    activations: Literal["static", "dynamic"] = "static"  # pt2e: calibrated int8 activations (TFLite: int8 I/O), or
                                                          # int8 weights with activations quantized at run time
    config: Literal["int8_dynamic_activation_int8_weight", "int8_weight_only"] = \
        "int8_dynamic_activation_int8_weight"            # torchao
    min_elements: int = 64                               # weights, float_weights: constants with fewer values
                                                         # stay float
    reduce_range: bool = False                           # ort_*: 7-bit weights (onnxruntime's reduce_range): its
                                                         # u8s8 kernels on x86 CPUs without VNNI (AVX2, AVX-512F)
                                                         # sum pairs of 8-bit products in int16 and can saturate
    float_weights: Literal["fp32", "int8"] = "fp32"      # pt2e (tflite): the float constants int8 compute leaves
                                                         # (excluded modules, the scan's) stored as int8 behind a
                                                         # DEQUANTIZE run once at load, as method weights does

    def __post_init__(self):
        check(self.calibration_images >= 1, "calibration_images", "must be at least 1")
        check(bool(self.op_types), "op_types", "must name at least one ONNX op type")
        check(self.min_elements >= 1, "min_elements", "must be at least 1")

    def excludes(self, module: str) -> bool:
        """Whether the module at path ``module`` ('blocks.0.mixer.fwd.x_proj') stays float (``exclude_modules``)."""
        return bool(module) and any(fnmatch.fnmatch(module, pattern) for pattern in self.exclude_modules)


@dataclass
class VerifyConfig:
    max_abs_diff: float | None = None      # fp32: fail when a |logit difference| exceeds this (+ the relative part)
    max_rel_diff: float | None = None      # fp32: each logit may also differ by this times |its PyTorch value|:
                                           # |out - ref| <= max_abs_diff + max_rel_diff * |ref| elementwise
                                           # (numpy.allclose's rule), so large logits are held to float rounding
    rel_scale: Literal["logit", "row"] = "logit"  # what max_rel_diff multiplies: the logit's own |ref|, or the
                                           # largest |ref| of its image's row (float rounding of a logit is that
                                           # of the sums it came from, so a logit near 0 beside large ones rounds
                                           # like them: 'row' is the built-in fp32 targets' rule)
    max_accuracy_drop: float | None = None  # int8: fail when accuracy drops more than this many points
    min_agreement: float | None = None     # fail when top-1 agreement with PyTorch fp32 (%) is below this

    def __post_init__(self):
        check(self.max_abs_diff is None or self.max_abs_diff > 0, "max_abs_diff", "must be positive")
        check(self.max_rel_diff is None or 0 <= self.max_rel_diff < 1, "max_rel_diff", "must be in [0, 1)")
        check(self.max_accuracy_drop is None or self.max_accuracy_drop >= 0, "max_accuracy_drop", "must be >= 0")
        check(self.min_agreement is None or 0 <= self.min_agreement <= 100, "min_agreement", "must be in [0, 100]")


@dataclass
class ExportTarget:
    name: str
    format: str                            # a registered format (formats.py: FORMATS)
    precision: Literal["fp32", "int8"]
    description: str = ""
    quantization: QuantConfig = field(default_factory=QuantConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    scan: Literal["auto", "unrolled", "ssd", "ssd_matmul", "ssd_onnx", "ssd_bmm", "torch",
                  "closed"] = "auto"       # exportable
                                           # scan. auto: 'ssd' for headed students (batched matmuls;
                                           # 'ssd_onnx' in ONNX, 'ssd_bmm' in ExecuTorch),
                                           # else 'unrolled' (the step loop in
                                           # a position-major layout, fastest in ORT/TFLite at image-sized L);
                                           # 'torch': the reference's own layout; 'closed': fewer ops, L times
                                           # the work
    opset: int = 18                        # onnx

    def __post_init__(self):
        check(self.format in FORMATS, "format", f"{self.format!r} is not allowed{closest(self.format, FORMATS)} "
              f"(allowed: {', '.join(FORMATS.names())})")
        method, methods = self.quantization.method, FORMATS.get(self.format).methods
        check(method in methods, "quantization.method",
              f"'{method}' does not apply to format {self.format} (allowed: {', '.join(methods)})")
        check((method == "none") == (self.precision == "fp32"), "precision",
              "fp32 targets use quantization.method none; int8 targets name a quantization method")
        check(not (method == "weights" and self.quantization.exclude_modules), "quantization.exclude_modules",
              "method weights stores every float constant of >= min_elements values as int8; raise min_elements "
              "to keep small ones float")
        check(self.quantization.float_weights == "fp32" or (method == "pt2e" and self.format == "tflite"),
              "quantization.float_weights", "int8 storage of the float constants left applies to method pt2e "
              "in format tflite only; remove the key or set it to fp32")
        if self.precision == "fp32" and self.verify.max_abs_diff is None:
            self.verify.max_abs_diff = 1e-4
        if self.precision == "int8" and self.verify.max_accuracy_drop is None:
            self.verify.max_accuracy_drop = 1.0

    @property
    def export_format(self) -> ExportFormat:
        return FORMATS.get(self.format)

    @property
    def suffix(self) -> str:
        return self.export_format.suffix

    @property
    def form(self) -> str:
        """The ``edgepkd.models.mamba.EXPORT_FORMS`` key of this target's export form: its format's, except for
        ONNX quantized by onnxruntime's quantizers, which expect a MatMul's weight as its second operand."""
        if self.format == "onnx" and self.quantization.method in ("ort_static", "ort_dynamic"):
            return "onnx-ort-quantized"
        return self.format


def load_targets(extra_dirs: list[Path] = ()) -> Registry[ExportTarget]:
    """Built-in targets, then ``./export/`` and ``extra_dirs``; a later file with a known name fails."""
    return load_named_dirs(ExportTarget, "export target", BUILTIN_DIR, "export", extra_dirs, "--targets-dir")
