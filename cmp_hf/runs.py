"""A run's output directory: which checkpoint a run resumes from, whether a checkpoint is this run's, whether the
directory already holds a finished run, and the lock a run holds while it writes there.

Trainer resumes from whatever directory it is given, and its ``resume_from_checkpoint=True`` takes the
highest-numbered ``checkpoint-*`` even when that one was cut off while being written (a run killed mid-save). A
checkpoint of another run (other classes, seed or loss) would load without complaint and continue a different
experiment under this run's name. Two runs given the same ``output_dir`` would both succeed, the last writer
silently replacing the other's prompt and metrics. These checks run before any training.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .atomic import STAGING_PREFIX, naming_failures
from .constants import (
    CALIBRATION_FEATURES_NAME,
    CALIBRATION_NAME,
    EVAL_DIR,
    MAPLE_PROMPTS_NAME,
    META_NET_NAME,
    MODEL_CARD_NAME,
    OUTPUT_DIR_LOCK_NAME,
    PRODA_CONTEXTS_NAME,
    PROMPT_CONFIG_NAME,
    PROMPT_DIGEST_NAME,
    PROMPT_FILES,
    RUN_IDENTITY_FIELDS,
    RUN_INFO_NAME,
    RUN_METRICS_NAME,
    SWEEP_JOB_NAME,
    TRAINER_STATE_NAME,
    TRAINING_ARGS_NAME,
)

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_TRUE, _FALSE = {"true", "last"}, {"false", "none", ""}
_HELD: dict[str, list[int]] = {}  # lock file -> [descriptor, holds] of the locks this process holds


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


def finished_run_files(output_dir: str) -> list[str]:
    """What marks ``output_dir`` as holding a finished run: a recipe's ``metrics.json``, or a saved prompt."""
    found = [RUN_METRICS_NAME] if os.path.isfile(os.path.join(output_dir, RUN_METRICS_NAME)) else []
    if all(os.path.isfile(os.path.join(output_dir, name)) for name in PROMPT_FILES):
        found += list(PROMPT_FILES)
    return found


def is_finished(output_dir: str | os.PathLike) -> bool:
    """A finished run: a readable ``metrics.json`` (the recipe writes it last, atomically) and the saved prompt."""
    try:
        metrics = json.loads(Path(output_dir, RUN_METRICS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(metrics) and all(Path(output_dir, name).is_file() for name in PROMPT_FILES)


def run_state(output_dir: str | os.PathLike) -> tuple[str, str | None, str | None]:
    """(state, log, error line) of a run directory: ``done`` (finished), ``failed`` (its sweep job recorded an
    error, in ``sweep_job.json``), ``incomplete`` (started, not finished, no error: still running, or killed; the
    log's last line) or ``missing`` (no record of a start)."""
    if is_finished(output_dir):
        return "done", None, None
    try:
        record = json.loads(Path(output_dir, SWEEP_JOB_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "missing", None, None
    log = record.get("log")
    if "error" in record:
        return "failed", log, record["error"]
    return "incomplete", log, last_line(read_log(log)) or None


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def read_log(path: str | None) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace") if path else ""
    except OSError:
        return ""


def check_output_dir_is_writable(output_dir: str) -> None:
    """Before any training: ``output_dir`` is (or can be made) a directory one can write a file into. A file of
    that name, a read-only disk, missing permissions or a full disk fail now, naming the path, instead of after
    training when the prompt is saved."""
    with naming_failures(output_dir):
        if os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", output_dir)
        os.makedirs(output_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=STAGING_PREFIX, dir=output_dir)
        try:
            os.write(fd, b"cmp_hf")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)


def check_output_dir_is_free(output_dir: str, overwrite: bool, resuming: bool) -> None:
    """Refuse to train into a directory that holds a finished run, unless asked to overwrite it or resuming it."""
    found = finished_run_files(output_dir)
    if found and not (overwrite or resuming):
        raise FileExistsError(
            f"{output_dir} already holds a finished run ({', '.join(found)}); training there would overwrite its "
            "prompt and metrics. Choose another output_dir, continue that run with resume_from_checkpoint, or "
            "replace it with overwrite_output_dir: true (--overwrite_output_dir true)."
        )


# What a run writes into its output_dir, all of which an overwrite replaces (with EVAL_DIR and the checkpoints)
RUN_OUTPUT_FILES = (
    *PROMPT_FILES, PROMPT_DIGEST_NAME, CALIBRATION_NAME, CALIBRATION_FEATURES_NAME, META_NET_NAME,
    PRODA_CONTEXTS_NAME, MAPLE_PROMPTS_NAME, TRAINING_ARGS_NAME, MODEL_CARD_NAME, RUN_INFO_NAME, RUN_METRICS_NAME,
)  # fmt: skip


def remove_replaced_run(output_dir: str, overwrite: bool, resuming: bool) -> None:
    """With ``overwrite_output_dir`` (and not resuming), remove the outputs of the finished run ``output_dir``
    holds before the new run starts: its prompt, card, metrics, ``eval/<set>/`` reports and checkpoints. Left
    alone, an eval set the new run does not evaluate would keep the old run's report beside the new card, and a
    push would upload it. Other files (a sweep's records, the few-shot split, your own) stay. Call it with the lock
    held, after :func:`check_output_dir_is_free`."""
    if not overwrite or resuming or not finished_run_files(output_dir):
        return
    removed = [name for name in RUN_OUTPUT_FILES if os.path.isfile(os.path.join(output_dir, name))]
    for name in removed:
        os.remove(os.path.join(output_dir, name))
    folders = [EVAL_DIR] if os.path.isdir(os.path.join(output_dir, EVAL_DIR)) else []
    folders += sorted(name for name in os.listdir(output_dir) if _CHECKPOINT.match(name))
    for name in folders:
        shutil.rmtree(os.path.join(output_dir, name))
    logger.warning(
        "overwrite_output_dir: removed the replaced run's outputs from %s: %s.",
        output_dir, ", ".join([*removed, *(f"{name}/" for name in folders)]),
    )  # fmt: skip


def lock_output_dir(output_dir: str) -> None:
    """Hold ``output_dir``'s lock file until :func:`unlock_output_dir`; re-entrant within a process.

    A second process that tries while a run writes there gets an error naming the lock and that run's pid. The
    lock is an ``flock`` on the file, which the system drops when its holder dies, so the lock of a killed run is
    taken over (the file's content, the holder's pid, is then rewritten).
    """
    path = os.path.realpath(os.path.join(output_dir, OUTPUT_DIR_LOCK_NAME))
    if path in _HELD:
        _HELD[path][1] += 1
        return
    if fcntl is None:
        logger.warning("No file locking on this platform: %s is not protected against a second run.", output_dir)
        return
    os.makedirs(output_dir, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RuntimeError(
                f"{output_dir} is in use by another run ({holder}; lock file {path}). Wait for that run to end, "
                "or give this one another output_dir."
            ) from None
        try:  # the holder we waited for may have released it and removed the file: lock the current file
            current = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    _HELD[path] = [fd, 1]


def unlock_output_dir(output_dir: str) -> None:
    """Give back one hold of ``output_dir``'s lock; the last one removes the lock file."""
    path = os.path.realpath(os.path.join(output_dir, OUTPUT_DIR_LOCK_NAME))
    held = _HELD.get(path)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[path]
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # while still locked, so no other process locks the file being removed
        os.close(held[0])


@contextlib.contextmanager
def output_dir_of_run(output_dir: str, overwrite: bool, resuming: bool, is_main_process: bool) -> Iterator[None]:
    """On the main process, hold ``output_dir``'s lock inside the block; check, once it is held (so that no run
    finishes there between the check and the lock), that the directory may be trained into."""
    if not is_main_process:
        check_output_dir_is_free(output_dir, overwrite, resuming)
        yield
        return
    check_output_dir_is_writable(output_dir)
    lock_output_dir(output_dir)
    try:
        check_output_dir_is_free(output_dir, overwrite, resuming)
        remove_replaced_run(output_dir, overwrite, resuming)
        yield
    finally:
        unlock_output_dir(output_dir)
