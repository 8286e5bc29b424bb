"""ExecuTorch: ``torch.export`` -> ``to_edge_transform_and_lower`` with XNNPACK's partitioner -> a .pte program, run
with ExecuTorch's runtime.

int8 (method pt2e) is PT2E with XNNPACK's own quantizer (``XNNPACKQuantizer`` with
``get_symmetric_quantization_config``): per-channel symmetric int8 weights of the Linear / Conv layers
(``quantization.modules``), activations calibrated on training images ('static') or quantized at run time
('dynamic'); modules matching ``exclude_modules`` stay float, and so does the selective scan (its elementwise ops are
not annotated), as for tflite-int8-static. The quantize / dequantize ops sit inside the program and are lowered to
XNNPACK with the layers they wrap, so the program's input and output stay float32.

Metadata: the .pte format has no free-form key/value table like ONNX's metadata_props or TFLite's metadata
entries, so the program gets a second method, the constant method ``edgepkd_metadata``, that returns the JSON
(model, preprocessing, labels, provenance) as a uint8 tensor of its UTF-8 bytes. Any ExecuTorch runtime reads it
(``program.load_method("edgepkd_metadata")``, no inputs), torch-free ones included; ``read_metadata`` and the
device runner do, through ``compress/runtimes.py``'s ExecuTorchModel (``metadata()``), the adapter verification
runs the program in too. ``manifest.json`` holds the same next to the artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from edgepkd.compress._native import quiet_native
from edgepkd.compress.runtimes import PTE_METADATA_METHOD
from edgepkd.compress.targets import ExportTarget

_OPS = {"linear": ("linear.default",), "conv": ("conv1d.default", "conv2d.default")}


def _quantizer(target: ExportTarget):
    """XNNPACK's PT2E quantizer, annotating only the ``quantization.modules`` ops outside ``exclude_modules``."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, \
        get_symmetric_quantization_config

    from edgepkd.compress.tflite_export import _module_path

    quant = target.quantization
    config = get_symmetric_quantization_config(is_per_channel=quant.per_channel,
                                               is_dynamic=quant.activations == "dynamic")
    q = XNNPACKQuantizer()
    for module in quant.modules:
        for name in _OPS[module]:
            packet, overload = name.split(".")
            q.set_operator_type(getattr(getattr(torch.ops.aten, packet), overload), config)
    q.set_filter_function(lambda node: not quant.excludes(_module_path(node)))
    return q


def export(model: torch.nn.Module, example: torch.Tensor, path: Path, target: ExportTarget,
           calibration: Callable[[], Iterable[np.ndarray]], metadata: dict) -> None:
    """Write ``model`` to ``path`` as a .pte for ``target``: export (quantized with PT2E for method pt2e), lower to
    XNNPACK, serialize; the metadata becomes the constant method 'edgepkd_metadata'."""
    import warnings

    model = model.eval()
    with torch.no_grad(), warnings.catch_warnings(), quiet_native():
        warnings.simplefilter("ignore")  # executorch.exir's experimental-API and deprecation notices
        # imported here: torchao's import logs a deprecation notice through torch's logger
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        program = torch.export.export(model, (example,))
        if target.quantization.method == "pt2e":
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            graph = prepare_pt2e(program.module(), _quantizer(target))
            for x in calibration():
                graph(torch.from_numpy(x))
            graph = convert_pt2e(graph)
            program = torch.export.export(graph, (example,))
        data = torch.tensor(list(json.dumps(metadata).encode()), dtype=torch.uint8)
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                           constant_methods={PTE_METADATA_METHOD: data})
        buffer = edge.to_executorch().buffer
    Path(path).write_bytes(buffer)


def read_metadata(path: Path) -> dict:
    from edgepkd.compress.formats import FORMATS

    return FORMATS.get("executorch").open(path).metadata()

