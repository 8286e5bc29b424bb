"""Selective scan (the S6 recurrence of Mamba) with interchangeable backends sharing one signature.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (ZOH for A, Euler for B, as in Mamba)
    y_t = <C_t, h_t> + D * u_t ;  out = y * silu(z)

Signature (that of ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``, real-valued,
ungrouped B/C):

    u: r(B D L)   delta: r(B D L)   A: r(D N)   B: r(B N L)   C: r(B N L)
    D: r(D) | None   z: r(B D L) | None   delta_bias: r(D) | None
    returns out: r(B D L)  [, last_state: r(B D N)]

Backends (`edgepkd list scan-backends`):
    torch      pure PyTorch, step by step over L: the reference, exportable (L fixed at export),
               the default on CPU. Computes in fp32 and casts back, like mamba's selective_scan_ref.
    mamba_ssm  the CUDA kernel of the mamba-ssm package (extra ``cuda``); chosen by ``auto`` when the
               input is on a GPU and the package imports.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import torch
import torch.nn.functional as F

from edgepkd.errors import ConfigError
from edgepkd.registry import Registry

log = logging.getLogger(__name__)

SCAN_BACKENDS: Registry[Callable] = Registry("scan backend")


@SCAN_BACKENDS.register("torch")
def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """Reference selective scan in pure PyTorch (one step per position; only elementwise ops)."""
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]                    # (B, D, L)
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    dA = torch.exp(delta.unsqueeze(-1) * A.float()[:, None, :])         # (B, D, L, N)
    dBu = (delta * u).unsqueeze(-1) * B.float().transpose(1, 2).unsqueeze(1)  # (B, D, L, N)
    Ct = C.float().transpose(1, 2).unsqueeze(1)                         # (B, 1, L, N)
    h = u.new_zeros(batch, dim, A.shape[-1])                            # (B, D, N)
    ys = []
    for t in range(length):
        h = dA[:, :, t] * h + dBu[:, :, t]                              # (B, D, N)
        ys.append((h * Ct[:, :, t]).sum(-1))                            # (B, D)
    out = torch.stack(ys, dim=-1)                                       # (B, D, L)
    if D is not None:
        out = out + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype_in)
    return (out, h) if return_last_state else out


@functools.lru_cache(maxsize=1)
def _mamba_ssm_fn() -> Callable | None:
    """The mamba-ssm kernel, or None (with the reason logged once) when it cannot be imported."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as e:  # ImportError, or the missing compiled extension raising at import
        log.warning("mamba-ssm CUDA kernel unavailable (%s: %s); using the 'torch' scan",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    return selective_scan_fn


@SCAN_BACKENDS.register("mamba_ssm")
def selective_scan_mamba_ssm(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False):
    """mamba-ssm's fused CUDA selective scan. Needs CUDA tensors and ``pip install 'edgepkd[cuda]'``."""
    fn = _mamba_ssm_fn()
    if fn is None:
        raise ConfigError("scan backend 'mamba_ssm' needs the mamba-ssm CUDA kernel: "
                          "pip install 'edgepkd[cuda]' on a machine with CUDA, or use scan_backend: torch")
    return fn(u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
              D=D, z=None if z is None else z.contiguous(), delta_bias=delta_bias,
              delta_softplus=delta_softplus, return_last_state=return_last_state)


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Map 'auto' to a concrete backend for tensors on ``device``; check explicit names."""
    if name != "auto":
        SCAN_BACKENDS.get(name)
        return name
    if torch.device(device).type == "cuda" and _mamba_ssm_fn() is not None:
        return "mamba_ssm"
    return "torch"


def get_scan(name: str) -> Callable:
    return SCAN_BACKENDS.get(name)


def backend_names() -> list[str]:
    return ["auto", *SCAN_BACKENDS.names()]
