"""Shared fixtures: a tiny random CLIP saved as a directory, and colour-patch datasets. Everything is offline."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import: tests never reach the Hub
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="cmp_hf_tests_datasets_")  # isolated feature cache
# evaluate: offline, and evaluate.load's copies of module scripts and its metric caches go to throw-away dirs
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="cmp_hf_tests_modules_")
os.environ["HF_METRICS_CACHE"] = tempfile.mkdtemp(prefix="cmp_hf_tests_metrics_")

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import CLIPModel, CLIPTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from cmp_hf.testing.synthetic import colour_patches  # noqa: E402
from cmp_hf.testing.tiny import save_tiny_clip, tiny_clip_config  # noqa: E402
from recipes import make_tiny_testbed  # noqa: E402

CLASS_NAMES = ["red", "green", "blue", "yellow"]
WORDS = CLASS_NAMES + ["a", "photo", "of"]


HOLD_LOCK = "import sys, time; from cmp_hf.runs import RunDir; RunDir(sys.argv[1]).lock(); print('locked', flush=True); time.sleep(600)"  # noqa: E501


@pytest.fixture
def lock_holder():
    """Start another process that holds a directory's output_dir lock, as a run in progress does; killed at the
    end of the test (a test may kill it earlier)."""
    processes = []

    def hold(output_dir) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(output_dir)], stdout=subprocess.PIPE, text=True
        )
        processes.append(process)
        assert process.stdout.readline().strip() == "locked"
        return process

    yield hold
    for process in processes:
        process.kill()
        process.wait()


@pytest.fixture(autouse=True)
def progress_bars_restored():
    """A recipe run in-process switches the datasets and transformers progress bars globally (``quiet_console``):
    undo it after each test, so that a later test sees the default."""
    enabled = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    yield
    (datasets.enable_progress_bars if enabled[0] else datasets.disable_progress_bars)()
    (hf_logging.enable_progress_bar if enabled[1] else hf_logging.disable_progress_bar)()


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


@pytest.fixture(scope="session")
def testbed(tmp_path_factory) -> Path:
    """What the quickstart trains on: a tiny CLIP directory and an image folder (12 images per class and split)."""
    directory = tmp_path_factory.mktemp("testbed")
    make_tiny_testbed.main(str(directory), per_class=12, seed=0)
    return directory


@pytest.fixture(scope="session")
def tokenizer(tiny_clip_dir) -> CLIPTokenizer:
    """The tiny CLIP's tokenizer, read from its files."""
    return CLIPTokenizer.from_pretrained(tiny_clip_dir)


@pytest.fixture(scope="session")
def wide_clip(tokenizer):
    """Three layers per tower and a vision width (48) unlike the text width (32), so the couplings map between."""
    config = tiny_clip_config(tokenizer)
    config.text_config.num_hidden_layers = config.vision_config.num_hidden_layers = 3
    config.vision_config.hidden_size, config.vision_config.intermediate_size = 48, 96
    torch.manual_seed(0)
    return CLIPModel(config).eval()
