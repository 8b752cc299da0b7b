"""The named recipes (``CMPConfig(preset=...)``) and the post-hoc steps a trainer fits at the end of training."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmp_hf import CMPConfig, CMPTrainer, calibration_metrics
from cmp_hf.constants import PRESETS
from cmp_hf.data import CLIPImageCollator
from cmp_hf.posthoc import fit_temperature


def make_config(tmp_path, **overrides) -> CMPConfig:
    values = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no", n_ctx=2,
                  ctx_init="a photo of", per_device_train_batch_size=4, learning_rate=0.05, seed=3, max_steps=3,
                  disable_tqdm=True)  # fmt: skip
    values.update(overrides)
    return CMPConfig(**values)


def test_the_calibrated_preset_sets_its_options(tmp_path):
    config = make_config(tmp_path, preset="calibrated")
    assert {name: getattr(config, name) for name in PRESETS["calibrated"]} == PRESETS["calibrated"]
    assert config.posthoc_requested
    same = make_config(tmp_path, preset="calibrated", **PRESETS["calibrated"])  # the preset's own values: fine
    assert same.shift_strength == config.shift_strength
    name, value = next((n, v) for n, v in PRESETS["calibrated"].items() if v)
    with pytest.raises(ValueError, match=f"preset 'calibrated' sets {name}="):
        make_config(tmp_path, preset="calibrated", **{name: value * 2 + 0.1})
    with pytest.raises(ValueError, match="Unknown preset 'calibratd'"):
        make_config(tmp_path, preset="calibratd")
    assert not make_config(tmp_path).posthoc_requested


def test_training_ends_by_fitting_the_posthoc_calibration(tmp_path, tiny_clip_dir, train_set, test_set):
    """After train(): the reference features are the training images' own (encoded here through the processor, not
    the feature cache), and evaluate() reports the metrics of the anchored, shift-aware probabilities."""
    args = make_config(tmp_path, shift_strength=0.4, zero_shot_weight=0.3, transfer_zero_shot_weight=0.6,
                       augment=True, augmented_views=2)  # fmt: skip
    trainer = CMPTrainer(model=tiny_clip_dir, args=args, train_dataset=train_set)
    trainer.train()
    model, calibration = trainer.model.eval(), trainer.model.calibration
    collate = CLIPImageCollator(trainer.processing_class.image_processor)
    with torch.no_grad():
        train_features = model.image_features(collate(list(train_set))["pixel_values"])
        torch.testing.assert_close(calibration.reference_features, train_features, rtol=0, atol=1e-5)
        batch = collate(list(test_set))
        features = model.image_features(batch["pixel_values"])
        scale = model.clip.logit_scale.exp()
        tuned = scale * features @ model.text_features().t()
        zero_shot = scale * features @ model.hand_crafted_text_features().t()
    # brute force: the proximity of each test image to the training images, against theirs to each other
    similarity = (features @ train_features.t()).numpy()
    own = (train_features @ train_features.t()).numpy()
    np.fill_diagonal(own, -np.inf)
    near = np.sort(similarity, axis=1)[:, -5:].mean(1)
    own_near = np.sort(own, axis=1)[:, -5:].mean(1)
    t = np.exp(0.4 * (np.sort(own_near)[(len(own_near) - 1) // 2] - near) / own_near.std(ddof=1))[:, None]
    t = torch.tensor(t, dtype=tuned.dtype)
    p = 0.7 * F.softmax(tuned / t, 1) + 0.3 * F.softmax(zero_shot / t, 1)
    expected = calibration_metrics(batch["labels"].numpy(), probs=p.numpy())
    metrics = trainer.evaluate({"test": test_set})
    assert metrics["eval_test_ece_pct"] == pytest.approx(100 * expected["ece"], abs=1e-3)
    assert metrics["eval_test_nll"] == pytest.approx(expected["nll"], rel=1e-4)
    trainer.save_model()
    assert (tmp_path / "out" / "calibration.safetensors").is_file()


def test_temperature_scaling_needs_held_out_images(tmp_path, tiny_clip_dir, train_set):
    with pytest.raises(ValueError, match="pass calibration_dataset="):
        CMPTrainer(model=tiny_clip_dir, args=make_config(tmp_path, preset="calibrated"), train_dataset=train_set)


def test_the_preset_fits_t_on_the_held_out_set_and_gates_anchoring_on_zero_shot_accuracy(
    tmp_path, tiny_clip_dir, train_set, test_set, caplog
):
    """T is the fit on the held-out set's raw logits; the anchoring weight is kept only when zero-shot CLIP's
    accuracy on the training images (recomputed here from the processor's pixels) reaches the threshold."""
    collate = None
    options = {**PRESETS["calibrated"]}
    for threshold, kept in ((0.1, True), (0.99, False)):  # zero-shot gets 31 % of these training images right
        options["zero_shot_min_accuracy"] = threshold
        args = make_config(tmp_path / str(threshold), **options)
        trainer = CMPTrainer(model=tiny_clip_dir, args=args, train_dataset=train_set, calibration_dataset=test_set)
        with caplog.at_level("INFO", logger="cmp_hf.trainer_posthoc"):
            trainer.train()
        model, calibration = trainer.model.eval(), trainer.model.calibration
        collate = collate or CLIPImageCollator(trainer.processing_class.image_processor)
        held_out, train = collate(list(test_set)), collate(list(train_set))
        with torch.no_grad():
            features = model.image_features(held_out["pixel_values"])
            raw = model.clip.logit_scale.exp() * features @ model.text_features().t()
            zero_shot = model.image_features(train["pixel_values"]) @ model.hand_crafted_text_features().t()
        assert calibration.temperature == pytest.approx(fit_temperature(raw, held_out["labels"]), rel=1e-6)
        accuracy = (zero_shot.argmax(1) == train["labels"]).float().mean().item()
        text = model.hand_crafted_text_features()
        assert trainer._zero_shot_accuracy(calibration.reference_features, text) == pytest.approx(accuracy)
        expected = PRESETS["calibrated"]["transfer_zero_shot_weight"] if kept else 0.0
        assert calibration.transfer_zero_shot_weight == expected and calibration.zero_shot_weight == 0.0
        assert ("Zero-shot anchoring off" in caplog.text) == (not kept)
        assert calibration.shift_strength == PRESETS["calibrated"]["shift_strength"]


@pytest.mark.parametrize(
    "overrides, message",
    [({"zero_shot_weight": 1.5}, r"zero_shot_weight must be in \[0, 1\)"),
     ({"shift_strength": -1.0}, "shift_strength must be >= 0"),
     ({"shift_neighbours": 0}, "shift_neighbours >= 1"),
     ({"zero_shot_min_accuracy": 2.0}, r"zero_shot_min_accuracy is a fraction .* in \[0, 1\]")],
)  # fmt: skip
def test_bad_posthoc_options_are_refused_before_training(tmp_path, overrides, message):
    """Post-hoc options are only used after training: a bad one must fail when the config is built, not then."""
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **overrides)
