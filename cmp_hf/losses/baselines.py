"""Calibration losses the paper's reviewers asked CMP to be compared with, and KgCoOp's prompt regulariser.

All take class logits (B, C) and integer labels (B,), are computed in float32 (float64 kept) and averaged over the
batch, so they combine with cross-entropy and CMP by plain addition.

* label smoothing (Szegedy et al. 2016): cross-entropy against (1 - eps) one-hot + eps uniform; equals
  ``F.cross_entropy(..., label_smoothing=eps)``.
* focal loss (Lin et al. 2017; for calibration Mukhoti et al. 2020): -(1 - p_y)^gamma log p_y.
* MbLS, margin-based label smoothing (Liu et al., CVPR 2022): relu(max_j z_j - z_k - margin) averaged over all
  B x C logits, as the authors' ``MarginLoss`` does; added to cross-entropy with weight alpha (paper: 0.1, margin 10).
* KgCoOp (Yao et al., CVPR 2023): 1 - the mean cosine between the learned class text features and the hand-crafted
  prompt's, as the released trainer computes it (weight 8 there). The paper writes the squared L2 distance of the
  unit features, 2 (1 - cos): twice this, so the released weight 8 is 16 in the paper's form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _float(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    log_probs = _float(logits).log_softmax(dim=1)
    nll = -log_probs.gather(1, labels.long()[:, None]).squeeze(1)
    return ((1 - smoothing) * nll - smoothing * log_probs.mean(dim=1)).mean()


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    log_p_true = _float(logits).log_softmax(dim=1).gather(1, labels.long()[:, None]).squeeze(1)
    return (-((1 - log_p_true.exp()) ** gamma) * log_p_true).mean()


def mbls_penalty(logits: torch.Tensor, margin: float) -> torch.Tensor:
    z = _float(logits)
    distances = z.max(dim=1, keepdim=True).values - z
    return F.relu(distances - margin).mean()


def kgcoop_penalty(text_features: torch.Tensor, hand_crafted_features: torch.Tensor) -> torch.Tensor:
    """``1 - mean cos`` over classes (and images, for (B, C, D) features); the released ``CosineSimilarity(eps=1e-7)``
    normalises the features itself, so it also holds for features that are not unit (ProDA's mean)."""
    cosine = F.cosine_similarity(_float(text_features), _float(hand_crafted_features), dim=-1, eps=1e-7)
    return 1 - cosine.mean()
