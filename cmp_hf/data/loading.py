"""Load an image-classification dataset from the Hub, a local image folder or a ``save_to_disk`` directory.

All three end as ``datasets`` objects through ``datasets``' own loaders, so a local copy and a Hub repo go through
the same code after this point.
"""

from __future__ import annotations

import os

from datasets import ClassLabel, Dataset, DatasetDict, load_dataset, load_from_disk


def load_image_dataset(name_or_path: str, config_name: str | None = None) -> DatasetDict:
    """A ``DatasetDict`` from a Hub id, a directory written by ``save_to_disk`` or an image folder."""
    if os.path.isdir(name_or_path):
        if os.path.isfile(os.path.join(name_or_path, "dataset_dict.json")):
            return load_from_disk(name_or_path)
        if os.path.isfile(os.path.join(name_or_path, "state.json")):
            raise ValueError(
                f"{name_or_path} holds a single saved Dataset: save a DatasetDict (with named splits) instead."
            )
        return load_dataset("imagefolder", data_dir=name_or_path)
    return load_dataset(name_or_path, config_name)


def class_names_from_features(dataset: Dataset, label_column: str) -> list[str]:
    """Class names in label order from the label column's ``ClassLabel``."""
    feature = dataset.features.get(label_column)
    if not isinstance(feature, ClassLabel):
        raise ValueError(
            f"Column {label_column!r} is not a ClassLabel ({feature!r}), so the class names are unknown: "
            "pass class_names explicitly."
        )
    return list(feature.names)
