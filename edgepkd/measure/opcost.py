"""Per-op latency estimate of a .tflite on a microcontroller: every operator of the main subgraph costs cycles from
the device profile's table (``calibration.per_op``), and latency = their sum / the clock.

    estimate(buf, table)     {"cycles", "ms", "by_op": {"CONV_2D/int8": {...}}, "not_modelled": {...}}
    operators(buf)           [Op(name, inputs, outputs, options)] of subgraph 0, read from the flatbuffer
    python -m edgepkd.measure.opcost MODEL.tflite [DEVICE]     the estimate by op type (default cortex-m7)

How an operator is costed (``OP_CLASSES``):
  * CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, BATCH_MATMUL (TRANSPOSE_CONV at conv_2d's rate): MACs counted from
    the tensor shapes (output elements x the filter taps each one sums) / ``macs_per_cycle`` of the op;
  * everything else: elements x ``cycles_per_element`` of its class (elementwise, division, transcendental,
    reduction, movement, quantize); elements are the outputs' (pooling: output x window; MEAN, SUM, REDUCE_* and
    ARG_*: the input's); some ops add classes (LOGISTIC = transcendental + division: 1 / (1 + exp(-x)));
  * RESHAPE, SQUEEZE, EXPAND_DIMS, SHAPE, BROADCAST_ARGS, VAR_HANDLE: free (TFLite Micro's RESHAPE copies only when
    the memory planner gives input and output separate buffers, tensorflow/lite/micro/kernels/reshape.cc);
  * SVDF, UNIDIRECTIONAL_SEQUENCE_LSTM, IF, WHILE, CALL_ONCE: not modelled (cost 0, listed in ``not_modelled``).
An op is float32 when any tensor it reads or writes is floating point (float32, float16, float64), else int8 (the
integer kernels: int8, int16, int32, bool). The interpreter's own per-op overhead is not counted.

The shipped table (devices/cortex-m7.yaml, STM32H7A3), every number with where it comes from:
  * clock 280 MHz. PUBLISHED: ST's MLPerf Tiny v1.0 system description, github.com/mlcommons/tiny_results_v1.0
    commit c7761cf84076d601c4a0ed2ecc51e77d40696ed2, closed/STMicroelectronics/systems/NUCLEO-H7A3ZI-Q/
    NUCLEO_H7A3ZI_Q_system_description.json ("Processor(s) Frequencies": "280 MHz").
  * calibration target 54.3 ms per ResNet-8 image. PUBLISHED: same commit, closed/STMicroelectronics/results/
    NUCLEO-H7A3ZI-Q/ic/performance/results.txt ("Median throughput is 18.401 inf./sec.", X-CUBE-AI 7.3.0).
  * int8 MACs per cycle of CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, BATCH_MATMUL, 0.886: FITTED, one factor
    for all four, so that MLPerf Tiny's ResNet-8 (edgepkd's ``resnet8``, exported by tflite-micro-int8:
    12,501,632 MACs, and 1,106,304 cycles of other ops under this table) takes 280e6 / 18.401 cycles = 54.3 ms
    (tests/test_opcost.py). No CMSIS-NN MACs-per-cycle figure for the Cortex-M7 was found published
    (github.com/ARM-software/CMSIS-NN commit 99f736a63036613032f9b70de36b493bcd7802d4 has no cycle or rate table,
    nor do its docs); the published bound is the M7's one MAC pipe (one SMLAD, two 16-bit MACs, per cycle:
    2 MACs/cycle), and the fit stays under it. The fit is X-CUBE-AI's rate: Plumerai's published comparison
    (blog.plumerai.com/2021/10/cortex-m-inference-software, MobileNetV2 on an STM32F746: X-CUBE-AI 103 ms,
    TFLite Micro 2.5 with CMSIS-NN 129 ms) puts TFLite Micro + CMSIS-NN about 25 % slower.
  * float32: DERIVED lower bounds, not measured. The Cortex-M7's pipeline as LLVM's scheduling model states it
    (github.com/llvm/llvm-project commit 6a5553319e1ba4ac3484f966a95f2407ca76525d, llvm/lib/Target/ARM/
    ARMScheduleM7.td: one VFP pipe and two VFP register ports, two ALU, two load and one store pipe, one MAC pipe;
    single-precision add / multiply latency 3, multiply-accumulate 6 with the accumulator read 3 cycles late,
    divide and square root 16; double-precision add 4, multiply 7, multiply-accumulate 11, conversions 3) applied
    to the inner loops of TFLite Micro's reference float kernels (github.com/tensorflow/tflite-micro commit
    90b983c2b3f1480642e040bbd2ddb37b998f3424, tensorflow/lite/kernels/internal/reference/): a MAC is one
    dependent accumulate, 3 cycles (0.333 MACs per cycle); elementwise 3 (two loads, the op, two clamps, a store:
    3 VFP ops and 6 register-port transfers over two ports); division 16 (DIV, SQRT: the divider's latency,
    assumed not pipelined); transcendental 54 (derived for EXP; LOG, TANH, ELU, SIN, COS ASSUMED the same:
    newlib's expf, Arm optimized-routines,
    github.com/ARM-software/optimized-routines commit 04884bd04eac4b251da4026900010ea7d8850edc, math/expf.c, is a
    dependent chain of double-precision convert, multiply, add and subtract of the rounding shift, subtract, two
    multiply-adds, multiply, convert on the H7's double-precision FPU: 3+7+4+4+4+11+11+7+3 = 54; newlib builds it
    for Arm FPUs with double precision, newlib/libc/include/machine/ieeefp.h `#if __ARM_FP & 0x8` ->
    `__OBSOLETE_MATH_DEFAULT 0`, github.com/mwtoews/cygwin commit d765e5f1c9b604818464b91e4f34584e1d6de691; the
    STM32H7's M7 has one, github.com/zephyrproject-rtos/zephyr commit 06758ff20b28aae9fea4273ac0ba59aebf80966f,
    soc/st/stm32/stm32h7x/Kconfig: CPU_HAS_FPU_DOUBLE_PRECISION); reduction 3 (one
    dependent add or max per element read); movement 1 (a load and a store); quantize 3 (DEQUANTIZE: convert,
    multiply by the double scale, convert; float -> int8 QUANTIZE adds a division, reference quantize.h divides
    by the scale).
  * int8 non-MAC ops: DERIVED the same way from CMSIS-NN's kernels (commit above): elementwise 25
    (arm_elementwise_add_s8 requantizes both inputs and the sum; arm_nn_requantize in C is about 14 integer
    instructions: with offsets and the clamp about 50 instructions per element on the two ALU pipes); reduction 1
    and movement 1 (a byte load and a store per element); quantize 10 (an int8 -> int8 requantize, about 20
    instructions). int8 division and transcendental: NOT GIVEN (no edgepkd export has such an op; an op needing
    one is reported as not modelled). In ResNet-8 the non-MAC ops are 7 % of the cycles (its export keeps the first
    block's ReLU, two residual adds and the mean in float between DEQUANTIZE and QUANTIZE).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgepkd.errors import RunError

# BuiltinOperator codes of tensorflow/lite/schema/schema.fbs for the ops TFLite Micro has (edgepkd.compress.tflm.
# TFLM_OPS); tests/test_opcost.py checks them against tflite_micro's generated schema.
BUILTIN_CODES: dict[int, str] = {
    0: "ADD", 1: "AVERAGE_POOL_2D", 2: "CONCATENATION", 3: "CONV_2D", 4: "DEPTHWISE_CONV_2D", 5: "DEPTH_TO_SPACE",
    6: "DEQUANTIZE", 7: "EMBEDDING_LOOKUP", 8: "FLOOR", 9: "FULLY_CONNECTED", 11: "L2_NORMALIZATION",
    12: "L2_POOL_2D", 14: "LOGISTIC", 17: "MAX_POOL_2D", 18: "MUL", 19: "RELU", 21: "RELU6", 22: "RESHAPE",
    23: "RESIZE_BILINEAR", 25: "SOFTMAX", 26: "SPACE_TO_DEPTH", 27: "SVDF", 28: "TANH", 34: "PAD", 36: "GATHER",
    37: "BATCH_TO_SPACE_ND", 38: "SPACE_TO_BATCH_ND", 39: "TRANSPOSE", 40: "MEAN", 41: "SUB", 42: "DIV",
    43: "SQUEEZE", 44: "UNIDIRECTIONAL_SEQUENCE_LSTM", 45: "STRIDED_SLICE", 47: "EXP", 49: "SPLIT",
    50: "LOG_SOFTMAX", 53: "CAST", 54: "PRELU", 55: "MAXIMUM", 56: "ARG_MAX", 57: "MINIMUM", 58: "LESS", 59: "NEG",
    60: "PADV2", 61: "GREATER", 62: "GREATER_EQUAL", 63: "LESS_EQUAL", 65: "SLICE", 66: "SIN", 67: "TRANSPOSE_CONV",
    70: "EXPAND_DIMS", 71: "EQUAL", 72: "NOT_EQUAL", 73: "LOG", 74: "SUM", 75: "SQRT", 76: "RSQRT", 77: "SHAPE",
    79: "ARG_MIN", 82: "REDUCE_MAX", 83: "PACK", 84: "LOGICAL_OR", 86: "LOGICAL_AND", 87: "LOGICAL_NOT",
    88: "UNPACK", 89: "REDUCE_MIN", 90: "FLOOR_DIV", 92: "SQUARE", 93: "ZEROS_LIKE", 94: "FILL", 95: "FLOOR_MOD",
    97: "RESIZE_NEAREST_NEIGHBOR", 98: "LEAKY_RELU", 99: "SQUARED_DIFFERENCE", 100: "MIRROR_PAD", 101: "ABS",
    102: "SPLIT_V", 104: "CEIL", 105: "REVERSE_V2", 106: "ADD_N", 107: "GATHER_ND", 108: "COS", 111: "ELU",
    114: "QUANTIZE", 116: "ROUND", 117: "HARD_SWISH", 118: "IF", 119: "WHILE", 123: "SELECT_V2",
    126: "BATCH_MATMUL", 128: "CUMSUM", 129: "CALL_ONCE", 130: "BROADCAST_TO", 140: "REDUCE_ALL",
    142: "VAR_HANDLE", 143: "READ_VARIABLE", 144: "ASSIGN_VARIABLE", 145: "BROADCAST_ARGS",
    151: "DYNAMIC_UPDATE_SLICE",
}
FLOAT_TYPES = {0, 1, 10}              # TensorType FLOAT32, FLOAT16, FLOAT64

MAC_OPS = {"CONV_2D": "conv_2d", "DEPTHWISE_CONV_2D": "depthwise_conv_2d", "FULLY_CONNECTED": "fully_connected",
           "BATCH_MATMUL": "batch_matmul", "TRANSPOSE_CONV": "conv_2d"}
FREE_OPS = {"RESHAPE", "SQUEEZE", "EXPAND_DIMS", "SHAPE", "BROADCAST_ARGS", "VAR_HANDLE"}
NOT_MODELLED = {"SVDF", "UNIDIRECTIONAL_SEQUENCE_LSTM", "IF", "WHILE", "CALL_ONCE"}
CLASSES = ("elementwise", "division", "transcendental", "reduction", "movement", "quantize")


def _classes(*names: str) -> tuple[tuple[str, float], ...]:
    return tuple((n, 1.0) for n in names)


# op -> (what its elements are: "out" | "in" | "window", ((class, multiplier), ...))
OP_CLASSES: dict[str, tuple[str, tuple[tuple[str, float], ...]]] = {
    **{op: ("out", _classes("elementwise")) for op in (
        "ADD", "SUB", "MUL", "MAXIMUM", "MINIMUM", "ABS", "NEG", "SQUARE", "SQUARED_DIFFERENCE", "RELU", "RELU6",
        "LEAKY_RELU", "PRELU", "HARD_SWISH", "FLOOR", "CEIL", "ROUND", "FLOOR_DIV", "FLOOR_MOD", "EQUAL",
        "NOT_EQUAL", "GREATER", "GREATER_EQUAL", "LESS", "LESS_EQUAL", "LOGICAL_AND", "LOGICAL_OR", "LOGICAL_NOT",
        "SELECT_V2", "CAST", "ZEROS_LIKE", "FILL")},
    "ADD_N": ("out", (("elementwise", -1.0),)),            # -1: one add per input after the first (below)
    "DIV": ("out", _classes("division")),
    "SQRT": ("out", _classes("division")),
    "RSQRT": ("out", (("division", 2.0),)),                 # 1 / sqrt(x)
    **{op: ("out", _classes("transcendental")) for op in ("EXP", "LOG", "TANH", "ELU", "SIN", "COS")},
    "LOGISTIC": ("out", _classes("transcendental", "division")),      # 1 / (1 + exp(-x))
    "SOFTMAX": ("out", _classes("transcendental", "elementwise")),    # exp(x - max), then scaled by 1 / sum
    "LOG_SOFTMAX": ("out", _classes("transcendental", "elementwise")),
    "L2_NORMALIZATION": ("in", _classes("reduction", "elementwise")),
    **{op: ("window", _classes("reduction")) for op in ("AVERAGE_POOL_2D", "MAX_POOL_2D", "L2_POOL_2D")},
    **{op: ("in", _classes("reduction")) for op in (
        "MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN", "REDUCE_ALL", "ARG_MAX", "ARG_MIN", "CUMSUM")},
    **{op: ("out", _classes("movement")) for op in (
        "TRANSPOSE", "CONCATENATION", "SLICE", "STRIDED_SLICE", "SPLIT", "SPLIT_V", "PACK", "UNPACK", "PAD",
        "PADV2", "MIRROR_PAD", "GATHER", "GATHER_ND", "BROADCAST_TO", "REVERSE_V2", "DEPTH_TO_SPACE",
        "SPACE_TO_DEPTH", "BATCH_TO_SPACE_ND", "SPACE_TO_BATCH_ND", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR",
        "DYNAMIC_UPDATE_SLICE", "EMBEDDING_LOOKUP", "READ_VARIABLE", "ASSIGN_VARIABLE")},
    **{op: ("out", _classes("quantize")) for op in ("QUANTIZE", "DEQUANTIZE")},
}


@dataclass
class Tensor:
    shape: tuple[int, ...]
    type: int
    constant: bool

    @property
    def elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= max(d, 1)
        return n

    @property
    def floating(self) -> bool:
        return self.type in FLOAT_TYPES


@dataclass
class Op:
    name: str
    inputs: list[Tensor | None]           # None: an optional input left out (index -1)
    outputs: list[Tensor]
    options: dict = field(default_factory=dict)

    @property
    def precision(self) -> str:
        return "float32" if any(t is not None and t.floating for t in [*self.inputs, *self.outputs]) else "int8"


def operators(buf: bytes) -> list[Op]:
    """The operators of the main subgraph in graph order, with their tensors' shapes and types and the options the
    estimate needs (Pool2DOptions' filter size, BatchMatMulOptions' adj_x). Torch- and schema-free: runner.py's
    flatbuffer reader."""
    from edgepkd.measure.runner import RunnerError, _buffer_bytes, _tflite_model

    try:
        model = _tflite_model(buf)
    except RunnerError as e:
        raise RunError(str(e)) from None
    codes = []
    for code in model.tables(1):          # OperatorCode: deprecated_builtin_code (0), builtin_code (3)
        builtin = max(code.scalar(0, "b"), code.scalar(3, "i"))
        codes.append(BUILTIN_CODES.get(builtin, f"BUILTIN_{builtin}") if builtin != 32 else
                     f"CUSTOM:{code.string(1)}")
    subgraphs = model.tables(2)
    if not subgraphs:
        return []
    sub = subgraphs[0]
    tensors = [Tensor(tuple(t.scalars(0, "i")), t.scalar(1, "b"), bool(_buffer_bytes(buf, model, t.scalar(2, "I"))))
               for t in sub.tables(0)]    # Tensor: shape (0), type (1), buffer (2)
    out = []
    for op in sub.tables(3):              # Operator: opcode_index (0), inputs (1), outputs (2), builtin_options (4)
        name = codes[op.scalar(0, "I")]
        options = {}
        at = op._indirect(4)
        if at and name in ("AVERAGE_POOL_2D", "MAX_POOL_2D", "L2_POOL_2D"):
            from edgepkd.measure.runner import _Table

            pool = _Table(buf, at)        # Pool2DOptions: filter_width (3), filter_height (4)
            options = {"filter_width": pool.scalar(3, "i", 1), "filter_height": pool.scalar(4, "i", 1)}
        elif at and name == "BATCH_MATMUL":
            from edgepkd.measure.runner import _Table

            options = {"adj_x": bool(_Table(buf, at).scalar(0, "B"))}   # BatchMatMulOptions: adj_x (0)
        out.append(Op(name, [tensors[i] if i >= 0 else None for i in op.scalars(1, "i")],
                      [tensors[i] for i in op.scalars(2, "i")], options))
    return out


def macs(op: Op) -> int:
    """Multiply-accumulates of a MAC op, from its shapes (TFLite layouts: filters OHWI, depthwise 1HWO, fully
    connected weights (units, depth))."""
    out = sum(t.elements for t in op.outputs)
    if op.name == "CONV_2D":
        _, kh, kw, ic = (list(op.inputs[1].shape) + [1, 1, 1, 1])[:4]
        return out * kh * kw * ic
    if op.name == "DEPTHWISE_CONV_2D":
        _, kh, kw, _ = (list(op.inputs[1].shape) + [1, 1, 1, 1])[:4]
        return out * kh * kw
    if op.name == "FULLY_CONNECTED":
        return out * op.inputs[1].shape[-1]
    if op.name == "BATCH_MATMUL":
        a = op.inputs[0].shape
        return out * (a[-2] if op.options.get("adj_x") else a[-1])
    if op.name == "TRANSPOSE_CONV":                          # inputs: output shape, weights OHWI, input
        oc, kh, kw, _ = op.inputs[1].shape
        return op.inputs[2].elements * kh * kw * oc
    raise ValueError(op.name)


def elements(op: Op, base: str) -> int:
    if base == "in":
        return op.inputs[0].elements
    out = sum(t.elements for t in op.outputs)
    if base == "window":
        return out * op.options.get("filter_width", 1) * op.options.get("filter_height", 1)
    return out


def op_cycles(op: Op, table) -> tuple[float, dict]:
    """(cycles, what was counted) of one operator under ``table`` (a devices.PerOpCalibration); what was counted
    has "macs" or "elements", and "not_modelled" when the op (or a class it needs) has no figure."""
    rates = getattr(table, op.precision)
    if op.name in MAC_OPS:
        n = macs(op)
        return n / getattr(rates.macs_per_cycle, MAC_OPS[op.name]), {"macs": n}
    if op.name in FREE_OPS:
        return 0.0, {}
    if op.name in NOT_MODELLED or op.name not in OP_CLASSES:
        return 0.0, {"not_modelled": op.name}
    base, classes = OP_CLASSES[op.name]
    if op.name == "QUANTIZE" and op.inputs[0].floating:     # float -> int: round(x / scale), one division each
        classes = _classes("division", "quantize")
    n = elements(op, base)
    cycles, missing = 0.0, []
    for cls, mult in classes:
        per = getattr(rates.cycles_per_element, cls)
        if per is None:
            missing.append(cls)
            continue
        if mult < 0:                                         # ADD_N: inputs - 1 adds per element
            mult = max(len(op.inputs) - 1, 1)
        cycles += mult * n * per
    counted = {"elements": n}
    if missing:                                              # no figure for a class it needs: not costed at all
        return 0.0, {**counted, "not_modelled": f"{op.precision} {'/'.join(missing)}"}
    return cycles, counted


def estimate(buf: bytes, table) -> dict:
    """Cycles and milliseconds of one inference under ``table`` (a devices.PerOpCalibration), with the breakdown by
    op type and precision ("CONV_2D/int8": count, MACs or elements, cycles, share of the total) and the ops it
    could not cost ("not_modelled": {"SVDF/int8": 1, ...}, each costed 0)."""
    by_op: dict[str, dict] = {}
    not_modelled: dict[str, int] = {}
    total = 0.0
    for op in operators(buf):
        cycles, counted = op_cycles(op, table)
        key = f"{op.name}/{op.precision}"
        if "not_modelled" in counted:
            not_modelled[key] = not_modelled.get(key, 0) + 1
        row = by_op.setdefault(key, {"count": 0, "cycles": 0.0})
        row["count"] += 1
        row["cycles"] += cycles
        for k in ("macs", "elements"):
            if k in counted:
                row[k] = row.get(k, 0) + counted[k]
        total += cycles
    for row in by_op.values():
        row["share"] = row["cycles"] / total if total else 0.0
    by_op = dict(sorted(by_op.items(), key=lambda kv: (-kv[1]["cycles"], kv[0])))
    return {"cycles": total, "ms": 1e3 * total / (table.clock_mhz * 1e6), "clock_mhz": table.clock_mhz,
            "by_op": by_op, "not_modelled": not_modelled}


def render(est: dict) -> str:
    """The breakdown as a table: op/precision, count, MACs or elements, cycles, share."""
    lines = [f"{'op':<28} {'n':>4} {'MACs / elements':>16} {'cycles':>14} {'share':>7}"]
    for key, row in est["by_op"].items():
        work = row.get("macs", row.get("elements"))
        lines.append(f"{key:<28} {row['count']:>4} {'-' if work is None else f'{work:,}':>16} "
                     f"{row['cycles']:>14,.0f} {100 * row['share']:>6.1f}%")
    lines.append(f"total {est['cycles']:,.0f} cycles = {est['ms']:.4g} ms at {est['clock_mhz']:g} MHz"
                 + (f"; not modelled (0 cycles): {est['not_modelled']}" if est["not_modelled"] else ""))
    return "\n".join(lines)


if __name__ == "__main__":   # python -m edgepkd.measure.opcost MODEL.tflite [DEVICE]: the per-op estimate, by op type
    import sys

    from edgepkd.errors import EdgepkdError
    from edgepkd.measure.devices import load_devices

    try:
        if len(sys.argv) not in (2, 3):
            raise EdgepkdError("usage: python -m edgepkd.measure.opcost MODEL.tflite [DEVICE (default cortex-m7)]")
        device = load_devices().get(sys.argv[2] if len(sys.argv) == 3 else "cortex-m7")
        if device.calibration.per_op is None:
            raise EdgepkdError(f"device '{device.name}' has no calibration.per_op table")
        with open(sys.argv[1], "rb") as fh:
            print(render(estimate(fh.read(), device.calibration.per_op)))
    except (OSError, EdgepkdError) as e:
        print(f"edgepkd: error: {f'{e.filename}: {e.strerror}' if isinstance(e, OSError) else e}", file=sys.stderr)
        sys.exit(2)
    except Exception:   # a truncated flatbuffer fails somewhere inside the reader
        print(f"edgepkd: error: {sys.argv[1]}: not a .tflite flatbuffer", file=sys.stderr)
        sys.exit(2)
