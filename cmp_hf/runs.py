"""A run's output directory, owned by one object, :class:`RunDir`: which checkpoint the run resumes from and whether
that checkpoint is this run's, whether the directory holds a finished run, the lock a run holds while it writes
there, and the run's record (``run.json`` and ``metrics.json``, one typed :class:`~cmp_hf.run_record.RunRecord`).

Trainer resumes from whatever directory it is given, and its ``resume_from_checkpoint=True`` takes the
highest-numbered ``checkpoint-*`` even when that one was cut off while being written (a run killed mid-save). A
checkpoint of another run (other classes, seed or loss) would load without complaint and continue a different
experiment under this run's name. Two runs given the same ``output_dir`` would both succeed, the last writer
silently replacing the other's prompt and metrics. These checks run before any training, each in one place here:
the recipe (and a sweep job through it) claims its directory once; a ``CMPTrainer`` built in Python without a
claimed ``RunDir`` claims its ``output_dir`` itself.
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

from .atomic import STAGING_PREFIX, naming_failures, write_json
from .constants import (
    CALIBRATION_FEATURES_NAME,
    CALIBRATION_NAME,
    EVAL_DIR,
    METRICS_NAME,
    MODEL_CARD_NAME,
    OUTPUT_DIR_LOCK_NAME,
    PROMPT_CONFIG_NAME,
    PROMPT_DIGEST_NAME,
    PROMPT_FILES,
    RUN_IDENTITY_FIELDS,
    RUN_INFO_NAME,
    SWEEP_JOB_NAME,
    TRAINER_STATE_NAME,
    TRAINING_ARGS_NAME,
)
from .learners import LEARNERS
from .run_record import RunRecord

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_TRUE, _FALSE = {"true", "last"}, {"false", "none", ""}
_HELD: dict[str, RunDir] = {}  # lock file -> the RunDir of this process that holds it

# What a run writes into its output_dir, all of which an overwrite replaces (with EVAL_DIR and the checkpoints);
# each learner's own weights file comes from the registry, so a new learner's is replaced too
RUN_OUTPUT_FILES = (
    *PROMPT_FILES, PROMPT_DIGEST_NAME, CALIBRATION_NAME, CALIBRATION_FEATURES_NAME, TRAINING_ARGS_NAME,
    MODEL_CARD_NAME, RUN_INFO_NAME, METRICS_NAME,
    *sorted({learner.weights_name for learner in LEARNERS.values() if learner.weights_name}),
)  # fmt: skip
# What says a directory is a recipe run's (the recipe writes run.json when it starts, a sweep job sweep_job.json)
RECIPE_RUN_FILES = (RUN_INFO_NAME, SWEEP_JOB_NAME)


class RunDir:
    """A run's output directory.

    **Finished.** A directory holds a finished run when the file its run writes last is there. A recipe run says
    it is one when it starts (``run.json``, or a sweep job's ``sweep_job.json``) and writes, in this order and each
    atomically, the prompt, the final ``run.json`` and ``metrics.json``: it is finished when ``metrics.json`` and
    the prompt are there. A prompt trained and saved with ``CMPTrainer`` alone (no ``run.json``) is finished when it
    is saved. So a recipe run killed at any point before its end (while training, or evaluating after its prompt was
    saved) is unfinished: the recipe and the sweep run it again without ``overwrite_output_dir`` (resuming from its
    last complete checkpoint when there is one), the report lists it as unfinished; and a finished run, of either
    kind, is never trained over unless ``overwrite_output_dir`` asks for it. The recipe (:meth:`is_finished`), the
    sweep and the report (``cmp_hf.paper_tables``) use this one definition.

    **Claim.** :meth:`claim` (a context manager; :meth:`acquire` and :meth:`release` for a holder that outlives a
    block, as a trainer does) checks that the directory can be written, takes its lock, refuses a finished run and
    removes the outputs of a run an overwrite replaces. The lock is taken once per run (the recipe hands its claimed
    ``RunDir`` to the trainer): another process's claim is refused while it is held; a later claim in this process
    (a new trainer after one that failed, in a notebook) takes it over from the earlier holder.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.checkpoint: str | None = None  # the checkpoint this run resumes from (resume_from)
        self._lock: int | None = None  # the descriptor of the held lock file

    def __repr__(self) -> str:
        return f"RunDir({self.path!r})"

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # ---- resuming ---------------------------------------------------------------------------------------------

    def last_checkpoint(self) -> str | None:
        return last_checkpoint(self.path)

    def resume_from(self, value: str | bool | None) -> str | None:
        """Resolve ``resume_from_checkpoint`` into :attr:`checkpoint` and return it: ``None``/``False``/
        ``"false"`` for none; ``True``/``"true"`` for the last complete checkpoint here; otherwise a path, which
        must be a complete Trainer checkpoint. Raises with what to do when there is none."""
        self.checkpoint = self._checkpoint_named(value)
        return self.checkpoint

    def _checkpoint_named(self, value: str | bool | None) -> str | None:
        if value is None or value is False or (isinstance(value, str) and value.strip().lower() in _FALSE):
            return None
        if value is True or (isinstance(value, str) and value.strip().lower() in _TRUE):
            checkpoint = self.last_checkpoint()
            if checkpoint is None:
                raise FileNotFoundError(
                    f"resume_from_checkpoint is true but {self.path} holds no complete {PREFIX_CHECKPOINT_DIR}-* "
                    f"directory (one with {TRAINER_STATE_NAME}): nothing to resume. Drop resume_from_checkpoint to "
                    "start this run from step 0, or give the path of a checkpoint."
                )
            return checkpoint
        checkpoint = os.fspath(value)
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(
                f"resume_from_checkpoint: {checkpoint} does not exist. Give a {PREFIX_CHECKPOINT_DIR}-<step> "
                "directory of this run's output_dir, or true for the last one."
            )
        if _global_step(checkpoint) is None:
            raise ValueError(
                f"resume_from_checkpoint: {checkpoint} is not a complete Trainer checkpoint (no readable "
                f"{TRAINER_STATE_NAME}; a run killed while saving leaves such a directory). Resume from an earlier "
                "checkpoint, or pass true for the last complete one."
            )
        return checkpoint

    def check_checkpoint_is_this_run(self, args: TrainingArguments, prompt: dict[str, Any]) -> None:
        """Refuse :attr:`checkpoint` if another run saved it: its prompt (classes, context, learner, base model)
        and the training options that shape the trajectory (seed, loss, optimizer, batch, schedule;
        ``RUN_IDENTITY_FIELDS``) must be this run's, or resuming would silently continue a different experiment."""
        if self.checkpoint is None:
            return
        saved_prompt = _read_checkpoint_json(self.checkpoint, PROMPT_CONFIG_NAME)
        saved_args = _read_checkpoint_json(self.checkpoint, TRAINING_ARGS_NAME)
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
                f"resume_from_checkpoint: {self.checkpoint} belongs to another run ({'; '.join(differences)}). Resume "
                "from a checkpoint of this run (true takes the last one in output_dir), or start this run without "
                "resume_from_checkpoint."
            )

    # ---- finished or not --------------------------------------------------------------------------------------

    def finished_files(self) -> list[str]:
        """The files that make this a finished run (see the class docstring), or ``[]`` when it is not one."""
        prompt = list(PROMPT_FILES)
        if not all(os.path.isfile(self._file(name)) for name in prompt):
            return []
        if not any(os.path.isfile(self._file(name)) for name in RECIPE_RUN_FILES):
            return prompt  # a prompt saved by CMPTrainer alone
        return [METRICS_NAME, *prompt] if os.path.isfile(self._file(METRICS_NAME)) else []

    def is_finished(self) -> bool:
        return bool(self.finished_files())

    def has_record(self) -> bool:
        """Whether a recipe run's ``run.json`` is here (a finished recipe run has one; a trainer's prompt not)."""
        return os.path.isfile(self._file(RUN_INFO_NAME))

    def state(self) -> tuple[str, str | None, str | None]:
        """(state, log, error line): ``done`` (finished), ``failed`` (its sweep job recorded an error, in
        ``sweep_job.json``), ``incomplete`` (started, not finished, no error: still running, or killed; the log's
        last line) or ``missing`` (no record of a sweep job's start)."""
        if self.is_finished():
            return "done", None, None
        try:
            record = json.loads(Path(self._file(SWEEP_JOB_NAME)).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "missing", None, None
        log = record.get("log")
        if "error" in record:
            return "failed", log, record["error"]
        return "incomplete", log, last_line(read_log(log)) or None

    # ---- the run's record -------------------------------------------------------------------------------------

    def begin(self, record: RunRecord) -> None:
        """Say that a recipe run started here (see the class docstring): ``run.json`` without results, unless one is
        here already (a run resumed, or run again, keeps the record it has until :meth:`finish` replaces it)."""
        if not self.has_record():
            write_json(self._file(RUN_INFO_NAME), record.run_json(), indent=2, allow_nan=False)

    def finish(self, record: RunRecord) -> None:
        """Write the final ``run.json``, then ``metrics.json``: from then on, the run is finished."""
        write_json(self._file(RUN_INFO_NAME), record.run_json(), indent=2, allow_nan=False)
        write_json(self._file(METRICS_NAME), record.metrics, indent=2, allow_nan=False)

    def read_record(self) -> RunRecord:
        """The finished recipe run's record; an unreadable file is an error that names it."""
        try:
            run = json.loads(Path(self._file(RUN_INFO_NAME)).read_text(encoding="utf-8"))
            return RunRecord.from_json(run, json.loads(Path(self._file(METRICS_NAME)).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(f"{self.path} has an unreadable result file ({error}): re-run it.") from error

    # ---- claiming the directory -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def claim(self, overwrite: bool, is_main_process: bool = True) -> Iterator[RunDir]:
        """Inside the block, this run holds the directory: see :meth:`acquire`. A lock the caller already holds
        (a sweep job's) stays the caller's to release."""
        held = self.locked
        self.acquire(overwrite, is_main_process)
        try:
            yield self
        finally:
            if not held:
                self.release()

    def acquire(self, overwrite: bool, is_main_process: bool = True) -> None:
        """On the main process: check that the directory can be written, take its lock (unless held already),
        then, with the lock held (so that no run finishes there between the check and the lock), refuse a
        finished run unless overwriting or resuming it (:attr:`checkpoint`) and remove the outputs an overwrite
        replaces. Other processes only check. Release with :meth:`release`."""
        if not is_main_process:
            self.check_is_free(overwrite)
            return
        self.check_is_writable()
        held = self.locked
        if not held:
            self.lock()
        try:
            self.check_is_free(overwrite)
            self.remove_replaced_run(overwrite)
        except BaseException:
            if not held:
                self.release()
            raise

    def check_is_writable(self) -> None:
        """Before any training: the directory is (or can be made) one a file can be written into. A file of that
        name, a read-only disk, missing permissions or a full disk fail now, naming the path, instead of after
        training when the prompt is saved."""
        with naming_failures(self.path):
            if os.path.exists(self.path) and not os.path.isdir(self.path):
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", self.path)
            os.makedirs(self.path, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=STAGING_PREFIX, dir=self.path)
            try:
                os.write(fd, b"cmp_hf")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.remove(probe)

    def check_is_free(self, overwrite: bool) -> None:
        """Refuse to train into a finished run, unless asked to overwrite it or resuming it."""
        found = self.finished_files()
        if found and not (overwrite or self.checkpoint is not None):
            raise FileExistsError(
                f"{self.path} already holds a finished run ({', '.join(found)}); training there would overwrite its "
                "prompt and metrics. Choose another output_dir, continue that run with resume_from_checkpoint, or "
                "replace it with overwrite_output_dir: true (--overwrite_output_dir true)."
            )

    def remove_replaced_run(self, overwrite: bool) -> None:
        """With ``overwrite_output_dir`` (and not resuming), remove the outputs of the run the directory holds (its
        prompt or metrics are there) before the new run starts: its prompt, card, metrics, ``eval/<set>/`` reports
        and checkpoints. Left alone, an eval set the new run does not evaluate would keep the old run's report
        beside the new card, and a push would upload it. Other files (a sweep's records, the few-shot split, your
        own) stay. Called with the lock held, after :meth:`check_is_free`."""
        outputs = (METRICS_NAME, *PROMPT_FILES)
        if not overwrite or self.checkpoint is not None or not any(os.path.isfile(self._file(n)) for n in outputs):
            return
        removed = [name for name in RUN_OUTPUT_FILES if os.path.isfile(self._file(name))]
        for name in removed:
            os.remove(self._file(name))
        folders = [EVAL_DIR] if os.path.isdir(self._file(EVAL_DIR)) else []
        folders += sorted(name for name in os.listdir(self.path) if _CHECKPOINT.match(name))
        for name in folders:
            shutil.rmtree(self._file(name))
        logger.warning(
            "overwrite_output_dir: removed the replaced run's outputs from %s: %s.",
            self.path, ", ".join([*removed, *(f"{name}/" for name in folders)]),
        )  # fmt: skip

    @property
    def locked(self) -> bool:
        return self._lock is not None

    def lock(self) -> None:
        """Hold the directory's lock file until :meth:`release`.

        Another process that tries while it is held gets an error naming the lock and the holder's pid; another
        ``RunDir`` of this process takes it over (the earlier holder's release then leaves it alone). The lock is an
        ``flock`` on the file, which the system drops when its holder dies, so the lock of a killed run is taken
        over (the file's content, the holder's pid, is then rewritten).
        """
        if self.locked:
            raise RuntimeError(f"{self} holds its lock already: a run takes it once.")
        if fcntl is None:
            logger.warning("No file locking on this platform: %s is not protected against a second run.", self.path)
            return
        os.makedirs(self.path, exist_ok=True)
        path = os.path.realpath(self._file(OUTPUT_DIR_LOCK_NAME))
        if path in _HELD:  # held by an earlier run of this process
            earlier = _HELD[path]
            self._lock, earlier._lock = earlier._lock, None
            _HELD[path] = self
            return
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RuntimeError(
                    f"{self.path} is in use by another run ({holder}; lock file {path}). Wait for that run to end, "
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
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}".encode())
        self._lock = fd
        _HELD[path] = self

    def release(self) -> None:
        """Give the lock back (removing the lock file), if this ``RunDir`` holds it."""
        if self._lock is None:
            return
        fd, self._lock = self._lock, None
        path = os.path.realpath(self._file(OUTPUT_DIR_LOCK_NAME))
        del _HELD[path]
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # while still locked, so no other process locks it meanwhile
        os.close(fd)


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The highest-numbered ``checkpoint-<step>`` of ``output_dir`` whose trainer state (written last) is readable."""
    output_dir = os.fspath(output_dir)
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


def _read_checkpoint_json(checkpoint: str, name: str) -> dict[str, Any]:
    try:
        with open(os.path.join(checkpoint, name), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"resume_from_checkpoint: {checkpoint} is not a cmp_hf checkpoint ({name} is missing or unreadable: "
            f"{error}). Resume from a checkpoint that CMPTrainer saved."
        ) from error


def _global_step(checkpoint: str) -> int | None:
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME), encoding="utf-8") as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def read_log(path: str | None) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace") if path else ""
    except OSError:
        return ""
