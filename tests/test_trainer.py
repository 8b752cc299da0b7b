import dataclasses
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors.torch import load_file, save_file
from transformers import TrainingArguments

import cmp_hf.atomic
import cmp_hf.eval_report
import cmp_hf.metrics
from cmp_hf import CMPConfig, CMPTrainer, HubError, PostHocCalibration, PromptTunedCLIP, calibration_metrics
from cmp_hf.atomic import STAGING_PREFIX
from cmp_hf.constants import ADAPTER_WEIGHTS_NAME, CALIBRATION_FEATURES_NAME, CALIBRATION_NAME, PROMPT_DIGEST_NAME
from cmp_hf.data import CLIPImageCollator
from cmp_hf.learners import LEARNERS, CoOpLearner
from cmp_hf.losses import LossOptions
from cmp_hf.metrics import METRIC_KEYS, as_percent
from cmp_hf.testing.synthetic import colour_patches


def make_config(tmp_path, **overrides) -> CMPConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        n_ctx=4,
        learning_rate=0.05,
        seed=7,
        disable_tqdm=True,
    )
    values.update(overrides)
    return CMPConfig(**values)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_training_changes_exactly_the_context(tmp_path, tiny_clip_dir, train_set):
    trainer = CMPTrainer(model=tiny_clip_dir, args=make_config(tmp_path, max_steps=3), train_dataset=train_set)
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed == ["peft_model.prompt_encoder.default.embedding.weight"]
    assert "peft_model.base_model.logit_scale" in before  # frozen, not merely absent


def final_context(tmp_path, tiny_clip_dir, dataset, **overrides) -> torch.Tensor:
    trainer = CMPTrainer(model=tiny_clip_dir, args=make_config(tmp_path, **overrides), train_dataset=dataset)
    trainer.train()
    return trainer.model.context.detach().clone()


def test_gradient_accumulation_matches_the_full_batch(tmp_path, tiny_clip_dir):
    data = colour_patches(["red", "green", "blue", "yellow"], per_class=4, seed=3)  # 16 rows: 2 steps of 8
    config = dict(max_steps=2, cmp_lambda=1.0, optim="sgd", optim_args="momentum=0.9", weight_decay=5e-4)
    start = final_context(tmp_path, tiny_clip_dir, data, **config, learning_rate=0.0)
    full = final_context(tmp_path, tiny_clip_dir, data, **config, per_device_train_batch_size=8)
    accumulated = final_context(
        tmp_path, tiny_clip_dir, data, **config, per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    moved = (full - start).abs().max().item()
    gap = (full - accumulated).abs().max().item()
    print(f"GA equivalence: update {moved:.3e}, |batch 8 - 2 x batch 4| = {gap:.3e}")
    assert moved > 1e-3  # the comparison is not between two untouched prompts
    assert gap <= 1e-5 * moved  # unclipped (CMPConfig's default): a 2x gradient error would give a gap ~ moved


def test_loss_is_ce_plus_lambda_cmp_and_terms_are_logged(tmp_path, tiny_clip_dir, train_set):
    trainer = CMPTrainer(
        model=tiny_clip_dir,
        args=make_config(tmp_path, max_steps=4, logging_steps=1, cmp_lambda=0.5, cmp_competitors="top1"),
        train_dataset=train_set,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    for entry in logs:
        assert entry["loss"] == pytest.approx(entry["ce"] + 0.5 * entry["cmp"], rel=1e-4)
        assert 0.0 <= entry["misclassified"] <= 1.0
    assert any(entry["cmp"] > 0 for entry in logs)


def test_lambda_zero_is_plain_cross_entropy(tmp_path, tiny_clip_dir, train_set):
    trainer = CMPTrainer(
        model=tiny_clip_dir,
        args=make_config(tmp_path, max_steps=2, logging_steps=1, cmp_lambda=0.0),
        train_dataset=train_set,
    )
    trainer.train()
    for entry in (e for e in trainer.state.log_history if "loss" in e):
        assert entry["loss"] == pytest.approx(entry["ce"], rel=1e-6) and entry["cmp"] > 0


def test_evaluation_reports_calibration_for_each_eval_set(tmp_path, tiny_clip_dir, train_set, test_set):
    trainer = CMPTrainer(
        model=tiny_clip_dir,
        args=make_config(tmp_path),
        train_dataset=train_set,
        eval_dataset={"test": test_set, "train": train_set},
    )
    calls = []
    trainer.model.clip.text_model.register_forward_hook(lambda *args: calls.append(1))
    metrics = trainer.evaluate()
    assert len(calls) == 2  # once per eval set, not once per batch (4 batches each)
    for split, dataset in (("test", test_set), ("train", train_set)):
        batch = CLIPImageCollator(trainer.processing_class.image_processor)(list(dataset))
        with torch.no_grad():
            logits = trainer.model.eval()(pixel_values=batch["pixel_values"]).logits.numpy()
        expected = calibration_metrics(batch["labels"].numpy(), logits=logits)
        for key in ("accuracy", "ece", "ace", "mce", "mce_weighted", "rmsce"):
            assert metrics[f"eval_{split}_{key}_pct"] == pytest.approx(100 * expected[key], abs=1e-4)
        assert metrics[f"eval_{split}_nll"] == pytest.approx(expected["nll"], rel=1e-5)
        assert metrics[f"eval_{split}_ce"] == pytest.approx(expected["nll"], rel=1e-5)
        assert metrics[f"eval_{split}_loss"] == pytest.approx(
            metrics[f"eval_{split}_ce"] + metrics[f"eval_{split}_cmp"], rel=1e-5
        )


def test_coop_schedule_drives_the_learning_rate(tmp_path, tiny_clip_dir, train_set):
    # 16 rows / batch 4 = 4 steps per epoch, 3 epochs: warm-up epoch, then cosine over 3 epochs per epoch.
    trainer = CMPTrainer(
        model=tiny_clip_dir,
        args=make_config(tmp_path, num_train_epochs=3, logging_steps=1, coop_schedule=True, learning_rate=2e-3),
        train_dataset=train_set,
    )
    trainer.train()
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "loss" in entry]
    expected = [1e-5] * 4 + [2e-3] * 4 + [2e-3 * 0.5 * (1 + math.cos(math.pi / 3))] * 4
    assert rates == pytest.approx(expected, rel=1e-9)


def test_resume_from_checkpoint_continues_the_same_run(tmp_path, tiny_clip_dir, train_set):
    full = final_context(tmp_path / "a", tiny_clip_dir, train_set, max_steps=6)
    config = make_config(tmp_path / "b", max_steps=6, save_strategy="steps", save_steps=3)
    CMPTrainer(model=tiny_clip_dir, args=config, train_dataset=train_set).train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").exists() and (checkpoint / "optimizer.pt").exists()
    resumed = CMPTrainer(model=tiny_clip_dir, args=config, train_dataset=train_set)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    torch.testing.assert_close(resumed.model.context.detach(), full, atol=1e-6, rtol=0)


def tamper_adapter(checkpoint):
    weights = checkpoint / ADAPTER_WEIGHTS_NAME
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name][0, 0] += 1.0  # still a valid safetensors file: only its digest tells
    save_file(tensors, weights)


@pytest.mark.parametrize(("damage", "error", "message"), [
    (tamper_adapter, ValueError, "adapter_model.safetensors does not match the digest"),
    (lambda checkpoint: (checkpoint / PROMPT_DIGEST_NAME).unlink(), FileNotFoundError, "has no prompt_digest.json"),
])  # fmt: skip
def test_resume_refuses_a_damaged_checkpoint_before_restoring_it(tmp_path, tiny_clip_dir, train_set, damage, error,
                                                                 message):  # fmt: skip
    config = make_config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    CMPTrainer(model=tiny_clip_dir, args=config, train_dataset=train_set).train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    damage(checkpoint)
    resumed = CMPTrainer(model=tiny_clip_dir, args=config, train_dataset=train_set)
    before = resumed.model.context.detach().clone()
    with pytest.raises(
        error, match=rf"Cannot resume from {re.escape(str(checkpoint))}: .*{message}.*another checkpoint"
    ):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert torch.equal(resumed.model.context.detach(), before) and resumed.state.global_step == 0


def test_each_save_writes_the_calibration_once_and_leaves_no_stale_file(tmp_path, tiny_clip_dir, train_set,
                                                                        monkeypatch):  # fmt: skip
    trainer = CMPTrainer(model=tiny_clip_dir, args=make_config(tmp_path), train_dataset=train_set)
    out = tmp_path / "out"
    written = []
    atomic_path = cmp_hf.atomic.atomic_path  # every file cmp_hf writes itself goes through it

    def recorded(path):
        written.append(os.path.relpath(path, out))
        return atomic_path(path)

    monkeypatch.setattr(cmp_hf.atomic, "atomic_path", recorded)
    width = trainer.model.clip.config.projection_dim
    shifted = PostHocCalibration(temperature=1.5, shift_strength=0.2, reference_features=F.normalize(
        torch.randn(8, width, generator=torch.Generator().manual_seed(0)), dim=-1))  # fmt: skip
    for calibration, files in [
        (shifted, {CALIBRATION_NAME, CALIBRATION_FEATURES_NAME}),
        (PostHocCalibration(temperature=2.0), {CALIBRATION_NAME}),  # the features of the save before are stale
        (PostHocCalibration(), set()),  # uncalibrated: no calibration file is left from the saves before
    ]:
        trainer.model.calibration = calibration
        written.clear()
        trainer.save_model()
        assert sorted(name for name in written if name.startswith("calibration")) == sorted(files)  # once each
        assert {name for name in os.listdir(out) if name.startswith("calibration")} == files
        assert not [name for name in os.listdir(out) if name.startswith(STAGING_PREFIX)]
        loaded = PromptTunedCLIP.from_pretrained(out).calibration  # digests verified: the files belong together
        assert loaded.saved_values() == calibration.saved_values()


def test_save_locally_never_pushes_and_save_model_does(tmp_path, tiny_clip_dir, train_set, monkeypatch):
    config = make_config(tmp_path, push_to_hub=True, hub_token="hf_test", hub_model_id="tester/prompt")
    monkeypatch.setattr(CMPTrainer, "init_hf_repo", lambda self, **kwargs: None)  # no network here
    trainer = CMPTrainer(model=tiny_clip_dir, args=config, train_dataset=train_set)
    pushes = []
    monkeypatch.setattr(trainer, "push_to_hub", lambda **kwargs: pushes.append(kwargs))
    trainer.save_locally()
    assert (tmp_path / "out" / ADAPTER_WEIGHTS_NAME).is_file() and not pushes
    trainer.save_model()  # Trainer's: saves, then pushes when push_to_hub is set
    assert [push["commit_message"] for push in pushes] == ["Model save"]


def test_model_can_be_a_clip_or_a_prompt(tmp_path, tiny_clip_dir, train_set, class_names):
    from transformers import CLIPModel, CLIPProcessor

    processor = CLIPProcessor.from_pretrained(tiny_clip_dir)
    from_clip = CMPTrainer(
        model=CLIPModel.from_pretrained(tiny_clip_dir), args=make_config(tmp_path, ctx_init="a photo of a"),
        processing_class=processor, class_names=class_names,
    )  # fmt: skip
    assert isinstance(from_clip.model, PromptTunedCLIP) and from_clip.model.prompt_config.n_ctx == 4
    again = CMPTrainer(model=from_clip.model, args=make_config(tmp_path), train_dataset=train_set)
    assert again.model is from_clip.model


def test_saved_model_loads_back(tmp_path, tiny_clip_dir, train_set):
    trainer = CMPTrainer(model=tiny_clip_dir, args=make_config(tmp_path, max_steps=2), train_dataset=train_set)
    trainer.train()
    trainer.save_model(str(tmp_path / "prompt"))
    loaded = PromptTunedCLIP.from_pretrained(tmp_path / "prompt").eval()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(loaded(pixel_values=x).logits, trainer.model.eval()(pixel_values=x).logits)


MISSING_MODEL = "/nonexistent/clip"  # errors must come before the model is loaded


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cmp_lambda": -0.1}, "cmp_lambda must be >= 0"),
        ({"cmp_form": "squared"}, "Unknown cmp_form"),
        ({"cmp_competitors": "top3"}, "Unknown cmp_competitors"),
        ({"n_ctx": 0}, "n_ctx must be >= 1"),
        ({"class_token_position": "left"}, "class_token_position"),
        ({"calibration_bins": 0}, "calibration_bins"),
    ],
)
def test_bad_config_is_rejected(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **overrides)


def test_labels_outside_the_classes_are_rejected(tmp_path, train_set, class_names):
    bad = Dataset.from_dict({"image": train_set["image"], "label": [0, 1, 2, 3] * 3 + [4, 0, 1, 2]})
    with pytest.raises(ValueError, match=r"train_dataset has labels in \[0, 4\] but there are 4 class names"):
        CMPTrainer(model=MISSING_MODEL, args=make_config(tmp_path), train_dataset=bad, class_names=class_names)


def test_bad_eval_set_is_rejected(tmp_path, train_set, class_names):
    negative = Dataset.from_dict({"image": train_set["image"][:2], "label": [-1, 0]})
    with pytest.raises(ValueError, match=r"eval_dataset\['shifted'\] has labels in \[-1, 0\]"):
        CMPTrainer(
            model=MISSING_MODEL, args=make_config(tmp_path), train_dataset=train_set,
            eval_dataset={"ok": train_set, "shifted": negative},
        )  # fmt: skip


@pytest.mark.parametrize(
    ("class_names", "message"),
    [([], "class_names is empty"), (["red", "green", "red", "blue"], "duplicate: 'red'")],
)
def test_bad_class_names_are_rejected(tmp_path, train_set, class_names, message):
    with pytest.raises(ValueError, match=message):
        CMPTrainer(model=MISSING_MODEL, args=make_config(tmp_path), train_dataset=train_set, class_names=class_names)


def test_missing_columns_are_rejected(tmp_path, train_set):
    renamed = train_set.rename_column("image", "img")
    with pytest.raises(ValueError, match=r"train_dataset has no column \['image'\] .* image_column"):
        CMPTrainer(model=MISSING_MODEL, args=make_config(tmp_path), train_dataset=renamed)
    with pytest.raises(ValueError, match=r"has no column \['target'\]"):
        CMPTrainer(model=MISSING_MODEL, args=make_config(tmp_path, label_column="target"), train_dataset=train_set)


def test_unlabelled_classes_need_names(tmp_path, train_set):
    plain = Dataset.from_dict({"image": train_set["image"], "label": np.asarray(train_set["label"]).tolist()})
    with pytest.raises(ValueError, match="is not a ClassLabel .* pass class_names"):
        CMPTrainer(model=MISSING_MODEL, args=make_config(tmp_path), train_dataset=plain)


def test_push_without_token_is_refused_before_loading_anything(tmp_path, train_set, monkeypatch):
    import cmp_hf.hub

    monkeypatch.setattr(cmp_hf.hub, "get_token", lambda: None)
    config = make_config(tmp_path, push_to_hub=True, hub_model_id="tester/x")
    with pytest.raises(HubError, match="no Hugging Face token was found"):
        CMPTrainer(model=MISSING_MODEL, args=config, train_dataset=train_set)


def test_nan_pixels_from_a_custom_collator_are_named_as_the_cause(tmp_path, tiny_clip_dir, class_names):
    """A collator of its own that passes float ``pixel_values``: a NaN image row is the cause the error names,
    not the learning rate."""
    pixels = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pixels[5] = math.nan
    dataset = Dataset.from_dict({"image": pixels.numpy(), "label": [0, 1, 2, 3] * 2})

    def collate(rows):
        return {"pixel_values": torch.tensor(np.array([row["image"] for row in rows]), dtype=torch.float32),
                "labels": torch.tensor([row["label"] for row in rows])}  # fmt: skip

    config = make_config(tmp_path, max_steps=1, per_device_train_batch_size=8)
    trainer = CMPTrainer(model=tiny_clip_dir, args=config, train_dataset=dataset, class_names=class_names,
                         data_collator=collate)  # fmt: skip
    start = trainer.model.context.detach().clone()
    with pytest.raises(FloatingPointError) as error:
        trainer.train()
    message = str(error.value)
    assert re.search(r"the batch's images hold NaN or infinite values \(rows \[\d\] of the batch\)", message)
    assert "lower learning_rate" not in message and torch.equal(trainer.model.context.detach(), start)


def test_kgcoop_with_weight_zero_is_coop_exactly(tmp_path, tiny_clip_dir, train_set):
    coop = final_context(tmp_path / "a", tiny_clip_dir, train_set, max_steps=3)
    zero = final_context(tmp_path / "b", tiny_clip_dir, train_set, max_steps=3, kgcoop_weight=0.0)
    kg = final_context(tmp_path / "c", tiny_clip_dir, train_set, max_steps=3, kgcoop_weight=8.0)
    torch.testing.assert_close(zero, coop, rtol=0, atol=0)
    assert (kg - coop).abs().max() > 1e-4  # and a positive weight does change the prompt


def test_baseline_terms_are_added_and_logged(tmp_path, tiny_clip_dir, train_set):
    config = make_config(tmp_path, max_steps=2, logging_steps=1, cmp_lambda=0.5, focal_gamma=2.0, mbls_weight=0.1,
                         mbls_margin=1.0, kgcoop_weight=3.0)  # fmt: skip
    trainer = CMPTrainer(model=tiny_clip_dir, args=config, train_dataset=train_set)
    trainer.train()
    for entry in (e for e in trainer.state.log_history if "loss" in e):
        expected = entry["focal"] + 0.5 * entry["cmp"] + 0.1 * entry["mbls"] + 3.0 * entry["kgcoop"]
        assert entry["loss"] == pytest.approx(expected, rel=1e-4)
        assert entry["kgcoop"] > 0 and entry["focal"] < entry["ce"]


def test_label_smoothing_trains_through_the_objective(tmp_path, tiny_clip_dir, train_set):
    config = make_config(tmp_path, max_steps=2, logging_steps=1, cmp_lambda=0.5, label_smoothing_factor=0.1)
    trainer = CMPTrainer(model=tiny_clip_dir, args=config, train_dataset=train_set)
    trainer.train()
    for entry in (e for e in trainer.state.log_history if "loss" in e):
        assert entry["loss"] == pytest.approx(entry["smoothed_ce"] + 0.5 * entry["cmp"], rel=1e-4)
        assert entry["smoothed_ce"] != pytest.approx(entry["ce"], rel=1e-3)


def test_temperature_scaling_on_validation_data(tmp_path, tiny_clip_dir, train_set, test_set):
    trainer = CMPTrainer(model=tiny_clip_dir, args=make_config(tmp_path, max_steps=2), train_dataset=train_set,
                         eval_dataset={"test": test_set})  # fmt: skip
    trainer.train()
    before = trainer.evaluate()["eval_test_nll"]
    t = trainer.fit_temperature(test_set)
    assert trainer.model.calibration.temperature == t != 1.0 and "temperature_fit" not in trainer.eval_reports
    assert trainer.evaluate()["eval_test_nll"] < before  # fitted on this very set: NLL can only go down
    trainer.save_model(str(tmp_path / "saved"))
    assert PromptTunedCLIP.from_pretrained(tmp_path / "saved").calibration.temperature == t


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"focal_gamma": 2.0, "label_smoothing_factor": 0.1}, "not both"), ({"mbls_weight": -1.0}, "must be >= 0"),
     ({"kgcoop_template": "a photo"}, "kgcoop_template")],
)  # fmt: skip
def test_bad_baseline_options_are_rejected(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **overrides)


def test_cocoop_trains_in_the_trainer(tmp_path, tiny_clip_dir, train_set, test_set):
    trainer = CMPTrainer(model=tiny_clip_dir, args=make_config(tmp_path, max_steps=3, prompt_learner="cocoop"),
                         train_dataset=train_set, eval_dataset={"test": test_set})  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.model.learner.meta_net.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.learner.meta_net.named_parameters())
    logits, labels = logits_of(trainer.model, trainer.processing_class, test_set)
    ece = trainer.evaluate()["eval_test_ece_pct"]
    assert ece == pytest.approx(100 * calibration_metrics(labels, logits=logits)["ece"], abs=1e-4)


def logits_of(model: PromptTunedCLIP, processor, dataset) -> np.ndarray:
    batch = CLIPImageCollator(processor.image_processor)(list(dataset))
    with torch.no_grad():
        return model.eval()(pixel_values=batch["pixel_values"]).logits.numpy(), batch["labels"].numpy()


def test_evaluation_computes_the_calibration_maths_once_per_set(
    tmp_path, tiny_clip_dir, train_set, test_set, monkeypatch
):
    calls = []
    real = cmp_hf.metrics.CalibrationAccumulator.result

    def counting(self):
        calls.append(1)
        return real(self)

    # every way to the numbers (CalibrationMetrics', the report's, the evaluation's batches) ends in result()
    monkeypatch.setattr(cmp_hf.metrics.CalibrationAccumulator, "result", counting)
    trainer = CMPTrainer(model=tiny_clip_dir, args=make_config(tmp_path), train_dataset=train_set)
    metrics = trainer.evaluate({"a": test_set, "b": train_set})
    assert len(calls) == 2  # once per eval set: its report's metrics are the returned metrics
    for name in ("a", "b"):
        assert trainer.eval_reports[name].metrics == {key: metrics[f"eval_{name}_{key}"] for key in METRIC_KEYS}
    logits, labels = logits_of(trainer.model, trainer.processing_class, test_set)
    expected = as_percent(calibration_metrics(labels, logits=logits))
    assert trainer.eval_reports["a"].metrics == pytest.approx(expected, abs=1e-4)


def test_evaluate_takes_a_dict_of_sets_and_records_each(tmp_path, tiny_clip_dir, train_set, test_set):
    trainer = CMPTrainer(model=tiny_clip_dir, args=make_config(tmp_path), train_dataset=train_set)
    metrics = trainer.evaluate({"a": test_set, "b": train_set})
    assert set(trainer.eval_reports) == {"a", "b"}
    assert metrics["eval_a_accuracy_pct"] == trainer.eval_reports["a"].metrics["accuracy_pct"]
    logits, labels = logits_of(trainer.model, trainer.processing_class, train_set)
    assert metrics["eval_b_ece_pct"] == pytest.approx(
        100 * calibration_metrics(labels, logits=logits)["ece"], abs=1e-4
    )


def test_a_single_eval_set_is_saved_in_eval_itself(tmp_path, tiny_clip_dir, train_set, test_set):
    trainer = CMPTrainer(
        model=tiny_clip_dir, args=make_config(tmp_path), train_dataset=train_set, eval_dataset=test_set
    )
    trainer.evaluate()
    trainer.save_model()
    out = tmp_path / "out"
    assert (out / "eval" / "metrics.json").exists() and (out / "eval" / "reliability.png").exists()
    assert not (out / "eval" / "eval").exists()


@pytest.mark.parametrize("learner", sorted(LEARNERS))
def test_evaluate_under_other_class_names_is_the_transferred_prompt(tmp_path, tiny_clip_dir, train_set, learner):
    """``evaluate(class_names=...)`` scores exactly what ``for_classes`` gives, and leaves the model as it was."""
    options = LEARNERS[learner].test_options
    config = make_config(tmp_path, max_steps=2, prompt_learner=learner, kgcoop_weight=1.0, **options)
    trainer = CMPTrainer(model=tiny_clip_dir, args=config, train_dataset=train_set)
    trainer.train()
    trainer.model.calibration.dac_k = 2
    novel = colour_patches(["purple", "red", "pink"], per_class=3, seed=5)
    names = ["purple", "red", "pink"]
    embedding = trainer.model.clip.text_model.embeddings.token_embedding
    metrics = trainer.evaluate({"novel": novel}, class_names=names)
    assert trainer.model.class_names == ["red", "green", "blue", "yellow"] and not embedding._forward_hooks
    logits, labels = logits_of(trainer.model.for_classes(names), trainer.processing_class, novel)
    expected = calibration_metrics(labels, logits=logits)
    assert metrics["eval_novel_ece_pct"] == pytest.approx(100 * expected["ece"], abs=1e-4)
    assert metrics["eval_novel_nll"] == pytest.approx(expected["nll"], rel=1e-5)
    assert "eval_novel_kgcoop" in metrics  # KgCoOp's term is measured against the novel classes' own prompts
    assert trainer.eval_reports["novel"].num_classes == 3


class ImageTowerLearner(CoOpLearner):
    """A learner that says its image features change with training (as MaPLe's do)."""

    name = "image_tower_test"
    caches_image_features = False


def test_the_trainer_asks_the_learner_whether_features_may_be_cached(tmp_path, tiny_clip_dir, train_set, monkeypatch):
    monkeypatch.setitem(LEARNERS, ImageTowerLearner.name, ImageTowerLearner)
    config = make_config(tmp_path, max_steps=1, prompt_learner=ImageTowerLearner.name)
    trainer = CMPTrainer(model=tiny_clip_dir, args=config, train_dataset=train_set)
    assert isinstance(trainer.data_collator, CLIPImageCollator) and trainer.input_pipeline.feature_cache is None
    assert isinstance(trainer.model.learner, ImageTowerLearner)
    trainer.train()


def test_unknown_learner_is_rejected_before_loading_anything(tmp_path):
    with pytest.raises(ValueError, match="Unknown prompt learner 'maple2'"):
        make_config(tmp_path, prompt_learner="maple2")
    with pytest.raises(ValueError, match="class_specific_context must be off"):
        make_config(tmp_path, prompt_learner="cocoop", class_specific_context=True)


def test_loss_options_come_from_the_config(tmp_path):
    config = make_config(tmp_path, cmp_lambda=0.5, focal_gamma=2.0, kgcoop_weight=3.0)
    options = config.loss_options()
    assert (options.cmp_lambda, options.focal_gamma, options.kgcoop_weight, options.cmp_form) == (
        0.5,
        2.0,
        3.0,
        "log_ratio",
    )
    assert set(LossOptions.__dataclass_fields__) <= {f.name for f in dataclasses.fields(CMPConfig)}


def test_every_config_field_is_documented_by_its_help():
    """The docstring is built from the fields' help: one text for the docs and for a recipe's --help."""
    documented = [f for f in dataclasses.fields(CMPConfig) if f"\n{f.name} (`" in CMPConfig.__doc__]
    ours = {f.name for f in dataclasses.fields(CMPConfig)} - {f.name for f in dataclasses.fields(TrainingArguments)}
    assert ours <= {f.name for f in documented}
    for f in documented:
        assert f.metadata["help"] in CMPConfig.__doc__
