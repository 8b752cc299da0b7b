"""Training losses: the Confidence Misalignment Penalty and the calibration baselines it is compared with."""

from .baselines import focal_loss, kgcoop_penalty, mbls_penalty, smoothed_cross_entropy
from .cmp import CMP_COMPETITORS, CMP_FORMS, RATIO_EPS, cmp_penalty, winning_wrong_classes
from .gaussian import expected_cross_entropy_bound, margin_variance
from .objective import GAUSSIAN_FEATURES_REFUSE, LossOptions, WeightedTerm, training_objective

__all__ = [
    "CMP_COMPETITORS",
    "CMP_FORMS",
    "GAUSSIAN_FEATURES_REFUSE",
    "LossOptions",
    "RATIO_EPS",
    "cmp_penalty",
    "expected_cross_entropy_bound",
    "focal_loss",
    "kgcoop_penalty",
    "margin_variance",
    "mbls_penalty",
    "smoothed_cross_entropy",
    "WeightedTerm",
    "training_objective",
    "winning_wrong_classes",
]
