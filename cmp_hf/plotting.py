"""Reliability diagrams: accuracy per confidence bin against the diagonal, over the histogram of confidences."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or assumed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .metrics import ReliabilityTable  # noqa: E402


def reliability_diagram(table: ReliabilityTable, ece: float, path: str | os.PathLike, title: str = "") -> None:
    """Write a PNG: per-bin accuracy bars (gap to perfect calibration shaded) above a confidence histogram.

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
    fig.savefig(path, dpi=100)
    plt.close(fig)
