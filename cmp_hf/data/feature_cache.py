"""Frozen image features, computed once and stored with ``datasets`` (Arrow, memory-mapped).

In CoOp only the text prompt learns, yet the reference loop runs the image encoder on every batch of every epoch.
The image tower is frozen, so its L2-normalised output for an image never changes: encoding each image once and
training on the stored features gives the same logits and the same prompt, at the cost of the text encoder alone.

Each cache entry is a directory named by a fingerprint of everything the features depend on: the image tower's
weights, the dataset (``datasets``' own fingerprint), the image column, the image processor's settings, and the
augmentation (views, seed). A second run with the same inputs reuses it; any change gives a new entry. Entries are
written to a temporary directory and renamed into place, with a manifest of file digests written last; an entry
whose files do not match its manifest (truncated, corrupted, half-written) is rebuilt, never trusted.

Augmentation: ``views=K > 0`` stores K random-resized-crop + flip views per image (view k of row i drawn from
``default_rng([seed, i, k])``), and :func:`select_views` hands out one view per row at each access. That is a fixed
pool of K crops instead of a fresh crop every step; for fresh augmentation, turn the cache off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from datasets import Array2D, ClassLabel, Dataset, Features, Sequence, Value, load_from_disk
from datasets.utils import (
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
    tqdm,  # tqdm.auto that obeys datasets.disable_progress_bars()
)

from .augment import RandomResizedCropFlip
from .collator import ROW_COLUMN, read_image, to_rgb, undecoded

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # 2: the label column keeps its ClassLabel; one view is a (D,) list
MANIFEST_NAME = "cmp_hf_cache.json"
FEATURES_COLUMN = "image_features"


class ImageEncoder(Protocol):
    """What the cache needs of a model (``PromptTunedCLIP`` has it): its CLIP and its image-feature function."""

    clip: Any

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...


def _digest_files(directory: str) -> dict[str, str]:
    digests = {}
    for name in sorted(os.listdir(directory)):
        if name == MANIFEST_NAME:
            continue
        h = hashlib.blake2b(digest_size=16)
        with open(os.path.join(directory, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digests[name] = h.hexdigest()
    return digests


def _remove(path: str) -> None:
    """Remove a cache entry, be it a directory or something else left in its place (a file, a link)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def image_tower_digest(model: ImageEncoder) -> str:
    """Digest of the weights that produce image features (vision tower + projection)."""
    h = hashlib.blake2b(digest_size=16)
    clip = model.clip
    for prefix, module in (("vision_model", clip.vision_model), ("visual_projection", clip.visual_projection)):
        for name, tensor in module.state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            h.update(f"{prefix}.{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            h.update(tensor.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class ImageFeatureCache:
    """Encode datasets once with the frozen image tower of ``model`` and keep the result under ``cache_dir``."""

    model: ImageEncoder
    image_processor: Any
    cache_dir: str
    image_column: str = "image"
    label_column: str = "label"
    batch_size: int = 64
    seed: int = 0
    progress: bool = True  # show a progress bar while encoding (the trainer passes ``not disable_tqdm``)

    def __post_init__(self) -> None:
        self._tower_digest = image_tower_digest(self.model)

    def fingerprint(self, dataset: Dataset, views: int = 0) -> str:
        crop = RandomResizedCropFlip(self._image_size()) if views else None
        parts = {
            "format": CACHE_FORMAT_VERSION,
            "tower": self._tower_digest,
            "dataset": dataset._fingerprint,
            "columns": [self.image_column, self.label_column],
            "processor": self.image_processor.to_json_string(),
            "views": views,
            "augmentation": repr(crop) + f"seed={self.seed}" if views else None,
        }
        return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()

    def features(self, dataset: Dataset, views: int = 0) -> Dataset:
        """``dataset`` as rows of ``image_features`` ((D,), or (views, D) with augmentation) and the label (its
        ClassLabel kept), from the cache if valid."""
        key = self.fingerprint(dataset, views)
        path = os.path.join(self.cache_dir, key)
        cached = self._load(path, key)
        if cached is not None:
            logger.info("Reusing image features from %s", path)
            return cached
        encoded = self._encode(dataset, views)
        self._write(encoded, path, key)
        return load_from_disk(path)

    # ---- internals ----------------------------------------------------------------------------------------------

    def _image_size(self) -> int:
        return self.model.clip.config.vision_config.image_size

    def _images(self, dataset: Dataset, views: int) -> Iterator[Any]:
        """Every image (or every augmented view, row-major) in order, as RGB PIL images."""
        crop = RandomResizedCropFlip(self._image_size())
        images = dataset.select_columns([self.image_column])
        for start in range(0, len(images), self.batch_size):
            rows = range(start, min(start + self.batch_size, len(images)))
            for row, image in zip(rows, self._decoded(images, rows), strict=True):
                if not views:
                    yield image
                for k in range(views):
                    yield crop(image, np.random.default_rng([self.seed, row, k]))

    def _decoded(self, images: Dataset, rows: range) -> list[Any]:
        """The rows' images in RGB; an image that cannot be read is named by its row and column."""
        try:
            return [to_rgb(image) for image in images[rows.start : rows.stop][self.image_column]]
        except Exception:  # find the row: decoding the batch names neither the row nor the column
            stored = undecoded(images, self.image_column)  # decoding must happen inside read_image
            for row in rows:
                read_image(stored[row][self.image_column], row, self.image_column)
            raise

    @torch.no_grad()
    def _encode(self, dataset: Dataset, views: int) -> Dataset:
        device = next(self.model.parameters()).device
        per_row = max(views, 1)
        outputs, batch = [], []

        def flush() -> None:
            pixel_values = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            outputs.append(self.model.image_features(pixel_values.to(device)).float().cpu())
            batch.clear()

        total = len(dataset) * per_row
        images = tqdm(self._images(dataset, views), total=total, desc="Encoding images", disable=not self.progress)
        for image in images:
            batch.append(image)
            if len(batch) == self.batch_size:
                flush()
        if batch:
            flush()
        features = torch.cat(outputs).numpy()
        if views:
            features = features.reshape(len(dataset), views, features.shape[-1])
        label_feature = dataset.features[self.label_column]  # a ClassLabel keeps its names, for subsets by class
        labels = np.asarray(dataset.select_columns([self.label_column])[self.label_column])
        return features_dataset(features, labels, self.label_column, label_feature)

    def _write(self, encoded: Dataset, path: str, key: str) -> None:
        staging = f"{path}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            _save_without_progress_bar(encoded, staging)
            manifest = {"key": key, "num_rows": len(encoded), "files": _digest_files(staging)}
            with open(os.path.join(staging, MANIFEST_NAME), "w", encoding="utf-8") as f:
                json.dump(manifest, f)
            _remove(path)
            try:
                os.replace(staging, path)
            except OSError:  # another process (a parallel sweep job on the same data) wrote this entry meanwhile
                if not os.path.isdir(path):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone after the rename; left over only after a failure

    def _load(self, path: str, key: str) -> Dataset | None:
        manifest_path = os.path.join(path, MANIFEST_NAME)
        if not os.path.isdir(path):
            if os.path.lexists(path):
                logger.warning("Image-feature cache %s is not a directory: rebuilding it.", path)
            return None
        try:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
            if manifest["key"] != key or manifest["files"] != _digest_files(path):
                raise ValueError("files do not match the manifest")
            dataset = load_from_disk(path)
            if len(dataset) != manifest["num_rows"]:
                raise ValueError("row count does not match the manifest")
            return dataset
        except (OSError, ValueError, KeyError) as error:
            logger.warning("Image-feature cache %s is invalid (%s): rebuilding it.", path, error)
            return None


def features_dataset(
    features: np.ndarray, labels: np.ndarray, label_column: str = "label", label_feature: Any = None
) -> Dataset:
    """Cached features as the cache stores them: (N, D) features one (D,) fixed-length list per row (read back an
    order of magnitude faster than a (1, D) Array2D), (N, K, D) ones a (K, D) Array2D per row that
    :func:`select_views` draws from; labels int64 unless ``label_feature`` is a ``ClassLabel``."""
    if features.ndim == 3:
        feature_type = Array2D(features.shape[1:], "float32")
    else:
        feature_type = Sequence(Value("float32"), length=features.shape[-1])
    if not isinstance(label_feature, ClassLabel):
        label_feature = Value("int64")
    schema = Features({FEATURES_COLUMN: feature_type, label_column: label_feature})
    return Dataset.from_dict({FEATURES_COLUMN: features, label_column: labels}, features=schema)


def select_views(dataset: Dataset, seed: int) -> Dataset:
    """Give each row one (D,) feature: a random view per access when the cache holds several (augmentation);
    a single-view dataset already has one and is returned as it is."""
    if not isinstance(dataset.features[FEATURES_COLUMN], Array2D):
        return dataset
    rng = np.random.default_rng(seed)

    def pick(batch: dict[str, list]) -> dict[str, list]:
        views = [np.asarray(v, dtype=np.float32) for v in batch[FEATURES_COLUMN]]
        batch[FEATURES_COLUMN] = [v[rng.integers(len(v))] for v in views]
        return batch

    return dataset.with_transform(pick)


def augmented(dataset: Dataset, crop: RandomResizedCropFlip, image_column: str, seed: int) -> Dataset:
    """Uncached path: a fresh random crop + flip of each training image at every access."""
    rng = np.random.default_rng(seed)

    def transform(batch: dict[str, list]) -> dict[str, list]:
        rows = batch.get(ROW_COLUMN, [None] * len(batch[image_column]))
        batch[image_column] = [
            crop(read_image(image, row, image_column), rng)
            for image, row in zip(batch[image_column], rows, strict=True)
        ]
        return batch

    return dataset.with_transform(transform)


def _save_without_progress_bar(dataset: Dataset, path: str) -> None:
    """``save_to_disk`` without its "Saving the dataset" / "Flattening the indices" bars: writing a cache file takes
    a blink and is not progress anyone follows (the encoding before it has its own bar)."""
    shown = not are_progress_bars_disabled()
    disable_progress_bars()
    try:
        dataset.save_to_disk(path)
    finally:
        if shown:
            enable_progress_bars()
