"""Selective scan (the S6 recurrence of Mamba) with interchangeable backends sharing one signature.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (ZOH for A, Euler for B, as in Mamba)
    y_t = <C_t, h_t> + D * u_t ;  out = y * silu(z)

Signature (that of ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``, real-valued,
ungrouped B/C):

    u: r(B D L)   delta: r(B H L)   A: r(H N) | r(H 1)   B: r(B N L)   C: r(B N L)
    D: r(D) | None   z: r(B D L) | None   delta_bias: r(H) | None
    returns out: r(B D L)  [, last_state: r(B D N)]

H is D (Mamba-1: a step size and N decays per channel) or divides D (heads, as in Mamba-2: channel d belongs to
head d // (D/H) and shares its step size and decays); A with one column is one decay for all N states of a head
(Mamba-2's scalar A). Every backend accepts both: ``_per_channel`` repeats heads to channels where a backend
needs per-channel inputs; 'ssd' uses the head structure.

Every backend computes in fp32 and casts back, like mamba's ``selective_scan_ref``.
Backends (`edgepkd list scan-backends`):
    torch      pure PyTorch, one step per position: the reference; exportable (unrolled at the fixed L).
    unrolled   the reference's recurrence laid out for device runtimes (the default export form): position-major
               (L, B, D, N) tensors, so each step's slice is one contiguous block; softplus written with ops
               every runtime delegates (no SELECT). Exportable, for inference.
    closed     pure PyTorch closed form with an (L, L) decay matrix: no loop, few ops; exportable, for inference.
    ssd        the quadratic (attention-like) form of Mamba-2's SSD: with one decay per head (A: r(H 1)) the
               whole scan is a handful of batched matmuls over (B, H, L, L), no loop, few ops; the export form
               of headed students. With per-state decays it is the closed form. Exportable; small L.
    ssd_matmul 'ssd' with C^T B as one matmul of two activations: the ONNX form (TFLite would leave that matmul
               outside XNNPACK).
    chunked    pure PyTorch two-level scan (~2·sqrt(L) sequential steps) with a hand-written backward.
    cpp        the O(B·D·L·N) core in a small C++ kernel (csrc/), compiled on first use; falls back to 'chunked'.
               ``auto`` picks it on CPU.
    mamba_ssm  the CUDA kernel of the mamba-ssm package (extra ``cuda``); ``auto`` picks it for GPU inputs
               when the package imports, else falls back with a one-line notice.
Tests check each backend against the reference, forward and gradients.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from edgepkd.errors import ConfigError, first_line
from edgepkd.registry import Registry

log = logging.getLogger(__name__)

SCAN_BACKENDS: Registry[Callable] = Registry("scan backend")


def _per_channel(u, delta, A, B, delta_bias):
    """Heads repeated to channels, for backends that compute per channel: delta (B, D, L), A (D, N),
    delta_bias (D,). A no-op for Mamba-1 inputs (H = D, A with N columns)."""
    dim, heads, n = u.shape[1], delta.shape[1], B.shape[1]
    if heads != dim:
        if dim % heads:
            raise ValueError(f"delta has {heads} heads, which do not divide the {dim} channels of u")
        p = dim // heads
        delta = delta.repeat_interleave(p, dim=1)                         # (B, D, L)
        A = A.repeat_interleave(p, dim=0)                                 # (D, N) or (D, 1)
        delta_bias = None if delta_bias is None else delta_bias.repeat_interleave(p)  # (D,)
    if A.shape[1] != n:
        A = A.expand(A.shape[0], n)                                       # (D, N): one decay for every state
    return delta, A, delta_bias


def _step_size(delta, delta_bias, delta_softplus, softplus=F.softplus) -> torch.Tensor:
    """fp32 step size dt = softplus?(delta + delta_bias): (B, H, L). The export forms pass
    ``softplus_exportable`` (no SELECT in the graph)."""
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    return softplus(delta) if delta_softplus else delta


def _skip_and_gate(y, u, D, z, dtype) -> torch.Tensor:
    """out = (y + D·u) * silu(z), cast back to the input dtype: (B, D, L)."""
    if D is not None:
        y = y + u.float() * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


@SCAN_BACKENDS.register("torch")
def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """Reference selective scan in pure PyTorch: one multiply-add per position, everything else vectorised.

    Also the export form: unrolled at a fixed L it is one SPLIT of the decays and of the inputs, two elementwise
    ops per position (none for the first: the state starts at zero), one CONCAT of the states and one
    contraction with C (about 2·L + 10 ops per branch)."""
    delta, A, delta_bias = _per_channel(u, delta, A, B, delta_bias)
    dt = _step_size(delta, delta_bias, delta_softplus)                  # (B, D, L)
    dA = torch.exp(dt.unsqueeze(-1) * A.float()[:, None, :])            # (B, D, L, N)
    dBu = (dt * u.float()).unsqueeze(-1) * B.float().transpose(1, 2).unsqueeze(1)  # (B, D, L, N)
    decays, inputs = dA.split(1, dim=2), dBu.split(1, dim=2)            # L x (B, D, 1, N): one SPLIT op each
    h = inputs[0] if len(inputs) > 1 else inputs[0] + 0 * decays[0]     # (B, D, 1, N): h_0 = x_0 (h_-1 = 0);
    # at L = 1 the decay still joins the graph, so A gets its (zero) gradient as in every other backend
    states = [h]
    for a, x in zip(decays[1:], inputs[1:]):
        h = a * h + x                                                   # (B, D, 1, N)
        states.append(h)
    y = (torch.cat(states, dim=2) * C.float().transpose(1, 2).unsqueeze(1)).sum(-1)  # (B, D, L)
    out = _skip_and_gate(y, u, D, z, u.dtype)                           # (B, D, L)
    return (out, h.squeeze(2)) if return_last_state else out


def softplus_exportable(x: torch.Tensor) -> torch.Tensor:
    """softplus(x) = max(x, 0) + log(1 + exp(-|x|)): exact and overflow-free, in ops that XNNPACK, onnxruntime
    and TFLite Micro all have. ``F.softplus`` lowers to GREATER + SELECT (its threshold branch), which falls
    outside TFLite's XNNPACK delegate and which TFLite Micro lacks. Differs from ``F.softplus`` by < 1e-7."""
    return torch.relu(x) + torch.log(1 + torch.exp(-x.abs()))


def _concat(parts: list[torch.Tensor], dim: int, fan_in: int = 4) -> torch.Tensor:
    """torch.cat as a tree of at most ``fan_in``-input concatenations: XNNPACK delegates CONCATENATION of up to
    5 inputs only, and one L-input concat splits the TFLite graph into three delegate partitions."""
    while len(parts) > 1:
        parts = [torch.cat(parts[i:i + fan_in], dim) if len(parts[i:i + fan_in]) > 1 else parts[i]
                 for i in range(0, len(parts), fan_in)]
    return parts[0]


@SCAN_BACKENDS.register("unrolled")
def selective_scan_unrolled(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            return_last_state=False):
    """The reference recurrence in the layout device runtimes run fastest, for export (inference only).

    Position-major: dA and dt·u·B are built as (L, B, D, N), so the SPLIT along L gives contiguous blocks (in
    the reference's (B, D, L, N) layout every step's slice is a strided gather of D pieces of N floats). Per
    step: two SLICEs, one MUL, one ADD; softplus without SELECT; the states join in a tree of <= 4-input
    concatenations; the contraction with C runs over the contiguous last axis. Same math as 'torch', within
    float rounding (tests check it against the reference)."""
    delta, A, delta_bias = _per_channel(u, delta, A, B, delta_bias)
    dt = _step_size(delta, delta_bias, delta_softplus, softplus_exportable)  # (B, D, L)
    dt_l = dt.permute(2, 0, 1).unsqueeze(-1)                            # (L, B, D, 1)
    dA = torch.exp(dt_l * A.float())                                    # (L, B, D, N)
    x = (dt_l * u.float().permute(2, 0, 1).unsqueeze(-1)) * B.float().permute(2, 0, 1).unsqueeze(2)  # (L, B, D, N)
    decays, inputs = dA.split(1, dim=0), x.split(1, dim=0)              # L x (1, B, D, N), contiguous
    h = inputs[0] if len(inputs) > 1 else inputs[0] + 0 * decays[0]     # (1, B, D, N): h_0 = x_0
    states = [h]
    for a, xt in zip(decays[1:], inputs[1:]):
        h = a * h + xt                                                  # (1, B, D, N)
        states.append(h)
    hs = _concat(states, 0)                                             # (L, B, D, N)
    y = (hs * C.float().permute(2, 0, 1).unsqueeze(2)).sum(-1).permute(1, 2, 0)  # (B, D, L)
    out = _skip_and_gate(y, u, D, z, u.dtype)                           # (B, D, L)
    return (out, h[0]) if return_last_state else out


@SCAN_BACKENDS.register("closed")
def selective_scan_closed(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
    """Closed form without a sequential loop, for export: a handful of ops whatever L is.

        y_t = sum_{s<=t} sum_n C_tn exp(S_tn - S_sn) dt_s u_s B_sn,  S = cumsum(dt * A) over L

    Materialises an (L, L) decay per channel and state: B·D·L²·N floats, fine for batch-1 inference at the
    small L of image students (L=49, D=96, N=8: 7 MB), too much for training. exp() only sees S_t - S_s <= 0
    (the upper triangle is masked before exp), so it cannot overflow.
    """
    delta, A, delta_bias = _per_channel(u, delta, A, B, delta_bias)
    dt = _step_size(delta, delta_bias, delta_softplus)                  # (B, D, L)
    length = u.shape[-1]
    S = torch.cumsum(dt.unsqueeze(-1) * A.float()[:, None, :], dim=2)   # (B, D, L, N)
    diff = S.unsqueeze(3) - S.unsqueeze(2)                              # (B, D, L_t, L_s, N)
    causal = torch.ones(length, length, dtype=torch.bool, device=u.device).tril()[:, :, None]  # (L_t, L_s, 1)
    decay = torch.exp(diff.masked_fill(~causal, -float("inf")))        # (B, D, L_t, L_s, N)
    x = (dt * u.float()).unsqueeze(-1) * B.float().transpose(1, 2).unsqueeze(1)  # (B, D, L_s, N)
    h = (decay * x.unsqueeze(2)).sum(3)                                 # (B, D, L_t, N)
    y = (h * C.float().transpose(1, 2).unsqueeze(1)).sum(-1)            # (B, D, L)
    out = _skip_and_gate(y, u, D, z, u.dtype)
    return (out, h[:, :, -1]) if return_last_state else out


@functools.lru_cache(maxsize=32)
def _causal_arrays(length: int):
    """(segments, mask): segments (L, L·L) with segments[r, t·L + s] = 1 for s < r <= t, so that
    (dt·A) @ segments is every segment sum S_t - S_s = sum_{s<r<=t} dt_r A_r at once, each summed from its own
    terms (Mamba-2's ``segsum``: a difference of two cumsums would cancel catastrophically once they are large),
    as one matmul with a constant that every delegate runs; mask (L, L) is -1e30 above the diagonal (s > t),
    else 0. Cached as numpy arrays and made tensors where they are used (a tensor cached during a
    torch.export trace would be a fake one), so an export sees two constants, not the ops that make them."""
    import numpy as np

    r, t, s = np.meshgrid(np.arange(length), np.arange(length), np.arange(length), indexing="ij")
    segments = ((s < r) & (r <= t)).astype(np.float32).reshape(length, length * length)  # (L_r, L_t·L_s)
    mask = np.triu(np.full((length, length), -1e30, dtype=np.float32), 1)             # (L_t, L_s)
    return segments, mask


def _heads(u, delta) -> tuple[int, int, int, int, int]:
    """(B, D, L, H, P) of a headed scan's u (B, D, L) and delta (B, H, L): P = D / H channels per head."""
    bsz, dim, length = u.shape
    heads = delta.shape[1]
    if dim % heads:
        raise ValueError(f"delta has {heads} heads, which do not divide the {dim} channels of u")
    return bsz, dim, length, heads, dim // heads


def _ssd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, gram):
    """The SSD quadratic form shared by 'ssd' and 'ssd_matmul'; ``gram(B, C)`` gives G = C^T B: (B, L_t, L_s)."""
    if A.shape[1] != 1:
        return selective_scan_closed(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    bsz, dim, length, heads, p = _heads(u, delta)
    dt = _step_size(delta, delta_bias, delta_softplus, softplus_exportable)  # (B, H, L)
    segments, mask = (torch.tensor(c, device=u.device) for c in _causal_arrays(length))
    seg = ((dt * A.float()) @ segments).unflatten(-1, (length, length))  # (B, H, L_t, L_s): S_t - S_s for s < t
    M = torch.exp(seg + mask)                                           # (B, H, L_t, L_s) causal decay
    G = gram(B.float(), C.float())                                      # (B, L_t, L_s): C_t . B_s
    # transpose before the multiply: TFLite's RESHAPE shares u's buffer, and a MUL on that alias may then be run
    # in place by its builtin kernels, overwriting u, which the skip below still reads (XNNPACK is unaffected)
    v = u.float().reshape(bsz, heads, p, length).transpose(2, 3) * dt.unsqueeze(-1)  # (B, H, L_s, P)
    y = ((M * G.unsqueeze(1)) @ v).transpose(2, 3).reshape(bsz, dim, length)  # (B, D, L)
    out = _skip_and_gate(y, u, D, z, u.dtype)                           # (B, D, L)
    if not return_last_state:
        return out
    w = M[:, :, -1].unsqueeze(-1) * dt.unsqueeze(-1)                    # (B, H, L_s, 1): exp(S_L - S_s) dt_s
    last = (u.float().reshape(bsz, heads, p, length) @ (w * B.float().transpose(1, 2).unsqueeze(1)))  # (B, H, P, N)
    return out, last.reshape(bsz, dim, -1)


def _gram_broadcast(B, C):  # B, C: (B, N, L) -> (B, L_t, L_s)
    return (C.transpose(1, 2).unsqueeze(2) * B.transpose(1, 2).unsqueeze(1)).sum(-1)


def _gram_matmul(B, C):  # B, C: (B, N, L) -> (B, L_t, L_s)
    return C.transpose(1, 2) @ B


@SCAN_BACKENDS.register("ssd")
def selective_scan_ssd(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """The scan as Mamba-2's SSD quadratic form (Dao & Gu 2024, "Transformers are SSMs", sec. 6), for heads
    with one decay each (A: (H, 1)):

        y_t = sum_{s<=t} (C_t . B_s) exp(S_t - S_s) dt_s u_s,   S_t - S_s = sum_{s<r<=t} dt_r A, per head

    i.e. y = (G * M) @ (dt u) per head with G = C^T B (L, L) shared by all heads and M the (H, L, L) causal decay:
    three matmuls and a few elementwise ops on H·L² values, whatever L is; no per-position ops. exp() sees
    segment sums <= 0 on and below the diagonal and -1e30 above it (masked before exp): no overflow. Its work grows
    as L²: meant for the short sequences of image students (L <= 64). With per-state decays (A: (H, N), N > 1)
    M would be (H, N, L, L): that is the closed form, which this then runs.

    G is a broadcast product summed over N, not a matmul: a matmul of two activations becomes a FULLY_CONNECTED
    with dynamic weights in TFLite, which XNNPACK leaves out (a partition split per block). 'ssd_matmul' is the
    same form with G as a matmul, for runtimes that run one (onnxruntime)."""
    return _ssd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, _gram_broadcast)


@SCAN_BACKENDS.register("ssd_matmul")
def selective_scan_ssd_matmul(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                              return_last_state=False):
    """'ssd' with G = C^T B as one matmul of two activations: the ONNX export form of headed branches.
    onnxruntime runs it as one MatMul (with the transpose fused) where the broadcast form is four nodes and an
    (L, L, N) product; measured 13 us (9 %) less per MNIST student of two blocks (issue #13)."""
    return _ssd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, _gram_matmul)


@functools.lru_cache(maxsize=32)
def _causal_arrays_transposed(length: int):
    """``_causal_arrays`` for the transposed form: segments (L, L·L) with [r, s·L + t] = 1 for s < r <= t and
    mask (L_s, L_t) -1e30 below the diagonal (s > t), so that (dt·A) @ segments is every S_t - S_s laid out as
    (L_s, L_t)."""
    segments, mask = _causal_arrays(length)
    transposed = segments.reshape(length, length, length).transpose(0, 2, 1).reshape(length, length * length)
    return np.ascontiguousarray(transposed), np.ascontiguousarray(mask.T)


@SCAN_BACKENDS.register("ssd_onnx")
def selective_scan_ssd_onnx(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            return_last_state=False):
    """'ssd_matmul' computed transposed, the ONNX export form of headed branches: y (B, H, P, L_t) =
    (dt·u) (B, H, P, L_s) @ (M^T * G^T) (B, H, L_s, L_t), with M^T's segment sums from the transposed constant and
    G^T = B^T C as one matmul, so that u, dt and y keep the (B, D, L) layout and the graph has no Transpose (the
    'ssd' form transposes v and y: two of them per block); dt's softplus is ``F.softplus``, which the ONNX export
    writes as one Softplus node (``compress/onnx_export.py``; onnxruntime's kernel is overflow-free) instead of
    the seven of ``softplus_exportable``. Same math as 'ssd'; the last state comes from it."""
    if A.shape[1] != 1 or return_last_state:
        return _ssd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, _gram_matmul)
    bsz, dim, length, heads, p = _heads(u, delta)
    dt = _step_size(delta, delta_bias, delta_softplus)                   # (B, H, L)
    segments, mask = (torch.tensor(c, device=u.device) for c in _causal_arrays_transposed(length))
    seg = ((dt * A.float()) @ segments).unflatten(-1, (length, length))  # (B, H, L_s, L_t): S_t - S_s for s < t
    MT = torch.exp(seg + mask)                                           # (B, H, L_s, L_t) causal decay
    GT = B.float().transpose(1, 2) @ C.float()                           # (B, L_s, L_t): B_s . C_t
    v = u.float().reshape(bsz, heads, p, length) * dt.unsqueeze(2)       # (B, H, P, L_s)
    y = (v @ (MT * GT.unsqueeze(1))).reshape(bsz, dim, length)           # (B, D, L)
    return _skip_and_gate(y, u, D, z, u.dtype)                           # (B, D, L)


_ONE = np.ones(1, dtype=np.float32)  # softplus's 1 as a (1,) constant, see selective_scan_ssd_bmm


def _softplus_one_as_tensor(x: torch.Tensor) -> torch.Tensor:
    """``softplus_exportable`` with its 1 as a (1,) constant: ExecuTorch lifts a Python 1 to a 0-d tensor, whose
    dim-order copy XNNPACK's partitioner refuses ('invalid dtype') and which then runs outside the delegate."""
    return torch.relu(x) + torch.log(torch.exp(-x.abs()) + torch.tensor(_ONE, device=x.device))


@SCAN_BACKENDS.register("ssd_bmm")
def selective_scan_ssd_bmm(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False):
    """'ssd' for ExecuTorch's XNNPACK partitioner (1.5), the ExecuTorch export form of headed branches: every
    product a 3-D ``bmm`` (a 4-D matmul lowers to ``expand_copy`` + bmm, and XNNPACK takes no expand_copy),
    reshapes instead of ``unsqueeze`` (its unsqueeze_copy only appends a trailing dimension), the segment sums as a
    bmm with the (1, L, L·L) constant (an ``mm`` wants a static weight, which a constant made in forward is not)
    and softplus's 1 as a (1,) tensor. With ``EXPORT_FORMS['executorch']`` the MNIST recipe's largest student
    lowers to one XNNPACK partition with no op outside it, instead of 14 partitions and 27 ops outside (issue #13).
    Same math as 'ssd'; the last state comes from it."""
    if A.shape[1] != 1 or return_last_state:
        return _ssd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, _gram_matmul)
    bsz, dim, length, heads, p = _heads(u, delta)
    dt = _step_size(delta, delta_bias, delta_softplus, _softplus_one_as_tensor)  # (B, H, L)
    segments, mask = (torch.tensor(c, device=u.device) for c in _causal_arrays(length))
    dta = (dt * A.float().reshape(1, heads, 1)).reshape(1, bsz * heads, length)  # (1, B·H, L)
    seg = torch.bmm(dta, segments.reshape(1, length, length * length))          # (1, B·H, L_t·L_s)
    M = torch.exp(seg.reshape(bsz, heads, length, length) + mask)               # (B, H, L_t, L_s)
    G = torch.bmm(C.float().transpose(1, 2), B.float())                         # (B, L_t, L_s): C_t . B_s
    MG = (M * G.reshape(bsz, 1, length, length)).reshape(bsz * heads, length, length)  # (B·H, L_t, L_s)
    v = u.float().reshape(bsz * heads, p, length).transpose(1, 2) * dt.reshape(bsz * heads, length, 1)  # (B·H, L_s, P)
    y = torch.bmm(MG, v).transpose(1, 2).reshape(bsz, dim, length)             # (B, D, L)
    return _skip_and_gate(y, u, D, z, u.dtype)                                  # (B, D, L)


class _LinearRecurrence(torch.autograd.Function):
    """h_t = a_t * h_{t-1} + x_t along dim 0 (h_{-1} = 0), with a hand-written backward.

    One fused ``addcmul`` per step in each direction. Backward is the reverse recurrence
    g_t = dh_t + a_{t+1} * g_{t+1}, then da_t = g_t * h_{t-1} and dx_t = g_t.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # a, x: (T, ...) contiguous
        h = torch.empty_like(x)                                            # (T, ...)
        h[0] = x[0]
        for t in range(1, x.shape[0]):
            torch.addcmul(x[t], a[t], h[t - 1], out=h[t])
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        a, h = ctx.saved_tensors
        dh = dh.contiguous()
        g = torch.empty_like(dh)                                           # (T, ...) dLoss/dh_t, all paths
        g[-1] = dh[-1]
        for t in range(dh.shape[0] - 2, -1, -1):
            torch.addcmul(dh[t], a[t + 1], g[t + 1], out=g[t])
        da = torch.zeros_like(a)
        da[1:] = g[1:] * h[:-1]
        return da, g


def _two_level_scan(log_a: torch.Tensor, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """All states of h_t = exp(log_a_t) * h_{t-1} + x_t along dim 0, in chunk + L/chunk sequential steps.

    log_a, x: (L, ...). Inside each chunk the recurrence runs from zero for all chunks at once; a second
    recurrence over chunk ends carries the state across chunks; each position then adds the carried state
    decayed by exp(cumsum(log_a)) within its chunk (a sum of non-positive logs: no overflow; underflow to 0
    is the true decay).
    """
    length = x.shape[0]
    if chunk >= length:
        return _LinearRecurrence.apply(torch.exp(log_a), x)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:  # zero input and zero log-decay (a = 1) past the end: earlier positions are unaffected
        log_a = F.pad(log_a, (0, 0) * (log_a.dim() - 1) + (0, pad))
        x = F.pad(x, (0, 0) * (x.dim() - 1) + (0, pad))
    rest = x.shape[1:]
    la = log_a.reshape(n_chunks, chunk, *rest).transpose(0, 1).contiguous()   # (c, nc, ...)
    xc = x.reshape(n_chunks, chunk, *rest).transpose(0, 1).contiguous()       # (c, nc, ...)
    local = _LinearRecurrence.apply(torch.exp(la), xc)                         # (c, nc, ...) zero-init per chunk
    decay = torch.exp(torch.cumsum(la, dim=0))                                 # (c, nc, ...) prod of a up to t
    carry = _LinearRecurrence.apply(decay[-1], local[-1])                      # (nc, ...) state at chunk ends
    prev = torch.cat([torch.zeros_like(carry[:1]), carry[:-1]])                # (nc, ...) state entering chunk
    h = local + decay * prev.unsqueeze(0)                                      # (c, nc, ...)
    return h.transpose(0, 1).reshape(n_chunks * chunk, *rest)[:length]         # (L, ...)


@SCAN_BACKENDS.register("chunked")
def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, chunk: int | None = None):
    """The reference's math as a two-level scan with hand-written backward for the sequential parts.

    Pure PyTorch, any device. Not traceable for export (in-place writes); ``export_mode`` switches to 'torch'.
    """
    delta, A, delta_bias = _per_channel(u, delta, A, B, delta_bias)
    dt = _step_size(delta, delta_bias, delta_softplus).permute(2, 0, 1).unsqueeze(-1)  # (L, B, D, 1)
    length = u.shape[-1]
    log_a = dt * A.float()                                                 # (L, B, D, N)
    x = (dt * u.float().permute(2, 0, 1).unsqueeze(-1)) * B.float().permute(2, 0, 1).unsqueeze(2)  # (L, B, D, N)
    h = _two_level_scan(log_a, x, chunk or math.isqrt(length - 1) + 1)    # (L, B, D, N)
    y = (h * C.float().permute(2, 0, 1).unsqueeze(2)).sum(-1).permute(1, 2, 0)  # (B, D, L)
    out = _skip_and_gate(y, u, D, z, u.dtype)
    return (out, h[-1]) if return_last_state else out


@functools.lru_cache(maxsize=1)
def _cpu_kernel():
    """edgepkd's C++ scan (csrc/selective_scan_cpu.cpp), compiled on first use and cached by torch
    (~/.cache/torch_extensions); None, with the reason logged once, when it cannot be built."""
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its import warns about CUDA_HOME on CPU-only machines: noise here
    try:
        from torch.utils.cpp_extension import load

        src = Path(__file__).parent / "csrc" / "selective_scan_cpu.cpp"
        return load(name="edgepkd_selective_scan_cpu", sources=[str(src)], extra_cflags=["-O3", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, no headers...
        reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else ""
        log.warning("could not build the C++ scan kernel (%s: %s); using the 'chunked' scan",
                    type(e).__name__, reason)
        return None
    finally:
        quiet.setLevel(level)


class _CpuScanCore(torch.autograd.Function):
    """y = <C, h> with h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, in C++ (backward recomputes the states)."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C):  # u, dt: (B, D, L); A: (D, N); B, C: (B, N, L); fp32, contiguous
        ctx.save_for_backward(u, dt, A, B, C)
        return _cpu_kernel().forward(u, dt, A, B, C)                       # (B, D, L)

    @staticmethod
    def backward(ctx, dy):
        return tuple(_cpu_kernel().backward(*ctx.saved_tensors, dy.contiguous()))


@SCAN_BACKENDS.register("cpp")
def selective_scan_cpp(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """The scan's core in C++ (CPU, fp32), built on first use with torch's cpp_extension (needs a C++
    compiler and ninja); 'chunked' serves what it does not (no kernel, GPU tensors, return_last_state).
    Keeps no states between forward and backward. Not exportable; ``export_mode`` switches to 'torch'.
    """
    delta, A, delta_bias = _per_channel(u, delta, A, B, delta_bias)
    if return_last_state or u.device.type != "cpu" or _cpu_kernel() is None:
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    dt = _step_size(delta, delta_bias, delta_softplus).contiguous()       # (B, D, L)
    y = _CpuScanCore.apply(u.float().contiguous(), dt, A.float().contiguous(), B.float().contiguous(),
                           C.float().contiguous())                         # (B, D, L)
    return _skip_and_gate(y, u, D, z, u.dtype)


@functools.lru_cache(maxsize=1)
def _mamba_ssm_fn() -> Callable | None:
    """The mamba-ssm kernel, or None (with the reason logged once) when it cannot be imported."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as e:  # ImportError, or the missing compiled extension raising at import
        log.warning("mamba-ssm CUDA kernel unavailable (%s); using the 'chunked' scan",
                    first_line(e, with_type=True))
        return None
    return selective_scan_fn


@SCAN_BACKENDS.register("mamba_ssm")
def selective_scan_mamba_ssm(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False):
    """mamba-ssm's fused CUDA selective scan. Needs CUDA tensors and ``pip install 'edgepkd[cuda]'``."""
    delta, A, delta_bias = _per_channel(u, delta, A, B, delta_bias)
    fn = _mamba_ssm_fn()
    if fn is None:
        raise ConfigError("scan backend 'mamba_ssm' needs the mamba-ssm CUDA kernel: "
                          "pip install 'edgepkd[cuda]' on a machine with CUDA, or use scan_backend: auto")
    return fn(u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
              D=D, z=None if z is None else z.contiguous(), delta_bias=delta_bias,
              delta_softplus=delta_softplus, return_last_state=return_last_state)


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Map 'auto' to a concrete backend for tensors on ``device``; check explicit names."""
    if name != "auto":
        SCAN_BACKENDS.get(name)
        return name
    if torch.device(device).type == "cuda":
        return "mamba_ssm" if _mamba_ssm_fn() is not None else "chunked"
    return "cpp"


def get_scan(name: str) -> Callable:
    return SCAN_BACKENDS.get(name)


def backend_names() -> list[str]:
    return ["auto", *SCAN_BACKENDS.names()]
