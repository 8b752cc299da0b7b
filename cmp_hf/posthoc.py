"""Post-hoc calibration fitted after training; neither changes a prediction's argmax, only its confidence.

* Temperature scaling (Guo et al., ICML 2017): one scalar T > 0 divides the logits, fitted by minimising the NLL
  of held-out labelled logits (CoOp's few-shot validation set), so it assumes that set looks like the test data.
* Distance-aware calibration, DAC (Wang et al., ICML 2024; the authors' ``DistanseAwareCalibration``): for a prompt
  transferred to new classes, a per-class scale from how far each class's text feature moved away from the base
  classes with tuning; it needs no labels and only changes predictions of non-base classes.

Both are saved with the prompt (``calibration.json``) and applied when it is loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature minimising the mean NLL of ``logits / T`` (L-BFGS on log T, float64)."""
    if len(labels) == 0:
        raise ValueError("Temperature scaling needs at least one labelled example.")
    logits, labels = torch.as_tensor(logits).double(), torch.as_tensor(labels).long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.exp())


def distance_aware_scales(
    base_zero_shot: torch.Tensor,
    classes_zero_shot: torch.Tensor,
    base_tuned: torch.Tensor,
    classes_tuned: torch.Tensor,
    k: int = 5,
    base_radius: float = 0.05,
) -> torch.Tensor:
    """DAC (Wang et al., ICML 2024): one logit scale per class for a prompt transferred to new classes.

    For each class, the mean Euclidean distance to its k nearest base-class text features is measured twice, with
    the tuned prompt and with the hand-crafted (zero-shot) prompt; the scale is exp(-d_tuned) / exp(-d_zero_shot).
    A class whose tuned feature lies within ``base_radius`` of a base class is a base class: scale 1. It assumes
    that a new class far from the base classes after tuning, compared with before, deserves less confidence.
    """
    k = min(k, len(base_tuned))
    d_zero_shot = torch.cdist(classes_zero_shot.double(), base_zero_shot.double()).topk(k, largest=False).values
    d_tuned = torch.cdist(classes_tuned.double(), base_tuned.double()).topk(k, largest=False).values
    scales = torch.exp(-d_tuned.mean(dim=1)) / torch.exp(-d_zero_shot.mean(dim=1))
    return torch.where(d_tuned[:, 0] < base_radius, torch.ones_like(scales), scales).float()


def apply_class_scales(logits: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Multiply each sample's logits by the scale of its predicted class (a per-prediction temperature)."""
    return logits * scales.to(logits.device, logits.dtype)[logits.argmax(dim=1)][:, None]
