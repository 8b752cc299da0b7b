import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer

from cmp_hf import CoOpPromptConfig, PromptTunedCLIP
from cmp_hf.posthoc import PostHocCalibration, apply_class_scales, distance_aware_scales, fit_temperature


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
    t = fit_temperature(logits, labels)
    assert t > 1.5  # over-confident logits need cooling
    nll = [F.cross_entropy(logits / s, labels).item() for s in np.linspace(0.5, 20, 400)]
    best = np.linspace(0.5, 20, 400)[int(np.argmin(nll))]
    assert t == pytest.approx(best, abs=0.05)  # brute-force grid agrees with L-BFGS
    assert F.cross_entropy(logits / t, labels) < F.cross_entropy(logits, labels)
    assert torch.equal((logits / t).argmax(1), logits.argmax(1))  # TS never changes a prediction


def test_temperature_is_saved_and_reapplied(tiny_clip_dir, tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip_dir)
    config = CoOpPromptConfig(class_names=["red", "green", "blue"], n_ctx=2)
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


def test_a_separable_set_is_flagged(caplog):
    logits = torch.tensor([[5.0, 0.0], [0.0, 4.0], [3.0, 1.0]])
    with caplog.at_level("WARNING", logger="cmp_hf.posthoc"):
        t = fit_temperature(logits, torch.tensor([0, 1, 0]))
    assert "no minimum" in caplog.text and t < 0.5  # pushed towards 0, as the NLL keeps falling
    caplog.clear()
    with caplog.at_level("WARNING", logger="cmp_hf.posthoc"):
        fit_temperature(logits, torch.tensor([0, 1, 1]))
    assert "no minimum" not in caplog.text


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
    config = CoOpPromptConfig(class_names=["red", "green", "blue"], n_ctx=2)
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
