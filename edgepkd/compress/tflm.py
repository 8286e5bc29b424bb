"""TFLite Micro on the host: what an MCU's interpreter accepts, and what it needs, measured in its own kernels.

``pip install tflite-micro`` gives TFLite Micro's interpreter for the host
(``tflite_micro.python.tflite_micro.runtime``): the reference kernels an MCU build compiles, with the same memory
planner. This module (numpy and tflite_micro only, no torch) reads a .tflite's operators, checks them against
TFLite Micro's builtin op set, finds the exact tensor arena by bisection, and runs test images:

    ops(buf)                    [(builtin name, number of inputs)] of every operator, in graph order
    problems(buf)               what TFLite Micro cannot run ([] when it runs): ops it lacks, oversized concats
    find_arena(path)            the smallest arena_size (bytes) that allocates and invokes
    TFLMModel(path, arena)      prepare / run / logits like compress/runtimes.py's adapters, in TFLite Micro

``edgepkd bench`` on a tflite-micro device (measure/bench.py) adds top-1 on the run's test images.

Attempts at an arena size run in a child process each: TFLite Micro may abort the process when an arena is too
small. The host interpreter allocates its arena with ``new uint8_t[]`` (16-byte aligned by glibc on x86_64 and
aarch64), so a firmware's ``alignas(16)`` arena of the measured size behaves the same. The CMSIS-NN kernels of a
Cortex-M build may ask for a few scratch bytes more or less than the reference kernels measured here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from edgepkd.compress.runtimes import Adapter, dequantize, describe, quantize
from edgepkd.errors import EdgepkdError, first_line

INSTALL = "pip install tflite-micro"

# TFLite Micro's builtin operators: BuiltinOperator name -> the MicroMutableOpResolver method that registers it.
# Every Add* method of tensorflow/lite/micro/micro_mutable_op_resolver.h that calls AddBuiltin, read at
# github.com/tensorflow/tflite-micro commit 90b983c2b3f1480642e040bbd2ddb37b998f3424 (2026-08-20); the
# custom-op methods (AddCustom: signal ops, Ethos-U, detection postprocess, circular buffer, decode) are left out.
TFLM_OPS: dict[str, str] = {
    "ABS": "AddAbs", "ADD": "AddAdd", "ADD_N": "AddAddN", "ARG_MAX": "AddArgMax", "ARG_MIN": "AddArgMin",
    "ASSIGN_VARIABLE": "AddAssignVariable", "AVERAGE_POOL_2D": "AddAveragePool2D", "BATCH_MATMUL": "AddBatchMatMul",
    "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd", "BROADCAST_ARGS": "AddBroadcastArgs", "BROADCAST_TO": "AddBroadcastTo",
    "CALL_ONCE": "AddCallOnce", "CAST": "AddCast", "CEIL": "AddCeil", "CONCATENATION": "AddConcatenation",
    "CONV_2D": "AddConv2D", "COS": "AddCos", "CUMSUM": "AddCumSum",
    "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D", "DEPTH_TO_SPACE": "AddDepthToSpace", "DEQUANTIZE": "AddDequantize",
    "DIV": "AddDiv", "DYNAMIC_UPDATE_SLICE": "AddDynamicUpdateSlice", "ELU": "AddElu",
    "EMBEDDING_LOOKUP": "AddEmbeddingLookup", "EQUAL": "AddEqual", "EXP": "AddExp", "EXPAND_DIMS": "AddExpandDims",
    "FILL": "AddFill", "FLOOR": "AddFloor", "FLOOR_DIV": "AddFloorDiv", "FLOOR_MOD": "AddFloorMod",
    "FULLY_CONNECTED": "AddFullyConnected", "GATHER": "AddGather", "GATHER_ND": "AddGatherNd",
    "GREATER": "AddGreater", "GREATER_EQUAL": "AddGreaterEqual", "HARD_SWISH": "AddHardSwish", "IF": "AddIf",
    "L2_NORMALIZATION": "AddL2Normalization", "L2_POOL_2D": "AddL2Pool2D", "LEAKY_RELU": "AddLeakyRelu",
    "LESS": "AddLess", "LESS_EQUAL": "AddLessEqual", "LOG": "AddLog", "LOGICAL_AND": "AddLogicalAnd",
    "LOGICAL_NOT": "AddLogicalNot", "LOGICAL_OR": "AddLogicalOr", "LOGISTIC": "AddLogistic",
    "LOG_SOFTMAX": "AddLogSoftmax", "MAXIMUM": "AddMaximum", "MAX_POOL_2D": "AddMaxPool2D", "MEAN": "AddMean",
    "MINIMUM": "AddMinimum", "MIRROR_PAD": "AddMirrorPad", "MUL": "AddMul", "NEG": "AddNeg",
    "NOT_EQUAL": "AddNotEqual", "PACK": "AddPack", "PAD": "AddPad", "PADV2": "AddPadV2", "PRELU": "AddPrelu",
    "QUANTIZE": "AddQuantize", "READ_VARIABLE": "AddReadVariable", "REDUCE_ALL": "AddReduceAll",
    "REDUCE_MAX": "AddReduceMax", "REDUCE_MIN": "AddReduceMin", "RELU": "AddRelu", "RELU6": "AddRelu6",
    "RESHAPE": "AddReshape", "RESIZE_BILINEAR": "AddResizeBilinear",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor", "REVERSE_V2": "AddReverseV2", "ROUND": "AddRound",
    "RSQRT": "AddRsqrt", "SELECT_V2": "AddSelectV2", "SHAPE": "AddShape", "SIN": "AddSin", "SLICE": "AddSlice",
    "SOFTMAX": "AddSoftmax", "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd", "SPACE_TO_DEPTH": "AddSpaceToDepth",
    "SPLIT": "AddSplit", "SPLIT_V": "AddSplitV", "SQRT": "AddSqrt", "SQUARE": "AddSquare",
    "SQUARED_DIFFERENCE": "AddSquaredDifference", "SQUEEZE": "AddSqueeze", "STRIDED_SLICE": "AddStridedSlice",
    "SUB": "AddSub", "SUM": "AddSum", "SVDF": "AddSvdf", "TANH": "AddTanh", "TRANSPOSE": "AddTranspose",
    "TRANSPOSE_CONV": "AddTransposeConv", "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM",
    "UNPACK": "AddUnpack", "VAR_HANDLE": "AddVarHandle", "WHILE": "AddWhile", "ZEROS_LIKE": "AddZerosLike",
}
# tensorflow/lite/micro/kernels/concatenation.cc (same commit): `constexpr int kMaxInputNum = 10;`, checked in
# Prepare (TF_LITE_ENSURE(context, num_inputs <= kMaxInputNum)): a larger CONCATENATION fails to allocate.
MAX_CONCAT_INPUTS = 10

ARENA_LIMIT = 64 * 1024 * 1024      # bisection gives up above this (no MCU has that much SRAM)


class TFLMError(EdgepkdError):
    """One line: TFLite Micro is missing, or cannot run an artifact."""

    exit_code = 1


def runtime():
    """tflite_micro's runtime module, or a one-line TFLMError saying how to install it."""
    try:
        from tflite_micro.python.tflite_micro import runtime as rt
    except ImportError:
        raise TFLMError(f"TFLite Micro's Python interpreter is not installed: {INSTALL}") from None
    return rt


def version() -> str:
    try:
        from tflite_micro.python.tflite_micro import _version
        return _version.__version__
    except ImportError:
        return "unknown"


def _schema():
    try:
        from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema
    except ImportError:
        raise TFLMError(f"TFLite Micro's Python interpreter is not installed: {INSTALL}") from None
    return schema


def ops(buf: bytes) -> list[tuple[str, int]]:
    """(BuiltinOperator name, number of inputs) of every operator of every subgraph, in graph order."""
    schema = _schema()
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.Model.GetRootAs(buf, 0)
    codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
    out = []
    for s in range(model.SubgraphsLength()):
        sub = model.Subgraphs(s)
        for i in range(sub.OperatorsLength()):
            op = sub.Operators(i)
            code = codes[op.OpcodeIndex()]
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            name = names.get(builtin, str(builtin))
            if name == "CUSTOM":
                name = f"CUSTOM:{(code.CustomCode() or b'').decode()}"
            out.append((name, op.InputsLength()))
    return out


def problems(buf: bytes) -> list[str]:
    """What TFLite Micro cannot run in this graph, one phrase each ([]: every op is a TFLite Micro builtin and every
    CONCATENATION has at most MAX_CONCAT_INPUTS inputs)."""
    return problems_of(ops(buf))


def problems_of(listed: list[tuple[str, int]]) -> list[str]:
    """``problems`` of a graph's already listed ``ops``."""
    found = []
    for name, n_inputs in listed:
        if name not in TFLM_OPS:
            found.append(f"{name} (not a TFLite Micro op)")
        elif name == "CONCATENATION" and n_inputs > MAX_CONCAT_INPUTS:
            found.append(f"CONCATENATION of {n_inputs} inputs (TFLite Micro takes at most {MAX_CONCAT_INPUTS})")
    return list(dict.fromkeys(found))


def op_names(buf: bytes) -> list[str]:
    """The distinct builtin ops of a graph, sorted: what a MicroMutableOpResolver must register."""
    return sorted({name for name, _ in ops(buf)})


# ---------------------------------------------------------------------------------------------------- arena
_PROBE = """
import sys
import numpy as np
from tflite_micro.python.tflite_micro import runtime
path, arena = sys.argv[1], int(sys.argv[2])
try:
    it = runtime.Interpreter.from_file(path, arena_size=arena)
    d = it.get_input_details(0)
    it.set_input(np.zeros(d["shape"], d["dtype"]), 0)
    it.invoke()
    it.get_output(0)
except Exception:
    sys.exit(1)
sys.exit(0)
"""


def _fits(path: str, arena: int, python: str) -> bool:
    """Whether TFLite Micro allocates and invokes ``path`` in ``arena`` bytes, tried in a child process (a too
    small arena may abort the process instead of raising)."""
    proc = subprocess.run([python, "-c", _PROBE, path, str(arena)], capture_output=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc.returncode == 0


def find_arena(path, python: str | None = None, start: int = 16 * 1024) -> int:
    """The smallest ``arena_size`` (bytes) for which TFLite Micro's interpreter allocates and invokes ``path``:
    doubling from ``start`` to a size that works, then bisection to the byte (arena - 1 fails, arena works)."""
    runtime()                                             # a missing package is one line, not a failed probe
    path, python = str(path), python or sys.executable
    lo, hi = 0, start                                     # invariant: lo fails (0 always does), hi works
    while not _fits(path, hi, python):
        lo, hi = hi, hi * 2
        if hi > ARENA_LIMIT:
            raise TFLMError(f"{os.path.basename(path)}: TFLite Micro cannot allocate it in {ARENA_LIMIT:,} bytes "
                            f"of arena ({_load_error(path)})")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _fits(path, mid, python) else (mid, hi)
    return hi


def _load_error(path: str) -> str:
    """Why TFLite Micro refuses ``path`` at a large arena: its first own line of complaint (it prints to fd 2)."""
    code = _PROBE.replace("except Exception:\n    sys.exit(1)", "except Exception as e:\n    print(e)\n    sys.exit(1)")
    proc = subprocess.run([sys.executable, "-c", code, path, str(ARENA_LIMIT)], capture_output=True, text=True,
                          timeout=300)
    lines = [x.strip() for x in (proc.stderr + proc.stdout).splitlines() if x.strip()]
    return "; ".join(lines[:2])[:300] or f"exit status {proc.returncode}"


# -------------------------------------------------------------------------------------------------- running
class TFLMModel(Adapter):
    """An artifact in TFLite Micro's interpreter, with the interface of compress/runtimes.py's adapters:
    ``prepare(x)`` float32 (1, C, H, W) -> the input tensor's dtype (int8 quantized with the model's scale and zero
    point), ``run(prepared)``, ``logits(raw)`` -> float32 (1, K), ``io()``; ``model(x)`` all three. ``arena`` is
    the arena size it runs in (``find_arena``'s exact one for export verification)."""

    runtime = "tflite_micro"

    def __init__(self, path, arena: int):
        import numpy as np

        rt = runtime()
        self.np, self.path, self.arena = np, str(path), arena
        try:
            self.interpreter = rt.Interpreter.from_file(self.path, arena_size=arena)
        except Exception as e:
            raise TFLMError(f"{os.path.basename(self.path)}: TFLite Micro cannot load it in a {arena:,}-byte arena "
                            f"({first_line(e, 200)})") from None
        self.inp, self.out = self.interpreter.get_input_details(0), self.interpreter.get_output_details(0)
        self._in_q, self._out_q = self._quant(self.inp), self._quant(self.out)   # read once, not per image
        self.version = version()

    @staticmethod
    def _quant(d) -> tuple[float, int] | None:
        q = d.get("quantization_parameters") or {}
        scales, zeros = list(q.get("scales", [])), list(q.get("zero_points", []))
        return (float(scales[0]), int(zeros[0])) if scales else None

    def io(self) -> dict:
        return {side: describe(d["shape"], d["dtype"], None if d["dtype"] == self.np.float32 else self._quant(d))
                for side, d in (("input", self.inp), ("output", self.out))}

    def prepare(self, x):
        if self.inp["dtype"] == self.np.float32:
            return x.astype(self.np.float32)
        return quantize(x, self.inp["dtype"], *self._in_q)

    def run(self, prepared):
        self.interpreter.set_input(prepared, 0)
        self.interpreter.invoke()
        return self.interpreter.get_output(0)

    def logits(self, raw):
        if raw.dtype == self.np.float32:
            return raw.reshape(1, -1)
        return dequantize(raw, *self._out_q).reshape(1, -1)


if __name__ == "__main__":   # python -m edgepkd.compress.tflm MODEL.tflite: its ops, problems and exact arena
    try:
        with open(sys.argv[1], "rb") as fh:
            blob = fh.read()
        found = problems(blob)
        print(json.dumps({"ops": op_names(blob), "problems": found,
                          "arena_bytes": None if found else find_arena(sys.argv[1])}))
    except (IndexError, OSError, TFLMError) as e:
        detail = "usage: python -m edgepkd.compress.tflm MODEL.tflite" if isinstance(e, IndexError) else \
            (f"{e.filename}: {e.strerror}" if isinstance(e, OSError) else str(e))
        print(f"edgepkd: error: {detail}", file=sys.stderr)
        sys.exit(2)
    except Exception:   # not a flatbuffer: the schema's parser fails somewhere inside
        print(f"edgepkd: error: {sys.argv[1]}: not a .tflite flatbuffer", file=sys.stderr)
        sys.exit(2)
