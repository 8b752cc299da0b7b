"""The ``calibration`` evaluate module: offline ``evaluate.load``, batches, ``combine``; the trainer's evaluation
against a brute-force computation."""

import os
from pathlib import Path

import datasets
import evaluate
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import EvalPrediction

from cmp_hf import CMPConfig, CMPTrainer, PromptConfig, PromptTunedCLIP
from cmp_hf.data.collator import ImageFeatureCollator
from cmp_hf.data.feature_batches import FeatureBatches
from cmp_hf.data.feature_cache import FEATURES_COLUMN
from cmp_hf.evaluation import CALIBRATION_METRIC, Calibration
from cmp_hf.losses import cmp_penalty
from cmp_hf.losses.baselines import mbls_penalty
from cmp_hf.metrics import CalibrationMetrics, as_percent, calibration_metrics, reliability_table, risk_coverage
from cmp_hf.testing.synthetic import random_features
from cmp_hf.testing.tiny import tiny_clip


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


def feature_trainer(tmp_path, n: int, classes: int, collator=None, **options) -> tuple:
    """A CMPTrainer over cached image features (the evaluation at scale's input) on a tiny CLIP, and its eval set.
    Without ``collator``, the trainer's own input pipeline reads the features (in batches of columns); with
    ``ImageFeatureCollator()``, a user's collator gets them as ``datasets`` hands them, row by row."""
    names = [f"class {chr(97 + k)}" for k in range(classes)]
    clip, processor = tiny_clip(word for name in names for word in name.split())
    model = PromptTunedCLIP.from_clip(clip, processor.tokenizer, PromptConfig(class_names=names, n_ctx=2))
    dataset = random_features(n, clip.config.projection_dim, classes)
    config = CMPConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, **options
    )
    trainer = CMPTrainer(model, config, data_collator=collator, processing_class=processor)
    return trainer, dataset


@pytest.mark.parametrize("collator", [None, ImageFeatureCollator()], ids=["batches", "rows"])
def test_trainer_evaluation_equals_a_brute_force_computation(tmp_path, collator):
    """Loss terms and calibration metrics of an eval set in uneven batches = the same maths on all its logits."""
    trainer, dataset = feature_trainer(
        tmp_path, 61, 7, collator, per_device_eval_batch_size=8, cmp_lambda=0.5, mbls_weight=0.2, calibration_bins=12
    )
    metrics = trainer.evaluate({"set": dataset})
    features, labels = torch.tensor(np.asarray(dataset[FEATURES_COLUMN])), torch.tensor(dataset["label"])
    with torch.no_grad():
        logits = trainer.model.eval()(image_features=features).logits.double()
    ce, cmp = F.cross_entropy(logits, labels).item(), cmp_penalty(logits, labels).item()
    mbls = mbls_penalty(logits, trainer.args.mbls_margin).item()
    expected = {
        "ce": ce, "cmp": cmp, "mbls": mbls, "loss": ce + 0.5 * cmp + 0.2 * mbls,
        "misclassified": (logits.argmax(1) != labels).double().mean().item(),
        **as_percent(calibration_metrics(labels.numpy(), logits=logits.float().numpy(), n_bins=12)),
    }  # fmt: skip
    assert {key: metrics[f"eval_set_{key}"] for key in expected} == pytest.approx(expected, rel=1e-6, abs=1e-6)
    report = trainer.eval_reports["set"]
    probs = torch.softmax(logits, dim=1).numpy()
    correct = probs.argmax(1) == labels.numpy()
    table = reliability_table(probs.max(1), correct, 12)
    for field in ("count", "accuracy", "confidence"):
        np.testing.assert_allclose(getattr(report.reliability, field), getattr(table, field), rtol=1e-6)
    np.testing.assert_allclose(report.risk, risk_coverage(probs.max(1), correct)[1], rtol=1e-12)
    assert (report.num_samples, report.num_classes, report.n_bins) == (61, 7, 12)


def test_predict_gives_the_calibration_metrics_and_keeps_no_report(tmp_path):
    trainer, dataset = feature_trainer(tmp_path, 30, 5, per_device_eval_batch_size=8)
    output = trainer.predict(dataset)
    assert output.predictions.shape == (30, 5) and not trainer.eval_reports
    expected = as_percent(calibration_metrics(output.label_ids, logits=output.predictions))
    assert {key: output.metrics[f"test_{key}"] for key in expected} == expected
    keys = [key for key in output.metrics if not key.endswith(("_runtime", "_per_second", "_preparation_time"))]
    assert keys == ["test_loss", *(f"test_{key}" for key in expected), "test_ce", "test_cmp", "test_misclassified"]


def test_another_compute_metrics_gets_the_whole_sets_arrays(tmp_path):
    seen = []

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        seen.append((prediction.predictions, prediction.label_ids))
        return {"rows": len(prediction.label_ids)}

    trainer, dataset = feature_trainer(tmp_path, 30, 5, per_device_eval_batch_size=8)
    trainer.compute_metrics = compute_metrics
    metrics = trainer.evaluate({"set": dataset})
    output = trainer.predict(dataset)
    assert metrics["eval_set_rows"] == output.metrics["test_rows"] == 30 and "eval_set_ece_pct" not in metrics
    for logits, labels in seen:  # arrays of all 30 rows, not Trainer's per-batch lists
        np.testing.assert_array_equal(logits, output.predictions)
        np.testing.assert_array_equal(labels, dataset["label"])
    assert trainer.eval_reports["set"].metrics == as_percent(calibration_metrics(labels, logits=logits))


def test_an_evaluation_reads_cached_features_in_batches_and_keeps_no_logits(tmp_path, monkeypatch):
    """What keeps evaluating an ImageNet-sized set near the cost of its maths: one Arrow read per batch (not a
    Python dict per row) and the maths fed batch by batch (no N x C logits kept, none concatenated)."""
    reads = []
    real = FeatureBatches.__getitems__
    monkeypatch.setattr(FeatureBatches, "__getitems__", lambda self, rows: reads.append(len(rows)) or real(self, rows))
    trainer, dataset = feature_trainer(tmp_path, 61, 7, per_device_eval_batch_size=8)
    loader = trainer.get_eval_dataloader(trainer._model_inputs(dataset))
    output = trainer.evaluation_loop(loader, "Evaluation", metric_key_prefix="eval")
    assert reads == [8] * 7 + [5]
    assert output.predictions is None and output.metrics["eval_accuracy_pct"] >= 0
    prediction = trainer.predict(dataset)  # a prediction keeps its logits, in one array
    assert prediction.predictions.shape == (61, 7)
    expected = as_percent(calibration_metrics(prediction.label_ids, logits=prediction.predictions))
    assert {key: output.metrics[f"eval_{key}"] for key in expected} == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("fixed_width", [True, False], ids=["as-the-cache-writes", "list-column"])
def test_feature_batches_read_what_the_rows_hold(fixed_width):
    rng = np.random.default_rng(1)
    features = rng.standard_normal((20, 6)).astype(np.float32)
    feature_type = datasets.Sequence(datasets.Value("float32"), length=6 if fixed_width else -1)
    schema = datasets.Features({FEATURES_COLUMN: feature_type, "label": datasets.ClassLabel(num_classes=4)})
    dataset = Dataset.from_dict({FEATURES_COLUMN: features, "label": rng.integers(0, 4, 20)}, features=schema)
    dataset = dataset.shuffle(seed=0).select(range(3, 17))  # through an indices mapping, as a subset is read
    batches = FeatureBatches(dataset, "label")
    rows = [7, 0, 13, 2]
    batch = ImageFeatureCollator()(batches.__getitems__(rows))
    expected = ImageFeatureCollator()([dataset[row] for row in rows])
    torch.testing.assert_close(batch, expected, rtol=0, atol=0)
    assert batch["image_features"].dtype == torch.float32 and batch["labels"].dtype == torch.long
    assert len(batches) == 14 and batches[5]["label"] == dataset[5]["label"]


def test_feature_batches_refuse_features_of_different_widths():
    dataset = Dataset.from_dict({FEATURES_COLUMN: [[0.1, 0.2], [0.3, 0.4, 0.5]], "label": [0, 1]})
    with pytest.raises(ValueError, match="2 different lengths"):
        FeatureBatches(dataset, "label").__getitems__([0, 1])


def test_cached_features_for_a_learner_that_needs_images_are_refused_at_once(tmp_path, tiny_clip_dir, train_set):
    """MaPLe prompts the image tower: features encoded by the frozen tower are not what it classifies."""
    features = Dataset.from_dict({FEATURES_COLUMN: np.zeros((4, 16), np.float32), "label": [0, 1, 2, 0]})
    config = CMPConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", prompt_learner="maple")
    with pytest.raises(ValueError, match="holds cached 'image_features' but this trainer feeds images"):
        CMPTrainer(model=tiny_clip_dir, args=config, train_dataset=train_set, eval_dataset=features)


def test_a_per_batch_compute_metrics_of_the_users_gets_every_batch_and_the_report_is_still_kept(tmp_path):
    calls = []

    def compute_metrics(prediction: EvalPrediction, compute_result: bool) -> dict[str, float]:
        calls.append((len(prediction.label_ids), compute_result))
        return {"rows": sum(rows for rows, _ in calls)} if compute_result else {}

    trainer, dataset = feature_trainer(tmp_path, 30, 5, per_device_eval_batch_size=8, batch_eval_metrics=True)
    trainer.compute_metrics = compute_metrics
    metrics = trainer.evaluate({"set": dataset})
    assert calls == [(8, False), (8, False), (8, False), (6, True)] and metrics["eval_set_rows"] == 30
    logits = trainer.predict(dataset).predictions
    expected = as_percent(calibration_metrics(np.asarray(dataset["label"]), logits=logits))
    assert trainer.eval_reports["set"].metrics == pytest.approx(expected, abs=1e-12)


def test_remove_unused_columns_reads_cached_features_by_rows_with_the_same_numbers(tmp_path):
    """Trainer wraps the collator of a non-``datasets`` set in one that takes rows: no batch reader then."""
    numbers = []
    for remove in (False, True):
        torch.manual_seed(0)  # the same random context in both
        trainer, dataset = feature_trainer(
            tmp_path / str(remove), 30, 5, per_device_eval_batch_size=8, remove_unused_columns=remove
        )
        assert isinstance(trainer._model_inputs(dataset), FeatureBatches) != remove
        numbers.append(trainer.evaluate({"set": dataset}))
    drop = ("runtime", "per_second", "preparation_time")
    assert {k: v for k, v in numbers[1].items() if not k.endswith(drop)} == pytest.approx(
        {k: v for k, v in numbers[0].items() if not k.endswith(drop)}, abs=1e-6
    )


def test_feature_batches_leave_a_column_of_nested_lists_to_the_row_path():
    nested = Dataset.from_dict({FEATURES_COLUMN: [[[0.1, 0.2]], [[0.3, 0.4]]], "label": [0, 1]})
    flat = Dataset.from_dict({FEATURES_COLUMN: [[0.1, 0.2], [0.3, 0.4]], "label": [0, 1]})
    assert not FeatureBatches.can_read(nested) and FeatureBatches.can_read(flat)


def test_a_training_set_of_cached_features_is_not_silently_left_unaugmented(tmp_path, tiny_clip_dir):
    features = Dataset.from_dict({FEATURES_COLUMN: np.ones((4, 16), np.float32), "label": [0, 1, 2, 0]})
    config = CMPConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", augment=True)
    with pytest.raises(ValueError, match="cannot be augmented: pass the images .* or set augment=False"):
        CMPTrainer(model=tiny_clip_dir, args=config, train_dataset=features, class_names=["red", "green", "blue"])


def test_datasets_passed_in_are_each_read_with_persistent_workers(tmp_path):
    """Trainer caches a persistent-workers eval loader under "eval" for any dataset passed in: the second set
    would silently get the first one's numbers."""
    trainer, dataset = feature_trainer(
        tmp_path, 30, 5, per_device_eval_batch_size=8, dataloader_num_workers=1, dataloader_persistent_workers=True
    )
    first, second = dataset.select(range(15)), dataset.select(range(15, 30))
    metrics = trainer.evaluate({"first": first, "second": second})
    for name, subset in (("first", first), ("second", second)):
        logits = trainer.predict(subset).predictions
        expected = as_percent(calibration_metrics(np.asarray(subset["label"]), logits=logits))
        assert {key: metrics[f"eval_{name}_{key}"] for key in expected} == pytest.approx(expected, abs=1e-9), name
