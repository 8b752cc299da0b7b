"""Post-hoc calibration fitted after training; neither changes a prediction's argmax, only its confidence.

* Temperature scaling (Guo et al., ICML 2017): one scalar T > 0 divides the logits, fitted by minimising the NLL
  of held-out labelled logits (CoOp's few-shot validation set), so it assumes that set looks like the test data.
* Distance-aware calibration, DAC (Wang et al., ICML 2024; the authors' ``DistanseAwareCalibration``): for a prompt
  transferred to new classes, a per-class scale from how far each class's text feature moved away from the base
  classes with tuning; it needs no labels and only changes predictions of non-base classes.

:class:`PostHocCalibration` holds both: it is saved with the prompt (``calibration.json``) and applied in
``PromptTunedCLIP.forward``, so the trainer's evaluation, a transfer to other classes (``for_classes``) and
``CalibratedCLIP`` all calibrate the same way.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .atomic import write_json
from .constants import CALIBRATION_NAME

logger = logging.getLogger(__name__)


@dataclass
class PostHocCalibration:
    """Post-hoc calibration of a prompt's logits: ``logits / temperature``, then DAC's class scales if any.

    Args:
        temperature: temperature-scaling T (1 = none), fitted by ``CMPTrainer.fit_temperature``.
        dac_k: when set, a transfer of the prompt to other classes computes DAC's class scales with k neighbours.
        class_scales: DAC's per-class scales of a transferred prompt (computed, never saved: they follow from the
            prompt and the classes).
    """

    temperature: float = 1.0
    dac_k: int | None = None
    class_scales: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.dac_k is not None and self.dac_k < 1:
            raise ValueError(f"dac_k must be >= 1 (neighbours among the base classes), got {self.dac_k}.")

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits / self.temperature if self.temperature != 1.0 else logits
        return apply_class_scales(logits, self.class_scales) if self.class_scales is not None else logits

    def transferred(
        self,
        base_zero_shot: torch.Tensor,
        classes_zero_shot: torch.Tensor,
        base_tuned: torch.Tensor,
        classes_tuned: torch.Tensor,
    ) -> PostHocCalibration:
        """The calibration of this prompt moved to other classes: the same temperature, and DAC's class scales
        from the four sets of text features when ``dac_k`` is set (see :func:`distance_aware_scales`)."""
        scales = None
        if self.dac_k is not None:
            scales = distance_aware_scales(base_zero_shot, classes_zero_shot, base_tuned, classes_tuned, k=self.dac_k)
        return PostHocCalibration(self.temperature, self.dac_k, scales)

    def saved_values(self) -> dict[str, float | int | None]:
        """What ``calibration.json`` holds (the class scales follow from the prompt and are never saved)."""
        return {"temperature": float(self.temperature), "dac_k": self.dac_k}

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``calibration.json``, or remove a stale one when there is nothing to apply."""
        path = os.path.join(save_directory, CALIBRATION_NAME)
        if self.temperature == 1.0 and self.dac_k is None:
            if os.path.isfile(path):  # a directory reused for an uncalibrated prompt
                os.remove(path)
            return
        write_json(path, self.saved_values(), indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> PostHocCalibration:
        """What ``calibration.json`` says; none (T = 1, no DAC) without one."""
        path = os.path.join(directory, CALIBRATION_NAME)
        if not os.path.isfile(path):
            return cls()
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        return cls(float(saved.get("temperature", 1.0)), saved.get("dac_k"))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature minimising the mean NLL of ``logits / T`` (L-BFGS on log T, float64).

    When every example is classified correctly the minimum does not exist (the NLL keeps falling as T -> 0): the
    T returned is then where the optimiser stopped, and a warning says so.
    """
    if len(labels) == 0:
        raise ValueError("Temperature scaling needs at least one labelled example.")
    logits, labels = torch.as_tensor(logits).double(), torch.as_tensor(labels).long()
    if bool((logits.argmax(dim=1) == labels).all()):
        logger.warning(
            "Temperature scaling: all %d validation examples are classified correctly, so the NLL has no minimum "
            "(it falls as T -> 0) and the fitted T is only where L-BFGS stopped; use a larger or harder held-out set.",
            len(labels),
        )
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
