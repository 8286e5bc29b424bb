"""The per-op latency estimate (issue #14, item 3): each operator's cycles from the device's table, checked by hand on
a small hand-built graph; the op table against TFLite Micro's schema; and the calibration: MLPerf Tiny's ResNet-8,
exported by tflite-micro-int8, comes out at ST's published 54.3 ms on an STM32H7A3."""

from pathlib import Path

import pytest

from edgepkd.measure import opcost
from edgepkd.measure.devices import load_devices

INT8, INT32, FLOAT32 = 9, 2, 0            # schema.fbs TensorType


@pytest.fixture(scope="module")
def table():
    return load_devices().get("cortex-m7").calibration.per_op


def _tflite(tensors: list[tuple], ops: list[tuple]) -> bytes:
    """A .tflite flatbuffer: ``tensors`` [(shape, type, constant)], ``ops`` [(builtin name, inputs, outputs,
    options or None)], built with the schema's object API (no converter: the graph is exactly what is written)."""
    schema = pytest.importorskip("ai_edge_litert.schema_py_generated")
    from ai_edge_litert.tools import flatbuffer_utils

    codes = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    by_name = {n: c for c, n in codes.items()}
    model = schema.ModelT()
    model.version = 3
    model.buffers = [schema.BufferT()]                        # buffer 0: empty (activations)
    sub = schema.SubGraphT()
    sub.tensors = []
    for i, (shape, ttype, constant) in enumerate(tensors):
        t = schema.TensorT()
        t.shape, t.type, t.name = list(shape), ttype, f"t{i}".encode()
        t.buffer = 0
        if constant:
            size = 4 if ttype in (FLOAT32, INT32) else 1
            n = 1
            for d in shape:
                n *= d
            b = schema.BufferT()
            b.data = [1] * (n * size)
            model.buffers.append(b)
            t.buffer = len(model.buffers) - 1
        sub.tensors.append(t)
    names = sorted({op[0] for op in ops})
    model.operatorCodes = []
    for name in names:
        code = schema.OperatorCodeT()
        code.builtinCode = by_name[name]
        code.deprecatedBuiltinCode = min(by_name[name], 127)
        code.version = 1
        model.operatorCodes.append(code)
    sub.operators = []
    for name, inputs, outputs, options in ops:
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = names.index(name), list(inputs), list(outputs)
        if options is not None:
            op.builtinOptionsType, op.builtinOptions = options
        sub.operators.append(op)
    sub.inputs, sub.outputs = [0], [sub.operators[-1].outputs[0]]
    model.subgraphs = [sub]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _pool(schema, width: int, height: int):
    o = schema.Pool2DOptionsT()
    o.filterWidth, o.filterHeight, o.strideW, o.strideH = width, height, width, height
    return schema.BuiltinOptions.Pool2DOptions, o


def _bmm(schema, adj_x: bool):
    o = schema.BatchMatMulOptionsT()
    o.adjX = adj_x
    return schema.BuiltinOptions.BatchMatMulOptions, o


@pytest.fixture(scope="module")
def small_graph() -> bytes:
    """float [1, 8] -> QUANTIZE -> int8 FULLY_CONNECTED (4 x 8) -> DEQUANTIZE -> LOGISTIC -> float FULLY_CONNECTED
    (4 x 4) -> RESHAPE -> AVERAGE_POOL_2D (2x2 window over [1, 2, 2, 1]) and a float BATCH_MATMUL with adj_x, an
    int8 ADD and an SVDF (not modelled) on the side."""
    schema = pytest.importorskip("ai_edge_litert.schema_py_generated")
    tensors = [
        ((1, 8), FLOAT32, False),        # 0 input
        ((1, 8), INT8, False),           # 1 quantized
        ((4, 8), INT8, True),            # 2 int8 weights
        ((4,), INT32, True),             # 3 bias
        ((1, 4), INT8, False),           # 4 int8 FC out
        ((1, 4), FLOAT32, False),        # 5 dequantized
        ((1, 4), FLOAT32, False),        # 6 logistic
        ((4, 4), FLOAT32, True),         # 7 float weights
        ((1, 4), FLOAT32, False),        # 8 float FC out
        ((4,), INT32, True),             # 9 shape
        ((1, 2, 2, 1), FLOAT32, False),  # 10 reshaped
        ((1, 1, 1, 1), FLOAT32, False),  # 11 pooled
        ((2, 5, 3), FLOAT32, False),     # 12 bmm lhs, adj_x: (batch 2, K 5, M 3)
        ((2, 5, 6), FLOAT32, False),     # 13 bmm rhs (K 5, N 6)
        ((2, 3, 6), FLOAT32, False),     # 14 bmm out
        ((1, 4), INT8, False),           # 15 int8 add out
        ((1, 4), INT8, False),           # 16 svdf out
    ]
    ops = [
        ("QUANTIZE", [0], [1], None),
        ("FULLY_CONNECTED", [1, 2, 3], [4], None),
        ("DEQUANTIZE", [4], [5], None),
        ("LOGISTIC", [5], [6], None),
        ("FULLY_CONNECTED", [6, 7, -1], [8], None),
        ("RESHAPE", [8, 9], [10], None),
        ("BATCH_MATMUL", [12, 13], [14], _bmm(schema, True)),
        ("ADD", [4, 4], [15], None),
        ("SVDF", [4], [16], None),
        ("AVERAGE_POOL_2D", [10], [11], _pool(schema, 2, 2)),
    ]
    return _tflite(tensors, ops)


def test_each_op_costs_its_macs_or_elements_times_the_table(small_graph, table):
    """Every op's cycles, computed here by hand from the shipped table: MACs / macs_per_cycle for the MAC ops,
    elements x cycles_per_element of each class the op needs for the rest."""
    i8, f32 = table.int8, table.float32
    by_op = {(op.name, op.precision): opcost.op_cycles(op, table) for op in opcost.operators(small_graph)}
    assert by_op[("FULLY_CONNECTED", "int8")] == (pytest.approx(32 / i8.macs_per_cycle.fully_connected),
                                                  {"macs": 4 * 8})
    assert by_op[("FULLY_CONNECTED", "float32")] == (pytest.approx(16 / f32.macs_per_cycle.fully_connected),
                                                     {"macs": 4 * 4})
    # float -> int8 QUANTIZE divides by the scale: a division and the quantize step per element
    e = f32.cycles_per_element
    assert by_op[("QUANTIZE", "float32")][0] == pytest.approx(8 * (e.division + e.quantize))
    assert by_op[("DEQUANTIZE", "float32")][0] == pytest.approx(4 * e.quantize)
    assert by_op[("LOGISTIC", "float32")][0] == pytest.approx(4 * (e.transcendental + e.division))
    assert by_op[("RESHAPE", "float32")] == (0.0, {})
    # batch matmul with adj_x: K is the lhs's second-to-last dimension (5), output 2 x 3 x 6
    assert by_op[("BATCH_MATMUL", "float32")] == (pytest.approx(2 * 3 * 6 * 5 / f32.macs_per_cycle.batch_matmul),
                                                  {"macs": 180})
    # a 2x2 average pool reads 4 elements per output
    assert by_op[("AVERAGE_POOL_2D", "float32")] == (pytest.approx(4 * e.reduction), {"elements": 4})
    assert by_op[("ADD", "int8")][0] == pytest.approx(4 * i8.cycles_per_element.elementwise)
    assert by_op[("SVDF", "int8")] == (0.0, {"not_modelled": "SVDF"})


def test_estimate_sums_the_ops_over_the_clock(small_graph, table):
    est = opcost.estimate(small_graph, table)
    by_hand = sum(opcost.op_cycles(op, table)[0] for op in opcost.operators(small_graph))
    assert est["cycles"] == pytest.approx(by_hand) and est["cycles"] > 0
    assert est["ms"] == pytest.approx(1e3 * by_hand / (table.clock_mhz * 1e6))
    assert sum(r["cycles"] for r in est["by_op"].values()) == pytest.approx(by_hand)
    assert sum(r["share"] for r in est["by_op"].values()) == pytest.approx(1.0)
    assert est["by_op"]["FULLY_CONNECTED/int8"]["macs"] == 32 and est["by_op"]["LOGISTIC/float32"]["count"] == 1
    assert est["not_modelled"] == {"SVDF/int8": 1}


def test_command_line_prints_the_breakdown(small_graph, table, tmp_path):
    """python -m edgepkd.measure.opcost FILE: a row per op type and the total of estimate()."""
    import subprocess
    import sys

    path = tmp_path / "small.tflite"
    path.write_bytes(small_graph)
    done = subprocess.run([sys.executable, "-m", "edgepkd.measure.opcost", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    est = opcost.estimate(small_graph, table)
    assert f"total {est['cycles']:,.0f} cycles" in done.stdout and "LOGISTIC/float32" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "edgepkd.measure.opcost", str(path), "host"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr == "edgepkd: error: device 'host' has no calibration.per_op table\n"


def test_a_class_without_a_figure_is_not_modelled(small_graph, table):
    """A class the table leaves out (cortex-m7 gives no int8 division or transcendental figure) is not guessed: its
    ops cost 0 and are listed as not modelled."""
    from dataclasses import replace

    assert table.int8.cycles_per_element.transcendental is None
    float_free = replace(table, float32=replace(table.float32, cycles_per_element=replace(
        table.float32.cycles_per_element, transcendental=None)))
    est = opcost.estimate(small_graph, float_free)
    assert est["not_modelled"] == {"LOGISTIC/float32": 1, "SVDF/int8": 1}
    assert est["by_op"]["LOGISTIC/float32"]["cycles"] == 0


def test_a_float_mac_costs_more_than_an_int8_one(table):
    """The same fully connected and convolution layers cost more in float32 than in int8 (CMSIS-NN's SIMD MACs
    against the FPU's dependent accumulate)."""
    for name, weights, out, macs in [("FULLY_CONNECTED", (16, 32), (1, 16), 16 * 32),
                                     ("CONV_2D", (8, 3, 3, 4), (1, 6, 6, 8), 6 * 6 * 8 * 3 * 3 * 4)]:
        cost = {}
        for dtype in (INT8, FLOAT32):
            op = opcost.Op(name, [opcost.Tensor((1, 8, 8, 4) if name == "CONV_2D" else (1, 32), dtype, False),
                                  opcost.Tensor(weights, dtype, True)], [opcost.Tensor(out, dtype, False)])
            cycles, counted = opcost.op_cycles(op, table)
            assert counted == {"macs": macs}
            cost[op.precision] = cycles
        print(name, cost)
        assert cost["float32"] > cost["int8"] > 0


def test_builtin_codes_are_the_schema_s_and_every_tflite_micro_op_is_costed():
    """opcost's BuiltinOperator numbers equal tflite_micro's generated schema, and every TFLite Micro builtin has a
    rule: MACs, a class, free, or explicitly not modelled."""
    pytest.importorskip("tflite_micro")
    from edgepkd.compress.tflm import TFLM_OPS, _schema

    codes = {v: k for k, v in vars(_schema().BuiltinOperator).items() if not k.startswith("_")}
    assert {c: codes[c] for c in opcost.BUILTIN_CODES} == opcost.BUILTIN_CODES
    assert set(opcost.BUILTIN_CODES.values()) == set(TFLM_OPS)
    ruled = set(opcost.MAC_OPS) | set(opcost.OP_CLASSES) | opcost.FREE_OPS | opcost.NOT_MODELLED
    assert set(TFLM_OPS) <= ruled, sorted(set(TFLM_OPS) - ruled)
    assert all(cls in opcost.CLASSES for _, classes in opcost.OP_CLASSES.values() for cls, _ in classes)


# ------------------------------------------------------------------------------------------------ calibration
@pytest.fixture(scope="module")
def resnet8_tflite(tmp_path_factory) -> Path:
    """MLPerf Tiny's ResNet-8 (edgepkd's ``resnet8``: 3x32x32, 10 classes; random weights, which do not change the
    graph) exported by tflite-micro-int8, calibrated on random images (about 10 s)."""
    for module in ("litert_torch", "ai_edge_litert", "torchao", "tflite_micro"):
        pytest.importorskip(module)
    import numpy as np
    import torch

    from edgepkd.compress import tflm_export
    from edgepkd.compress.targets import load_targets
    from edgepkd.models import TEACHERS

    torch.manual_seed(0)
    model = TEACHERS.get("resnet8")(num_classes=10, in_chans=3, image_size=32).eval()
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("resnet8") / "resnet8.tflite"
    tflm_export.export(model, torch.randn(1, 3, 32, 32), path, load_targets().get("tflite-micro-int8"),
                       lambda: (rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(8)),
                       {"model": "resnet8"})
    return path


@pytest.mark.slow
@pytest.mark.export
def test_resnet8_comes_out_at_mlperf_tiny_s_54_ms(resnet8_tflite, table):
    """ST's MLPerf Tiny v1.0 result on NUCLEO-H7A3ZI-Q, 18.401 inferences/s = 54.3 ms: the per-op estimate of the
    exported ResNet-8 is within 10 % of it, its MACs are edgepkd's count of the model, and the fitted int8 rate
    stays under the Cortex-M7's peak (one SMLAD, 2 MACs, per cycle)."""
    est = opcost.estimate(resnet8_tflite.read_bytes(), table)
    for key, row in est["by_op"].items():
        print(f"{key:<24} x{row['count']:<3} {row['cycles']:>12,.0f} cycles {100 * row['share']:5.1f} %")
    print(f"ResNet-8: {est['cycles']:,.0f} cycles = {est['ms']:.2f} ms at {est['clock_mhz']:g} MHz")
    assert est["ms"] == pytest.approx(1e3 / 18.401, rel=0.10)
    int8_macs = sum(r.get("macs", 0) for k, r in est["by_op"].items() if k.endswith("/int8"))
    assert int8_macs == 12_501_632                                 # tests/test_devices.py's count of resnet8
    assert est["by_op"]["CONV_2D/int8"]["share"] > 0.8 and not est["not_modelled"]
    assert table.int8.macs_per_cycle.conv_2d < 2.0
