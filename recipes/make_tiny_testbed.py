"""Write a tiny random CLIP and a colour-patch image folder: the fastest offline end-to-end run (used by the tests).

    python recipes/make_tiny_testbed.py build/quickstart

Creates ``<dir>/clip`` (CLIPModel + CLIPProcessor, ``from_pretrained``-ready) and ``<dir>/data/{train,test}/<class>/``.
A random CLIP shows that the pipeline works, not what CMP does to calibration.
"""

from __future__ import annotations

import argparse
import os
import shutil

from cmp_hf.testing.synthetic import colour_patches, write_image_folder
from cmp_hf.testing.tiny import save_tiny_clip

CLASS_NAMES = ["red", "green", "blue", "yellow"]


def main(directory: str, per_class: int = 16, seed: int = 0) -> None:
    save_tiny_clip(os.path.join(directory, "clip"), words=CLASS_NAMES + ["a", "photo", "of"], seed=seed)
    data_dir = os.path.join(directory, "data")
    shutil.rmtree(data_dir, ignore_errors=True)
    write_image_folder(colour_patches(CLASS_NAMES, per_class, seed=seed), data_dir, "train")
    write_image_folder(colour_patches(CLASS_NAMES, per_class, seed=seed + 1), data_dir, "test")
    print(f"tiny CLIP in {directory}/clip, {len(CLASS_NAMES)} x {per_class} images per split in {data_dir}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--per_class", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.directory, args.per_class, args.seed)
