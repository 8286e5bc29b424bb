"""Ensemble prefixes: the one definition of how an anytime ensemble's members combine. Training, evaluation,
reports, export and the early-exit runner all use it.

    P_1 = f_1,    P_k = s · P_{k-1} + f_k        (f_k: member k's logits; s: ``distill.ensemble_shrinkage``)

so member j weighs s^(k-j) in prefix k. s = 1 is the plain sum of logits; s < 1 is boosting's shrinkage
(BoostNet uses 0.5): the frozen prefix is damped before the next member adds to it, so that member has to carry
part of the prediction rather than only correct the prefix on the training set. ``combine`` works on torch
tensors and on numpy arrays alike, in the same order of operations, so every consumer gets the same bits.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


def combine(logits: Sequence, shrinkage: float = 1.0):
    """Prefix logits of members 1..len(logits): each (B, K), tensors or arrays -> (B, K)."""
    out = logits[0]                                                      # (B, K)
    for f in logits[1:]:
        out = (out if shrinkage == 1.0 else out * shrinkage) + f          # (B, K): exactly out + f when s == 1
    return out


def prefix_weights(k: int, shrinkage: float = 1.0) -> list[float]:
    """Each member's weight in prefix 1..k: [s^(k-1), ..., s, 1]."""
    return [shrinkage ** (k - 1 - j) for j in range(k)]


class EnsemblePrefix(nn.Module):
    """An anytime model: members 1..k combined as ``combine`` does, exported as one graph."""

    def __init__(self, members: list[nn.Module], shrinkage: float = 1.0):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.shrinkage = float(shrinkage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, C, H, W) -> (B, K)
        return combine([m(x) for m in self.members], self.shrinkage)


class Corrective(nn.Module):
    """The whole ensemble as one trainable module, for the corrective step after the last member (BoostNet).

    Training mode returns every prefix's logits, (B, M, K), with a stop-gradient on the earlier prefix,
    P_k = s · sg(P_{k-1}) + f_k: member k's gradient comes from prefix k's loss only, given the others as they
    are now. Eval mode returns the full ensemble's logits, (B, K), as ``EnsemblePrefix`` does."""

    def __init__(self, members: list[nn.Module], shrinkage: float = 1.0):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.shrinkage = float(shrinkage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(x) for m in self.members]                               # M x (B, K)
        if not self.training:
            return combine(outs, self.shrinkage)                          # (B, K)
        prefixes, prev = [], None
        for f in outs:
            p = f if prev is None else combine([prev.detach(), f], self.shrinkage)  # (B, K)
            prefixes.append(p)
            prev = p
        return torch.stack(prefixes, dim=1)                               # (B, M, K)
