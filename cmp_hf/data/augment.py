"""CoOp's training augmentation (random resized crop + horizontal flip), in PIL, driven by an explicit generator.

torchvision does not import beside every torch build (and is not a dependency), so the crop follows
``torchvision.transforms.RandomResizedCrop.get_params`` here: scale (0.08, 1), aspect ratio (3/4, 4/3), ten tries,
then a centre crop. Passing the generator in makes every view reproducible: the feature cache draws view ``k``
of row ``i`` from ``default_rng([seed, i, k])``, whatever the batching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class RandomResizedCropFlip:
    """Crop a random area and aspect ratio, resize to ``size`` x ``size`` (bicubic, as CoOp), flip with p = 0.5."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                left = int(rng.integers(0, width - w + 1))
                top = int(rng.integers(0, height - h + 1))
                return left, top, left + w, top + h
        # Fallback: the largest centred crop whose aspect ratio lies in range.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        box = self.crop_box(image.width, image.height, rng)
        out = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out
