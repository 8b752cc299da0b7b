"""cmp_hf: calibrated prompt tuning of CLIP with the Confidence Misalignment Penalty (arXiv 2501.17595)."""

from .classifier import CalibratedCLIP
from .config import CMPConfig
from .hub import HubError, push_output_dir
from .learners import LEARNERS, PromptLearner
from .losses import cmp_penalty
from .metrics import CalibrationMetrics, ReliabilityTable, calibration_metrics, reliability_table
from .modeling import PromptTunedCLIP, PromptTunedCLIPOutput
from .pipeline import CalibratedImageClassificationPipeline  # registers "calibrated-image-classification"
from .posthoc import PostHocCalibration
from .prompts import CoOpPromptConfig, PromptConfig
from .trainer import CMPTrainer

__version__ = "0.1.0"

__all__ = [
    "CalibratedCLIP",
    "CalibratedImageClassificationPipeline",
    "CMPConfig",
    "CMPTrainer",
    "CalibrationMetrics",
    "CoOpPromptConfig",
    "PromptConfig",
    "HubError",
    "LEARNERS",
    "PostHocCalibration",
    "PromptLearner",
    "PromptTunedCLIP",
    "PromptTunedCLIPOutput",
    "ReliabilityTable",
    "calibration_metrics",
    "cmp_penalty",
    "push_output_dir",
    "reliability_table",
]
