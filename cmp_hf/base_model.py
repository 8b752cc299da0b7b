"""Where the base CLIP comes from: checked before anything is downloaded, cached or trained, and recorded with a
prompt so that the prompt loads from any working directory.

A model name is a local directory (a ``CLIPModel.save_pretrained`` output) or a Hub id. Mistakes here otherwise
surface as tracebacks deep inside transformers (``HFValidationError: Repo id must be...`` for a mistyped path, a
``KeyError`` for a BERT directory), after the data was already loaded; :func:`check_clip_source` says which case it
is (not found, not a CLIP, no network) and what to pass instead.
"""

from __future__ import annotations

import json
import os

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)
from transformers.utils import CONFIG_NAME

from .constants import PROMPT_CONFIG_NAME

CLIP_MODEL_TYPE = "clip"
_HINT = "pass a CLIP Hub id (e.g. openai/clip-vit-base-patch16) or a directory written by CLIPModel.save_pretrained"


def portable_name(name_or_path: str) -> str:
    """What a saved prompt records as its base: the absolute path of a local directory (a relative one only
    resolves from the directory the run started in), a Hub id as it is."""
    path = os.path.expanduser(name_or_path)
    return os.path.abspath(path) if os.path.isdir(path) else name_or_path


def check_clip_source(name_or_path: str, option: str = "model_name_or_path") -> None:
    """Raise a clear error unless ``name_or_path`` is a CLIP: a local directory, or a Hub id (or its cached copy).

    Reads only ``config.json`` (a Hub id downloads that file alone); ``option`` names the setting in the message.
    """
    config_file = _config_file(name_or_path, option)
    try:
        with open(config_file, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"{option} {name_or_path!r}: its {CONFIG_NAME} cannot be read ({error}); {_HINT}.") from error
    if model_type != CLIP_MODEL_TYPE:
        raise ValueError(
            f"{option} {name_or_path!r} is not a CLIP: its {CONFIG_NAME} says model_type {model_type!r}. cmp_hf "
            f"tunes prompts of a CLIPModel: {_HINT}."
        )


def _config_file(name_or_path: str, option: str) -> str:
    """The local path of the model's config.json, or an error that says why there is none."""
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        config_file = os.path.join(path, CONFIG_NAME)
        if os.path.isfile(config_file):
            return config_file
        if os.path.isfile(os.path.join(path, PROMPT_CONFIG_NAME)):
            raise ValueError(
                f"{option} {name_or_path!r} is a prompt saved by cmp_hf, not a CLIP: pass the CLIP it was trained "
                f"on (its {PROMPT_CONFIG_NAME} names it as base_model_name_or_path), and load the prompt with "
                "PromptTunedCLIP.from_pretrained or CalibratedCLIP.from_pretrained."
            )
        state = "is empty" if not os.listdir(path) else f"has no {CONFIG_NAME}"
        raise ValueError(f"{option} {name_or_path!r} is not a CLIP: the directory {state}; {_HINT}.")
    if os.path.exists(path):
        raise ValueError(f"{option} {name_or_path!r} is a file, not a model directory; {_HINT}.")
    try:
        return hf_hub_download(name_or_path, CONFIG_NAME)
    except HFValidationError as error:
        raise FileNotFoundError(
            f"{option} {name_or_path!r} not found: there is no such directory and it is not a valid Hub id; {_HINT}."
        ) from error
    except LocalEntryNotFoundError as error:  # offline, or the Hub is unreachable, and no cached copy
        raise ConnectionError(
            f"{option} {name_or_path!r}: no such local directory, and no network to find it on the Hub (the Hub "
            "could not be reached, or HF_HUB_OFFLINE is set) nor a copy in the local Hugging Face cache. Check the "
            "path; for a Hub id, connect and retry or download it once where there is a network (`hf download <id>`)."
        ) from error
    except (RepositoryNotFoundError, RemoteEntryNotFoundError) as error:
        raise FileNotFoundError(
            f"{option} {name_or_path!r} not found: there is no such local directory and no such model on the Hub "
            f"(or it is private: log in with `hf auth login`); {_HINT}."
        ) from error
