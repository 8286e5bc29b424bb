"""PyTorch deployment: torchao int8 quantization (``quantize_``), saved as a ``torch.export`` program (.pt2).

Metadata goes into the .pt2 archive's ``extra_files`` as ``edgepkd.json``. Verified in PyTorch
(``compress/runtimes.py``'s TorchProgramModel).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from edgepkd.compress._native import quiet_native
from edgepkd.compress.targets import ExportTarget


def _torchao_config(name: str):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    return {"int8_dynamic_activation_int8_weight": Int8DynamicActivationInt8WeightConfig,
            "int8_weight_only": Int8WeightOnlyConfig}[name]()


def export(model: torch.nn.Module, example: torch.Tensor, path: Path, target: ExportTarget,
           calibration: Callable[[], Iterable[np.ndarray]], metadata: dict) -> None:
    import copy

    model = copy.deepcopy(model).eval()
    if target.quantization.method == "torchao":
        with quiet_native():  # torchao's import logs deprecation notices through torch's logger
            from torchao.quantization import quantize_

        # nn.Linear only (torchao's int8 tensors have no convolution), and not Linear(1, n): dt_proj with
        # dt_rank 1 fails to quantize. The scan stays in float.
        quantize_(model, _torchao_config(target.quantization.config),
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and m.in_features > 1)
    with torch.no_grad():
        program = torch.export.export(model, (example,))
    torch.export.save(program, str(path), extra_files={"edgepkd.json": json.dumps(metadata)})


def read_metadata(path: Path) -> dict:
    extra = {"edgepkd.json": ""}
    torch.export.load(str(path), extra_files=extra)
    return json.loads(extra["edgepkd.json"] or "{}")

