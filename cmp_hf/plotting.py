"""Evaluation figures: reliability diagrams (accuracy per confidence bin against the diagonal, over the histogram
of confidences) and risk-coverage curves (error rate of the most confident samples as coverage grows)."""

from __future__ import annotations

import os
from typing import IO

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or assumed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .metrics import ReliabilityTable  # noqa: E402


def reliability_diagram(
    table: ReliabilityTable, ece: float, path: str | os.PathLike | IO[bytes], title: str = ""
) -> None:
    """Write a PNG (to a path or a binary file object): per-bin accuracy bars (gap to perfect calibration shaded)
    above a confidence histogram.

    ``ece`` is a fraction; the title shows it in percent, as the metrics JSON does.
    """
    centers = (table.lower + table.upper) / 2
    width = table.upper - table.lower
    filled = table.count > 0
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(4.8, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
    )
    top.bar(centers[filled], table.accuracy[filled], width=width[filled], color="#3b6fb6", edgecolor="white",
            label="accuracy")  # fmt: skip
    gap_low = np.minimum(table.accuracy, table.confidence)[filled]
    gap = np.abs(table.accuracy - table.confidence)[filled]
    top.bar(centers[filled], gap, bottom=gap_low, width=width[filled], color="#d9534f", alpha=0.35, hatch="//",
            edgecolor="#d9534f", label="gap to confidence")  # fmt: skip
    top.plot([0, 1], [0, 1], linestyle="--", color="black", linewidth=1, label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"{title + ' - ' if title else ''}ECE {100 * ece:.2f} %", fontsize=10)
    bottom.bar(centers, table.count, width=width, color="#7f7f7f", edgecolor="white")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (max softmax probability)")
    bottom.set_ylabel("samples")
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def risk_coverage_curve(risk: np.ndarray, aurc: float, path: str | os.PathLike | IO[bytes], title: str = "") -> None:
    """Write a PNG of ``risk`` (error rate of the k most confident samples, k = 1..N) against coverage k/N.

    Beside it, two references to read it by: the oracle (confidence puts every error last, the lowest curve any
    ranking can reach) and the overall error rate (what a random ranking gives on average). ``aurc`` is a
    fraction, shown as such in the title.
    """
    n = len(risk)
    k = np.arange(1, n + 1)
    coverage = k / n
    errors = round(risk[-1] * n)
    oracle = np.maximum(k - (n - errors), 0) / k
    fig, ax = plt.subplots(figsize=(4.8, 4.0), constrained_layout=True)
    ax.plot(coverage, risk, color="#3b6fb6", linewidth=1.5, label="model")
    ax.plot(coverage, oracle, color="black", linestyle="--", linewidth=1, label="oracle ranking")
    ax.axhline(risk[-1], color="#7f7f7f", linestyle=":", linewidth=1, label="random ranking")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(float(risk.max()), 0.05) * 1.05)
    ax.set_xlabel("coverage (most confident first)")
    ax.set_ylabel("risk (error rate)")
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"{title + ' - ' if title else ''}AURC {aurc:.4f}", fontsize=10)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
