import numpy as np
import pytest
import torch
from datasets import DatasetDict
from PIL import Image
from transformers import CLIPImageProcessor

from cmp_hf.data import (
    CLIPImageCollator,
    class_names_from_features,
    colour_patches,
    load_image_dataset,
    sample_few_shot,
    to_rgb,
    write_image_folder,
)


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
    with pytest.raises(ValueError, match="fewer than shots=11"):
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
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
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
