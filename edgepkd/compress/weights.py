"""int8 weight storage with float compute: the numerics shared by the ONNX and TFLite passes (method ``weights``).

Every float constant (ONNX initializer, TFLite constant buffer) of at least ``min_elements`` values is stored as
symmetric int8 with a float scale (one per slice along the axis that reconstructs it best, or one for the tensor)
and dequantized by the graph itself: ``Cast`` + ``Mul`` in ONNX, which onnxruntime constant-folds when it loads the
session; ``DEQUANTIZE`` of a constant in TFLite, whose kernel computes its output once and keeps it. The compute
graph the runtime executes is then the fp32 graph: same speed, weights in a quarter of the bytes. Unlike int8
compute (QDQ, dynamic range, PT2E), nothing is added per inference, which is what the smallest students need
(their matmuls are too small for int8 kernels to pay off).
"""

from __future__ import annotations

import numpy as np


def broadcast(scale: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    """``scale`` (C,) shaped to multiply a tensor of ``ndim`` dimensions along ``axis`` (a scalar stays a scalar)."""
    if axis is None or scale.ndim == 0:
        return scale
    return scale.reshape([-1 if d == axis % ndim else 1 for d in range(ndim)])


def quantize(a: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of ``a`` (float32): returns (q int8 like ``a``, scale float32 of shape (a.shape[axis],) or ())
    with ``a ≈ q * scale`` broadcast along ``axis``. A channel (or tensor) of zeros gets scale 1."""
    a = np.asarray(a, dtype=np.float32)
    if axis is None or a.ndim == 0:
        scale = np.float32(np.abs(a).max() / 127.0) if a.size else np.float32(0)
        scale = np.array(scale if scale > 0 else 1.0, dtype=np.float32)  # ()
        shaped = scale
    else:
        axis = axis % a.ndim
        others = tuple(d for d in range(a.ndim) if d != axis)
        scale = (np.abs(a).max(axis=others) / 127.0).astype(np.float32)  # (C,)
        scale[scale == 0] = 1.0
        shaped = broadcast(scale, axis, a.ndim)
    q = np.clip(np.rint(a / shaped), -127, 127).astype(np.int8)         # like a
    return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    return q.astype(np.float32) * broadcast(scale, axis, q.ndim)


def quantize_best(a: np.ndarray, per_channel: bool = True) \
        -> tuple[np.ndarray, np.ndarray, int | None]:
    """``quantize`` along the axis whose per-slice scales reconstruct ``a`` best (least squared error; one scale
    for vectors, scalars, ``per_channel=False`` and tensors one scale reconstructs as well): (q, scale, axis). Compute stays float, so any axis works for
    the runtime; the best one matters for what is not a matmul weight: the scan's A (d_inner, N) wants one scale
    per channel row, not per state column (on an MNIST student: max logit error 0.11 against 1.75)."""
    a = np.asarray(a, dtype=np.float32)
    axes = [d for d, n in enumerate(a.shape) if n > 1] if per_channel and a.ndim >= 2 else []
    if not axes:
        return (*quantize(a, None), None)
    tried = [(*quantize(a, None), None)] + [(*quantize(a, d), d) for d in axes]
    # ties go to fewer scales: a tensor one scale reconstructs as well as any per-channel one (the SSD scan's 0/1
    # segment matrix, (256, 16) on an MNIST student) stores 1 scale instead of 256 (TFLite adds an int64 zero point
    # per scale: 3 KB of that student's int8 file)
    return min(tried, key=lambda t: (float(np.square(dequantize(*t) - a).sum()), t[1].size))


def best_axis(a: np.ndarray) -> int | None:
    """The axis ``quantize_best`` picks for ``a``."""
    return quantize_best(a)[2]
