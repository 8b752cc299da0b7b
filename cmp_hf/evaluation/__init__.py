"""``evaluate`` modules shipped with cmp_hf. ``CALIBRATION_METRIC`` is the path ``evaluate.load`` takes, offline:

    import evaluate
    from cmp_hf.evaluation import CALIBRATION_METRIC

    calibration = evaluate.load(CALIBRATION_METRIC)
"""

from __future__ import annotations

from pathlib import Path

from .calibration.calibration import Calibration

CALIBRATION_METRIC: str = str(Path(__file__).resolve().parent / "calibration")

__all__ = ["CALIBRATION_METRIC", "Calibration"]
