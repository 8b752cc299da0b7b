"""What a trainer feeds the model: cached image features (the default) or images, with their collator.

The image tower is frozen, so by default every dataset is encoded once into an :class:`ImageFeatureCache` and the
training loop runs the text side alone. That is not possible for a stream (no fingerprint, no length) nor for a
learner that prompts the image tower (its features change with training): those get images, augmented on the fly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from datasets import Dataset
from datasets.config import HF_DATASETS_CACHE

from .augment import RandomResizedCropFlip
from .collator import CLIPImageCollator, ImageFeatureCollator, with_row_numbers
from .feature_batches import FeatureBatches
from .feature_cache import FEATURES_COLUMN, ImageFeatureCache, augmented, select_views

if TYPE_CHECKING:  # the data layer needs neither at run time
    from ..config import CMPConfig
    from ..modeling import PromptTunedCLIP

logger = logging.getLogger(__name__)


@dataclass
class InputPipeline:
    """Turns datasets of images into what the collator takes: cached features when ``feature_cache`` is set,
    else images with their row numbers (augmented by ``crop`` for a training set with views).

    ``InputPipeline(args)`` alone serves a user's own collator: datasets pass with row numbers added.
    """

    args: CMPConfig
    collator: Callable | None = None  # the collator that takes this pipeline's output (None: the user's own)
    feature_cache: ImageFeatureCache | None = None
    crop: RandomResizedCropFlip | None = None

    @classmethod
    def default(
        cls, model: PromptTunedCLIP, image_processor: Any, args: CMPConfig, datasets: list[tuple[str, Any]]
    ) -> InputPipeline:
        """The pipeline when no collator is given: the feature cache when ``args`` ask for it and every dataset of
        ``datasets`` (from :func:`named_datasets`) can be cached, else images; each refusal is logged."""
        crop = RandomResizedCropFlip(model.clip.config.vision_config.image_size)
        cacheable = all(isinstance(dataset, Dataset) for _, dataset in datasets)
        if args.cache_image_features and not cacheable:
            logger.warning("Image features are not cached: only `datasets.Dataset` inputs can be (got a stream).")
        if args.cache_image_features and not model.learner.caches_image_features:
            logger.warning(
                "Image features are not cached: the %s learner prompts the image tower, so they change with training.",
                model.learner.name,
            )
            cacheable = False
        if not (args.cache_image_features and cacheable):
            return cls(args, CLIPImageCollator(image_processor, args.image_column, args.label_column), crop=crop)
        cache = ImageFeatureCache(
            model.to(args.device),
            image_processor,
            cache_dir=args.image_feature_cache_dir or os.path.join(HF_DATASETS_CACHE, "cmp_hf_image_features"),
            image_column=args.image_column,
            label_column=args.label_column,
            batch_size=args.image_feature_batch_size,
            seed=args.seed,
            progress=not args.disable_tqdm,
        )
        return cls(args, ImageFeatureCollator(args.label_column), feature_cache=cache, crop=crop)

    def __call__(self, dataset: Any, views: int = 0) -> Any:
        """``dataset`` as the collator takes it; ``views`` > 0 for a training set (``args.augmented_views``)."""
        args = self.args
        if dataset is None or isinstance(dataset, str):
            return dataset
        if FEATURES_COLUMN in (dataset.column_names or []):  # encoded already (by this pipeline or the user)
            if isinstance(self.collator, CLIPImageCollator):
                raise ValueError(
                    f"A dataset holds cached {FEATURES_COLUMN!r} but this trainer feeds images to the model "
                    "(cache_image_features is off, or the learner prompts the image tower): pass the images."
                )
            if views:
                raise ValueError(
                    f"The training set holds cached {FEATURES_COLUMN!r}, which cannot be augmented: pass the images "
                    "(the cache encodes augmented views of them), or set augment=False."
                )
            return dataset
        if self.feature_cache is None:
            dataset = with_row_numbers(dataset, args.image_column)
            if not views:
                return dataset
            return augmented(dataset, self.crop, args.image_column, args.seed)
        with args.main_process_first(desc="image-feature cache"):
            return select_views(self.feature_cache.features(dataset, views), seed=args.seed)

    def for_reading(self, dataset: Any) -> Any:
        """``dataset`` as an evaluation reads it: as :meth:`__call__` gives it, read in batches of columns
        (:class:`~cmp_hf.data.feature_batches.FeatureBatches`) where it holds cached features and this pipeline's
        collator takes them. Not with ``remove_unused_columns``: Trainer then wraps the collator in one that takes
        rows (and the batch reader keeps only the columns the collator takes anyway)."""
        if isinstance(dataset, FeatureBatches):
            return dataset
        dataset = self(dataset)
        readable = isinstance(self.collator, ImageFeatureCollator) and FeatureBatches.can_read(dataset)
        if readable and not self.args.remove_unused_columns:
            return FeatureBatches(dataset, self.args.label_column)
        return dataset

    def prepare(self, train_dataset: Any, eval_dataset: Any) -> tuple[Any, Any]:
        """The training set (with the augmented views ``args`` ask for) and the eval set or dict of eval sets, as
        the collator takes them."""
        train_dataset = self(train_dataset, views=self.args.augmented_views if self.args.augment else 0)
        if isinstance(eval_dataset, dict):
            return train_dataset, {key: self.for_reading(dataset) for key, dataset in eval_dataset.items()}
        return train_dataset, self.for_reading(eval_dataset)


def named_datasets(train_dataset: Any, eval_dataset: Any) -> list[tuple[str, Any]]:
    """The datasets a trainer was given, each with the name an error about it uses (``eval_dataset['test']``)."""
    named = [("train_dataset", train_dataset)]
    if isinstance(eval_dataset, dict):
        named += [(f"eval_dataset[{key!r}]", dataset) for key, dataset in eval_dataset.items()]
    else:
        named.append(("eval_dataset", eval_dataset))
    return [(name, dataset) for name, dataset in named if dataset is not None]
