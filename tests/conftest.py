"""Shared fixtures: a tiny random CLIP saved as a directory, and colour-patch datasets. Everything is offline."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import: tests never reach the Hub
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="cmp_hf_tests_datasets_")  # isolated feature cache

import pytest  # noqa: E402

from cmp_hf.data import colour_patches  # noqa: E402
from cmp_hf.tiny import save_tiny_clip  # noqa: E402

CLASS_NAMES = ["red", "green", "blue", "yellow"]
WORDS = CLASS_NAMES + ["a", "photo", "of"]


@pytest.fixture(scope="session")
def class_names() -> list[str]:
    return list(CLASS_NAMES)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> str:
    return save_tiny_clip(str(tmp_path_factory.mktemp("tiny_clip")), words=WORDS, seed=0)


@pytest.fixture(scope="session")
def train_set():
    return colour_patches(CLASS_NAMES, per_class=4, seed=0)


@pytest.fixture(scope="session")
def test_set():
    return colour_patches(CLASS_NAMES, per_class=4, seed=1)
