"""Analytic FLOP and parameter accounting, per layer, for one image (batch 1).

Convention (stated once, used everywhere):
  * MACs: multiply-accumulates of Conv1d / Conv2d / Linear layers (bias adds not counted), from each
    layer's weight shape and output size. FLOPs of those layers = 2 x MACs, the convention of
    ``torch.utils.flop_counter.FlopCounterMode`` (a test cross-checks the two).
  * Selective scan: 9·L·D·N FLOPs per branch (VMamba's ``flops_selective_scan_ref``, derived from the
    Mamba reference scan) + L·D for the D skip + L·D for the SiLU(z) gate. It has no MACs in this count.
    A headed branch (Mamba-2's scalar SSM) counts its 'ssd' export form instead (``SSMBranch.scan_flops``).
  * Not counted: normalisation, activations, pooling, residual adds, softplus (elementwise, O(L·D)).
  * FLOPs = 2 x MACs + scan FLOPs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from edgepkd.models.mamba import SSMBranch


# the convention above in one line, as metrics.json states it
FLOP_CONVENTION = ("FLOPs per image = 2 x MACs of conv/linear layers + selective scan 9·L·D·N (+2·L·D for the "
                   "D skip and z gate; headed students: their ssd form, 2·L²·N + 2·H·L³ + 3·H·L² + 2·D·L² + L·D); "
                   "norms and activations not counted")


@dataclass
class LayerCount:
    name: str
    kind: str
    macs: int
    flops: int


@dataclass
class FlopReport:
    macs: int
    flops: int
    params: int
    layers: list[LayerCount] = field(default_factory=list)

    @property
    def mflops(self) -> float:
        return self.flops / 1e6

    def bytes(self) -> dict[str, int]:
        """Weight bytes per precision (int8 excludes the per-channel scales, a few hundred bytes)."""
        return {"fp32": 4 * self.params, "fp16": 2 * self.params, "int8": self.params}

    def as_dict(self, layers: bool = False) -> dict:
        d = asdict(self)
        d["bytes"] = self.bytes()
        if not layers:
            d.pop("layers")
        return d


def _layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        per_output = module.weight.shape[1] * int(torch.tensor(module.kernel_size).prod())  # (cin/groups)·k
        return out.numel() * per_output
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    return 0


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> FlopReport:
    """Count MACs/FLOPs of ``model`` on one input of shape ``input_shape`` = (C, H, W), per layer."""
    layers: list[LayerCount] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, inputs, out):
        if isinstance(module, SSMBranch):
            length = inputs[0].shape[-1]
            flops = module.scan_flops(length)
            layers.append(LayerCount(names[module] + ".scan", "selective_scan", 0, flops))
        else:
            macs = _layer_macs(module, out)
            layers.append(LayerCount(names[module], type(module).__name__, macs, 2 * macs))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear, SSMBranch))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.zeros(1, *input_shape, dtype=p.dtype, device=p.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    macs = sum(layer.macs for layer in layers)
    flops = sum(layer.flops for layer in layers)
    params = sum(p.numel() for p in model.parameters())
    return FlopReport(macs=macs, flops=flops, params=params, layers=layers)
