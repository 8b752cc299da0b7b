"""``CalibratedCLIP``: a trained prompt from the Hub or a directory, ready to classify images with probabilities.

Serving differs from training in two ways that set its cost. The class text features of a prompt whose classes do
not depend on the image (every learner but CoCoOp) are the same for every image: they are computed once and kept
until the prompt's weights, its classes or the device change, so that a call costs the image tower and one matrix
product (the text tower over C classes cost more than the image itself at C = 100). And images come in bounded
batches (:mod:`cmp_hf.serving`) under ``torch.inference_mode``, so memory does not grow with the input.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from transformers import AutoImageProcessor, CLIPModel, PreTrainedTokenizerBase

from .data.collator import to_rgb
from .hub import fetch_prompt
from .modeling import PromptTunedCLIP
from .posthoc import PostHocCalibration
from .serving import image_batches, progress_bar

AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


class CalibratedCLIP:
    """Classify images over the prompt's classes, with calibrated probabilities.

    ``predict_proba`` returns the softmax of ``logit_scale * cos(image, class prompt)`` after the prompt's post-hoc
    :attr:`calibration` (temperature, DAC; saved with the prompt): the probabilities the model card reports.
    ``dtype=torch.bfloat16`` (or ``float16``) runs the towers under autocast in that precision (for a GPU; the
    weights stay float32); the returned logits and probabilities are float32.
    """

    def __init__(
        self,
        model: PromptTunedCLIP,
        image_processor: Any,
        dtype: torch.dtype | None = None,
        image_column: str = "image",
    ) -> None:
        if dtype not in (None, torch.float32, *AUTOCAST_DTYPES):
            raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or None (float32), got {dtype}.")
        self.model = model.eval()
        self.image_processor = image_processor
        self.dtype = None if dtype == torch.float32 else dtype
        self.image_column = image_column
        self._class_features: tuple[tuple, torch.Tensor] | None = None  # (_weights_key(), features)

    @classmethod
    def from_pretrained(
        cls,
        repo_or_dir: str | os.PathLike,
        clip: CLIPModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        image_processor: Any | None = None,
        device: str | torch.device | None = None,
        revision: str | None = None,
        token: str | None = None,
        base_model: str | None = None,
        dtype: torch.dtype | None = None,
        verify_digest: bool = True,
    ) -> CalibratedCLIP:
        """Load the prompt (JSON + safetensors only) and the base CLIP it names, unless ``clip`` is given;
        ``base_model`` (a Hub id or directory) replaces the base the prompt names, e.g. a copy of it elsewhere.
        ``device``: where to classify (e.g. ``"cuda"``); ``dtype``: see the class; ``verify_digest``: see
        :meth:`PromptTunedCLIP.from_pretrained`."""
        prompt_dir = fetch_prompt(repo_or_dir, revision, token)
        model = PromptTunedCLIP.from_pretrained(
            prompt_dir, clip, tokenizer, base_model=base_model, verify_digest=verify_digest
        )
        if image_processor is None:  # the torchvision backend when installed, else PIL (and no fallback warning)
            image_processor = AutoImageProcessor.from_pretrained(model.prompt_config.base_model_name_or_path)
        return cls(model.to(device) if device is not None else model, image_processor, dtype)

    def for_classes(self, class_names: list[str]) -> CalibratedCLIP:
        """The same prompt (context, learner weights, calibration) over other classes, with its own class features."""
        return CalibratedCLIP(self.model.for_classes(class_names), self.image_processor, self.dtype, self.image_column)

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    @property
    def calibration(self) -> PostHocCalibration:
        """The post-hoc calibration applied to the logits (the prompt's own: set it there, saved with it)."""
        return self.model.calibration

    @property
    def device(self) -> torch.device:
        return self.model.context.device

    def to(self, device: str | torch.device) -> CalibratedCLIP:
        """Move the model (the class features follow on the next call); returns ``self``."""
        self.model.to(device)
        return self

    # ---- class features: once per prompt ------------------------------------------------------------------------

    def class_features(self) -> torch.Tensor | None:
        """The (C, D) class text features every call reuses, recomputed only when the context, the learner's
        weights (or the learner itself: ``for_classes``, ``over_classes``), the device or the dtype changed.
        ``None`` for a learner whose class features depend on the image (CoCoOp): those are computed per batch."""
        if self.model.learner.conditional:
            return None
        key = self._weights_key()
        if self._class_features is None or not _same_key(self._class_features[0], key):
            # an ordinary tensor even when the first call runs under inference_mode: kept, it serves in and out of it
            with torch.inference_mode(False), torch.no_grad(), self._autocast():
                self._class_features = key, self.model.text_features()
        return self._class_features[1]

    def _weights_key(self) -> tuple[tuple, tuple]:
        """What the class features depend on: the learner and context objects themselves (compared by identity:
        a new learner after ``over_classes``, a reloaded adapter), the device, the dtype, and the ``_version``
        of every weight, which counts its in-place changes (an optimizer step, ``copy_``, ``load_state_dict``),
        so that changed weights are noticed without hashing them."""
        learner, context = self.model.learner, self.model.context
        versions = tuple(tensor._version for tensor in (context, *learner.parameters()))
        return (learner, context), (self.device, self.dtype, versions)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    # ---- prediction ---------------------------------------------------------------------------------------------

    def pixel_batches(self, images: Any, batch_size: int) -> tuple[Iterator[torch.Tensor], int | None]:
        """``images`` in any form :func:`cmp_hf.serving.image_batches` takes, as ``pixel_values`` batches of at most
        ``batch_size`` images, and how many images there are: the one place where the input is read and checked
        (its form at once, each image as its batch is decoded)."""
        batches, num_images = image_batches(images, batch_size, self.image_column)

        def pixel_values(batch: list[Any] | torch.Tensor) -> torch.Tensor:
            if isinstance(batch, torch.Tensor):
                return batch
            return self.image_processor(images=[to_rgb(image) for image in batch], return_tensors="pt")["pixel_values"]

        return map(pixel_values, batches), num_images

    def batch_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C) calibrated float32 logits of one ``pixel_values`` batch, on the model's device, with the kept
        class features. Call it under ``torch.inference_mode()`` (the pipeline and :meth:`logits` do)."""
        features = self.class_features()
        with self._autocast(), self.model.fixed_text_features(features):
            return self.model(pixel_values=pixel_values.to(self.device)).logits.float()

    def _map_batches(
        self, images: Any, batch_size: int, progress: bool | None, output: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        batches, num_images = self.pixel_batches(images, batch_size)
        results = []
        with torch.inference_mode():
            for pixel_values in progress_bar(batches, num_images, batch_size, progress):
                results.append(output(self.batch_logits(pixel_values)).cpu())
        return torch.cat(results)

    def logits(self, images: Any, batch_size: int = 64, progress: bool | None = None) -> torch.Tensor:
        """(N, C) calibrated logits (float32, on the CPU) for one image (PIL image, file path, uint8 array), a list
        or iterable of them, a ``datasets.Dataset`` (its ``image_column``) or a ``pixel_values`` tensor
        (N, 3, H, W), classified ``batch_size`` images at a time. ``progress``: a progress bar (``None``: for
        inputs of more than one batch that take a while)."""
        return self._map_batches(images, batch_size, progress, lambda logits: logits)

    def predict_proba(self, images: Any, batch_size: int = 64, progress: bool | None = None) -> np.ndarray:
        """(N, C) class probabilities; arguments as for :meth:`logits`."""
        return self._map_batches(images, batch_size, progress, lambda logits: logits.softmax(dim=-1)).numpy()

    def predict(self, images: Any, batch_size: int = 64, progress: bool | None = None) -> np.ndarray:
        """(N,) class indices (``class_names`` maps them to names); arguments as for :meth:`logits`."""
        return self._map_batches(images, batch_size, progress, lambda logits: logits.argmax(dim=-1)).numpy()


def _same_key(old: tuple[tuple, tuple], new: tuple[tuple, tuple]) -> bool:
    """Same objects (by identity: a tensor's ``==`` is elementwise) and equal state."""
    return all(a is b for a, b in zip(old[0], new[0], strict=True)) and old[1] == new[1]
