"""Images in bounded batches, whatever form they come in: what ``CalibratedCLIP`` classifies from.

``CalibratedCLIP`` once stacked every image of a call into one pixel tensor (10,000 images at 224 px: 6 GB before
the first forward). Here an input is cut into batches of ``batch_size`` images that are decoded and processed
one batch at a time, so peak memory follows the batch size, not the number of images. The input's form is checked
when :func:`image_batches` is called, before any image is decoded or encoded.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from PIL import Image
from transformers.utils import logging as hf_logging

SINGLE_IMAGE = (Image.Image, str, os.PathLike, np.ndarray)
PROGRESS_DELAY_S = 2.0  # a bar only for calls that last; the usual switches turn it off altogether


def image_batches(
    images: Any, batch_size: int, image_column: str = "image"
) -> tuple[Iterator[list[Any] | torch.Tensor], int | None]:
    """The batches of ``images`` and how many images there are (``None`` for an iterable of unknown length).

    ``images``: one image (PIL image, file path, HxW(xC) uint8 array), a list or tuple of them, a ``pixel_values``
    tensor (N, 3, H, W), a ``datasets.Dataset`` or ``IterableDataset`` (its ``image_column``), or any iterable of
    images (a generator: read lazily, one batch at a time). Each batch is a list of raw images, or a slice of the
    pixel tensor.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (images per forward), got {batch_size!r}.")
    if images is None:
        raise TypeError("images is None: pass a PIL image, an image path, a list of them, a Dataset or pixel_values.")
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"A pixel_values tensor must be (N, 3, H, W), got shape {tuple(images.shape)}: for one image, "
                "add the batch dimension with .unsqueeze(0); or pass PIL images, which the processor prepares."
            )
        rows = torch.nonzero(~torch.isfinite(images.flatten(1)).all(dim=1)).flatten().tolist()
        if rows:  # they would come out as rows of NaN probabilities
            raise ValueError(
                f"pixel_values hold NaN or infinite values in {len(rows)} images (first: {rows[:10]}): fix or "
                "drop those images."
            )
        return _nonempty(iter(images.split(batch_size)), len(images))
    if isinstance(images, SINGLE_IMAGE):
        return iter([[images]]), 1
    if isinstance(images, Dataset | IterableDataset):
        column = _image_column(images, image_column)
        if isinstance(images, Dataset):
            slices = (column[start : start + batch_size] for start in range(0, len(column), batch_size))
            return _nonempty(slices, len(column))
        return _chunks((row[image_column] for row in column), batch_size), None
    if isinstance(images, list | tuple):
        slices = (list(images[start : start + batch_size]) for start in range(0, len(images), batch_size))
        return _nonempty(slices, len(images))
    if isinstance(images, Iterable):
        return _chunks(iter(images), batch_size), None
    raise TypeError(
        f"Cannot read images from a {type(images).__name__}: pass a PIL image, an image path, an array, a list or "
        "iterable of them, a datasets.Dataset (with image_column=) or a pixel_values tensor."
    )


def _image_column(dataset: Dataset | IterableDataset, image_column: str) -> Any:
    """The dataset's image column alone (a ``Dataset`` column decodes lazily, slice by slice)."""
    columns = dataset.column_names
    if columns is not None and image_column not in columns:
        raise ValueError(
            f"The dataset has no {image_column!r} column (its columns: {columns}): pass image_column= naming the "
            "column of images."
        )
    if isinstance(dataset, Dataset):
        return dataset.select_columns([image_column])[image_column]
    return dataset.select_columns([image_column])


def _nonempty(batches: Iterator[Any], num_images: int) -> tuple[Iterator[Any], int]:
    if num_images == 0:
        raise ValueError("No images given (an empty input): pass at least one image.")
    return batches, num_images


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    first = True
    while batch := list(itertools.islice(items, size)):
        first = False
        yield batch
    if first:
        raise ValueError("No images given (an empty iterable): pass at least one image.")


def progress_bar(batches: Iterator[Any], num_images: int | None, batch_size: int, show: bool | None) -> Iterator[Any]:
    """``batches`` behind a progress bar counted in batches. ``show=None``: a bar for an input of more than one
    batch (or of unknown length) that appears once the call has run ``PROGRESS_DELAY_S``; ``True``: at once;
    ``False``: none. ``transformers.utils.logging.disable_progress_bar()`` (or ``HF_HUB_DISABLE_PROGRESS_BARS=1``)
    turns every bar off, as it does the model-loading bars."""
    if show is False or (show is None and num_images is not None and num_images <= batch_size):
        return batches
    total = None if num_images is None else -(-num_images // batch_size)
    delay = 0.0 if show else PROGRESS_DELAY_S
    return hf_logging.tqdm(batches, total=total, unit="batch", desc="Classifying", delay=delay)
