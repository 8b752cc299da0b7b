"""Helpers shared by the test modules (trl keeps these in ``testing_utils``): test modules import from here, never
from ``conftest.py`` (fixtures and hooks only) or from each other.

The loopback Hub (``hub_server.py``) and the suite dataset copies (``suite_copies.py``) stay modules of their own:
each is one self-contained concern of ~100-200 lines that only some test files need.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def quickstart_config(testbed: Path, path: Path, **overrides) -> Path:
    """recipes/configs/quickstart.yaml pointed at ``testbed``, with overrides, written to ``path/config.yaml``."""
    config = yaml.safe_load((ROOT / "recipes/configs/quickstart.yaml").read_text())
    config.update(model_name_or_path=str(testbed / "clip"), dataset_name=str(testbed / "data"))
    # the tiny testbed has train/test splits only and a random CLIP: no shifted sets, no zero-shot baseline
    config.update(eval_splits=["test"], base_to_novel=False, zero_shot_baseline=False, num_train_epochs=5, shots=8)
    del config["preset"]  # the recipe mechanics under CoOp + CMP, whose options tests vary (the preset fixes them)
    config.update(cmp_lambda=1.0, cmp_form="log_ratio")
    config.update(overrides)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path / "config.yaml"


def hub_env(tmp_path: Path, endpoint: str, token: str | None = "hf_test_token") -> dict[str, str]:
    """The environment of a subprocess that talks to the loopback Hub at ``endpoint`` (huggingface_hub reads
    HF_ENDPOINT when imported), with its own HF_HOME and, unless ``token`` is None, a token."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_XET="1")
    env["HF_DATASETS_CACHE"] = os.environ["HF_DATASETS_CACHE"]
    if token:
        env["HF_TOKEN"] = token
    return env


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``command`` from the repository root with ``env``, capturing its output."""
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def flip_last_byte(path: Path) -> None:
    """Damage a safetensors file so that it still parses: its digest no longer matches."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10  # inside the last tensor's data: the file still parses
    path.write_bytes(bytes(data))
