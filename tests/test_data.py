import numpy as np
import pytest
import torch
from datasets import DatasetDict
from PIL import Image
from transformers import CLIPImageProcessorPil

from cmp_hf.data import (
    CLIPImageCollator,
    FewShotSplit,
    base_novel_classes,
    class_names_from_features,
    few_shot_sets,
    few_shot_split,
    load_image_dataset,
    sample_few_shot,
    subset_classes,
    to_rgb,
)
from cmp_hf.testing.synthetic import colour_patches, write_image_folder


def test_colour_patches_are_deterministic_and_balanced():
    a = colour_patches(["red", "blue", "green"], per_class=5, seed=3)
    b = colour_patches(["red", "blue", "green"], per_class=5, seed=3)
    assert np.array_equal(np.asarray(a[7]["image"]), np.asarray(b[7]["image"]))
    assert np.bincount(a["label"]).tolist() == [5, 5, 5]
    assert class_names_from_features(a, "label") == ["red", "blue", "green"]
    with pytest.raises(ValueError, match=r"No colour for \['mauve'\]"):
        colour_patches(["mauve"], per_class=1)


def test_few_shot_sampling_is_seeded_and_balanced():
    data = colour_patches(["red", "blue", "green", "yellow"], per_class=10, seed=0)
    first = sample_few_shot(data, shots=3, seed=1)
    assert np.bincount(first["label"]).tolist() == [3, 3, 3, 3]
    again = sample_few_shot(data, shots=3, seed=1)
    other = sample_few_shot(data, shots=3, seed=2)
    first_images = [np.asarray(im).tobytes() for im in first["image"]]
    assert first_images == [np.asarray(im).tobytes() for im in again["image"]]
    assert first_images != [np.asarray(im).tobytes() for im in other["image"]]
    with pytest.raises(ValueError, match="Class 0 has 10 rows, fewer than shots \\+ validation shots = 11 \\+ 0"):
        sample_few_shot(data, shots=11)


def test_image_folder_and_saved_dataset_load_the_same(tmp_path):
    data = colour_patches(["red", "blue"], per_class=3, seed=0)
    write_image_folder(data, str(tmp_path / "folder"), "train")
    from_folder = load_image_dataset(str(tmp_path / "folder"))
    assert class_names_from_features(from_folder["train"], "label") == ["blue", "red"]  # folders sort by name
    DatasetDict({"train": data}).save_to_disk(str(tmp_path / "saved"))
    saved = load_image_dataset(str(tmp_path / "saved"))
    assert saved["train"].num_rows == 6 and class_names_from_features(saved["train"], "label") == ["red", "blue"]
    data.save_to_disk(str(tmp_path / "single"))
    with pytest.raises(ValueError, match="single saved Dataset"):
        load_image_dataset(str(tmp_path / "single"))


def test_collator_handles_grey_arrays_and_pil():
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    collator = CLIPImageCollator(processor)
    rows = [
        {"image": np.zeros((8, 8), dtype=np.uint8), "label": 1},
        {"image": Image.new("L", (40, 30), 200), "label": 0},
        {"image": Image.new("RGB", (20, 20), (255, 0, 0)), "label": 2},
    ]
    batch = collator(rows)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["labels"].tolist() == [1, 0, 2] and batch["labels"].dtype == torch.long
    grey = np.asarray(to_rgb(np.full((4, 4), 77, dtype=np.uint8)))
    assert grey.shape == (4, 4, 3) and (grey == 77).all()  # grey input is replicated to three channels


def test_few_shot_split_is_seeded_balanced_and_disjoint():
    labels = np.repeat(np.arange(5), 12)
    train, val = few_shot_split(labels, shots=8, seed=3)
    assert np.bincount(labels[train]).tolist() == [8] * 5 and np.bincount(labels[val]).tolist() == [4] * 5  # min(k, 4)
    assert not set(train) & set(val)
    assert (train, val) == few_shot_split(labels, shots=8, seed=3)
    assert train != few_shot_split(labels, shots=8, seed=4)[0]
    assert np.bincount(labels[few_shot_split(labels, shots=2, seed=0)[1]]).tolist() == [2] * 5
    with pytest.raises(ValueError, match="fewer than shots \\+ validation shots = 10 \\+ 4"):
        few_shot_split(labels, shots=10, seed=0)


def test_few_shot_sets_are_saved_and_reused(tmp_path):
    pool = colour_patches(["red", "blue", "green"], per_class=8, seed=0)
    train, val = few_shot_sets(pool, shots=2, seed=5, run_dir=str(tmp_path))
    saved = FewShotSplit.load(str(tmp_path))
    assert saved.train == sorted(saved.train) and len(saved.train) == 6 and len(saved.val) == 6
    saved.train = saved.train[::-1][:6]  # a run dir holds the split of that run: it is read back, not redrawn
    saved.save(str(tmp_path))
    again, _ = few_shot_sets(pool, shots=2, seed=5, run_dir=str(tmp_path))
    assert [np.asarray(im).tobytes() for im in again["image"]] == [
        np.asarray(pool[i]["image"]).tobytes() for i in saved.train
    ]
    other, _ = few_shot_sets(pool, shots=2, seed=6, run_dir=str(tmp_path))  # another seed: a new split
    assert FewShotSplit.load(str(tmp_path)).seed == 6 and len(other) == 6
    assert len(train) == 6 and len(val) == 6


def test_base_to_novel_split_is_disjoint_and_relabelled():
    assert base_novel_classes(5) == ([0, 1, 2], [3, 4])
    data = colour_patches(["red", "blue", "green", "yellow", "pink"], per_class=2, seed=0)
    base, novel = base_novel_classes(5)
    base_set, novel_set = subset_classes(data, base), subset_classes(data, novel)
    assert base_set.features["label"].names == ["red", "blue", "green"]
    assert novel_set.features["label"].names == ["yellow", "pink"]
    assert sorted(set(novel_set["label"])) == [0, 1] and len(base_set) + len(novel_set) == len(data)
    assert np.array_equal(np.asarray(novel_set[0]["image"]), np.asarray(data[6]["image"]))  # first yellow row
