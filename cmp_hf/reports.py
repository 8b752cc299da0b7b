"""Evaluation artefacts on disk: ``eval/<name>/metrics.json`` and ``eval/<name>/reliability.png`` per eval set.

The same files sit in a local output directory and in a pushed Hub repo, and the model card links to them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from .constants import EVAL_DIR, EVAL_METRICS_NAME, RELIABILITY_DIAGRAM_NAME
from .metrics import ReliabilityTable, as_percent, calibration_metrics, probabilities, reliability_table
from .plotting import reliability_diagram


@dataclass
class EvalReport:
    """Calibration of one eval set: ``metrics`` as ``CalibrationMetrics`` reports them (percent keys end in _pct)."""

    name: str
    metrics: dict[str, float]
    n_bins: int
    num_samples: int
    num_classes: int
    reliability: ReliabilityTable

    @classmethod
    def from_logits(cls, name: str, logits: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> EvalReport:
        metrics = calibration_metrics(labels, logits=logits, n_bins=n_bins)
        probs = probabilities(logits=logits)
        correct = probs.argmax(axis=1) == np.asarray(labels)
        table = reliability_table(probs.max(axis=1), correct, n_bins)
        return cls(name, as_percent(metrics), n_bins, len(labels), logits.shape[1], table)

    @property
    def folder(self) -> str:
        """Path of this report's files relative to the output directory (also their path in a Hub repo): ``eval/``
        itself for a single, unnamed eval set (named ``"eval"``), ``eval/<name>/`` otherwise."""
        return EVAL_DIR if self.name == EVAL_DIR else f"{EVAL_DIR}/{self.name}"

    def save(self, output_dir: str | os.PathLike) -> None:
        directory = os.path.join(output_dir, self.folder)
        os.makedirs(directory, exist_ok=True)
        content = {
            **self.metrics,
            "n_bins": self.n_bins,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "reliability": self.reliability.to_dict(),
        }
        with open(os.path.join(directory, EVAL_METRICS_NAME), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, allow_nan=False)
            f.write("\n")
        diagram = os.path.join(directory, RELIABILITY_DIAGRAM_NAME)
        reliability_diagram(self.reliability, self.metrics["ece_pct"] / 100, diagram, self.name)
