import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer

from cmp_hf import CoOpPromptConfig, PromptTunedCLIP
from cmp_hf.posthoc import fit_temperature


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
    model.temperature = 2.5
    torch.testing.assert_close(model(pixel_values=x).logits, raw / 2.5)
    model.save_pretrained(tmp_path)
    loaded = PromptTunedCLIP.from_pretrained(tmp_path).eval()
    assert loaded.temperature == 2.5
    torch.testing.assert_close(loaded(pixel_values=x).logits, model(pixel_values=x).logits, rtol=0, atol=0)
    assert loaded.for_classes(["pink"]).temperature == 2.5  # a transferred context keeps its calibration
    model.temperature = 1.0
    model.save_pretrained(tmp_path)  # re-saving an uncalibrated prompt removes the stale calibration file
    assert not (tmp_path / "calibration.json").exists() and PromptTunedCLIP.from_pretrained(tmp_path).temperature == 1


def test_empty_set_is_refused():
    with pytest.raises(ValueError, match="at least one labelled example"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
