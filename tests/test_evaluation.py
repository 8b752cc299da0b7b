"""The ``calibration`` evaluate module: offline ``evaluate.load``, batches, ``combine``, and the trainer's use."""

import os
from pathlib import Path

import datasets
import evaluate
import numpy as np
import pytest
from transformers import EvalPrediction

from cmp_hf.evaluation import CALIBRATION_METRIC, Calibration
from cmp_hf.metrics import CalibrationMetrics, as_percent, calibration_metrics


def scores(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * 3
    labels = np.where(rng.random(n) < 0.6, logits.argmax(axis=1), rng.integers(0, classes, size=n))
    return logits, labels


def test_evaluate_load_works_offline_from_the_documented_path():
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_EVALUATE_OFFLINE"] == "1"
    module = evaluate.load(CALIBRATION_METRIC)
    assert module.name == "calibration" and isinstance(module, evaluate.Metric)
    copies = list(Path(os.environ["HF_MODULES_CACHE"]).rglob("calibration.py"))
    assert copies, "evaluate.load did not copy the script into the modules cache set by the tests"
    results = module.compute(predictions=[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], references=[0, 1, 1])
    assert results["ece_pct"] == pytest.approx(30.0)  # the README's example: gaps 0.1, 0.2, 0.6 in three bins
    assert results["accuracy_pct"] == pytest.approx(200 / 3)
    assert "guo2017calibration" in module.info.citation


def test_module_card_documents_every_output():
    card = (Path(CALIBRATION_METRIC) / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "app_file: app.py" in card and "- evaluate" in card
    outputs = Calibration().compute(predictions=[[0.7, 0.3], [0.4, 0.6]], references=[0, 0])
    for key in outputs:
        assert f"`{key}`" in card, key
    assert "evaluate.load(CALIBRATION_METRIC)" in card and "```bibtex" in card


def test_logits_and_probabilities_give_the_same_numbers():
    logits, labels = scores(300, 5, 0)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    module = Calibration()
    from_logits = module.compute(predictions=logits, references=labels)  # detected: rows do not sum to 1
    from_probs = module.compute(predictions=probs, references=labels)
    assert from_logits == pytest.approx(from_probs, abs=1e-9)
    assert from_logits == pytest.approx(as_percent(calibration_metrics(labels, logits=logits)), abs=1e-12)
    # a logit row that happens to look like probabilities is taken as logits when told so
    told = module.compute(predictions=[[0.5, 0.5], [1.0, 0.0]], references=[0, 0], from_logits=True)
    assert told["nll"] == pytest.approx(np.mean([np.log(2), np.log1p(np.exp(-1.0))]))


def test_logit_rows_that_sum_to_one_are_taken_as_logits():
    """Rows 2 - 1 = 1 and -0.5 + 1.5 = 1 sum to 1 but hold negative scores: logits, whose softmax puts
    1 / (1 + e^-3) and 1 / (1 + e^-2) on the (true) larger class."""
    logits, labels = [[2.0, -1.0], [-0.5, 1.5]], [0, 1]
    module = Calibration()
    detected = module.compute(predictions=logits, references=labels)
    assert detected == module.compute(predictions=logits, references=labels, from_logits=True)
    assert detected["nll"] == pytest.approx(np.mean([np.log1p(np.exp(-3.0)), np.log1p(np.exp(-2.0))]), abs=1e-12)
    gaps = [1 / (1 + np.exp(3.0)), 1 / (1 + np.exp(2.0))]  # both right, confidences in different bins
    assert detected["accuracy_pct"] == 100 and detected["ece_pct"] == pytest.approx(100 * np.mean(gaps), abs=1e-10)


def test_add_batch_accumulates_and_n_bins_is_an_argument():
    logits, labels = scores(500, 4, 1)
    module = Calibration()
    for start in range(0, 500, 128):
        module.add_batch(predictions=logits[start : start + 128], references=labels[start : start + 128])
    batched = module.compute(n_bins=15)
    whole = as_percent(calibration_metrics(labels, logits=logits, n_bins=15))
    assert batched == pytest.approx(whole, abs=1e-12)
    # (ECE alone may not move: when every bin is over-confident it equals mean confidence - accuracy at any n_bins)
    assert batched["ace_pct"] != pytest.approx(as_percent(calibration_metrics(labels, logits=logits))["ace_pct"])


class Count(evaluate.Metric):
    """A second module to combine with: the number of samples."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="count",
            citation="",
            inputs_description="",
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references) -> dict[str, int]:
        return {"count": len(references)}


def test_combine_merges_with_other_modules():
    logits, labels = scores(200, 3, 2)
    combined = evaluate.combine([evaluate.load(CALIBRATION_METRIC), Count()])
    combined.add_batch(predictions=logits[:120], references=labels[:120])
    combined.add_batch(predictions=logits[120:], references=labels[120:])
    results = combined.compute()
    assert results["count"] == 200
    assert results["ece_pct"] == pytest.approx(100 * calibration_metrics(labels, logits=logits)["ece"], abs=1e-12)


def test_trainer_metrics_are_the_modules_numbers_without_its_arrow_store(monkeypatch):
    logits, labels = scores(256, 6, 3)
    logits = logits.astype(np.float32)
    expected = Calibration().compute(predictions=logits, references=labels, n_bins=12, from_logits=True)

    def refuse(*args, **kwargs):
        raise AssertionError("CalibrationMetrics went through the evaluate module")

    monkeypatch.setattr(Calibration, "_compute", refuse)
    out = CalibrationMetrics(n_bins=12)(EvalPrediction(predictions=logits, label_ids=labels))
    assert out == expected  # the same function on the same float64 values: equal, not only close
