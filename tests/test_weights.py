"""int8 weight storage (compress/weights.py): the rounding bound, zero channels, and the axis choice."""

import numpy as np
import pytest

from edgepkd.compress.weights import best_axis, dequantize, quantize, quantize_best


@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_quantize_is_within_half_a_step(axis):
    a = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32) * np.arange(1, 7)[:, None]
    q, scale = quantize(a, axis)
    assert q.dtype == np.int8 and q.shape == a.shape and np.abs(q).max() == 127
    step = scale if axis is None else np.expand_dims(scale, 1 - (axis % 2))
    assert np.all(np.abs(dequantize(q, scale, axis) - a) <= step / 2 + 1e-7)


def test_zero_channels_and_tensors_round_trip():
    a = np.zeros((3, 4), np.float32)
    a[1] = [1, -2, 3, -4]
    q, scale = quantize(a, 0)
    assert scale.tolist()[0] == 1.0 and scale.tolist()[2] == 1.0
    assert np.array_equal(dequantize(q, scale, 0)[[0, 2]], a[[0, 2]])
    q, scale = quantize(np.zeros(5, np.float32), None)
    assert float(scale) == 1.0 and not q.any()


def test_best_axis_follows_the_rows_of_a_scan_matrix():
    """A = -exp(A_log): (d_inner, N) with rows of very different magnitude -> one scale per row."""
    rows = np.exp(np.random.default_rng(1).uniform(-4, 2, size=(16, 1)))
    a = (-rows * np.arange(1, 5)[None, :]).astype(np.float32)                # (16, 4)
    assert best_axis(a) == 0
    assert best_axis(a.T.copy()) == 1
    assert best_axis(np.ones(7, np.float32)) is None
    assert best_axis(np.exp(np.arange(9, dtype=np.float32)).reshape(1, 9, 1)) == 1


def test_one_scale_when_it_is_as_exact_as_per_channel():
    """A 0/1 matrix (the SSD scan's segment sums) is exact with one scale: ties go to fewer scales."""
    segments = (np.random.default_rng(0).uniform(size=(16, 256)) < 0.3).astype(np.float32)   # (L, L·L)
    q, scale, axis = quantize_best(segments)
    assert axis is None and scale.size == 1
    assert np.array_equal(dequantize(q, scale, axis), segments)
    assert best_axis(np.ones((1, 9, 1), np.float32)) is None
