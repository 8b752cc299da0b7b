"""The training objective, assembled in one place for CMPTrainer and for lean loops (the calibration benchmark).

loss = cross-entropy (or focal loss, or label-smoothed cross-entropy) + cmp_lambda * CMP
       + mbls_weight * MbLS + kgcoop_weight * KgCoOp distance
Terms with weight 0 are not added (so KgCoOp with weight 0 is CoOp exactly); plain cross-entropy, CMP and the
misclassified fraction are always returned for logging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .baselines import focal_loss, kgcoop_penalty, mbls_penalty, smoothed_cross_entropy
from .cmp import cmp_penalty


@dataclass
class LossOptions:
    """The loss fields of CMPConfig, for code that trains without a Trainer (CMPConfig itself works too)."""

    cmp_lambda: float = 1.0
    cmp_form: str = "log_ratio"
    cmp_competitors: str = "all"
    label_smoothing_factor: float = 0.0
    focal_gamma: float = 0.0
    mbls_weight: float = 0.0
    mbls_margin: float = 10.0
    kgcoop_weight: float = 0.0


def training_objective(
    logits: torch.Tensor,
    labels: torch.Tensor,
    options: LossOptions,
    text_features: torch.Tensor | None = None,
    hand_crafted_text_features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and its named terms (unweighted) for a batch of class logits (float32 whatever their dtype)."""
    logits = logits.float()
    terms = {"ce": F.cross_entropy(logits, labels)}
    if options.focal_gamma:
        terms["focal"] = loss = focal_loss(logits, labels, options.focal_gamma)
    elif options.label_smoothing_factor:
        terms["smoothed_ce"] = loss = smoothed_cross_entropy(logits, labels, options.label_smoothing_factor)
    else:
        loss = terms["ce"]
    terms["cmp"] = cmp_penalty(logits, labels, options.cmp_form, options.cmp_competitors)
    if options.cmp_lambda:
        loss = loss + options.cmp_lambda * terms["cmp"]
    if options.mbls_weight:
        terms["mbls"] = mbls_penalty(logits, options.mbls_margin)
        loss = loss + options.mbls_weight * terms["mbls"]
    if options.kgcoop_weight:
        if text_features is None or hand_crafted_text_features is None:
            raise ValueError("kgcoop_weight > 0 needs the learned and the hand-crafted class text features.")
        terms["kgcoop"] = kgcoop_penalty(text_features, hand_crafted_text_features.to(text_features.device))
        loss = loss + options.kgcoop_weight * terms["kgcoop"]
    terms["misclassified"] = (logits.argmax(dim=1) != labels).float().mean()
    return loss, terms
