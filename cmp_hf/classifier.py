"""``CalibratedCLIP``: a trained prompt from the Hub or a directory, ready to classify images with probabilities."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from transformers import AutoImageProcessor, CLIPModel, PreTrainedTokenizerBase

from .data.collator import to_rgb
from .hub import fetch_prompt
from .modeling import PromptTunedCLIP
from .posthoc import PostHocCalibration


class CalibratedCLIP:
    """Classify images over the prompt's classes, with calibrated probabilities.

    ``predict_proba`` returns the softmax of ``logit_scale * cos(image, class prompt)`` after the prompt's post-hoc
    :attr:`calibration` (temperature, DAC; saved with the prompt): the probabilities the model card reports.
    """

    def __init__(self, model: PromptTunedCLIP, image_processor: Any) -> None:
        self.model = model.eval()
        self.image_processor = image_processor

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
        verify_digest: bool = True,
    ) -> CalibratedCLIP:
        """Load the prompt (JSON + safetensors only) and the base CLIP it names, unless ``clip`` is given;
        ``base_model`` (a Hub id or directory) replaces the base the prompt names, e.g. a copy of it elsewhere.
        ``verify_digest``: see :meth:`PromptTunedCLIP.from_pretrained`."""
        prompt_dir = fetch_prompt(repo_or_dir, revision, token)
        model = PromptTunedCLIP.from_pretrained(
            prompt_dir, clip, tokenizer, base_model=base_model, verify_digest=verify_digest
        )
        if image_processor is None:  # the torchvision backend when installed, else PIL (and no fallback warning)
            image_processor = AutoImageProcessor.from_pretrained(model.prompt_config.base_model_name_or_path)
        return cls(model.to(device) if device is not None else model, image_processor)

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    @property
    def calibration(self) -> PostHocCalibration:
        """The post-hoc calibration applied to the logits (the prompt's own: set it there, saved with it)."""
        return self.model.calibration

    @torch.no_grad()
    def logits(self, images: Any) -> torch.Tensor:
        """(N, C) logits for a PIL image, an image file's path, a list of images / arrays / paths, or a
        ``pixel_values`` tensor (N, 3, H, W)."""
        pixel_values = self._pixel_values(images)
        device = next(self.model.parameters()).device
        return self.model(pixel_values=pixel_values.to(device)).logits.float()

    def _pixel_values(self, images: Any) -> torch.Tensor:
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
            return images
        if images is None:
            raise TypeError("images is None: pass a PIL image, an image path, a list of them, or pixel_values.")
        batch = list(images) if isinstance(images, list | tuple) else [images]
        if not batch:
            raise ValueError("No images given (an empty list): pass at least one image.")
        return self.image_processor(images=[to_rgb(image) for image in batch], return_tensors="pt")["pixel_values"]

    def predict_proba(self, images: Any) -> np.ndarray:
        """(N, C) class probabilities."""
        return self.logits(images).softmax(dim=-1).cpu().numpy()

    def predict(self, images: Any) -> np.ndarray:
        """(N,) class indices; ``class_names`` maps them to names."""
        return self.logits(images).argmax(dim=-1).cpu().numpy()
