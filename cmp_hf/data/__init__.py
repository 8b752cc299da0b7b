"""Datasets: loading, few-shot sampling, batching, and small offline sets."""

from .collator import CLIPImageCollator, to_rgb
from .fewshot import sample_few_shot
from .loading import class_names_from_features, load_image_dataset
from .synthetic import PALETTE, colour_patches, write_image_folder

__all__ = [
    "PALETTE",
    "CLIPImageCollator",
    "class_names_from_features",
    "colour_patches",
    "load_image_dataset",
    "sample_few_shot",
    "to_rgb",
    "write_image_folder",
]
