"""Datasets: loading, few-shot sampling, batching, and small offline sets."""

from .augment import RandomResizedCropFlip
from .collator import CLIPImageCollator, ImageFeatureCollator, to_rgb
from .feature_cache import ImageFeatureCache, augmented, select_views
from .fewshot import sample_few_shot
from .loading import class_names_from_features, load_image_dataset
from .synthetic import PALETTE, colour_patches, write_image_folder

__all__ = [
    "PALETTE",
    "CLIPImageCollator",
    "ImageFeatureCache",
    "ImageFeatureCollator",
    "RandomResizedCropFlip",
    "augmented",
    "class_names_from_features",
    "colour_patches",
    "load_image_dataset",
    "sample_few_shot",
    "select_views",
    "to_rgb",
    "write_image_folder",
]
