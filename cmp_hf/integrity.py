"""Content digests of a saved prompt, written with the prompt and verified when it is loaded.

A safetensors file with flipped bytes inside a tensor still parses, and the prompt it holds silently shifts every
probability (by up to 0.88 in a trial); reversing the class order in ``prompt_config.json`` silently permutes the
labels, and editing ``calibration.json`` rescales every probability. ``save_pretrained`` therefore records in
``prompt_digest.json`` a SHA-256 of each weights file's tensors (names, dtypes, shapes and bytes, so re-serialising
the same tensors keeps the digest) and one of the settings that change the logits (every prompt option but the base
model's location, and the post-hoc calibration); ``from_pretrained`` refuses a prompt that no longer matches,
naming the file. A prompt saved with digests says so in its ``prompt_config.json`` (``format_version``), so a lost
or emptied digest is an error too; prompts saved before digests existed (no ``format_version``) load unverified,
with a log line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .constants import PROMPT_CONFIG_NAME, PROMPT_DIGEST_NAME

logger = logging.getLogger(__name__)

SETTINGS_KEY = "settings_sha256"  # the digest of the logit-changing settings, beside "sha256" (the weights files')
_RESAVE = (
    "Copy or download the whole prompt again; if the change is intended, load it with verify_digest=False and "
    "save_pretrained it again to record new digests."
)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors, in name order: each one's name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def settings_sha256(settings: dict[str, Any]) -> str:
    """SHA-256 of JSON-able settings, independent of key order."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def load_weights_file(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or an error that names the file when it is missing or unreadable."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the prompt is incomplete; save or download it again.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is corrupt ({error}): save or download the prompt again.") from error


def write_digests(directory: str | os.PathLike, names: list[str], settings: dict[str, Any]) -> None:
    """Record in ``prompt_digest.json`` the SHA-256 of the tensors in each of ``names`` (files in ``directory``)
    and of ``settings``."""
    digests = {name: tensors_sha256(load_weights_file(os.path.join(directory, name))) for name in names}
    with open(os.path.join(directory, PROMPT_DIGEST_NAME), "w", encoding="utf-8") as f:
        json.dump({"sha256": digests, SETTINGS_KEY: settings_sha256(settings)}, f, indent=2)
        f.write("\n")


def verify_digests(
    directory: str | os.PathLike, names: list[str], settings: dict[str, Any], saved_with_digest: bool
) -> None:
    """Check the weights files ``names`` and ``settings`` against ``prompt_digest.json``.

    ``saved_with_digest``: the prompt's config says a digest was written (then a missing or incomplete one is an
    error). A prompt from before (cmp_hf 0.1: no manifest) loads unverified, with a log line; one from before the
    settings were digested has its weights checked only.
    """
    manifest = os.path.join(directory, PROMPT_DIGEST_NAME)
    if not os.path.isfile(manifest):
        if saved_with_digest:
            raise FileNotFoundError(
                f"{directory} has no {PROMPT_DIGEST_NAME}, but its {PROMPT_CONFIG_NAME} says it was saved with one "
                f"(format_version): the digest was lost or removed, so damaged or altered files would load unnoticed. "
                + _RESAVE
            )
        logger.info("%s has no %s (saved before digests were recorded): not verified.", directory, PROMPT_DIGEST_NAME)
        return
    try:
        with open(manifest, encoding="utf-8") as f:
            recorded = json.load(f)
        digests = recorded["sha256"]
        if not isinstance(digests, dict):
            raise TypeError(f"'sha256' holds a {type(digests).__name__}, not a mapping of file names to digests")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{manifest} is corrupt ({error!r}): save or download the prompt again.") from error
    absent = [name for name in names if name not in digests]
    if saved_with_digest and SETTINGS_KEY not in recorded:
        absent.append("the settings")
    if absent:
        raise ValueError(f"{manifest} records no digest of {', '.join(absent)}: it is incomplete. " + _RESAVE)
    for name, expected in digests.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):  # reported by the loader that needs it, in its own words
            continue
        if tensors_sha256(load_weights_file(path)) != expected:
            raise ValueError(
                f"{path} does not match the digest recorded in {PROMPT_DIGEST_NAME}: its tensors were changed or "
                "corrupted after saving. Save or download the prompt again."
            )
    if SETTINGS_KEY in recorded and recorded[SETTINGS_KEY] != settings_sha256(settings):
        raise ValueError(
            f"The settings of the prompt in {directory} ({PROMPT_CONFIG_NAME}: class names and their order, template, "
            "context layout, learner; calibration.json: temperature, DAC) do not match the digest recorded in "
            f"{PROMPT_DIGEST_NAME}: they were changed after saving, which changes every prediction. " + _RESAVE
        )
