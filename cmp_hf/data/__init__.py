"""Datasets: loading, few-shot sampling, batching, and small offline sets."""

from .augment import RandomResizedCropFlip
from .collator import CLIPImageCollator, ImageFeatureCollator, to_rgb
from .feature_cache import ImageFeatureCache, augmented, select_views
from .fewshot import (
    FEWSHOT_SAMPLINGS,
    FewShotSplit,
    base_novel_classes,
    coop_few_shot_split,
    few_shot_sets,
    few_shot_split,
    sample_few_shot,
    subset_classes,
)
from .loading import class_names_from_features, load_image_dataset
from .suite import DOMAIN_SHIFTS, SUITE, SuiteDataset, load_suite_dataset

__all__ = [
    "DOMAIN_SHIFTS",
    "FEWSHOT_SAMPLINGS",
    "SUITE",
    "FewShotSplit",
    "SuiteDataset",
    "base_novel_classes",
    "coop_few_shot_split",
    "few_shot_sets",
    "few_shot_split",
    "load_suite_dataset",
    "subset_classes",
    "CLIPImageCollator",
    "ImageFeatureCache",
    "ImageFeatureCollator",
    "RandomResizedCropFlip",
    "augmented",
    "class_names_from_features",
    "load_image_dataset",
    "sample_few_shot",
    "select_views",
    "to_rgb",
]
