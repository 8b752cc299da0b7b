import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPModel, CLIPTokenizer

from cmp_hf import CalibratedCLIP, PromptConfig, PromptTunedCLIP, calibration_metrics
from cmp_hf.posthoc import (
    TEMPERATURE_PRIOR_STD,
    PostHocCalibration,
    apply_class_scales,
    distance_aware_scales,
    fit_temperature,
    proximity,
)


def overconfident(seed: int = 0, n: int = 400, classes: int = 5, scale: float = 8.0):
    """Logits that are right 60 % of the time but confident far beyond that."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes))
    predicted = np.where(rng.random(n) < 0.6, labels, rng.integers(0, classes, n))
    logits[np.arange(n), predicted] += 2.0
    return torch.tensor(logits * scale), torch.tensor(labels)


def test_temperature_reduces_nll_and_is_the_minimum():
    logits, labels = overconfident()
    t = fit_temperature(logits, labels, prior_std=None)  # maximum likelihood (Guo et al.)
    assert t > 1.5  # over-confident logits need cooling
    nll = [F.cross_entropy(logits / s, labels).item() for s in np.linspace(0.5, 20, 400)]
    best = np.linspace(0.5, 20, 400)[int(np.argmin(nll))]
    assert t == pytest.approx(best, abs=0.05)  # brute-force grid agrees with L-BFGS
    assert F.cross_entropy(logits / t, labels) < F.cross_entropy(logits, labels)
    assert torch.equal((logits / t).argmax(1), logits.argmax(1))  # TS never changes a prediction


def test_temperature_is_saved_and_reapplied(tiny_clip_dir, tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip_dir)
    config = PromptConfig(class_names=["red", "green", "blue"], n_ctx=2)
    model = PromptTunedCLIP.from_clip(CLIPModel.from_pretrained(tiny_clip_dir), tokenizer, config).eval()
    x = torch.randn(4, 3, 32, 32)
    raw = model(pixel_values=x).logits
    model.calibration.temperature = 2.5
    torch.testing.assert_close(model(pixel_values=x).logits, raw / 2.5)
    model.save_pretrained(tmp_path)
    loaded = PromptTunedCLIP.from_pretrained(tmp_path).eval()
    assert loaded.calibration.temperature == 2.5
    torch.testing.assert_close(loaded(pixel_values=x).logits, model(pixel_values=x).logits, rtol=0, atol=0)
    assert loaded.for_classes(["pink"]).calibration.temperature == 2.5  # a transferred context keeps its calibration
    model.calibration.temperature = 1.0
    model.save_pretrained(tmp_path)  # re-saving an uncalibrated prompt removes the stale calibration file
    assert (
        not (tmp_path / "calibration.json").exists()
        and PromptTunedCLIP.from_pretrained(tmp_path).calibration.temperature == 1
    )


def test_a_fully_correct_validation_set_keeps_t_1(caplog):
    """Four validation images per class, all classified correctly, from an over-confident prompt: maximum likelihood
    would run T towards 0 (sharper, worse); the fit keeps T = 1 and says why, so test ECE is no worse than no TS."""
    logits, labels = overconfident(seed=3, n=2000)
    rows = np.flatnonzero((logits.argmax(1) == labels).numpy())
    per_class = [rows[labels[rows].numpy() == c][:4] for c in range(5)]
    val = torch.as_tensor(np.concatenate(per_class))
    with caplog.at_level("INFO", logger="cmp_hf.posthoc"):
        t = fit_temperature(logits[val], labels[val])
    assert t == 1.0 and "classified correctly" in caplog.text
    test = torch.as_tensor(np.setdiff1d(np.arange(2000), val.numpy()))
    no_ts = calibration_metrics(labels[test].numpy(), logits=logits[test].numpy())["ece"]
    with_ts = calibration_metrics(labels[test].numpy(), logits=(logits[test] / t).numpy())["ece"]
    assert with_ts <= no_ts
    unguarded = _nll_minimiser(logits[val], labels[val], prior_std=None)  # what an unguarded fit would do
    assert (
        unguarded < 0.3
        and calibration_metrics(labels[test].numpy(), logits=(logits[test] / unguarded).numpy())["ece"] > no_ts
    )


def _nll_minimiser(logits: torch.Tensor, labels: torch.Tensor, prior_std: float | None) -> float:
    """Brute force over a grid of log T: summed NLL plus the Gaussian prior on log T."""
    grid = np.linspace(-4, 4, 8001)
    losses = [
        F.cross_entropy(logits.double() / np.exp(g), labels, reduction="sum").item()
        + (0 if prior_std is None else 0.5 * (g / prior_std) ** 2)
        for g in grid
    ]
    return float(np.exp(grid[int(np.argmin(losses))]))


@pytest.mark.parametrize("n", [12, 400])
def test_the_prior_on_log_t_is_a_map_fit(n):
    """With a few errors, the fit is the maximum of likelihood x prior (brute force); the prior pulls a small set's
    T towards 1 and matters little for a large one."""
    logits, labels = overconfident(seed=5, n=n)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(_nll_minimiser(logits, labels, prior_std=TEMPERATURE_PRIOR_STD), rel=2e-3)
    t_mle = fit_temperature(logits, labels, prior_std=None)
    assert t_mle == pytest.approx(_nll_minimiser(logits, labels, prior_std=None), rel=2e-3)
    assert abs(np.log(t)) < abs(np.log(t_mle))


def test_empty_set_is_refused():
    with pytest.raises(ValueError, match="at least one labelled example"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_distance_aware_scales_hand_computed():
    base_zs = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    base_ft = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    classes_zs = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    classes_ft = torch.tensor([[0.0, 3.0], [2.0, 0.01]])  # the second class sits on a base class once tuned
    scales = distance_aware_scales(base_zs, classes_zs, base_ft, classes_ft, k=1)
    # class 0: nearest base distance 1 (zero-shot) and 3 (tuned) -> exp(-3) / exp(-1)
    assert scales[0].item() == pytest.approx(np.exp(-3) / np.exp(-1), rel=1e-6)
    assert scales[1].item() == 1.0  # within 0.05 of a base class: left alone
    k2 = distance_aware_scales(base_zs, classes_zs, base_ft, classes_ft, k=2)
    d_zs, d_ft = (1 + np.sqrt(2)) / 2, (3 + np.sqrt(13)) / 2
    assert k2[0].item() == pytest.approx(np.exp(-d_ft) / np.exp(-d_zs), rel=1e-6)


def test_class_scales_never_change_the_prediction():
    logits, _ = overconfident(seed=4)
    scales = torch.rand(logits.shape[1]) + 0.05
    scaled = apply_class_scales(logits, scales)
    assert torch.equal(scaled.argmax(1), logits.argmax(1))
    predicted = logits.argmax(1)
    torch.testing.assert_close(scaled, logits * scales[predicted][:, None])


def test_dac_applies_on_transfer_and_is_saved(tiny_clip_dir, tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip_dir)
    config = PromptConfig(class_names=["red", "green", "blue"], n_ctx=2)
    model = PromptTunedCLIP.from_clip(CLIPModel.from_pretrained(tiny_clip_dir), tokenizer, config).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        model.context.normal_(0, 1)
    model.calibration.dac_k = 2
    other = model.for_classes(["red", "pink", "cyan"])  # one base class among new ones
    scales = other.calibration.class_scales
    assert scales[0].item() == 1.0 and (scales[1:] != 1.0).all()
    x = torch.randn(6, 3, 32, 32)
    plain = model.for_classes(["red", "pink", "cyan"])
    plain.calibration = PostHocCalibration()
    torch.testing.assert_close(other(pixel_values=x).logits, apply_class_scales(plain(pixel_values=x).logits, scales))
    model.save_pretrained(tmp_path)
    assert PromptTunedCLIP.from_pretrained(tmp_path).calibration.dac_k == 2


def _unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_shift_temperature_against_a_loop():
    """exp(gamma * (median - p) / std), p = mean of the k largest cosine similarities to the reference images, and
    median / std over the reference images' leave-one-out proximities: recomputed with Python loops."""
    reference, images = _unit(30, 8, 0), _unit(7, 8, 1)
    calibration = PostHocCalibration(shift_strength=0.4, shift_neighbours=3, reference_features=reference)

    def near(x, others):
        return float(np.mean(sorted(float(x @ o) for o in others)[-3:]))

    own = [near(reference[i], [reference[j] for j in range(30) if j != i]) for i in range(30)]
    median, std = sorted(own)[14], float(np.std(own, ddof=1))  # torch.median: the lower middle value
    expected = [np.exp(0.4 * (median - near(x, reference)) / std) for x in images]
    expected = torch.tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(calibration.image_temperatures(images), expected, rtol=1e-5, atol=0)
    assert calibration.image_temperatures(reference[:3]).max() < calibration.image_temperatures(-reference[:3]).min()
    torch.testing.assert_close(proximity(images, reference, 30), (images @ reference.t()).mean(1))


def test_anchoring_is_the_probability_mixture():
    logits, zero_shot = torch.randn(6, 4) * 5, torch.randn(6, 4) * 5
    reference, images = _unit(20, 8, 2), _unit(6, 8, 3)
    calibration = PostHocCalibration(
        temperature=1.3, shift_strength=0.5, zero_shot_weight=0.3, transfer_zero_shot_weight=0.6,
        reference_features=reference,
    )  # fmt: skip
    t = calibration.image_temperatures(images)[:, None]
    mixture = 0.7 * (logits / 1.3 / t).softmax(1) + 0.3 * (zero_shot / t).softmax(1)
    torch.testing.assert_close(calibration.apply(logits, images, zero_shot).softmax(1), mixture)
    moved = calibration.to_new_classes()  # other classes: the transfer weight, no shift-aware temperature
    assert not moved.shifts and moved.anchor_weight == 0.6
    mixture = 0.4 * (logits / 1.3).softmax(1) + 0.6 * zero_shot.softmax(1)
    torch.testing.assert_close(moved.apply(logits, images, zero_shot).softmax(1), mixture)
    with pytest.raises(ValueError, match="zero-shot CLIP's logits"):
        calibration.apply(logits, images)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        PostHocCalibration(zero_shot_weight=1.0)


def test_shift_aware_anchored_calibration_is_saved_and_reapplied(tiny_clip_dir, tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip_dir)
    config = PromptConfig(class_names=["red", "green", "blue"], n_ctx=2, ctx_init="a photo of")
    model = PromptTunedCLIP.from_clip(CLIPModel.from_pretrained(tiny_clip_dir), tokenizer, config).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        raw, features = model(pixel_values=x).logits, model.image_features(x)
        zero_shot = model.clip.logit_scale.exp() * features @ model.hand_crafted_text_features().t()
    model.calibration = PostHocCalibration(
        shift_strength=0.3, zero_shot_weight=0.25, transfer_zero_shot_weight=0.5, reference_features=_unit(9, 16, 4)
    )
    with torch.no_grad():
        calibrated = model(pixel_values=x).logits
    torch.testing.assert_close(calibrated, model.calibration.apply(raw, features, zero_shot))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "calibration.safetensors").is_file()
    loaded = PromptTunedCLIP.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, calibrated, rtol=0, atol=0)
    served = CalibratedCLIP.from_pretrained(tmp_path)  # the serving path: cached class features, batches of 2
    np.testing.assert_allclose(served.predict_proba(x, batch_size=2), calibrated.softmax(1).numpy(), atol=1e-5)
    with torch.no_grad():
        other = loaded.for_classes(["pink", "cyan"])
        plain = model.for_classes(["pink", "cyan"])
        plain.calibration = PostHocCalibration()
        zero_shot = model.clip.logit_scale.exp() * features @ plain.hand_crafted_text_features().t()
        expected = 0.5 * plain(pixel_values=x).logits.softmax(1) + 0.5 * zero_shot.softmax(1)
        torch.testing.assert_close(other(pixel_values=x).logits.softmax(1), expected)
    save_file({"reference_features": _unit(9, 16, 5)}, tmp_path / "calibration.safetensors")  # other features
    with pytest.raises(ValueError, match="do not match the digest"):
        PromptTunedCLIP.from_pretrained(tmp_path)
    (tmp_path / "calibration.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="calibration.safetensors"):
        PromptTunedCLIP.from_pretrained(tmp_path)
    model.calibration = PostHocCalibration()
    model.save_pretrained(tmp_path)  # an uncalibrated prompt leaves neither file behind
    assert not (tmp_path / "calibration.json").exists() and not (tmp_path / "calibration.safetensors").exists()
