"""Knowledge-distillation losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None,
            temperature: float, alpha: float, label_smoothing: float = 0.0,
            sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Hinton et al., "Distilling the Knowledge in a Neural Network" (2015):

        L = alpha · CE(y, s) + (1 - alpha) · tau² · KL(softmax(t / tau) || softmax(s / tau))

    ``logits`` s: (B, K); ``targets`` y: (B,); ``teacher_logits`` t: (B, K) or None (labels only).
    ``sample_weight`` (B,) weighs each sample's loss (mean 1 keeps the scale); None is uniform.
    """
    ce = F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)  # (B,)
    if teacher_logits is None or alpha >= 1.0:
        per_sample = ce
    else:
        per_sample = alpha * ce + (1.0 - alpha) * temperature ** 2 * kl_per_sample(teacher_logits, logits, temperature)
    if sample_weight is None:
        return per_sample.mean()
    return (per_sample * sample_weight).sum() / sample_weight.sum()


def kl_per_sample(teacher_logits: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t / tau) || softmax(s / tau)) per sample: (B, K), (B, K) -> (B,)."""
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)       # (B, K)
    log_q = F.log_softmax(logits / temperature, dim=-1)               # (B, K)
    return (log_p.exp() * (log_p - log_q)).sum(-1)                    # (B,)


def hardness_weights(teacher_logits: torch.Tensor, ensemble_logits: torch.Tensor, temperature: float,
                     power: float) -> torch.Tensor:
    """Ensemble sample weights: KL(teacher || ensemble so far) ** power, normalised to mean 1 over the batch.

    Samples the running ensemble already matches weigh little; those it misses weigh more (a soft,
    distillation form of boosting's reweighting). ``power`` 0 gives uniform weights.
    """
    kl = kl_per_sample(teacher_logits, ensemble_logits, temperature).clamp_min(1e-8)  # (B,)
    w = kl ** power
    return w / w.mean()
