"""The ``PromptTunedCLIP`` a trainer works on: built from what the user passed, or given a checkpoint's prompt back.

Kept apart from :mod:`cmp_hf.modeling`, which is the model itself: building one here takes what a trainer is given
(a Hub id, a directory, a CLIPModel or a ready prompt), the :class:`~cmp_hf.prompts.config.PromptConfig` the
training arguments describe and a processor, and restoring one checks a checkpoint as ``from_pretrained`` does.
"""

from __future__ import annotations

import os

from peft import set_peft_model_state_dict
from transformers import CLIPModel, CLIPProcessor

from .base_model import check_clip_source
from .constants import ADAPTER_WEIGHTS_NAME
from .integrity import load_weights_file
from .modeling import PromptTunedCLIP, read_prompt_files
from .prompts.config import PromptConfig


def prompt_model(
    model: str | CLIPModel | PromptTunedCLIP,
    prompt_config: PromptConfig | None,
    processing_class: CLIPProcessor | None,
) -> tuple[PromptTunedCLIP, CLIPProcessor]:
    """Turn what the user passed into a PromptTunedCLIP (a new prompt from ``prompt_config``) and its processor."""
    if isinstance(model, PromptTunedCLIP):
        if prompt_config is not None and prompt_config.class_names != model.class_names:
            raise ValueError("class_names differ from the class names of the PromptTunedCLIP passed as model.")
        source = model.prompt_config.base_model_name_or_path
    elif isinstance(model, str):
        check_clip_source(model, option="model")
        source = model
    elif isinstance(model, CLIPModel):
        source = model.name_or_path or None
    else:
        raise TypeError(f"model must be a Hub id or directory, a CLIPModel or a PromptTunedCLIP, got {type(model)}.")
    if processing_class is None:
        if not source:
            raise ValueError("This CLIPModel was not loaded from a directory or the Hub: pass processing_class.")
        processing_class = CLIPProcessor.from_pretrained(source)
    if isinstance(model, PromptTunedCLIP):
        return model, processing_class
    if prompt_config is None:
        raise ValueError("Pass class_names, or a train_dataset whose label column is a ClassLabel with names.")
    clip = CLIPModel.from_pretrained(model) if isinstance(model, str) else model
    prompt_config.base_model_name_or_path = source
    return PromptTunedCLIP.from_clip(clip, processing_class.tokenizer, prompt_config), processing_class


def load_prompt_weights(model: PromptTunedCLIP, checkpoint: str) -> None:
    """Restore the prompt vectors (and the learner's weights) of a checkpoint into ``model``, after the checks
    ``PromptTunedCLIP.from_pretrained`` makes: every file there, tensors and settings matching their digests.
    A checkpoint of another prompt, or a damaged or altered one, is refused before anything is restored."""
    try:
        saved, _ = read_prompt_files(checkpoint)
    except (FileNotFoundError, ValueError) as error:  # a missing file, or a corrupt or altered one
        kind = FileNotFoundError if isinstance(error, FileNotFoundError) else ValueError
        raise kind(
            f"Cannot resume from {checkpoint}: {error} Resume from another checkpoint, or train from the start."
        ) from error
    if saved.class_names != model.prompt_config.class_names or saved.n_ctx != model.prompt_config.n_ctx:
        raise ValueError(f"Checkpoint {checkpoint} holds a prompt for other classes or another n_ctx.")
    set_peft_model_state_dict(model.peft_model, load_weights_file(os.path.join(checkpoint, ADAPTER_WEIGHTS_NAME)))
    model.load_learner_weights(checkpoint)
