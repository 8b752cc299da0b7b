import tracemalloc

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error
from transformers import EvalPrediction

import cmp_hf.metrics
from cmp_hf.evaluation import Calibration
from cmp_hf.metrics import (
    METRIC_KEYS,
    CalibrationAccumulator,
    CalibrationMetrics,
    NonFiniteScoresError,
    as_percent,
    calibration_metrics,
    equal_mass_table,
    reliability_table,
    risk_coverage,
)


def random_probs(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * rng.uniform(0.5, 4.0, size=(n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, classes, size=n)
    labels[: n // 2] = probs[: n // 2].argmax(axis=1)  # about half correct, so bins are not all-wrong
    return probs, labels


@pytest.mark.parametrize(("n_bins", "classes", "seed"), [(10, 5, 0), (15, 3, 1), (7, 10, 2), (20, 4, 3)])
def test_matches_torchmetrics(n_bins, classes, seed):
    probs, labels = random_probs(2000, classes, seed)
    conf = probs.max(axis=1)
    assert np.min(np.abs(conf[:, None] * n_bins - np.arange(n_bins + 1))) > 1e-9  # nothing on a bin edge
    ours = calibration_metrics(labels, probs=probs, n_bins=n_bins)
    module = Calibration().compute(predictions=probs, references=labels, n_bins=n_bins)
    p, y = torch.from_numpy(probs), torch.from_numpy(labels)
    for key, norm in [("ece", "l1"), ("rmsce", "l2"), ("mce", "max")]:
        theirs = multiclass_calibration_error(p, y, num_classes=classes, n_bins=n_bins, norm=norm).item()
        assert ours[key] == pytest.approx(theirs, abs=1e-6), key
        assert module[f"{key}_pct"] == pytest.approx(100 * theirs, abs=1e-4), key


@pytest.mark.parametrize(("n_bins", "classes", "seed"), [(10, 5, 0), (15, 3, 1), (7, 10, 2)])
@pytest.mark.parametrize("block", [cmp_hf.metrics.BLOCK_ENTRIES, 64])  # one block; rows in uneven blocks of 6-21
def test_classwise_ece_matches_a_loop_over_classes_and_bins(n_bins, classes, seed, block, monkeypatch):
    monkeypatch.setattr(cmp_hf.metrics, "BLOCK_ENTRIES", block)
    probs, labels = random_probs(700, classes, seed)
    expected = 0.0
    for k in range(classes):
        for b in range(n_bins):
            lower, upper = b / n_bins, (b + 1) / n_bins
            members = [i for i in range(len(labels)) if lower < probs[i, k] <= upper or (b == 0 and probs[i, k] == 0)]
            if members:
                freq = np.mean([labels[i] == k for i in members])
                conf = np.mean([probs[i, k] for i in members])
                expected += len(members) / len(labels) * abs(freq - conf) / classes
    found = calibration_metrics(labels, probs=probs, n_bins=n_bins)["classwise_ece"]
    assert found == pytest.approx(expected, abs=1e-12)


def test_classwise_ece_puts_a_probability_on_an_edge_in_the_bin_below():
    """Bins are (lower, upper] for every class's probability too. By hand, 10 bins, sum over bins of
    |sum (1[y = k] - p_k)| / N, averaged over the 3 classes:
    class 0: 0.5 (y = 0) in (0.4, 0.5], 0.55 (y = 2) in (0.5, 0.6]: (|1 - 0.5| + |0 - 0.55|) / 2 = 0.525;
    class 1: 0.3 and 0.25 both in (0.2, 0.3], neither labelled 1: |-0.3 - 0.25| / 2 = 0.275;
    class 2: 0.2 and 0.2 in (0.1, 0.2], the second labelled 2: |-0.2 + 0.8| / 2 = 0.3.
    (With [lower, upper) bins class 0's 0.5 and 0.55 would share a bin: |0.5 - 0.55| / 2 = 0.025.)"""
    probs = np.array([[0.5, 0.3, 0.2], [0.55, 0.25, 0.2]])
    labels = np.array([0, 2])
    expected = (0.525 + 0.275 + 0.3) / 3
    assert calibration_metrics(labels, probs=probs)["classwise_ece"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aurc_matches_the_risk_at_every_confidence_threshold(seed):
    probs, labels = random_probs(400, 6, seed)
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    # brute force: for each sample's confidence as threshold, the error rate of the samples at least as confident
    risks = [np.mean([not correct[j] for j in range(len(conf)) if conf[j] >= t]) for t in conf]
    assert calibration_metrics(labels, probs=probs)["aurc"] == pytest.approx(np.mean(risks), abs=1e-12)
    coverage, risk = risk_coverage(conf, correct)
    assert coverage[-1] == 1 and risk[-1] == pytest.approx(1 - correct.mean())
    assert sorted(risk.tolist()) == sorted(risks)  # the curve's points are the thresholds' risks


def test_aurc_orders_rankings():
    correct = np.array([1, 1, 1, 0, 0], dtype=bool)
    good = np.array([0.9, 0.8, 0.7, 0.6, 0.5])  # the wrong ones are the least confident: the oracle ranking
    bad = good[::-1].copy()  # the wrong ones are the most confident
    assert risk_coverage(good, correct)[1].mean() == pytest.approx(np.mean([0, 0, 0, 1 / 4, 2 / 5]))
    assert risk_coverage(bad, correct)[1].mean() == pytest.approx(np.mean([1, 1, 2 / 3, 2 / 4, 2 / 5]))


def test_hand_computed_case():
    # 3 classes; confidences 0.95, 0.85 (bin (0.9,1] and (0.8,0.9]), 0.55 and 0.45 ((0.5,0.6] and (0.4,0.5]).
    probs = np.array(
        [[0.95, 0.03, 0.02], [0.10, 0.85, 0.05], [0.55, 0.25, 0.20], [0.30, 0.25, 0.45]]
    )  # fmt: skip
    labels = np.array([0, 0, 0, 2])  # correct, wrong, correct, correct
    m = calibration_metrics(labels, probs=probs, n_bins=10)
    gaps = [abs(1 - 0.95), abs(0 - 0.85), abs(1 - 0.55), abs(1 - 0.45)]
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["ece"] == pytest.approx(sum(gaps) / 4)
    assert m["mce"] == pytest.approx(0.85)
    assert m["mce_weighted"] == pytest.approx(0.85 / 4)
    assert m["rmsce"] == pytest.approx(np.sqrt(sum(g**2 for g in gaps) / 4))
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.95, 0.10, 0.55, 0.45])))
    one_hot = np.eye(3)[labels]
    assert m["brier"] == pytest.approx(((probs - one_hot) ** 2).sum(axis=1).mean())
    # Equal-mass with 2 bins: {0.45, 0.55} (both right) and {0.85 (wrong), 0.95 (right)}.
    ace = calibration_metrics(labels, probs=probs, n_bins=2)["ace"]
    assert ace == pytest.approx(0.5 * abs(1 - 0.5) + 0.5 * abs(0.5 - 0.9))


def test_bins_are_right_closed():
    table = reliability_table(np.array([0.5, 0.5000001, 1.0, 0.1]), np.array([1, 0, 1, 1]), n_bins=10)
    assert table.count.tolist() == [1, 0, 0, 0, 1, 1, 0, 0, 0, 1]  # 0.5 in (0.4, 0.5], 1.0 in (0.9, 1.0]
    assert np.isnan(table.accuracy[1]) and table.weighted_gaps[1] == 0


def test_equal_mass_bins_hold_equal_counts():
    conf = np.random.default_rng(0).uniform(0.2, 1.0, size=103)
    table = equal_mass_table(conf, np.ones(103), n_bins=10)
    assert sorted(set(table.count.tolist())) == [10, 11]
    assert np.all(table.lower[1:] >= table.upper[:-1])  # bins are ordered and do not overlap


def test_logits_and_probabilities_agree():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(300, 6)) * 3
    labels = rng.integers(0, 6, size=300)
    probs = torch.from_numpy(logits).softmax(dim=1).numpy()
    from_logits = calibration_metrics(labels, logits=logits)
    from_probs = calibration_metrics(labels, probs=probs)
    assert from_logits == pytest.approx(from_probs, abs=1e-12)
    nll = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    assert from_logits["nll"] == pytest.approx(nll, rel=1e-12)


def test_nll_from_logits_survives_underflow():
    logits = np.array([[0.0, 2000.0], [5.0, 0.0]])
    m = calibration_metrics(np.array([0, 0]), logits=logits)
    assert np.isfinite(m["nll"]) and m["nll"] == pytest.approx((2000.0 + np.log1p(np.exp(-5.0))) / 2)


def test_metric_keys_name_what_the_trainer_reports_in_order():
    probs, labels = random_probs(50, 3, 0)
    assert tuple(as_percent(calibration_metrics(labels, probs=probs))) == METRIC_KEYS


def test_compute_metrics_reports_percent():
    probs, labels = random_probs(500, 4, 5)
    logits = np.log(probs)
    out = CalibrationMetrics(n_bins=10)(EvalPrediction(predictions=logits, label_ids=labels))
    raw = calibration_metrics(labels, probs=probs)
    for key in ("accuracy", "ece", "ace", "mce", "mce_weighted", "rmsce", "classwise_ece"):
        assert out[f"{key}_pct"] == pytest.approx(100 * raw[key])
    for key in ("nll", "brier", "aurc"):
        assert out[key] == pytest.approx(raw[key])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"probs": np.eye(3), "logits": np.eye(3)}, "exactly one"),
        ({}, "exactly one"),
        ({"probs": np.eye(3), "labels": np.array([0, 1, 3])}, "Labels must lie in"),
        ({"probs": np.eye(3), "n_bins": 0}, "n_bins"),
        ({"probs": np.zeros((0, 3)), "labels": np.zeros(0)}, "empty"),
    ],
)
def test_bad_input_is_rejected(kwargs, message):
    kwargs.setdefault("labels", np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=message):
        calibration_metrics(**kwargs)


@pytest.mark.parametrize("from_logits", [True, False])
def test_batches_given_one_by_one_give_the_whole_sets_numbers(from_logits):
    """An evaluation feeds its batches as they come: uneven batches, each cut into blocks of its own, give what
    the whole array gives (the sums only regrouped)."""
    probs, labels = random_probs(1000, 7, 6)
    scores = {"logits": np.log(probs)} if from_logits else {"probs": probs}
    whole = cmp_hf.metrics.calibration_result(labels, n_bins=12, **scores)
    accumulator = CalibrationAccumulator(n_bins=12)
    for start, stop in [(0, 1), (1, 300), (300, 301), (301, 1000)]:
        accumulator.update(labels[start:stop], **{key: value[start:stop] for key, value in scores.items()})
    streamed = accumulator.result()
    assert streamed.metrics == pytest.approx(whole.metrics, abs=1e-12)
    assert list(streamed.metrics) == list(whole.metrics)
    np.testing.assert_array_equal(streamed.risk, whole.risk)
    np.testing.assert_array_equal(streamed.reliability.count, whole.reliability.count)
    assert streamed.num_classes == 7 and streamed.num_samples == 1000


def test_non_finite_rows_of_every_batch_are_named_by_their_row_in_the_set():
    logits = np.zeros((10, 3))
    logits[[2, 7], 1] = [np.nan, np.inf]
    accumulator = CalibrationAccumulator()
    accumulator.update(np.zeros(5, dtype=int), logits=logits[:5])
    accumulator.update(np.zeros(5, dtype=int), logits=logits[5:])
    with pytest.raises(NonFiniteScoresError, match=r"NaN or infinite values in 2 rows \(first: \[2, 7\]\)"):
        accumulator.result()


def test_a_batch_over_other_classes_is_refused():
    accumulator = CalibrationAccumulator()
    accumulator.update(np.array([0, 1]), logits=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="over 4 classes after 3"):
        accumulator.update(np.array([0, 1]), logits=np.zeros((2, 4)))


def test_the_maths_holds_a_block_of_probabilities_not_the_whole_set():
    """At 20,000 x 500 the float64 probabilities of the whole set take 80 MB; the maths works on 16 MB blocks."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20_000, 500)).astype(np.float32)
    labels = rng.integers(0, 500, size=20_000)
    tracemalloc.start()
    try:
        calibration_metrics(labels, logits=logits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    whole = logits.size * 8
    assert peak < whole / 2, f"peak {peak / 2**20:.0f} MiB"


def test_compute_metrics_adds_up_the_batches_trainer_hands_it_one_by_one():
    """Trainer's batch_eval_metrics: tensors per batch, the set's numbers with the last (compute_result=True)."""
    probs, labels = random_probs(100, 4, 7)
    logits = torch.from_numpy(np.log(probs)).to(torch.bfloat16)  # what an eval in bf16 gathers
    metrics = CalibrationMetrics(n_bins=10)
    returned = [
        metrics(
            EvalPrediction(
                predictions=logits[start : start + 32], label_ids=torch.from_numpy(labels[start : start + 32])
            ),
            compute_result=start + 32 >= 100,
        )
        for start in range(0, 100, 32)
    ]
    expected = as_percent(calibration_metrics(labels, logits=logits.float().numpy()))
    assert returned[:-1] == [{}, {}, {}] and returned[-1] == pytest.approx(expected, abs=1e-12)
    again = metrics(EvalPrediction(predictions=logits.float().numpy(), label_ids=labels))  # a new set, whole
    assert again == pytest.approx(expected, abs=1e-12)
