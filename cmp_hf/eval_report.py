"""Evaluation artefacts on disk, per eval set: ``eval/<name>/metrics.json``, ``eval/<name>/reliability.png`` (the
reliability diagram) and ``eval/<name>/risk_coverage.png`` (the risk-coverage curve whose area is the AURC).

The same files sit in a local output directory and in a pushed Hub repo, and the model card links to them.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import IO

import numpy as np
from PIL import Image

from .atomic import atomic_path, write_json
from .constants import EVAL_DIR, METRICS_NAME, RELIABILITY_DIAGRAM_NAME, RISK_COVERAGE_NAME
from .metrics import CalibrationResult, ReliabilityTable, as_percent, calibration_result
from .plotting import reliability_diagram, risk_coverage_curve

FIGURES = {"reliability": RELIABILITY_DIAGRAM_NAME, "risk_coverage": RISK_COVERAGE_NAME}  # figure -> its file


@dataclass
class EvalReport:
    """Calibration of one eval set: ``metrics`` as ``CalibrationMetrics`` reports them (percent keys end in _pct),
    the reliability table, and ``risk``: the error rate of the k most confident samples, k = 1..N."""

    name: str
    metrics: dict[str, float]
    n_bins: int
    num_samples: int
    num_classes: int
    reliability: ReliabilityTable
    risk: np.ndarray

    @classmethod
    def from_result(cls, name: str, result: CalibrationResult) -> EvalReport:
        """The report of a computed :class:`~cmp_hf.metrics.CalibrationResult`, with its metrics in percent."""
        n_bins = len(result.reliability.count)
        metrics = as_percent(result.metrics)
        return cls(name, metrics, n_bins, result.num_samples, result.num_classes, result.reliability, result.risk)

    @classmethod
    def from_logits(cls, name: str, logits: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> EvalReport:
        """Compute the report of an eval set from its logits (one pass of the calibration maths)."""
        return cls.from_result(name, calibration_result(labels, logits=logits, n_bins=n_bins))

    @property
    def folder(self) -> str:
        """Path of this report's files relative to the output directory (also their path in a Hub repo): ``eval/``
        itself for a single, unnamed eval set (named ``"eval"``), ``eval/<name>/`` otherwise."""
        return EVAL_DIR if self.name == EVAL_DIR else f"{EVAL_DIR}/{self.name}"

    def save(self, output_dir: str | os.PathLike) -> None:
        directory = os.path.join(output_dir, self.folder)
        content = {
            **self.metrics,
            "n_bins": self.n_bins,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "reliability": self.reliability.to_dict(),
        }
        write_json(os.path.join(directory, METRICS_NAME), content, indent=2, allow_nan=False)
        for figure, filename in FIGURES.items():
            with atomic_path(os.path.join(directory, filename)) as tmp:
                self.draw(figure, tmp)

    def draw(self, figure: str, target: str | os.PathLike | IO[bytes]) -> None:
        """Write one of ``FIGURES`` as a PNG to a path or a binary file object."""
        if figure == "reliability":
            reliability_diagram(self.reliability, self.metrics["ece_pct"] / 100, target, self.name)
        elif figure == "risk_coverage":
            risk_coverage_curve(self.risk, self.metrics["aurc"], target, self.name)
        else:
            raise ValueError(f"Unknown figure {figure!r}; choose from {list(FIGURES)}.")

    def image(self, figure: str) -> np.ndarray:
        """One of ``FIGURES`` as an (H, W, 3) uint8 array, the form trackers take images in."""
        buffer = io.BytesIO()
        self.draw(figure, buffer)
        buffer.seek(0)
        with Image.open(buffer) as png:
            return np.asarray(png.convert("RGB"))


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b), 0 when both are 0: the number base-to-novel papers (CoCoOp on) rank methods by."""
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def base_novel_harmonic_mean(metrics: dict[str, dict[str, float]], key: str = "accuracy_pct") -> dict[str, float]:
    """{split: H} for every split evaluated as ``<split>_base`` and ``<split>_novel``: the :func:`harmonic_mean` of
    the two sets' ``key``."""
    means = {}
    for name, base in metrics.items():
        novel = metrics.get(f"{name.removesuffix('_base')}_novel") if name.endswith("_base") else None
        if novel is not None:
            means[name.removesuffix("_base")] = harmonic_mean(base[key], novel[key])
    return means
