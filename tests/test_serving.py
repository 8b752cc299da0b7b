"""Serving a prompt: class features computed once, any input form in bounded batches, transformers' pipeline."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import ROOT
from PIL import Image
from transformers import CLIPModel, CLIPProcessor, pipeline
from transformers.utils import logging as hf_logging

from cmp_hf import CalibratedCLIP, CalibratedImageClassificationPipeline, PromptConfig, PromptTunedCLIP
from cmp_hf.pipeline import TASK


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def build(tiny_clip_dir: str, class_names: list[str], learner: str = "coop") -> CalibratedCLIP:
    processor = CLIPProcessor.from_pretrained(tiny_clip_dir)
    prompt = PromptConfig(class_names=class_names, n_ctx=2, learner=learner)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = PromptTunedCLIP.from_clip(CLIPModel.from_pretrained(tiny_clip_dir), processor.tokenizer, prompt)
    return CalibratedCLIP(model, processor.image_processor)


def count_text_tower_calls(classifier: CalibratedCLIP) -> list[int]:
    """Every text-feature computation ends in the text projection: count its forwards."""
    calls = [0]
    classifier.model.clip.text_projection.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def per_call_logits(classifier: CalibratedCLIP, batch: list[Image.Image]) -> torch.Tensor:
    """What CalibratedCLIP did before: the module's forward, which encodes the class prompts at every call."""
    pixel_values = classifier.image_processor(images=batch, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return classifier.model(pixel_values=pixel_values).logits.float()


@pytest.fixture
def classifier(tiny_clip_dir, class_names) -> CalibratedCLIP:
    return build(tiny_clip_dir, class_names)


# ---- class features once -----------------------------------------------------------------------------------------


def test_class_features_are_computed_once_and_give_todays_probabilities(classifier):
    calls = count_text_tower_calls(classifier)
    first, second = images(5, seed=1), images(7, seed=2)
    proba = classifier.predict_proba(first, batch_size=8)
    after_first = calls[0]
    assert after_first > 0
    proba_2 = classifier.predict_proba(second, batch_size=3)  # three batches
    labels = classifier.predict(first)
    logits = classifier.logits(first[0])
    assert calls[0] == after_first  # no text-tower forward after the first call
    np.testing.assert_array_equal(proba, per_call_logits(classifier, first).softmax(dim=-1).numpy())
    np.testing.assert_allclose(proba_2, per_call_logits(classifier, second).softmax(dim=-1).numpy(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(labels, proba.argmax(axis=1))
    torch.testing.assert_close(logits, per_call_logits(classifier, first[:1]), rtol=0, atol=1e-5)
    assert not logits.is_inference() and logits.dtype == torch.float32  # an ordinary tensor for the caller
    assert not classifier.class_features().is_inference()  # computed within the call's inference_mode, yet kept


def test_class_features_follow_changed_weights_and_classes(classifier):
    calls = count_text_tower_calls(classifier)
    batch = images(4)
    before = classifier.predict_proba(batch)
    counted = calls[0]
    with torch.no_grad():
        classifier.model.context.add_(0.5)  # e.g. a newer prompt loaded in place
    after = classifier.predict_proba(batch)
    assert calls[0] > counted and not np.allclose(before, after)
    np.testing.assert_array_equal(after, per_call_logits(classifier, batch).softmax(dim=-1).numpy())

    other = classifier.for_classes(["green", "red"])
    np.testing.assert_array_equal(other.predict_proba(batch), per_call_logits(other, batch).softmax(dim=-1).numpy())
    assert other.class_names == ["green", "red"] and classifier.predict_proba(batch).shape == (4, 4)

    classifier.model.calibration.temperature = 2.0  # the calibration applies to logits: nothing to recompute
    counted = calls[0]
    proba = classifier.predict_proba(batch)
    assert calls[0] == counted
    np.testing.assert_array_equal(proba, per_call_logits(classifier, batch).softmax(dim=-1).numpy())

    with classifier.model.over_classes(["blue", "red", "green"]):  # another learner object, the same context
        np.testing.assert_array_equal(
            classifier.predict_proba(batch), per_call_logits(classifier, batch).softmax(dim=-1).numpy()
        )
    np.testing.assert_array_equal(classifier.predict_proba(batch), proba)  # the prompt's own classes again


def test_cocoop_encodes_class_prompts_per_batch(tiny_clip_dir, class_names):
    classifier = build(tiny_clip_dir, class_names, learner="cocoop")
    assert classifier.class_features() is None
    calls = count_text_tower_calls(classifier)
    batch = images(5)
    proba = classifier.predict_proba(batch, batch_size=2)  # 3 batches
    assert calls[0] == 3
    np.testing.assert_allclose(proba, per_call_logits(classifier, batch).softmax(dim=-1).numpy(), rtol=0, atol=1e-5)


# ---- input forms, batches, progress, dtype -----------------------------------------------------------------------


def test_every_input_form_gives_the_same_probabilities(classifier, tmp_path):
    batch = images(7)
    expected = classifier.predict_proba(batch, batch_size=7)
    pixel_values = classifier.image_processor(images=batch, return_tensors="pt")["pixel_values"]
    dataset = Dataset.from_dict({"picture": batch, "label": list(range(7))})
    classifier.image_column = "picture"
    forms = {
        "tuple": tuple(batch),
        "generator": (image for image in batch),
        "pixel_values": pixel_values,
        "dataset": dataset,
        "iterable_dataset": dataset.to_iterable_dataset(),
        "arrays": [np.asarray(image) for image in batch],
    }
    for name, form in forms.items():
        np.testing.assert_allclose(classifier.predict_proba(form, batch_size=3), expected, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(classifier.predict_proba(batch[0]), expected[:1], atol=1e-5)


@pytest.mark.parametrize(
    "images_, options, message",
    [
        (Dataset.from_dict({"pixels": [0]}), {}, r"no 'image' column \(its columns: \['pixels'\]\).*image_column="),
        (iter([]), {}, "No images given"),
        (Dataset.from_dict({"image": []}), {}, "No images given"),
        ([np.zeros((32, 32, 3), np.uint8)], {"batch_size": 0}, "batch_size must be a positive integer"),
        (42, {}, "Cannot read images from a int"),
    ],
)
def test_bad_input_forms_are_named_before_any_forward(classifier, images_, options, message):
    calls = count_text_tower_calls(classifier)
    with pytest.raises((ValueError, TypeError), match=message):
        classifier.predict_proba(images_, **options)
    assert calls[0] == 0


def test_progress_bar_follows_the_switches(classifier, capsys):
    batch = images(6)
    classifier.predict_proba(batch, batch_size=2, progress=True)
    assert "Classifying" in capsys.readouterr().err
    classifier.predict_proba(batch, batch_size=2)  # short: the bar waits PROGRESS_DELAY_S before it shows
    classifier.predict_proba(batch, batch_size=8, progress=False)
    assert "Classifying" not in capsys.readouterr().err
    hf_logging.disable_progress_bar()
    try:
        classifier.predict_proba(batch, batch_size=2, progress=True)
    finally:
        hf_logging.enable_progress_bar()
    assert "Classifying" not in capsys.readouterr().err


def test_work_runs_under_inference_mode_and_bfloat16_autocast(tiny_clip_dir, class_names):
    classifier = build(tiny_clip_dir, class_names)
    modes = []
    classifier.model.clip.vision_model.register_forward_hook(
        lambda *_: modes.append((torch.is_inference_mode_enabled(), torch.get_autocast_dtype("cpu"),
                                 torch.is_autocast_enabled("cpu")))
    )  # fmt: skip
    batch = images(4)
    full = classifier.predict_proba(batch)
    half = CalibratedCLIP(classifier.model, classifier.image_processor, dtype=torch.bfloat16)
    low = half.predict_proba(batch)
    assert modes[0] == (True, torch.bfloat16, False) and modes[-1] == (True, torch.bfloat16, True)
    assert half.class_features().dtype == torch.bfloat16 and low.dtype == np.float32
    np.testing.assert_allclose(low, full, atol=0.05)
    np.testing.assert_array_equal(low.sum(axis=1).round(4), np.ones(4, np.float32))
    with pytest.raises(ValueError, match="dtype must be torch.bfloat16, torch.float16 or None"):
        CalibratedCLIP(classifier.model, classifier.image_processor, dtype=torch.float64)


MEMORY = textwrap.dedent(
    """
    import resource, sys
    import numpy as np, torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor
    from cmp_hf import CalibratedCLIP, PromptConfig, PromptTunedCLIP

    clip_dir, batch_size = sys.argv[1], int(sys.argv[2])
    processor = CLIPProcessor.from_pretrained(clip_dir)
    prompt = PromptConfig(class_names=["cat", "dog", "bird", "fish"], n_ctx=4)
    model = PromptTunedCLIP.from_clip(CLIPModel.from_pretrained(clip_dir), processor.tokenizer, prompt)
    classifier = CalibratedCLIP(model, processor.image_processor)

    def stream(n):  # images made as they are read: the input itself holds no memory
        rng = np.random.default_rng(0)
        return (Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(n))

    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for n in (100, 100, 2000):  # the first call also builds what every call reuses (class features, buffers)
        assert classifier.predict_proba(stream(n), batch_size=batch_size).shape == (n, 4)
        print(n, peak())
    """
)


def test_peak_memory_does_not_grow_with_the_number_of_images():
    """Peak RSS of a fresh process after a (second) call on 100 images and after one on 2,000 (all in one batch,
    as CalibratedCLIP did, the second adds ~800 MB). glibc's malloc is pinned (one thread, one arena, a fixed mmap
    threshold, so freed large blocks go back to the system): otherwise RSS depends on the order of earlier
    allocations by up to ~20 MB, whatever the input."""
    batch_size = 50
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.update(MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(
        [sys.executable, "-c", MEMORY, str(ROOT / "model_cards" / "micro-clip"), str(batch_size)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = dict(map(int, line.split()) for line in result.stdout.split("\n") if line)  # the second 100 kept
    one_batch = batch_size * 3 * 32 * 32 * 4  # bytes of one batch of pixel_values (the old path held 2000 at once)
    assert peaks[2000] - peaks[100] < one_batch, peaks


# ---- transformers' pipeline --------------------------------------------------------------------------------------


@pytest.fixture
def saved_prompt(classifier, tmp_path) -> str:
    classifier.model.calibration.temperature = 0.5  # the pipeline's scores must be the calibrated ones
    classifier.model.save_pretrained(tmp_path / "prompt")
    return str(tmp_path / "prompt")


def test_pipeline_from_a_prompt_directory_gives_calibrated_top_k(saved_prompt, tmp_path):
    classify = pipeline(TASK, model=saved_prompt, device="cpu")
    assert isinstance(classify, CalibratedImageClassificationPipeline)
    loaded = CalibratedCLIP.from_pretrained(saved_prompt)
    assert loaded.calibration.temperature == 0.5
    batch = images(5)
    proba = loaded.predict_proba(batch)
    one = classify(batch[0], top_k=2)
    assert [entry["label"] for entry in one] == [loaded.class_names[i] for i in np.argsort(-proba[0])[:2]]
    np.testing.assert_allclose([entry["score"] for entry in one], np.sort(proba[0])[::-1][:2], rtol=0, atol=1e-5)
    many = classify(batch, batch_size=2)  # default top_k 5 > 4 classes: all of them
    assert len(many) == 5 and all(len(result) == 4 for result in many)
    for result, row in zip(many, proba, strict=True):
        assert {entry["label"]: entry["score"] for entry in result} == pytest.approx(
            dict(zip(loaded.class_names, row.tolist(), strict=True)), abs=1e-5
        )
    batch[1].save(tmp_path / "image.png")
    assert classify(str(tmp_path / "image.png"), top_k=1)[0]["label"] == many[1][0]["label"]


def test_pipeline_takes_a_ready_classifier_and_checks_its_arguments(classifier):
    classify = pipeline(TASK, model=classifier, device="cpu")
    calls = count_text_tower_calls(classifier)
    batch = images(3)
    results = [classify(image, top_k=1)[0] for image in batch]
    assert calls[0] <= 1  # the class features of the classifier, computed at most once for every call
    proba = classifier.predict_proba(batch)
    assert [result["label"] for result in results] == [classifier.class_names[i] for i in proba.argmax(axis=1)]
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        classify(batch[0], top_k=0)
    with pytest.raises(TypeError, match="takes a CalibratedCLIP"):
        CalibratedImageClassificationPipeline(model=classifier.model, task=TASK)
