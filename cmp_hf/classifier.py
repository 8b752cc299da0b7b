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
    ) -> CalibratedCLIP:
        """Load the prompt (JSON + safetensors only) and the base CLIP it names, unless ``clip`` is given."""
        model = PromptTunedCLIP.from_pretrained(fetch_prompt(repo_or_dir, revision, token), clip, tokenizer)
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
        """(N, C) logits for a PIL image, a list of images / arrays, or a ``pixel_values`` tensor (N, 3, H, W)."""
        if isinstance(images, torch.Tensor):
            pixel_values = images
        else:
            batch = images if isinstance(images, list | tuple) else [images]
            pixel_values = self.image_processor(images=[to_rgb(i) for i in batch], return_tensors="pt")["pixel_values"]
        device = next(self.model.parameters()).device
        return self.model(pixel_values=pixel_values.to(device)).logits.float()

    def predict_proba(self, images: Any) -> np.ndarray:
        """(N, C) class probabilities."""
        return self.logits(images).softmax(dim=-1).cpu().numpy()

    def predict(self, images: Any) -> np.ndarray:
        """(N,) class indices; ``class_names`` maps them to names."""
        return self.logits(images).argmax(dim=-1).cpu().numpy()
