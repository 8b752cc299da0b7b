"""Checks of a dataset's columns and labels, run before any model is loaded or any image is encoded.

Each one turns an input that would otherwise train silently on something wrong (float labels used as indices, a
single class whose loss is 0 and accuracy 100 %, class names that drop classes) or fail deep inside the collator
into an error naming the dataset, the problem and the fix.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, Value

from .feature_cache import FEATURES_COLUMN


def check_columns(dataset: Any, name: str, image_column: str, label_column: str, needs_images: bool) -> None:
    """The image and label columns exist, and the image column does not hold labels or numbers."""
    columns = dataset.column_names
    if columns is None:  # an IterableDataset of unknown schema: nothing to check up front
        return
    needs_images = needs_images and FEATURES_COLUMN not in columns  # cached features stand for the images
    required = [image_column, label_column] if needs_images else [label_column]
    missing = [column for column in required if column not in columns]
    if missing:
        raise ValueError(
            f"{name} has no column {missing} (columns: {columns}). Set image_column / label_column in CMPConfig to "
            "the columns holding the images and the integer labels."
        )
    feature = (dataset.features or {}).get(image_column) if needs_images else None
    if isinstance(feature, ClassLabel) or (isinstance(feature, Value) and feature.dtype != "string"):
        raise ValueError(
            f"{name}'s image column {image_column!r} holds {feature!r}, not images: set image_column to the column "
            f"with the images (columns: {columns})."
        )


def check_labels(dataset: Any, name: str, label_column: str, num_classes: int) -> None:
    """Labels are integer class indices in [0, num_classes)."""
    if not isinstance(dataset, Dataset) or len(dataset) == 0:
        return
    labels = np.asarray(dataset.with_format("numpy")[label_column])
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise ValueError(
            f"{name}'s labels ({label_column!r}) are {labels.dtype} values such as {labels[0]!r}, not class indices: "
            f"encode them as integers 0..C-1 (dataset.class_encode_column({label_column!r}) does it, and its "
            "ClassLabel then gives the class names)."
        )
    if np.issubdtype(labels.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(labels) | (labels != np.round(labels)))
        if len(bad):
            raise ValueError(
                f"{name}'s labels ({label_column!r}) hold non-integer values ({float(labels[bad[0]]):g} at row "
                f"{bad[0]}): labels are class indices 0..C-1; fix the column or cast it with "
                f"dataset.cast_column({label_column!r}, ClassLabel(names=...))."
            )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"{name} has labels in [{labels.min():g}, {labels.max():g}] but there are {num_classes} class names: "
            f"labels must lie in [0, {num_classes}) (pass one class name per label)."
        )


def check_training_set(dataset: Any, label_column: str) -> None:
    """A training set with rows of at least two classes (one class trains to loss 0 and tells nothing)."""
    if not isinstance(dataset, Dataset):
        return
    if len(dataset) == 0:
        raise ValueError("train_dataset is empty: pass a dataset with examples of at least two classes.")
    classes = np.unique(np.asarray(dataset.with_format("numpy")[label_column]))
    if len(classes) < 2:
        raise ValueError(
            f"train_dataset holds a single class (label {classes[0]}): its loss is 0 and its accuracy 100 % whatever "
            "the prompt. Train on examples of at least two classes."
        )
