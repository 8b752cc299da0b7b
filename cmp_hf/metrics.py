"""Calibration metrics for classifiers: ECE, ACE, MCE, RMS calibration error, classwise ECE, AURC, NLL, Brier score
and accuracy.

Definitions follow the evaluator the CMP paper used (DAC codebase, after Guo et al. 2017): confidence is the
maximum softmax probability; equal-width bins are ``(lower, upper]``; ECE = sum_b |B_b|/N * |acc_b - conf_b|.

* ``ace``: the same formula over equal-mass bins (samples sorted by confidence, split into ``n_bins`` groups whose
  sizes differ by at most one).
* ``mce``: the textbook maximum calibration error, max_b |acc_b - conf_b| over non-empty bins.
* ``mce_weighted``: max_b |B_b|/N * |acc_b - conf_b|, which is what the DAC evaluator prints as "MCE".
* ``rmsce``: sqrt(sum_b |B_b|/N * (acc_b - conf_b)^2) (torchmetrics' ``norm="l2"``).
* ``nll``: mean negative log-likelihood of the true class; ``brier``: mean over samples of
  sum_k (p_k - 1[k = y])^2 (Brier's original multi-class score, range [0, 2]).
* ``classwise_ece``: ECE of every class's own probability p_k against 1[y = k] (all samples, the same equal-width
  bins), averaged over classes (Kull et al. 2019; netcal and the prompt-calibration papers report it).
* ``aurc``: area under the risk-coverage curve (Geifman & El-Yaniv 2017): samples sorted by confidence, most
  confident first; the risk at coverage k/N is the error rate of the first k; AURC is the mean of those N risks,
  a fraction in [0, 1] (lower is better). torch-uncertainty integrates the same curve with the trapezoid rule,
  which differs by O(1/N).

These functions work on numpy arrays and know nothing of models or of the rest of cmp_hf (this module imports
nothing from it). :func:`calibration_result` is the one computation: the metrics with the reliability table and the
risk curve they come from. ``calibration_metrics``, ``CalibrationMetrics`` (``Trainer``'s ``compute_metrics``), the
``calibration`` ``evaluate`` module (:mod:`cmp_hf.evaluation`) and the trainer's eval reports all go through it; the
trainer calls it once per eval set on the logits in memory, as the module's Arrow store costs 15-18x the maths
at ImageNet's 50,000 x 1,000.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

PERCENT_METRICS = ("accuracy", "ece", "ace", "mce", "mce_weighted", "rmsce", "classwise_ece")
# what ``as_percent(calibration_metrics(...))`` returns, in its order
METRIC_KEYS = (
    "accuracy_pct", "ece_pct", "ace_pct", "mce_pct", "mce_weighted_pct", "rmsce_pct", "nll", "brier",
    "classwise_ece_pct", "aurc",
)  # fmt: skip


CLASSWISE_BLOCK = 2**21  # entries of p per block of classwise_ece: 16 MB of bin indices


@dataclass(frozen=True)
class ReliabilityTable:
    """Per-bin statistics a reliability diagram draws. Empty bins have NaN accuracy and confidence."""

    lower: np.ndarray
    upper: np.ndarray
    count: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray

    @property
    def weighted_gaps(self) -> np.ndarray:
        """|B_b|/N * |acc_b - conf_b| per bin (0 for empty bins)."""
        return np.nan_to_num(self.count / self.count.sum() * np.abs(self.accuracy - self.confidence))

    def to_dict(self) -> dict[str, list[float | None]]:
        """Plain lists for JSON; empty bins' NaN become ``None`` (null)."""
        return {name: [None if np.isnan(v) else float(v) for v in values] for name, values in asdict(self).items()}


def _softmax(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 softmax of each row and its log normaliser (log-sum-exp), from one exp over a single N x C copy:
    at 50,000 x 1,000 every extra temporary costs 400 MB and a pass over it."""
    z = np.array(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"Expected logits (N, C), got shape {z.shape}.")
    z_max = z.max(axis=1, keepdims=True)
    z -= z_max
    np.exp(z, out=z)
    total = z.sum(axis=1, keepdims=True)
    z /= total
    return z, (z_max + np.log(total)).ravel()


class NonFiniteScoresError(ValueError):
    """Scores with NaN or infinite values; ``rows`` are the rows that hold them."""

    def __init__(self, message: str, rows: np.ndarray) -> None:
        super().__init__(message)
        self.rows = rows


def _check_finite(scores: np.ndarray, name: str) -> None:
    rows = np.flatnonzero(~np.isfinite(scores).all(axis=-1)) if scores.ndim == 2 else []
    if len(rows):
        raise NonFiniteScoresError(
            f"{name} holds NaN or infinite values in {len(rows)} rows (first: {rows[:10].tolist()}): calibration "
            "metrics of such scores mean nothing. Fix or drop those rows.",
            rows,
        )


def integer_labels(labels: np.ndarray) -> np.ndarray:
    """``labels`` as int64, refusing values that are not whole numbers (1.5 would silently become class 1)."""
    values = np.asarray(labels)
    if values.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        if len(bad):
            raise ValueError(
                f"Labels must be integer class indices; row {bad[0]} holds {values[bad[0]].item()!r} "
                f"({len(bad)} such rows)."
            )
    elif values.dtype.kind not in "iub":
        raise ValueError(f"Labels must be integer class indices, got dtype {values.dtype}.")
    return values.astype(np.int64)


def _bin_statistics(
    confidences: np.ndarray, correct: np.ndarray, bin_ids: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    count = np.bincount(bin_ids, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(bin_ids, weights=correct, minlength=n_bins) / count
        confidence = np.bincount(bin_ids, weights=confidences, minlength=n_bins) / count
    return count, accuracy, confidence


def reliability_table(confidences: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> ReliabilityTable:
    """Equal-width ``(lower, upper]`` bins over [0, 1]."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_ids = np.searchsorted(edges[1:-1], confidences, side="left")
    count, accuracy, confidence = _bin_statistics(confidences, correct.astype(np.float64), bin_ids, n_bins)
    return ReliabilityTable(edges[:-1], edges[1:], count, accuracy, confidence)


def equal_mass_table(confidences: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> ReliabilityTable:
    """Bins holding (almost) the same number of samples; bounds are each bin's min and max confidence."""
    order = np.argsort(confidences, kind="stable")
    sizes = np.array([len(chunk) for chunk in np.array_split(order, n_bins)])
    bin_ids = np.empty(len(order), dtype=np.int64)
    bin_ids[order] = np.repeat(np.arange(n_bins), sizes)
    count, accuracy, confidence = _bin_statistics(confidences, correct.astype(np.float64), bin_ids, n_bins)
    sorted_conf = confidences[order]
    ends = np.cumsum(sizes)
    last = len(order) - 1
    lower = np.where(sizes > 0, sorted_conf[np.minimum(ends - sizes, last)], np.nan)
    upper = np.where(sizes > 0, sorted_conf[np.clip(ends - 1, 0, last)], np.nan)
    return ReliabilityTable(lower, upper, count, accuracy, confidence)


def classwise_ece(p: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> float:
    """Mean over classes k of the ECE of p[:, k] against 1[labels = k], with ``reliability_table``'s bins.

    All classes' bins are counted in one ``bincount`` (bin index k * n_bins + b) instead of a loop over classes,
    which matters at ImageNet's 1000 classes; over blocks of rows, so that the bin indices take 16 MB instead of
    N x C x 8 bytes (400 MB at 50,000 x 1,000, as much again as the float64 probabilities).
    """
    n, num_classes = p.shape
    inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    offsets, size = n_bins * np.arange(num_classes), n_bins * num_classes
    count, gap = np.zeros(size, dtype=np.int64), np.zeros(size)
    rows = max(1, CLASSWISE_BLOCK // num_classes)
    for start in range(0, n, rows):
        block, block_labels = p[start : start + rows], labels[start : start + rows]
        bin_ids = np.searchsorted(inner_edges, block, side="left")
        bin_ids += offsets
        count += np.bincount(bin_ids.ravel(), minlength=size)
        # sum_B (1[y=k] - p_k): +1 in the bin of each sample's true class (no N x C indicator), -p over every entry
        gap += np.bincount(bin_ids[np.arange(len(block)), block_labels], minlength=size)
        gap -= np.bincount(bin_ids.ravel(), weights=block.ravel(), minlength=size)
    # |B|/N * |freq_B - conf_B| = |sum_B (1[y=k] - p_k)| / N; summed over all bins of all classes, then / classes
    return float(np.abs(gap[count > 0]).sum() / n / num_classes)


def risk_coverage(confidences: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage k/N and risk (error rate of the k most confident samples) for k = 1..N.

    Ties in confidence keep the samples' order (a stable sort), so the curve is deterministic.
    """
    order = np.argsort(-confidences, kind="stable")
    errors = 1.0 - np.asarray(correct, dtype=np.float64)[order]
    k = np.arange(1, len(order) + 1)
    return k / len(order), np.cumsum(errors) / k


@dataclass(frozen=True)
class CalibrationResult:
    """The calibration of one set of scores: ``metrics`` as fractions (not percent), the equal-width
    ``reliability`` table that ECE, MCE and RMSCE come from, and ``risk``: the error rate of the k most confident
    samples, k = 1..N, whose mean is the AURC."""

    metrics: dict[str, float]
    reliability: ReliabilityTable
    risk: np.ndarray
    num_classes: int

    @property
    def num_samples(self) -> int:
        return len(self.risk)


def calibration_result(
    labels: np.ndarray,
    *,
    probs: np.ndarray | None = None,
    logits: np.ndarray | None = None,
    n_bins: int = 10,
) -> CalibrationResult:
    """All calibration metrics of ``probs=`` or ``logits=`` (not both) with the table and curve they come from,
    from one softmax pass.

    Non-finite scores and non-integer labels are refused (they would give numbers with no meaning, or a label
    silently truncated to another class)."""
    if (probs is None) == (logits is None):
        raise ValueError("Pass exactly one of probs= (probabilities) or logits= (unnormalised scores).")
    name, scores = ("logits", logits) if probs is None else ("probs", probs)
    _check_finite(np.asarray(scores), name)
    p, log_normaliser = _softmax(logits) if logits is not None else (np.asarray(probs, dtype=np.float64), None)
    labels = integer_labels(labels)
    if p.ndim != 2 or labels.shape != (p.shape[0],):
        raise ValueError(f"Expected scores (N, C) and labels (N,), got {p.shape} and {labels.shape}.")
    if len(labels) == 0:
        raise ValueError("Cannot compute calibration metrics on an empty set.")
    if labels.min() < 0 or labels.max() >= p.shape[1]:
        raise ValueError(f"Labels must lie in [0, {p.shape[1]}), got values in [{labels.min()}, {labels.max()}].")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}.")
    confidences = p.max(axis=1)
    correct = (p.argmax(axis=1) == labels).astype(np.float64)
    table = reliability_table(confidences, correct, n_bins)
    _, risk = risk_coverage(confidences, correct)
    gaps = np.abs(table.accuracy - table.confidence)
    weights = table.count / table.count.sum()
    true_prob = p[np.arange(len(labels)), labels]
    if log_normaliser is not None:  # exact log-softmax instead of log of a possibly underflowed probability
        log_true = np.asarray(logits)[np.arange(len(labels)), labels].astype(np.float64) - log_normaliser
    else:
        log_true = np.log(np.maximum(true_prob, np.finfo(np.float64).tiny))
    metrics = {
        "accuracy": float(correct.mean()),
        "ece": float(table.weighted_gaps.sum()),
        "ace": float(equal_mass_table(confidences, correct, n_bins).weighted_gaps.sum()),
        "mce": float(np.nanmax(gaps)),
        "mce_weighted": float(table.weighted_gaps.max()),
        "rmsce": float(np.sqrt(np.nansum(weights * gaps**2))),
        "nll": float(-log_true.mean()),
        "brier": float(((p**2).sum(axis=1) - 2 * true_prob + 1).mean()),  # sum_k (p_k - 1[k=y])^2, no one-hot
        "classwise_ece": classwise_ece(p, labels, n_bins),
        "aurc": float(risk.mean()),
    }
    return CalibrationResult(metrics, table, risk, p.shape[1])


def calibration_metrics(
    labels: np.ndarray,
    *,
    probs: np.ndarray | None = None,
    logits: np.ndarray | None = None,
    n_bins: int = 10,
) -> dict[str, float]:
    """All calibration metrics as fractions (not percent): :func:`calibration_result`'s ``metrics``."""
    return calibration_result(labels, probs=probs, logits=logits, n_bins=n_bins).metrics


def as_percent(metrics: dict[str, float]) -> dict[str, float]:
    """Report the metrics the paper prints in percent under ``<name>_pct``; NLL and Brier keep their own scale."""
    return {
        (f"{k}_pct" if k in PERCENT_METRICS else k): (100.0 * v if k in PERCENT_METRICS else v)
        for k, v in metrics.items()
    }


@dataclass
class CalibrationMetrics:
    """``compute_metrics`` for ``Trainer``: the eval predictions are class logits.

    Computes :func:`calibration_metrics` on the logits in memory: the numbers of the ``calibration`` ``evaluate``
    module (``cmp_hf.evaluation.Calibration``, which calls the same function), without the module's Arrow round
    trip. ``CMPTrainer`` does not call it: it computes the same numbers with each eval set's report, once.
    Returns ``as_percent`` keys (:data:`METRIC_KEYS`): ``accuracy_pct``, ``ece_pct``, ``ace_pct``,
    ``mce_pct``, ``mce_weighted_pct``, ``rmsce_pct``, ``classwise_ece_pct`` (percent, as the paper prints them),
    ``nll``, ``brier`` and ``aurc`` (their own scale).
    """

    n_bins: int = 10

    def __call__(self, eval_prediction) -> dict[str, float]:
        logits, labels = eval_prediction.predictions, eval_prediction.label_ids
        if isinstance(logits, tuple):  # (logits, other model outputs)
            logits = logits[0]
        if isinstance(logits, list):  # one array per batch (eval_do_concat_batches=False): concatenated once
            logits, labels = np.concatenate(logits), np.concatenate(labels)
        return as_percent(calibration_metrics(labels, logits=logits, n_bins=self.n_bins))
