"""Turn dataset rows (an image and a label) into the tensors ``PromptTunedCLIP`` and ``CMPTrainer`` take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


def to_rgb(image: Any) -> Image.Image:
    """PIL image in RGB from a PIL image (any mode) or an HxW / HxWxC uint8 array (grey digits, masks...)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass
class CLIPImageCollator:
    """Batches rows into ``pixel_values`` (through CLIP's image processor) and ``labels``."""

    image_processor: Any
    image_column: str = "image"
    label_column: str = "label"

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [to_rgb(row[self.image_column]) for row in rows]
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        labels = torch.tensor([int(row[self.label_column]) for row in rows], dtype=torch.long)
        return {"pixel_values": pixel_values, "labels": labels}


@dataclass
class ImageFeatureCollator:
    """Batches rows of cached, L2-normalised ``image_features`` (D,) into ``image_features`` and ``labels``."""

    label_column: str = "label"

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        features = torch.from_numpy(np.stack([np.asarray(row["image_features"], dtype=np.float32) for row in rows]))
        labels = torch.tensor([int(row[self.label_column]) for row in rows], dtype=torch.long)
        return {"image_features": features, "labels": labels}
