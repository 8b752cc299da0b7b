"""The ``calibration`` metric for Hugging Face ``evaluate``: calibration of a classifier from its scores.

Load it offline with ``evaluate.load(cmp_hf.evaluation.CALIBRATION_METRIC)`` (this directory) or use the class,
``cmp_hf.evaluation.Calibration``. Every number comes from ``cmp_hf.metrics.calibration_metrics``: the same code
that ``CMPTrainer`` evaluates with, that writes ``eval/<set>/metrics.json`` and fills the model card. Imports are
absolute because ``evaluate.load`` copies this file into its modules cache and imports it from there.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from cmp_hf.metrics import as_percent, calibration_metrics

_DESCRIPTION = """
Calibration of a classifier: does its confidence (maximum softmax probability) match its accuracy? Computes, from
class probabilities or logits and the true labels, accuracy, expected calibration error (ECE, equal-width bins),
adaptive ECE (ACE, equal-mass bins), maximum calibration error (textbook and count-weighted), RMS calibration
error, classwise ECE, the area under the risk-coverage curve (AURC), negative log-likelihood and the Brier score.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`, shape (N, C)): class probabilities (rows on the simplex) or logits.
    references (`list` of `int`, shape (N,)): true class indices in [0, C); a non-integer value is an error.
    n_bins (`int`, defaults to 10): number of bins for ECE, ACE, MCE, RMSCE and classwise ECE.
    from_logits (`bool`, optional): whether `predictions` are logits (softmax is applied; NLL is then exact even
        where a probability underflows). By default, rows that are non-negative and sum to 1 (within 1e-4) are
        taken as probabilities, scores with a value below 0 or above 1 as logits, and anything else (scores in
        [0, 1] whose rows do not sum to 1) is an error that asks which they are. `from_logits=False` with rows that
        are not on the simplex is an error too. NaN or infinite scores are refused.

Returns:
    accuracy_pct, ece_pct, ace_pct, mce_pct, mce_weighted_pct, rmsce_pct, classwise_ece_pct (`float`): in percent,
        as calibration papers print them; lower is better except for accuracy.
    nll (`float`): mean negative log-likelihood of the true class, in nats.
    brier (`float`): mean over samples of sum_k (p_k - 1[k = y])^2, in [0, 2].
    aurc (`float`): area under the risk-coverage curve, a fraction in [0, 1].

Examples:
    >>> calibration = evaluate.load(cmp_hf.evaluation.CALIBRATION_METRIC)
    >>> results = calibration.compute(predictions=[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], references=[0, 1, 1])
    >>> round(results["ece_pct"], 2)
    30.0
"""

_CITATION = """
@inproceedings{guo2017calibration,
  title     = {On Calibration of Modern Neural Networks},
  author    = {Guo, Chuan and Pleiss, Geoff and Sun, Yu and Weinberger, Kilian Q.},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2017},
}
@inproceedings{nixon2019measuring,
  title     = {Measuring Calibration in Deep Learning},
  author    = {Nixon, Jeremy and Dusenberry, Michael W. and Zhang, Linchuan and Jerfel, Ghassen and Tran, Dustin},
  booktitle = {CVPR Workshops},
  year      = {2019},
}
@inproceedings{kull2019beyond,
  title     = {Beyond Temperature Scaling: Obtaining Well-Calibrated Multi-Class Probabilities with Dirichlet
               Calibration},
  author    = {Kull, Meelis and Perello Nieto, Miquel and K{\\"a}ngsepp, Markus and Silva Filho, Telmo and Song, Hao
               and Flach, Peter},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2019},
}
@inproceedings{geifman2017selective,
  title     = {Selective Classification for Deep Neural Networks},
  author    = {Geifman, Yonatan and El-Yaniv, Ran},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2017},
}
"""

PROBABILITY_ATOL = 1e-4  # float32 softmax rows sum to 1 within ~1e-6; logits almost never do


def looks_like_probabilities(scores: np.ndarray) -> bool:
    """True when every row is non-negative and sums to 1: then the scores are taken as probabilities."""
    return bool(np.all(scores >= 0) and np.allclose(scores.sum(axis=1), 1.0, rtol=0, atol=PROBABILITY_ATOL))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Calibration(evaluate.Metric):
    """Calibration metrics of class scores against labels; supports ``add_batch`` and ``evaluate.combine``."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # float references, so that a non-integer label reaches _compute (int64 would silently truncate it)
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("float64")}
            ),
            reference_urls=["https://arxiv.org/abs/1706.04599", "https://arxiv.org/abs/1904.01685"],
        )

    def _compute(
        self, predictions: np.ndarray, references: np.ndarray, n_bins: int = 10, from_logits: bool | None = None
    ) -> dict[str, float]:
        scores = np.asarray(predictions, dtype=np.float64)
        if scores.ndim != 2:
            raise ValueError(f"predictions must be (N, C) class scores, the same C in every row; got {scores.shape}.")
        given = {"logits": scores} if read_as_logits(scores, from_logits) else {"probs": scores}
        return as_percent(calibration_metrics(references, n_bins=n_bins, **given))


def read_as_logits(scores: np.ndarray, from_logits: bool | None) -> bool:
    """Whether ``scores`` are logits: as told, else as only one reading allows; an error when it is ambiguous or
    contradicts what was said, naming the row that was seen."""
    if from_logits:
        return True
    if not np.isfinite(scores).all():
        return True  # calibration_metrics names the rows
    on_simplex = looks_like_probabilities(scores)
    if from_logits is False and not on_simplex:
        raise ValueError(
            f"from_logits=False, but {_off_simplex(scores)}: probabilities are >= 0 and sum to 1 per row."
        )
    if from_logits is None and not on_simplex and scores.min() >= 0 and scores.max() <= 1:
        raise ValueError(
            f"predictions are all in [0, 1] but {_off_simplex(scores)}: they are not probabilities (normalise them, "
            "e.g. scores / scores.sum(axis=1, keepdims=True), if they are) nor recognisably logits. Pass "
            "from_logits=True if they are logits."
        )
    return not on_simplex


def _off_simplex(scores: np.ndarray) -> str:
    """Where ``scores`` leave the simplex: the first negative entry, or the first row not summing to 1."""
    if scores.min() < 0:
        row = int(np.flatnonzero((scores < 0).any(axis=1))[0])
        return f"row {row} holds a negative value ({scores[row].min():.4g})"
    sums = scores.sum(axis=1)
    row = int(np.flatnonzero(np.abs(sums - 1) > PROBABILITY_ATOL)[0])
    return f"row {row} sums to {sums[row]:.4g}, not 1"
