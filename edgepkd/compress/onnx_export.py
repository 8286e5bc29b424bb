"""ONNX: export with ``torch.onnx.export(dynamo=True)``, check with ``onnx.checker``, quantize with ONNX Runtime,
verified in ``onnxruntime`` (``compress/runtimes.py``'s OnnxModel). Metadata (preprocessing, labels, provenance)
goes into ``metadata_props``."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from edgepkd.compress.targets import ExportTarget, QuantConfig


def export(model: torch.nn.Module, example: torch.Tensor, path: Path, target: ExportTarget,
           calibration: Callable[[], Iterable[np.ndarray]], metadata: dict) -> None:
    """Write ``model`` to ``path`` for ``target``: export, check, slim; then quantize (from the fp32 graph), compact
    the names, embed the metadata, check again and save."""
    import onnx

    quant = target.quantization
    fp32 = path.with_name(path.stem + ".fp32-tmp.onnx")
    try:
        with torch.no_grad():
            torch.onnx.export(model, (example,), str(fp32), dynamo=True, opset_version=target.opset,
                              input_names=["input"], output_names=["logits"], external_data=False,
                              verbose=False, custom_translation_table=_translations(target.opset))
        onnx.checker.check_model(str(fp32), full_check=True)
        graph = onnx.load(str(fp32))
        excluded = _slim(graph, quant)
        if quant.method in ("ort_static", "ort_dynamic"):  # onnxruntime's quantizers work on files
            onnx.save(graph, str(fp32))
            _quantize(fp32, path, target, calibration, excluded)
            graph = onnx.load(str(path))
        elif quant.method == "weights":
            _int8_weights(graph, quant.min_elements, quant.per_channel)
        _compact(graph)
        _set_metadata(graph, metadata)
        onnx.checker.check_model(graph)
        onnx.save(graph, str(path))
    finally:
        fp32.unlink(missing_ok=True)
        Path(str(fp32) + ".data").unlink(missing_ok=True)


def _translations(opset: int = 18) -> dict:
    """aten ops written differently from the exporter's default: softplus (beta 1) as ONNX's one Softplus node,
    which onnxruntime computes without overflow, instead of Softplus, Greater and Where (torch's threshold branch,
    whose x > 20 shortcut differs from the exact value by < 3e-9)."""
    import onnxscript

    op = onnxscript.values.Opset("", opset)

    def softplus(x, beta: float = 1.0, threshold: float = 20.0):
        if beta != 1.0:
            return op.Div(op.Softplus(op.Mul(x, beta)), beta)
        return op.Softplus(x)

    return {torch.ops.aten.softplus.default: softplus}


def _module_path(node) -> str:
    """The PyTorch module that produced an ONNX node, from the dynamo exporter's 'namespace' metadata:
    ': Student/blocks.0: Block/blocks.0.mixer.in_proj: Linear/linear: aten.linear.default' -> 'blocks.0.mixer.in_proj'."""
    for prop in node.metadata_props:
        if prop.key == "namespace":
            scopes = [part.split(":")[0].strip() for part in prop.value.split("/")]
            modules = [s for s in scopes[1:-1] if s]
            return modules[-1] if modules else ""
    return ""


def _slim(model, quant: QuantConfig) -> list[str]:
    """Drop the exporter's per-node debug metadata (stack traces, FX nodes: most of a small model's bytes) and
    return the names of nodes whose module ``quant`` excludes (kept in float when quantizing)."""
    excluded = []
    for node in model.graph.node:
        if quant.excludes(_module_path(node)):
            excluded.append(node.name)
        del node.metadata_props[:]
        node.ClearField("doc_string")
    return excluded


class _Reader:
    """onnxruntime's CalibrationDataReader over a finite iterable of (1, C, H, W) float arrays."""

    def __init__(self, batches: Iterable[np.ndarray]):
        self._it = iter(batches)

    def get_next(self):
        x = next(self._it, None)
        return None if x is None else {"input": x}

    def rewind(self):  # part of the interface in recent onnxruntime versions
        raise NotImplementedError


def _quantize(src: Path, dst: Path, target: ExportTarget, calibration, excluded: list[str]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    q = target.quantization
    pre = src.with_name(src.stem + ".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        if q.method == "ort_dynamic":
            quantize_dynamic(str(pre), str(dst), op_types_to_quantize=list(q.op_types), per_channel=q.per_channel,
                             weight_type=QuantType.QInt8, nodes_to_exclude=excluded, reduce_range=q.reduce_range)
            return
        reader = type("Reader", (_Reader, CalibrationDataReader), {})(calibration())
        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}
        with contextlib.redirect_stdout(io.StringIO()):  # calibration prints progress with print()
            quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(q.op_types), per_channel=q.per_channel,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=excluded, calibrate_method=methods[q.calibration_method],
                            reduce_range=q.reduce_range)
    finally:
        pre.unlink(missing_ok=True)


def _int8_weights(model, min_elements: int, per_channel: bool) -> None:
    """int8 weight storage (method 'weights', see compress/weights.py): each float initializer with at least
    ``min_elements`` values becomes int8 + scale, and the graph computes it back with Cast and Mul. onnxruntime
    folds those at session load (its constant folding skips DequantizeLinear, so that op would run every
    inference), leaving the fp32 compute graph."""
    from onnx import TensorProto, helper, numpy_helper

    from edgepkd.compress import weights

    g = model.graph
    used = {name for n in g.node for name in n.input} - {v.name for v in g.input}  # an input may override it
    kept, decode = [], []
    for t in g.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype != np.float32 or a.size < min_elements or t.name not in used:
            kept.append(t)
            continue
        q, scale, axis = weights.quantize_best(a, per_channel)     # int8 like a, (C,) or ()
        scale = weights.broadcast(scale, axis, a.ndim)                     # multiplies q along axis
        kept += [numpy_helper.from_array(q, t.name + "/q"), numpy_helper.from_array(scale, t.name + "/scale")]
        decode += [helper.make_node("Cast", [t.name + "/q"], [t.name + "/f"], to=TensorProto.FLOAT),
                   helper.make_node("Mul", [t.name + "/f", t.name + "/scale"], [t.name])]
    del g.initializer[:]
    g.initializer.extend(kept)
    nodes = decode + list(g.node)                                          # decoders first: topological order
    del g.node[:]
    g.node.extend(nodes)


def _compact(model) -> None:
    """Short names for every intermediate tensor and initializer ('a0', 'a1', ...; the graph's 'input' and 'logits'
    stay), no node names, no value_info (shape annotations onnxruntime re-infers). The exporter's and the
    quantizer's names spell out module paths ('/blocks.0/mixer/in_proj/MatMul_output_0_quantized'): with the
    value_info, 27 % of a small student's int8 file. Graphs with subgraphs (Loop, If) are left as they are."""
    g = model.graph
    if any(a.g.node or a.graphs for n in g.node for a in n.attribute):
        return
    keep = {v.name for v in g.input} | {v.name for v in g.output}
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in short:
            short[name] = f"a{len(short):x}"
        return short[name]

    for t in g.initializer:
        t.name = rename(t.name)
    for n in g.node:
        n.input[:] = [rename(x) for x in n.input]
        n.output[:] = [rename(x) for x in n.output]
        n.ClearField("name")  # proto2: an empty string is still written; a cleared field is not
        if not n.domain:
            n.ClearField("domain")
    del g.value_info[:]
    del g.metadata_props[:]  # the exporter's graph signature: parameter names that no longer exist after renaming
    for v in list(g.input) + list(g.output):
        del v.metadata_props[:]


def _set_metadata(model, metadata: dict) -> None:
    """Store each top-level key of ``metadata`` as a JSON string in the model's ``metadata_props``."""
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)


def read_metadata(path: Path) -> dict:
    import onnxruntime as ort

    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta()
    return {k: json.loads(v) for k, v in meta.custom_metadata_map.items()}

