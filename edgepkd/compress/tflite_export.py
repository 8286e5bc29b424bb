"""TFLite: ``litert_torch.convert`` (fp32), PT2E int8 (``torchao.quantization.pt2e`` prepare/convert with a
quantizer litert-torch accepts), run with ``ai_edge_litert.interpreter.Interpreter``.

int8 compute (method pt2e) quantizes only Linear and Conv layers (weights per-channel, symmetric; activations either
calibrated ('static': the model's input and output become int8 tensors) or quantized at run time ('dynamic')):
quantizing the scan's elementwise ops fails to convert (tfl.slice same-scale constraint) or, when it converts,
makes a small student slower than fp32. Verification runs the file in ``compress/runtimes.py``'s TFLiteModel
(ai_edge_litert), which quantizes int8 inputs with the scale and zero point the interpreter reports. Method
weights stores the float constants as int8 behind DEQUANTIZE ops and computes in float (see compress/weights.py).
Metadata is a flatbuffer metadata entry 'edgepkd' (JSON), readable with ai_edge_litert alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from edgepkd.compress._native import quiet_native
from edgepkd.compress.targets import ExportTarget

METADATA_KEY = "edgepkd"


def _quantizer(target: ExportTarget):
    """litert-torch's PT2E quantizer, annotating only aten.linear / aten.conv nodes.

    ``set_module_type`` / ``set_module_name`` select nothing with torch 2.14's string-typed nn_module_stack
    (checked with litert-torch 0.10), so annotation is done directly with the per-op annotators.
    """
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.pt2e_quantizer_utils import OP_TO_ANNOTATOR

    quant = target.quantization

    class LinearConvQuantizer(PT2EQuantizer):
        def annotate(self, gm):
            for op in quant.modules:
                OP_TO_ANNOTATOR[op](gm, self.global_config, None)
            for node in gm.graph.nodes:  # nodes inside excluded modules lose their annotation: they stay float
                if quant.excludes(_module_path(node)):
                    node.meta.pop("quantization_annotation", None)
            return gm

    q = LinearConvQuantizer()
    q.set_global(get_symmetric_quantization_config(is_per_channel=quant.per_channel,
                                                   is_dynamic=quant.activations == "dynamic"))
    return q


def _module_path(node) -> str:
    """The module a graph node of torch.export belongs to ('blocks.0.mixer.fwd.x_proj'), from nn_module_stack."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]               # (qualified name, type) of the innermost module


def export(model: torch.nn.Module, example: torch.Tensor, path: Path, target: ExportTarget,
           calibration: Callable[[], Iterable[np.ndarray]], metadata: dict) -> None:
    """Write ``model`` to ``path`` for ``target``: convert (quantized with PT2E for method pt2e), then edit the
    flatbuffer once: int8 weight storage (method weights), short tensor names, the metadata entry."""
    from ai_edge_litert.tools import flatbuffer_utils

    with quiet_native():
        _export(model, example, path, target, calibration)
    flat = flatbuffer_utils.read_model(str(path))
    q = target.quantization
    if q.method == "weights" or (q.method == "pt2e" and q.float_weights == "int8"):
        _int8_weights(flat, q.min_elements, q.per_channel)   # pt2e: only the float constants are left to store
    _slim_tensors(flat)
    _set_metadata(flat, metadata)
    flatbuffer_utils.write_model(flat, str(path))


def _export(model, example, path: Path, target: ExportTarget, calibration) -> None:
    import litert_torch

    litert_torch.config.show_progress = False
    model = model.eval()
    if target.quantization.method == "pt2e":
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = _quantizer(target)
        graph = prepare_pt2e(torch.export.export(model, (example,)).module(), quantizer)
        with torch.no_grad():
            for x in calibration():
                graph(torch.from_numpy(x))
        graph = convert_pt2e(graph, fold_quantize=False)
        move_exported_model_to_eval(graph)
        edge = litert_torch.convert(graph, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
    else:
        edge = litert_torch.convert(model, (example,))
    edge.export(str(path))


def _int8_weights(model, min_elements: int, per_channel: bool) -> None:
    """int8 weight storage (method 'weights', see compress/weights.py): each float constant with at least
    ``min_elements`` values becomes an int8 tensor (symmetric, per channel) feeding a DEQUANTIZE
    op whose output is the tensor the graph used before. The interpreter's DEQUANTIZE kernel computes the output
    of a constant input once, on the first invoke, and keeps it: inference runs the fp32 graph. Tensors that
    share a float buffer share one int8 copy."""
    from ai_edge_litert import schema_py_generated as schema

    from edgepkd.compress import weights

    ops = schema.BuiltinOperator
    codes = model.operatorCodes
    existing = next((i for i, c in enumerate(codes) if max(c.builtinCode, c.deprecatedBuiltinCode) ==
                     ops.DEQUANTIZE), None)
    dequantize = existing if existing is not None else len(codes)      # appended below when used
    empty = 0                                                          # buffer 0 is the empty sentinel by convention
    if model.buffers[0].data is not None:
        model.buffers.append(schema.BufferT())
        empty = len(model.buffers) - 1
    version = 1
    owners: dict[int, int] = {}
    for sub in model.subgraphs:
        for t in sub.tensors:
            owners[t.buffer] = owners.get(t.buffer, 0) + 1
    for sub in model.subgraphs:
        used = {t for op in sub.operators for t in op.inputs}
        decode, stored_as = [], {}                                         # (float buffer, shape) -> int8 tensor
        for index, tensor in enumerate(list(sub.tensors)):
            data = model.buffers[tensor.buffer].data
            if tensor.type != schema.TensorType.FLOAT32 or data is None or index not in used:
                continue
            a = np.frombuffer(np.asarray(data, dtype=np.uint8).tobytes(), dtype=np.float32).reshape(tensor.shape)
            if a.size < min_elements or not np.isfinite(a).all():   # a mask of -inf has no int8 form
                continue
            key = (tensor.buffer, tuple(tensor.shape))
            if key not in stored_as:
                q, scale, axis = weights.quantize_best(a, per_channel)     # int8 like a, (C,) or ()
                stored = schema.BufferT()
                stored.data = np.frombuffer(q.tobytes(), dtype=np.uint8)
                model.buffers.append(stored)
                qt = schema.TensorT()
                qt.shape, qt.type, qt.buffer = list(tensor.shape), schema.TensorType.INT8, len(model.buffers) - 1
                qt.name = f"q{index}"                                    # renamed by _slim_tensors
                qt.quantization = schema.QuantizationParametersT()
                qt.quantization.scale = [float(s) for s in np.atleast_1d(scale)]
                qt.quantization.zeroPoint = [0] * len(qt.quantization.scale)
                qt.quantization.quantizedDimension = axis or 0
                sub.tensors.append(qt)
                stored_as[key] = len(sub.tensors) - 1
                # TFLite's op versions: DEQUANTIZE of int8 is 2, of per-channel int8 (several scales) 5
                version = max(version, 5 if len(qt.quantization.scale) > 1 else 2)
            owners[tensor.buffer] -= 1
            if not owners[tensor.buffer]:
                model.buffers[tensor.buffer].data = None                    # nobody else reads the float copy
            tensor.buffer = empty                                          # now computed, not stored
            op = schema.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = dequantize, [stored_as[key]], [index]
            decode.append(op)
        sub.operators = decode + list(sub.operators)                       # decoders first: topological order
    if version > 1 and existing is None:
        code = schema.OperatorCodeT()
        code.builtinCode, code.deprecatedBuiltinCode, code.version = ops.DEQUANTIZE, ops.DEQUANTIZE, version
        codes.append(code)
    elif version > 1:
        codes[dequantize].version = max(codes[dequantize].version, version)


def _set_metadata(model, metadata: dict) -> None:
    """A flatbuffer metadata entry 'edgepkd' holding ``metadata`` as JSON (replacing an earlier one)."""
    from ai_edge_litert import schema_py_generated as schema

    model.metadata = [m for m in (model.metadata or []) if m.name not in (METADATA_KEY, METADATA_KEY.encode())]
    buf = schema.BufferT()
    buf.data = np.frombuffer(json.dumps(metadata).encode(), dtype=np.uint8)
    model.buffers.append(buf)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_KEY, len(model.buffers) - 1
    model.metadata.append(entry)


def _slim_tensors(model) -> None:
    """The converter names every intermediate tensor after its whole module path ("edgepkd.models.mamba.
    MambaStudent/torch.nn.modules...;2"): about 40 % of a small student's file. Keep the graph's input and
    output names, number the rest. Float tensors also carry an empty quantization table each: dropped (5-6 %)."""
    for g, sub in enumerate(model.subgraphs):
        keep = set(sub.inputs) | set(sub.outputs)
        for i, tensor in enumerate(sub.tensors):
            if i not in keep:
                tensor.name = f"{g}:{i}" if g else str(i)
            q = tensor.quantization
            if q is not None and q.scale is None and q.zeroPoint is None and q.min is None and q.max is None \
                    and q.details is None:
                tensor.quantization = None


def read_metadata(path: Path) -> dict:
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(Path(path).read_bytes(), 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name().decode() == METADATA_KEY:
            return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    return {}

