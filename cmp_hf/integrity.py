"""Content digests of a saved prompt's learned tensors, written with the prompt and verified when it is loaded.

A safetensors file with flipped bytes inside a tensor still parses, and the prompt it holds silently shifts every
probability (by up to 0.88 in a trial). ``save_pretrained`` therefore records a SHA-256 of each weights file's
tensors (names, dtypes, shapes and bytes, so re-serialising the same tensors keeps the digest) in
``prompt_digest.json``, and ``from_pretrained`` refuses a file whose tensors no longer match, naming it. Prompts
saved before digests existed have no such file and load as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .constants import PROMPT_DIGEST_NAME

logger = logging.getLogger(__name__)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors, in name order: each one's name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_weights_file(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or an error that names the file when it is missing or unreadable."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the prompt is incomplete; save or download it again.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is corrupt ({error}): save or download the prompt again.") from error


def write_digests(directory: str | os.PathLike, names: list[str]) -> None:
    """Record the SHA-256 of the tensors in each of ``names`` (files in ``directory``) in ``prompt_digest.json``."""
    digests = {name: tensors_sha256(load_weights_file(os.path.join(directory, name))) for name in names}
    with open(os.path.join(directory, PROMPT_DIGEST_NAME), "w", encoding="utf-8") as f:
        json.dump({"sha256": digests}, f, indent=2)
        f.write("\n")


def verify_digests(directory: str | os.PathLike) -> None:
    """Check every weights file listed in ``prompt_digest.json`` against its recorded digest; a prompt without the
    manifest (saved by cmp_hf 0.1) is loaded unverified, with a log line."""
    manifest = os.path.join(directory, PROMPT_DIGEST_NAME)
    if not os.path.isfile(manifest):
        logger.info("%s has no %s (saved before digests were recorded): not verified.", directory, PROMPT_DIGEST_NAME)
        return
    try:
        with open(manifest, encoding="utf-8") as f:
            digests = json.load(f)["sha256"]
        if not isinstance(digests, dict):
            raise TypeError(f"'sha256' holds a {type(digests).__name__}, not a mapping of file names to digests")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{manifest} is corrupt ({error!r}): save or download the prompt again.") from error
    for name, expected in digests.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):  # reported by the loader that needs it, in its own words
            continue
        if tensors_sha256(load_weights_file(path)) != expected:
            raise ValueError(
                f"{path} does not match the digest recorded in {PROMPT_DIGEST_NAME}: its tensors were changed or "
                "corrupted after saving. Save or download the prompt again."
            )
