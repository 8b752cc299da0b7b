"""Colour patches: a tiny image-classification set drawn from a seed, for smoke runs and tests without downloads.

Each image is a square of the class colour at a random place and size on a noisy grey background. It carries no
meaning for a pretrained CLIP; it exists so that the full pipeline (image folder, collator, trainer, metrics) runs
offline in seconds.
"""

from __future__ import annotations

import os

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image

from ..data.feature_cache import features_dataset

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 50, 180),
    "orange": (240, 140, 30),
    "cyan": (40, 200, 210),
    "pink": (240, 130, 190),
}


def colour_patches(class_names: list[str], per_class: int, image_size: int = 32, seed: int = 0) -> Dataset:
    """``per_class`` images of each colour in ``class_names`` (keys of ``PALETTE``), label = position in the list."""
    unknown = [name for name in class_names if name not in PALETTE]
    if unknown:
        raise ValueError(f"No colour for {unknown}: choose from {sorted(PALETTE)}.")
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(class_names):
        for _ in range(per_class):
            image = rng.normal(128, 30, size=(image_size, image_size, 3))
            side = int(rng.integers(image_size // 3, image_size * 2 // 3 + 1))
            top, left = rng.integers(0, image_size - side + 1, size=2)
            image[top : top + side, left : left + side] = np.array(PALETTE[name]) + rng.normal(0, 12, size=3)
            images.append(np.clip(image, 0, 255).astype(np.uint8))
            labels.append(label)
    features = Features({"image": Image(), "label": ClassLabel(names=list(class_names))})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


def random_features(num_rows: int, width: int, num_classes: int, seed: int = 0) -> Dataset:
    """``num_rows`` random unit-norm image features and random labels, stored as the feature cache stores them: an
    eval set at any scale without encoding images (benchmarks of the evaluation, tests of the trainer's maths)."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((num_rows, width)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return features_dataset(features, rng.integers(0, num_classes, num_rows))


def write_image_folder(dataset: Dataset, directory: str, split: str) -> None:
    """Save as ``directory/split/<class name>/<i>.png``, the layout ``load_dataset("imagefolder")`` reads."""
    names = dataset.features["label"].names
    for i, row in enumerate(dataset):
        class_dir = os.path.join(directory, split, names[row["label"]])
        os.makedirs(class_dir, exist_ok=True)
        row["image"].save(os.path.join(class_dir, f"{i:05d}.png"))
