import os
import shutil

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from cmp_hf import CMPConfig, CMPTrainer, PromptConfig, PromptTunedCLIP
from cmp_hf.data import (
    CLIPImageCollator,
    ImageFeatureCache,
    RandomResizedCropFlip,
    select_views,
)
from cmp_hf.data.feature_cache import FEATURES_COLUMN, MANIFEST_NAME
from cmp_hf.testing.tiny import save_tiny_clip


def prompt_model(clip_dir):
    processor = CLIPProcessor.from_pretrained(clip_dir)
    config = PromptConfig(class_names=["red", "green", "blue", "yellow"], n_ctx=4)
    model = PromptTunedCLIP.from_clip(CLIPModel.from_pretrained(clip_dir), processor.tokenizer, config)
    return model.eval(), processor


class CountingCache:
    """An ImageFeatureCache whose image-tower forwards are counted."""

    def __init__(self, clip_dir, cache_dir, **kwargs):
        self.model, processor = prompt_model(clip_dir)
        self.calls = 0
        self.model.clip.vision_model.register_forward_hook(lambda *args: setattr(self, "calls", self.calls + 1))
        self.cache = ImageFeatureCache(self.model, processor.image_processor, str(cache_dir), batch_size=8, **kwargs)


def test_cached_features_equal_the_image_forward(tiny_clip_dir, tmp_path, train_set):
    counting = CountingCache(tiny_clip_dir, tmp_path)
    cached = counting.cache.features(train_set)
    stored = np.array(cached.with_format("numpy")[FEATURES_COLUMN])
    assert stored.shape == (16, 16)  # one (D,) feature per image, projection width 16
    features = torch.from_numpy(stored)
    pixels = CLIPImageCollator(counting.cache.image_processor)(list(train_set))["pixel_values"]
    model = counting.model
    torch.testing.assert_close(features, model.image_features(pixels), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        model(image_features=features).logits, model(pixel_values=pixels).logits, atol=1e-5, rtol=0
    )


def test_second_build_reuses_the_cache(tiny_clip_dir, tmp_path, train_set):
    counting = CountingCache(tiny_clip_dir, tmp_path)
    first = counting.cache.features(train_set)
    assert counting.calls == 2  # 16 images in batches of 8
    again = CountingCache(tiny_clip_dir, tmp_path)  # a new run: new model object, same weights and data
    second = again.cache.features(train_set)
    assert again.calls == 0
    assert np.array_equal(first.with_format("numpy")[FEATURES_COLUMN], second.with_format("numpy")[FEATURES_COLUMN])


def test_model_or_data_changes_invalidate_the_cache(tiny_clip_dir, tmp_path, train_set, test_set):
    cache_dir = tmp_path / "cache"
    base = CountingCache(tiny_clip_dir, cache_dir)
    base.cache.features(train_set)
    other_clip = save_tiny_clip(str(tmp_path / "other_clip"), words=["red"], seed=1)
    changed_model = CountingCache(other_clip, cache_dir)
    changed_model.cache.features(train_set)
    assert changed_model.calls == 2
    base.calls = 0
    base.cache.features(test_set)
    assert base.calls == 2
    assert len(os.listdir(cache_dir)) == 3  # three inputs, three entries


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "drop_manifest"])
def test_damaged_cache_is_rebuilt(tiny_clip_dir, tmp_path, train_set, damage):
    counting = CountingCache(tiny_clip_dir, tmp_path / "cache")
    good = np.array(counting.cache.features(train_set).with_format("numpy")[FEATURES_COLUMN])  # a copy, not a map
    (entry,) = os.listdir(tmp_path / "cache")
    directory = tmp_path / "cache" / entry
    arrow = next(p for p in directory.iterdir() if p.suffix == ".arrow")
    if damage == "truncate":
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    elif damage == "flip_byte":
        data = bytearray(arrow.read_bytes())
        data[len(data) // 2] ^= 0xFF
        arrow.write_bytes(bytes(data))
    else:
        (directory / MANIFEST_NAME).unlink()
    again = CountingCache(tiny_clip_dir, tmp_path / "cache")
    rebuilt = np.array(again.cache.features(train_set).with_format("numpy")[FEATURES_COLUMN])
    assert again.calls == 2
    assert np.array_equal(rebuilt, good)


def test_cache_entry_replaced_by_a_file_is_rebuilt(tiny_clip_dir, tmp_path, train_set):
    counting = CountingCache(tiny_clip_dir, tmp_path / "cache")
    good = np.array(counting.cache.features(train_set).with_format("numpy")[FEATURES_COLUMN])
    (entry,) = os.listdir(tmp_path / "cache")
    shutil.rmtree(tmp_path / "cache" / entry)
    (tmp_path / "cache" / entry).write_text("not a cache entry")
    again = CountingCache(tiny_clip_dir, tmp_path / "cache")
    rebuilt = np.array(again.cache.features(train_set).with_format("numpy")[FEATURES_COLUMN])
    assert again.calls == 2 and np.array_equal(rebuilt, good)
    assert os.listdir(tmp_path / "cache") == [entry]  # a directory again, and no .tmp staging directory left
    assert (tmp_path / "cache" / entry / MANIFEST_NAME).is_file()


@pytest.mark.parametrize(
    "change", [{"size": {"shortest_edge": 48}}, {"image_mean": [0.5] * 3},
               {"image_std": [0.2] * 3}],
)  # fmt: skip
def test_changed_image_processor_misses_the_cache(tiny_clip_dir, tmp_path, train_set, change):
    base = CountingCache(tiny_clip_dir, tmp_path / "cache")
    before = np.array(base.cache.features(train_set).with_format("numpy")[FEATURES_COLUMN])
    changed = CountingCache(tiny_clip_dir, tmp_path / "cache")
    for key, value in change.items():
        setattr(changed.cache.image_processor, key, value)
    after = np.array(changed.cache.features(train_set).with_format("numpy")[FEATURES_COLUMN])
    assert changed.calls == 2 and len(os.listdir(tmp_path / "cache")) == 2  # encoded again, into a new entry
    pixels = CLIPImageCollator(changed.cache.image_processor)(list(train_set))["pixel_values"]
    torch.testing.assert_close(torch.from_numpy(after), changed.model.image_features(pixels), atol=1e-6, rtol=0)
    assert np.abs(after - before).max() > 1e-4  # the processor change does change the features


def test_augmented_views_are_distinct_and_reproducible(tiny_clip_dir, tmp_path, train_set):
    a = CountingCache(tiny_clip_dir, tmp_path / "a", seed=3).cache.features(train_set, views=3)
    b = CountingCache(tiny_clip_dir, tmp_path / "b", seed=3).cache.features(train_set, views=3)
    va, vb = (np.array(d.with_format("numpy")[FEATURES_COLUMN]) for d in (a, b))
    assert va.shape == (16, 3, 16)
    assert np.array_equal(va, vb)
    assert np.abs(va[:, 0] - va[:, 1]).max() > 1e-3
    rows = select_views(a, seed=0)
    drawn = np.stack([np.asarray(rows[0][FEATURES_COLUMN]) for _ in range(20)])
    assert drawn.shape == (20, 16)
    matches = [[np.allclose(d, va[0, k]) for k in range(3)] for d in drawn]
    assert all(sum(m) == 1 for m in matches) and len({m.index(True) for m in matches}) > 1


def test_random_resized_crop_flip():
    crop = RandomResizedCropFlip(24)
    image = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3))
    out1 = crop(image, np.random.default_rng(5))
    assert out1.size == (24, 24)
    assert np.array_equal(np.asarray(out1), np.asarray(crop(image, np.random.default_rng(5))))
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = crop.crop_box(60, 40, rng)
        assert 0 <= left < right <= 60 and 0 <= top < bottom <= 40
        area, aspect = (right - left) * (bottom - top), (right - left) / (bottom - top)
        assert 0.07 * 2400 <= area <= 2400 and 0.7 < aspect < 1.4
    # a 1-pixel-high strip cannot hold the sampled boxes: the centre-crop fallback keeps the ratio bound
    assert RandomResizedCropFlip(8).crop_box(100, 1, np.random.default_rng(0)) == (49, 0, 50, 1)


def trained(tmp_path, clip_dir, data, **overrides):
    config = CMPConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=4, max_steps=4, n_ctx=4, learning_rate=0.05, seed=11,
        image_feature_cache_dir=str(tmp_path / "cache"), **overrides,
    )  # fmt: skip
    trainer = CMPTrainer(model=clip_dir, args=config, train_dataset=data, eval_dataset={"test": data})
    trainer.train()
    return trainer


def test_cached_and_uncached_training_agree(tiny_clip_dir, tmp_path, train_set):
    cached = trained(tmp_path / "cached", tiny_clip_dir, train_set)
    plain = trained(tmp_path / "plain", tiny_clip_dir, train_set, cache_image_features=False)
    gap = (cached.model.context - plain.model.context).abs().max().item()
    print(f"cached vs uncached prompt after 4 steps: {gap:.2e}")
    assert gap <= 1e-5
    m_cached, m_plain = cached.evaluate(), plain.evaluate()
    assert m_cached["eval_test_loss"] == pytest.approx(m_plain["eval_test_loss"], abs=1e-5)
    assert m_cached["eval_test_ece_pct"] == pytest.approx(m_plain["eval_test_ece_pct"], abs=1e-3)
    # a raw image dataset handed to evaluate() later goes through the cache too
    later = cached.evaluate(train_set, metric_key_prefix="later")
    assert later["later_loss"] == pytest.approx(m_cached["eval_test_loss"], abs=1e-6)


@pytest.mark.parametrize("cache", [True, False])
def test_augmented_training_runs_on_both_paths(tiny_clip_dir, tmp_path, train_set, cache):
    trainer = trained(tmp_path, tiny_clip_dir, train_set, augment=True, augmented_views=2, cache_image_features=cache)
    assert trainer.state.global_step == 4
    if not cache:  # fresh crops: the same row differs between accesses
        first, second = trainer.train_dataset[0]["image"], trainer.train_dataset[0]["image"]
        assert not np.array_equal(np.asarray(first), np.asarray(second))


@pytest.mark.parametrize("disable_tqdm", [True, False])
def test_encoding_progress_follows_disable_tqdm(tiny_clip_dir, tmp_path, train_set, capfd, disable_tqdm):
    config = CMPConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=disable_tqdm,
                       image_feature_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    CMPTrainer(model=tiny_clip_dir, args=config, train_dataset=train_set)
    assert ("Encoding images" in capfd.readouterr().err) is not disable_tqdm


def test_writing_the_cache_shows_no_progress_bar_and_keeps_the_setting(tiny_clip_dir, tmp_path, train_set, capfd):
    """The cache file is written in a blink: no "Saving the dataset" bar, whatever datasets' setting, which is left
    as the user had it (bars on here: the encoding bar, which is the cache's own, is turned off by progress=False)."""
    datasets.enable_progress_bars()
    CountingCache(tiny_clip_dir, tmp_path, progress=False).cache.features(train_set.select([3, 1, 2, 0]))
    printed = capfd.readouterr()
    assert "Saving the dataset" not in printed.err + printed.out
    assert "Flattening the indices" not in printed.err + printed.out
    assert not datasets.utils.are_progress_bars_disabled()
