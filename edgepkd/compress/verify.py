"""Verification of an exported artifact in its own runtime against the PyTorch fp32 model, on the test split.

Judged by accuracy, top-1 agreement with PyTorch and the logit differences; the target's tolerances decide pass
or fail, and failing is the default outcome of a miss. fp32: every logit of every test image must satisfy

    |out - ref| <= max_abs_diff + max_rel_diff * scale        (max_rel_diff default 0)

with ``scale`` = |ref| (``rel_scale: logit``, numpy.allclose's rule, the default) or the largest |ref| of the
image's row (``rel_scale: row``). A model with large logits is thus held to float rounding of its own magnitude,
while a wrong graph or weight still fails: its differences are not proportional to the logits' rounding.
int8: the accuracy drop (and top-1 agreement when the target asks).

The built-in fp32 targets (export/*-fp32.yaml) use ``max_abs_diff: 1e-4, max_rel_diff: 5e-5, rel_scale: row``,
from what MNIST's students measured in TFLite (XNNPACK, the least exact of the runtimes):
  * the absolute bound alone refused the smallest students at diffs of 1.1e-4 to 1.5e-4;
  * scaled by each logit's own |ref| the rule refused a member at 1.08e-4 on a logit of -0.09 beside one of 8:
    a logit is rounded like the sums it came from, so the row's magnitude is the scale;
  * at 1e-5 of the row it refused another run's member at 1.83e-4 on a row reaching 4.3 (TFLite's builtin
    kernels: 5.4e-5); the worst excess over 1e-4 seen is 1.9e-5 of the row, so 5e-5 leaves 2.6x;
  * a whole weight matrix 1 % off stays far outside (tests/test_verify.py: 18x over on logits scaled x1000).

A format may name second opinions, other ways a device runs the same file (TFLite: its builtin kernels without
XNNPACK). ``verify`` runs each on the first ``CROSS_CHECK_IMAGES`` test images: fp32 targets are held to the
same logit bound against PyTorch, int8 ones to >= ``CROSS_CHECK_AGREEMENT`` % top-1 agreement with the verified
runtime (int8 kernels may round differently; a wrong graph agrees far less).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from edgepkd.compress.targets import ExportTarget

CROSS_CHECK_IMAGES = 256
CROSS_CHECK_AGREEMENT = 98.0


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
    cross_checks: list[dict] = field(default_factory=list)  # one per second opinion (``_cross_check``)

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def verify(artifact, model: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor,
           target: ExportTarget, second_opinions: list = ()) -> Verification:
    """``artifact``: the exported file in its runtime (a compress/runtimes.py adapter, ``artifact(x) -> logits``);
    ``x_test``: normalised float images (N, C, H, W), given to it one at a time (batch 1); ``second_opinions``:
    other adapters of the same file, cross-checked on the first ``CROSS_CHECK_IMAGES`` images."""
    with torch.no_grad():
        ref = torch.cat([model(x_test[i:i + 256]) for i in range(0, len(x_test), 256)]).numpy()  # (N, K)
    x = x_test.numpy()                                                                # (N, C, H, W)
    out = np.concatenate([artifact(x[i:i + 1]) for i in range(len(x))]).astype(np.float32)  # (N, K)
    y = y_test.numpy()
    acc = 100.0 * float((out.argmax(1) == y).mean())
    ref_acc = 100.0 * float((ref.argmax(1) == y).mean())
    agreement = 100.0 * float((out.argmax(1) == ref.argmax(1)).mean())
    diff = np.abs(out - ref)                                                          # (N, K)
    v, failures = target.verify, _logit_failures(diff, ref, target)
    max_diff = float(diff.max())
    if v.max_accuracy_drop is not None and not ref_acc - acc <= v.max_accuracy_drop:
        failures.append(f"accuracy {acc:.2f}% is {ref_acc - acc:.2f} points below PyTorch's {ref_acc:.2f}% "
                        f"(allowed {v.max_accuracy_drop:g})")
    if v.min_agreement is not None and not agreement >= v.min_agreement:
        failures.append(f"top-1 agreement {agreement:.2f}% < {v.min_agreement:g}%")
    checks = [_cross_check(other, x, out, ref, artifact.runtime, target) for other in second_opinions]
    failures += [f"{c['runtime']}: {f}" for c in checks for f in c.pop("failures")]
    return Verification(len(y), acc, ref_acc, agreement, max_diff, artifact.runtime, artifact.version, failures,
                        checks)


def _logit_failures(diff, ref, target: ExportTarget) -> list[str]:
    """The fp32 logit bound (``max_abs_diff + max_rel_diff * scale``, module docstring): [] or one failure line."""
    v = target.verify
    if v.max_abs_diff is None and v.max_rel_diff is None:
        return []
    atol, rtol = v.max_abs_diff or 0.0, v.max_rel_diff or 0.0
    row = v.rel_scale == "row"
    scale = np.abs(ref)                                                                # (N, K)
    if row:
        scale = np.broadcast_to(scale.max(axis=1, keepdims=True), scale.shape)         # (N, K): the row's largest
    excess = diff - (atol + rtol * scale)                                              # (N, K): > 0 fails
    bad = ~(excess <= 0)                                                               # NaN fails too
    if not bad.any():
        return []
    worst = np.unravel_index(np.argmax(np.where(bad, np.nan_to_num(excess, nan=np.inf), -np.inf)), excess.shape)
    s = float(scale[worst])
    allowed = f"{atol:g}" if not rtol else \
        f"{atol:g} + {rtol:g}·{'max|ref row|' if row else '|ref|'} = {atol + rtol * s:.3g}"
    return [f"|logit diff| {diff[worst]:.3g} at a logit of {ref[worst]:.3g}{f' (row max |ref| {s:.3g})' if row else ''}"
            f" > {allowed} (max |logit diff| {float(np.nanmax(diff)):.3g}, {int(bad.sum())} of {bad.size} logits over)"]


def _cross_check(other, x, primary, ref, primary_runtime: str, target: ExportTarget) -> dict:
    """One second opinion (an adapter) on the first ``CROSS_CHECK_IMAGES`` images: its record, with the failures
    (fp32: the logit bound against PyTorch; int8: top-1 agreement with the verified runtime's ``primary``)."""
    n = min(CROSS_CHECK_IMAGES, len(x))                                                # x: (N, C, H, W)
    out = np.concatenate([other(x[i:i + 1]) for i in range(n)]).astype(np.float32)              # (n, K)
    agreement = 100.0 * float((out.argmax(1) == primary[:n].argmax(1)).mean())
    diff = np.abs(out - ref[:n])                                                        # (n, K)
    if target.precision == "fp32":
        failures = _logit_failures(diff, ref[:n], target)
    else:
        failures = ([] if agreement >= CROSS_CHECK_AGREEMENT else
                    [f"top-1 agreement with {primary_runtime} {agreement:.2f}% < {CROSS_CHECK_AGREEMENT:g}%"])
    return {"runtime": other.runtime, "images": n, "max_abs_diff": float(np.nanmax(diff)), "agreement": agreement,
            "passed": not failures, "failures": failures}
