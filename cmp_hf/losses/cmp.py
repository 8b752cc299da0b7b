"""The Confidence Misalignment Penalty (CMP) of Khan & Syed, arXiv 2501.17595.

When a sample is misclassified, CMP moves log-likelihood from the wrong classes that beat the true class back to
the true class. The paper publishes two forms that disagree (README, "The method, precisely"):

* ``"log_ratio"`` (appendix, Proposition B.4): ``logsumexp_{j in H} z_j - z_y``. Its gradient raises the true
  logit and lowers the winning wrong ones, which is what the paper's text describes.
* ``"ratio"`` (main text Eq. 2 and the authors' released code): ``p_y / (sum_{j in H} p_j + eps)``. Its gradient
  *lowers* the true logit; it is kept so that the released code can be reproduced and the two compared.

``H`` is the set of wrong classes whose logit is strictly larger than the true logit (``competitors="all"``), or
only the highest wrong class when it beats the true one (``competitors="top1"``; ties among wrong classes go to the
lowest index, as ``argmax`` does). Comparing logits rather than probabilities gives the same set without the
underflow of ``softmax`` for very confident rows. Correctly classified samples add zero but count in the batch.
"""

from __future__ import annotations

from typing import Literal

import torch

CMPForm = Literal["log_ratio", "ratio"]
CMPCompetitors = Literal["all", "top1"]
CMP_FORMS: tuple[str, ...] = ("log_ratio", "ratio")
CMP_COMPETITORS: tuple[str, ...] = ("all", "top1")
RATIO_EPS = 1e-10  # the released code's epsilon


def winning_wrong_classes(logits: torch.Tensor, labels: torch.Tensor, competitors: CMPCompetitors) -> torch.Tensor:
    """Boolean mask ``(B, C)`` of the set ``H_i``: wrong classes whose logit beats the true class's logit."""
    true_logit = logits.gather(1, labels[:, None])
    if competitors == "all":  # the true class never beats itself: no need to leave it out
        return logits > true_logit
    is_wrong = torch.ones_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], False)
    # top1: the best wrong class (first index among ties), kept only if it strictly beats the true class.
    best_wrong = logits.masked_fill(~is_wrong, float("-inf")).argmax(dim=1, keepdim=True)
    beats = logits.gather(1, best_wrong) > true_logit
    return torch.zeros_like(is_wrong).scatter_(1, best_wrong, beats)


def cmp_penalty(
    logits: torch.Tensor,
    labels: torch.Tensor,
    form: CMPForm = "log_ratio",
    competitors: CMPCompetitors = "all",
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> torch.Tensor:
    """Confidence Misalignment Penalty for a batch of class logits.

    Args:
        logits: ``(B, C)`` class logits (CLIP's ``logit_scale * cos``). Any floating dtype; the penalty is computed in
            float32 (float64 inputs stay float64, so that finite-difference checks are exact).
        labels: ``(B,)`` integer true classes in ``[0, C)``.
        form: ``"log_ratio"`` or ``"ratio"`` (see the module docstring).
        competitors: ``"all"`` wrong classes that beat the true one, or only the ``"top1"`` wrong class.
        reduction: ``"mean"`` divides by the full batch size ``B`` (correct samples included), as the paper does.

    Returns:
        A scalar (``"mean"``/``"sum"``) or the per-sample penalties ``(B,)`` (``"none"``), in the computation dtype.
    """
    if form not in CMP_FORMS:
        raise ValueError(f"Unknown CMP form {form!r}: use one of {CMP_FORMS}.")
    if competitors not in CMP_COMPETITORS:
        raise ValueError(f"Unknown CMP competitors {competitors!r}: use one of {CMP_COMPETITORS}.")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"Unknown reduction {reduction!r}: use 'mean', 'sum' or 'none'.")
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"cmp_penalty expects logits (B, C) and labels (B,), got {tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    labels = labels.long()
    in_h = winning_wrong_classes(z, labels, competitors)
    true_logit = z.gather(1, labels[:, None]).squeeze(1)
    if form == "log_ratio":
        # logsumexp over H from the row's maximum, which is in H when the row is misclassified (so its mass >= 1);
        # a row without competitors has mass 0, kept finite (and its gradient) by the clamp, then discarded.
        top = z.amax(dim=1, keepdim=True).detach()
        weights = (z - top).exp()
        # in place where no graph is kept (evaluation): no third (B, C) array
        mass = (weights.mul_(in_h) if not weights.requires_grad else torch.where(in_h, weights, 0)).sum(dim=1)
        misclassified = mass > 0
        per_sample = mass.clamp_min(torch.finfo(z.dtype).tiny).log() + top.squeeze(1) - true_logit
    else:
        misclassified = in_h.any(dim=1)
        probs = z.softmax(dim=1)
        competitor_mass = (probs * in_h).sum(dim=1)
        per_sample = probs.gather(1, labels[:, None]).squeeze(1) / (competitor_mass + RATIO_EPS)
    per_sample = torch.where(misclassified, per_sample, torch.zeros_like(per_sample))
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.mean()
