"""Training losses: the Confidence Misalignment Penalty and the calibration baselines it is compared with."""

from .baselines import focal_loss, kgcoop_penalty, mbls_penalty, smoothed_cross_entropy
from .cmp import CMP_COMPETITORS, CMP_FORMS, RATIO_EPS, cmp_penalty, winning_wrong_classes

__all__ = [
    "CMP_COMPETITORS",
    "CMP_FORMS",
    "RATIO_EPS",
    "cmp_penalty",
    "focal_loss",
    "kgcoop_penalty",
    "mbls_penalty",
    "smoothed_cross_entropy",
    "winning_wrong_classes",
]
