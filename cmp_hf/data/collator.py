"""Turn dataset rows (an image and a label) into the tensors ``PromptTunedCLIP`` and ``CMPTrainer`` take."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image

ROW_COLUMN = "__cmp_hf_row__"  # the row number each row of an uncached dataset carries, to name an unreadable image
_CONVERT_FLOATS = (
    "pass uint8 pixels in [0, 255] (e.g. (image * 255).round().astype(np.uint8) for floats in [0, 1]) or PIL images"
)


def to_rgb(image: Any) -> Image.Image:
    """PIL image in RGB from a PIL image (any mode), an image file's path, or an HxW / HxWxC array of integer pixels
    in [0, 255] (grey digits, masks...).

    Float pixels are refused rather than guessed: PIL would clip [0, 1] floats to an all-black image. So would it
    clip 16-bit greyscale (mode ``I;16``) to white: those are scaled from [0, 65535] to [0, 255]. A 32-bit integer
    image (mode ``I``) is taken as it is when its values lie in [0, 255], and refused otherwise (its range is
    unknown).
    """
    if isinstance(image, dict) and "bytes" in image and "path" in image:  # an Image column read with decode=False
        image = ImageFeature().decode_example(image)
    if isinstance(image, str | os.PathLike):
        with Image.open(image) as opened:  # FileNotFoundError / UnidentifiedImageError name the path
            opened.load()
            return to_rgb(opened)
    if not isinstance(image, Image.Image):
        image = Image.fromarray(_pixel_array(image))
    if image.mode == "F":
        raise ValueError(f"Got a float image (PIL mode 'F'), whose pixels PIL clips to black: {_CONVERT_FLOATS}.")
    if image.mode.startswith("I;16"):  # 65535 / 255 = 257, rounded to the nearest level
        image = Image.fromarray(((np.asarray(image).astype(np.uint32) + 128) // 257).astype(np.uint8))
    elif image.mode == "I":
        array = np.asarray(image)
        if array.min() < 0 or array.max() > 255:
            raise ValueError(
                f"Got a 32-bit integer image (PIL mode 'I') with values in [{array.min()}, {array.max()}], which PIL "
                "clips to white: convert it to 8 bits by its real range first, e.g. "
                "Image.fromarray((np.asarray(image) / 65535 * 255).round().astype(np.uint8)) for 16-bit data."
            )
        image = Image.fromarray(array.astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def read_image(image: Any, row: int | None, column: str) -> Image.Image:
    """:func:`to_rgb`, with a failure (a truncated or corrupt file, a float image...) named by its row and column."""
    try:
        return to_rgb(image)
    except Exception as error:
        where = f"row {row}" if row is not None else "a row"
        raise ValueError(
            f"Cannot read the image in {where} of column {column!r} ({type(error).__name__}: {error}): fix or drop "
            "that row (dataset.select / dataset.filter) and run again."
        ) from error


def with_row_numbers(dataset: Any, image_column: str) -> Any:
    """For the uncached path: a dataset whose images the collator decodes (``datasets`` would decode them while
    fetching a batch, where a truncated file fails without saying which row) and whose rows carry their number
    (column ``ROW_COLUMN``). Anything but a ``Dataset`` (a stream) is returned as it is."""
    if not isinstance(dataset, Dataset) or ROW_COLUMN in dataset.column_names:
        return dataset
    return undecoded(dataset, image_column).add_column(ROW_COLUMN, np.arange(len(dataset)))


def undecoded(dataset: Dataset, image_column: str) -> Dataset:
    """``dataset`` with its ``Image`` column read as stored (bytes and path): :func:`to_rgb` decodes it later."""
    if not isinstance(dataset.features.get(image_column), ImageFeature):
        return dataset
    return dataset.cast_column(image_column, ImageFeature(decode=False))


def _pixel_array(image: Any) -> np.ndarray:
    """An image array as uint8, refusing what would silently become a wrong image."""
    if image is None:
        raise TypeError("Got None instead of an image: pass a PIL image, an image path or an HxWxC uint8 array.")
    array = np.asarray(image)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise ValueError(
            f"Got an array of shape {array.shape} as an image: one image is HxW or HxWxC with C in 1, 3, 4 (pixels "
            "last; for channels-first data use np.moveaxis(image, 0, -1))."
        )
    if np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"Got an image array of dtype {array.dtype}: {_CONVERT_FLOATS}.")
    if not np.issubdtype(array.dtype, np.integer) or array.min() < 0 or array.max() > 255:
        raise ValueError(f"Got an image array of dtype {array.dtype} with values outside [0, 255]: {_CONVERT_FLOATS}.")
    array = array.astype(np.uint8, copy=False)
    return array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array


@dataclass
class CLIPImageCollator:
    """Batches rows into ``pixel_values`` (through CLIP's image processor) and ``labels``."""

    image_processor: Any
    image_column: str = "image"
    label_column: str = "label"

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [read_image(row[self.image_column], row.get(ROW_COLUMN), self.image_column) for row in rows]
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        labels = torch.tensor([int(row[self.label_column]) for row in rows], dtype=torch.long)
        return {"pixel_values": pixel_values, "labels": labels}


@dataclass
class ImageFeatureCollator:
    """Batches cached, L2-normalised ``image_features`` (D,) and their labels into ``image_features`` and
    ``labels``: from a list of rows, or from one batch of columns (:class:`~cmp_hf.data.feature_batches.FeatureBatches`
    reads them so)."""

    label_column: str = "label"

    def __call__(self, rows: list[dict[str, Any]] | Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        if isinstance(rows, Mapping):
            features, labels = rows["image_features"], rows[self.label_column]
        else:
            features = np.stack([np.asarray(row["image_features"], dtype=np.float32) for row in rows])
            labels = [int(row[self.label_column]) for row in rows]
        return {"image_features": torch.as_tensor(features), "labels": torch.as_tensor(labels, dtype=torch.long)}
