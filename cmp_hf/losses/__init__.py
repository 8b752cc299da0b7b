"""Training losses: the Confidence Misalignment Penalty and the calibration baselines it is compared with."""

from .baselines import focal_loss, kgcoop_penalty, mbls_penalty, smoothed_cross_entropy
from .cmp import CMP_COMPETITORS, CMP_FORMS, RATIO_EPS, cmp_penalty, winning_wrong_classes
from .objective import LossOptions, training_objective

__all__ = [
    "CMP_COMPETITORS",
    "CMP_FORMS",
    "LossOptions",
    "RATIO_EPS",
    "cmp_penalty",
    "focal_loss",
    "kgcoop_penalty",
    "mbls_penalty",
    "smoothed_cross_entropy",
    "training_objective",
    "winning_wrong_classes",
]
