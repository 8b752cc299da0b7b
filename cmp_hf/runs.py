"""A run's output directory: which checkpoint a run resumes from, and whether a checkpoint is this run's.

Trainer resumes from whatever directory it is given, and its ``resume_from_checkpoint=True`` takes the
highest-numbered ``checkpoint-*`` even when that one was cut off while being written (a run killed mid-save). A
checkpoint of another run (other classes, seed or loss) would load without complaint and continue a different
experiment under this run's name. These checks run before any training.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from transformers import TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .constants import PROMPT_CONFIG_NAME, RUN_IDENTITY_FIELDS, TRAINER_STATE_NAME, TRAINING_ARGS_NAME

_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_TRUE, _FALSE = {"true", "last"}, {"false", "none", ""}


def checkpoint_to_resume(value: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint directory ``resume_from_checkpoint`` names: ``None``/``False``/``"false"`` for none;
    ``True``/``"true"`` for the last complete checkpoint in ``output_dir``; otherwise a path, which must be a
    complete Trainer checkpoint. Raises with what to do when there is none."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in _FALSE):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in _TRUE):
        checkpoint = last_checkpoint(output_dir)
        if checkpoint is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint is true but {output_dir} holds no complete {PREFIX_CHECKPOINT_DIR}-* "
                f"directory (one with {TRAINER_STATE_NAME}): nothing to resume. Drop resume_from_checkpoint to start "
                "this run from step 0, or give the path of a checkpoint."
            )
        return checkpoint
    checkpoint = os.fspath(value)
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(
            f"resume_from_checkpoint: {checkpoint} does not exist. Give a {PREFIX_CHECKPOINT_DIR}-<step> directory "
            "of this run's output_dir, or true for the last one."
        )
    if _global_step(checkpoint) is None:
        raise ValueError(
            f"resume_from_checkpoint: {checkpoint} is not a complete Trainer checkpoint (no readable "
            f"{TRAINER_STATE_NAME}; a run killed while saving leaves such a directory). Resume from an earlier "
            "checkpoint, or pass true for the last complete one."
        )
    return checkpoint


def last_checkpoint(output_dir: str) -> str | None:
    """The highest-numbered ``checkpoint-<step>`` of ``output_dir`` whose trainer state (written last) is readable."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        ((int(match.group(1)), name) for name in os.listdir(output_dir) if (match := _CHECKPOINT.match(name))),
        reverse=True,
    )
    for _, name in steps:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and _global_step(path) is not None:
            return path
    return None


def checkpoint_step(checkpoint: str) -> int:
    """The optimizer step a complete checkpoint was saved at."""
    step = _global_step(checkpoint)
    if step is None:
        raise ValueError(f"{checkpoint} has no readable {TRAINER_STATE_NAME}.")
    return step


def check_checkpoint_is_this_run(checkpoint: str, args: TrainingArguments, prompt: dict[str, Any]) -> None:
    """Refuse a checkpoint saved by another run: its prompt (classes, context, learner, base model) and the training
    options that shape the trajectory (seed, loss, optimizer, batch, schedule; ``RUN_IDENTITY_FIELDS``) must be
    this run's, or resuming would silently continue a different experiment."""
    saved_prompt = _read_json(os.path.join(checkpoint, PROMPT_CONFIG_NAME), checkpoint)
    saved_args = _read_json(os.path.join(checkpoint, TRAINING_ARGS_NAME), checkpoint)
    current_args = json.loads(args.to_json_string())
    differences = [
        f"{key}: {saved_prompt.get(key)!r} there, {value!r} here"
        for key, value in prompt.items()
        if saved_prompt.get(key) != value
    ] + [
        f"{key}: {saved_args.get(key)!r} there, {current_args.get(key)!r} here"
        for key in RUN_IDENTITY_FIELDS
        if key in current_args and saved_args.get(key) != current_args[key]
    ]
    if differences:
        raise ValueError(
            f"resume_from_checkpoint: {checkpoint} belongs to another run ({'; '.join(differences)}). Resume from a "
            "checkpoint of this run (true takes the last one in output_dir), or start this run without "
            "resume_from_checkpoint."
        )


def _read_json(path: str, checkpoint: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"resume_from_checkpoint: {checkpoint} is not a cmp_hf checkpoint ({os.path.basename(path)} is missing "
            f"or unreadable: {error}). Resume from a checkpoint that CMPTrainer saved."
        ) from error


def _global_step(checkpoint: str) -> int | None:
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME), encoding="utf-8") as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
