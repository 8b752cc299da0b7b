"""The training objective of CMPTrainer, assembled in one place.

loss = cross-entropy (or focal loss, or label-smoothed cross-entropy) + cmp_lambda * CMP
       + mbls_weight * MbLS + kgcoop_weight * KgCoOp distance + the learner's own weighted terms
Terms with weight 0 are not added (so KgCoOp with weight 0 is CoOp exactly); plain cross-entropy, CMP and the
misclassified fraction are always returned for logging. The learner's own terms (ProDA's prompt diversity,
PromptSRC's self-regularisation) come from ``PromptLearner.regularization``, each with its weight.

For a learner with Gaussian class features (ProDA), ``margin_variance`` is given and the cross-entropy term becomes
ProDA's upper bound of the expected cross-entropy (``cmp_hf.losses.gaussian``), logged as ``ce_bound``. Every other
term, CMP included, sees the logits of the mean features: those are the logits the model predicts with, so CMP
penalises the confidence of the misclassifications the model actually makes. The bound's surrogate logits add the
variance to every wrong class only, so their ranking is not the model's, and CMP on them would penalise samples
the model gets right. Focal loss and label smoothing reshape the cross-entropy of point logits and have no such
bound here: a learner with Gaussian class features refuses them (``ProDALearner.check_loss_options``, the one place
that rule lives, called when the config is built), so with ``margin_variance`` this function uses the bound alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .baselines import focal_loss, kgcoop_penalty, mbls_penalty, smoothed_cross_entropy
from .cmp import CMP_COMPETITORS, CMP_FORMS, cmp_penalty
from .gaussian import expected_cross_entropy_bound


@dataclass(frozen=True)
class LossOptions:
    """The loss fields of ``CMPConfig`` (their defaults and help live there: ``CMPConfig.loss_options()`` builds
    this), checked here so that every way of building one is validated the same."""

    cmp_lambda: float
    cmp_form: str
    cmp_competitors: str
    label_smoothing_factor: float
    focal_gamma: float
    mbls_weight: float
    mbls_margin: float
    kgcoop_weight: float
    proda_diversity_weight: float = 0.0

    def __post_init__(self) -> None:
        non_finite = {f.name: getattr(self, f.name) for f in fields(self) if _non_finite(getattr(self, f.name))}
        if non_finite:
            raise ValueError(
                f"Loss weights must be finite numbers, got {non_finite}: a NaN or infinite weight makes every loss "
                "NaN and trains nothing. Set a finite value (cmp_lambda: 1.0 is the default, 0 turns CMP off)."
            )
        if self.cmp_lambda < 0:
            raise ValueError(f"cmp_lambda must be >= 0 (0 disables CMP), got {self.cmp_lambda}.")
        if self.cmp_form not in CMP_FORMS:
            raise ValueError(f"Unknown cmp_form {self.cmp_form!r}: use one of {CMP_FORMS}.")
        if self.cmp_competitors not in CMP_COMPETITORS:
            raise ValueError(f"Unknown cmp_competitors {self.cmp_competitors!r}: use one of {CMP_COMPETITORS}.")
        if min(self.focal_gamma, self.mbls_weight, self.mbls_margin, self.kgcoop_weight,
               self.proda_diversity_weight) < 0:  # fmt: skip
            raise ValueError(
                "focal_gamma, mbls_weight, mbls_margin, kgcoop_weight and proda_diversity_weight must be >= 0."
            )
        if self.focal_gamma and self.label_smoothing_factor:
            raise ValueError("Choose focal loss (focal_gamma) or label smoothing (label_smoothing_factor), not both.")


class WeightedTerm(NamedTuple):
    """A loss term of a learner's own: ``weight * value`` joins the loss, ``value`` is logged."""

    weight: float
    value: torch.Tensor


def _non_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not math.isfinite(value)


GAUSSIAN_FEATURES_REFUSE = (  # what ProDALearner.check_loss_options raises
    "Focal loss and label smoothing cannot train a learner with Gaussian class features (ProDA): its loss is an upper "
    "bound of the expected cross-entropy, which they have no bound for. Set focal_gamma and label_smoothing_factor to "
    "0 and combine ProDA with CMP, MbLS or KgCoOp (or temperature scaling after training)."
)


def training_objective(
    logits: torch.Tensor,
    labels: torch.Tensor,
    options: LossOptions,
    text_features: torch.Tensor | None = None,
    hand_crafted_text_features: torch.Tensor | None = None,
    margin_variance: torch.Tensor | None = None,
    learner_terms: dict[str, WeightedTerm] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and its named terms (unweighted) for a batch of class logits (float32 whatever their dtype);
    ``margin_variance`` (B, C): the variances of the logit margins of a learner with Gaussian class features;
    ``learner_terms``: the learner's own terms by name (``PromptLearner.regularization``), added with their
    weights (a weight of 0 logs the term without adding it)."""
    logits = logits.float()
    terms = {"ce": F.cross_entropy(logits, labels)}
    if margin_variance is not None:  # focal loss and label smoothing were refused by the learner
        terms["ce_bound"] = loss = expected_cross_entropy_bound(logits, labels, margin_variance)
    elif options.focal_gamma:
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
    for name, (weight, value) in (learner_terms or {}).items():
        if name in terms:
            raise ValueError(f"The learner's loss term {name!r} has the name of a term of the objective: rename it.")
        terms[name] = value.float()
        if weight:
            loss = loss + weight * terms[name]
    terms["misclassified"] = (logits.argmax(dim=1) != labels).float().mean()
    return loss, terms
