"""Verification of an exported artifact in its own runtime against the PyTorch fp32 model, on the test split.

Judged by accuracy, top-1 agreement with PyTorch and the largest |logit difference|; the target's tolerances
decide pass or fail (fp32: max |diff|; int8: accuracy drop), and failing is the default outcome of a miss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from edgepkd.compress.targets import ExportTarget


@dataclass
class Verification:
    images: int
    accuracy: float             # artifact, in its runtime (%)
    reference_accuracy: float   # PyTorch fp32 (%)
    agreement: float            # top-1 agreement with PyTorch fp32 (%)
    max_abs_diff: float         # largest |logit difference| over the split
    runtime: str
    runtime_version: str
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def verify(runner, model: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor,
           target: ExportTarget) -> Verification:
    """``x_test``: normalised float images (N, C, H, W); the runner takes one image at a time (batch 1)."""
    with torch.no_grad():
        ref = torch.cat([model(x_test[i:i + 256]) for i in range(0, len(x_test), 256)]).numpy()  # (N, K)
    out = np.concatenate([runner(x_test[i:i + 1].numpy()) for i in range(len(x_test))]).astype(np.float32)
    y = y_test.numpy()
    acc = 100.0 * float((out.argmax(1) == y).mean())
    ref_acc = 100.0 * float((ref.argmax(1) == y).mean())
    agreement = 100.0 * float((out.argmax(1) == ref.argmax(1)).mean())
    max_diff = float(np.abs(out - ref).max())
    v, failures = target.verify, []
    if v.max_abs_diff is not None and not max_diff <= v.max_abs_diff:
        failures.append(f"max |logit diff| {max_diff:.3g} > {v.max_abs_diff:g}")
    if v.max_accuracy_drop is not None and not ref_acc - acc <= v.max_accuracy_drop:
        failures.append(f"accuracy {acc:.2f}% is {ref_acc - acc:.2f} points below PyTorch's {ref_acc:.2f}% "
                        f"(allowed {v.max_accuracy_drop:g})")
    if v.min_agreement is not None and not agreement >= v.min_agreement:
        failures.append(f"top-1 agreement {agreement:.2f}% < {v.min_agreement:g}%")
    return Verification(len(y), acc, ref_acc, agreement, max_diff, runner.runtime, runner.version, failures)
