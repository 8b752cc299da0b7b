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
nothing from it). :class:`CalibrationAccumulator` is the one computation: the metrics with the reliability table and
the risk curve they come from, from scores given in row blocks. :func:`calibration_result` feeds it one array;
``calibration_metrics``, ``CalibrationMetrics`` (``Trainer``'s ``compute_metrics``) and the ``calibration``
``evaluate`` module (:mod:`cmp_hf.evaluation`) go through that; the trainer feeds it each eval batch as it comes,
once per eval set, as the module's Arrow store costs 15-20x the maths at ImageNet's 50,000 x 1,000.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PERCENT_METRICS = ("accuracy", "ece", "ace", "mce", "mce_weighted", "rmsce", "classwise_ece")
# what ``as_percent(calibration_metrics(...))`` returns, in its order
METRIC_KEYS = (
    "accuracy_pct", "ece_pct", "ace_pct", "mce_pct", "mce_weighted_pct", "rmsce_pct", "nll", "brier",
    "classwise_ece_pct", "aurc",
)  # fmt: skip


BLOCK_ENTRIES = 2**21  # scores per row block of the maths: 16 MB of float64 probabilities, as much of bin indices


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


class NonFiniteScoresError(ValueError):
    """Scores with NaN or infinite values; ``rows`` are the rows that hold them."""

    def __init__(self, message: str, rows: np.ndarray) -> None:
        super().__init__(message)
        self.rows = rows


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


class CalibrationAccumulator:
    """The calibration of a set of scores given in row blocks: an evaluation's batches as they come, or one array
    cut into blocks by :func:`calibration_result`.

    Keeps per row only what the metrics need (confidence, correctness, log-probability of the true class, Brier
    term) and the class-wise bin sums, so no N x C array outlives a block: at ImageNet's 50,000 x 1,000 the float64
    probabilities of the whole set would take 400 MB, freshly allocated at every evaluation (on Linux with
    transparent huge pages, a first allocation that size cost 1.7 s of kernel time on a 2-core machine), where a
    block takes 16 MB. Rows with non-finite scores are collected over every update and refused by :meth:`result`,
    named by their row in the whole set.
    """

    def __init__(self, n_bins: int = 10) -> None:
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}.")
        self.n_bins = n_bins
        self.num_classes: int | None = None
        self.num_rows = 0
        per_row = ("confidence", "correct", "log_true", "brier")
        self._per_row: dict[str, list[np.ndarray]] = {name: [] for name in per_row}
        self._class_count = self._class_gap = np.zeros(0)
        self._bad_rows: list[np.ndarray] = []
        self._scores_name = "scores"

    def update(self, labels: np.ndarray, *, probs: np.ndarray | None = None, logits: np.ndarray | None = None) -> None:
        """Add rows: ``probs=`` or ``logits=`` (N, C) (not both) with their integer ``labels`` (N,)."""
        if (probs is None) == (logits is None):
            raise ValueError("Pass exactly one of probs= (probabilities) or logits= (unnormalised scores).")
        self._scores_name, scores = ("logits", np.asarray(logits)) if probs is None else ("probs", np.asarray(probs))
        bad = np.flatnonzero(~np.isfinite(scores).all(axis=-1)) if scores.ndim == 2 else np.zeros(0, dtype=np.int64)
        labels = integer_labels(labels)
        if scores.ndim != 2 or labels.shape != (scores.shape[0],):
            raise ValueError(f"Expected scores (N, C) and labels (N,), got {scores.shape} and {labels.shape}.")
        if self.num_classes is None:
            self.num_classes = scores.shape[1]
            self._class_count = np.zeros(self.n_bins * self.num_classes, dtype=np.int64)
            self._class_gap = np.zeros(self.n_bins * self.num_classes)
        elif scores.shape[1] != self.num_classes:
            raise ValueError(f"Got scores over {scores.shape[1]} classes after {self.num_classes}: one set has one.")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"Labels must lie in [0, {self.num_classes}), got values in [{labels.min()}, {labels.max()}]."
            )
        if len(bad):
            self._bad_rows.append(bad + self.num_rows)
        if not self._bad_rows:  # a set with non-finite rows has no metrics: no work on it beyond finding them
            rows = max(1, BLOCK_ENTRIES // self.num_classes)
            for start in range(0, len(labels), rows):
                self._add_block(scores[start : start + rows], labels[start : start + rows], probs is None)
        self.num_rows += len(labels)

    def update_from_trainer(self, predictions: Any, label_ids: Any) -> None:
        """Add logits as Trainer hands them: an array or a list of per-batch arrays (``eval_do_concat_batches=False``),
        or a tuple led by either (the model's other outputs after it); arrays or tensors (any device, bfloat16)."""
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        if not isinstance(predictions, list):
            predictions, label_ids = [predictions], [label_ids]
        for logits, labels in zip(predictions, label_ids, strict=True):
            self.update(_as_numpy(labels), logits=_as_numpy(logits))

    def _add_block(self, scores: np.ndarray, labels: np.ndarray, from_logits: bool) -> None:
        rows = np.arange(len(labels))
        p = scores.astype(np.float64)  # a copy, normalised in place: one exp over the block
        if from_logits:
            z_max = p.max(axis=1, keepdims=True)
            p -= z_max
            np.exp(p, out=p)
            total = p.sum(axis=1, keepdims=True)
            p /= total
            # exact log-softmax instead of the log of a possibly underflowed probability
            log_true = scores[rows, labels].astype(np.float64) - (z_max + np.log(total)).ravel()
        true_prob = p[rows, labels]
        if not from_logits:
            log_true = np.log(np.maximum(true_prob, np.finfo(np.float64).tiny))
        found = self._per_row
        found["confidence"].append(p.max(axis=1))
        found["correct"].append((p.argmax(axis=1) == labels).astype(np.float64))
        found["log_true"].append(log_true)
        found["brier"].append((p**2).sum(axis=1) - 2 * true_prob + 1)  # sum_k (p_k - 1[k=y])^2, no one-hot
        # classwise ECE: every class's bins in one bincount (bin index k * n_bins + b), not a loop over classes;
        # sum_B (1[y=k] - p_k): +1 in the bin of each row's true class (no N x C indicator), -p over every entry
        size = len(self._class_count)
        inner_edges = np.linspace(0.0, 1.0, self.n_bins + 1)[1:-1]
        bin_ids = np.searchsorted(inner_edges, p, side="left")
        bin_ids += self.n_bins * np.arange(p.shape[1])
        self._class_count += np.bincount(bin_ids.ravel(), minlength=size)
        self._class_gap += np.bincount(bin_ids[rows, labels], minlength=size)
        self._class_gap -= np.bincount(bin_ids.ravel(), weights=p.ravel(), minlength=size)

    def result(self) -> CalibrationResult:
        """All calibration metrics of the rows added, with the table and curve they come from."""
        if self._bad_rows:
            rows = np.concatenate(self._bad_rows)
            raise NonFiniteScoresError(
                f"{self._scores_name} holds NaN or infinite values in {len(rows)} rows (first: {rows[:10].tolist()}): "
                "calibration metrics of such scores mean nothing. Fix or drop those rows.",
                rows,
            )
        if self.num_rows == 0:
            raise ValueError("Cannot compute calibration metrics on an empty set.")
        confidences, correct, log_true, brier = (np.concatenate(values) for values in self._per_row.values())
        n_bins = self.n_bins
        table = reliability_table(confidences, correct, n_bins)
        _, risk = risk_coverage(confidences, correct)
        gaps = np.abs(table.accuracy - table.confidence)
        weights = table.count / table.count.sum()
        # |B|/N * |freq_B - conf_B| = |sum_B (1[y=k] - p_k)| / N; summed over all bins of all classes, / classes
        classwise = np.abs(self._class_gap[self._class_count > 0]).sum() / self.num_rows / self.num_classes
        metrics = {
            "accuracy": float(correct.mean()),
            "ece": float(table.weighted_gaps.sum()),
            "ace": float(equal_mass_table(confidences, correct, n_bins).weighted_gaps.sum()),
            "mce": float(np.nanmax(gaps)),
            "mce_weighted": float(table.weighted_gaps.max()),
            "rmsce": float(np.sqrt(np.nansum(weights * gaps**2))),
            "nll": float(-log_true.mean()),
            "brier": float(brier.mean()),
            "classwise_ece": float(classwise),
            "aurc": float(risk.mean()),
        }
        return CalibrationResult(metrics, table, risk, self.num_classes)


def calibration_result(
    labels: np.ndarray,
    *,
    probs: np.ndarray | None = None,
    logits: np.ndarray | None = None,
    n_bins: int = 10,
) -> CalibrationResult:
    """All calibration metrics of ``probs=`` or ``logits=`` (not both) with the table and curve they come from,
    computed over row blocks (:class:`CalibrationAccumulator`).

    Non-finite scores and non-integer labels are refused (they would give numbers with no meaning, or a label
    silently truncated to another class)."""
    accumulator = CalibrationAccumulator(n_bins)
    accumulator.update(labels, probs=probs, logits=logits)
    return accumulator.result()


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
    trip; also batch by batch, with Trainer's ``batch_eval_metrics``. ``CMPTrainer`` does not call it: it computes the
    same numbers with each eval set's report, once.
    Returns ``as_percent`` keys (:data:`METRIC_KEYS`): ``accuracy_pct``, ``ece_pct``, ``ace_pct``,
    ``mce_pct``, ``mce_weighted_pct``, ``rmsce_pct``, ``classwise_ece_pct`` (percent, as the paper prints them),
    ``nll``, ``brier`` and ``aurc`` (their own scale).
    """

    n_bins: int = 10
    _batches: CalibrationAccumulator | None = field(default=None, init=False, repr=False, compare=False)

    def __call__(self, eval_prediction, compute_result: bool = True) -> dict[str, float]:
        """The set's metrics. Under Trainer's ``batch_eval_metrics`` each call brings one batch (as tensors): the
        batches are added up and the set's numbers come with the last one (``compute_result=True``), ``{}`` before.
        """
        if self._batches is None:
            self._batches = CalibrationAccumulator(self.n_bins)
        self._batches.update_from_trainer(eval_prediction.predictions, eval_prediction.label_ids)
        if not compute_result:
            return {}
        accumulator, self._batches = self._batches, None
        return as_percent(accumulator.result().metrics)


def _as_numpy(values: Any) -> np.ndarray:
    """A batch as Trainer hands it per batch (a tensor on any device, bfloat16 included) or an array, as numpy."""
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu()
        return (values.float() if values.is_floating_point() else values).numpy()
    return np.asarray(values)
