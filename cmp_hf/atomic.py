"""Atomic writes: every file cmp_hf writes appears whole or not at all.

A write that fails half-way (a value JSON cannot hold, a full disk, a killed process) must not leave a truncated
``metrics.json`` or adapter that a reader, a resumed run or a push would take for a finished one. Each file is
written to a temporary name in its own directory (same filesystem) and renamed over the target with
``os.replace``, which POSIX and Windows make atomic. Files written by other libraries (peft's adapter) are staged
in a temporary directory with :func:`staged_directory` and moved into place one by one the same way. A write the
system refuses (read-only or full disk, a directory where a file goes, a file where a directory goes) raises
:class:`OutputWriteError`, which names the file and the fix, instead of the bare OS error.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from safetensors.torch import save_file

STAGING_PREFIX = ".cmp_hf-staging-"  # temporary files and directories; a crash can leave one, never a target
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give: mkstemp's 0600 would make shared outputs owner-only


class OutputWriteError(OSError):
    """An output could not be written; the message names the file, the system's reason and what to do."""


_ADVICE = {
    errno.EROFS: "the file system is read-only: choose an output_dir on a writable disk",
    errno.EACCES: "permission denied: choose an output_dir you can write to",
    errno.EPERM: "permission denied: choose an output_dir you can write to",
    errno.ENOSPC: "the disk is full: free space or choose an output_dir on another disk",
    errno.EDQUOT: "the disk quota is exhausted: free space or choose an output_dir on another disk",
    errno.EISDIR: "a directory has that name: remove or rename it, or save elsewhere",
    errno.ENOTDIR: "a file stands where a directory is needed: remove or rename it, or save elsewhere",
    errno.EEXIST: "a file stands where a directory is needed: remove or rename it, or save elsewhere",
}


@contextmanager
def naming_failures(path: str) -> Iterator[None]:
    """Re-raise an OS error inside the block as :class:`OutputWriteError` naming ``path``."""
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as error:
        advice = _ADVICE.get(error.errno, "check that the location exists and is writable")
        reason = error.strerror or str(error)
        raise OutputWriteError(error.errno, f"Cannot write {path} ({reason}): {advice}.") from error


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside ``path`` to write to; renamed to ``path`` when the block ends without error,
    removed otherwise."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    with naming_failures(path):
        os.makedirs(directory, exist_ok=True)
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
        fd, tmp = tempfile.mkstemp(prefix=f"{STAGING_PREFIX}{os.path.basename(path)}.", dir=directory)
        os.fchmod(fd, FILE_MODE)
        os.close(fd)
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def write_json(path: str | os.PathLike, content: Any, **dump_options: Any) -> None:
    """``json.dumps(content, **dump_options)`` plus a final newline, written to ``path`` atomically. The text is
    built before the file is opened, so a value JSON cannot hold (NaN with ``allow_nan=False``) writes nothing."""
    write_text(path, json.dumps(content, **dump_options) + "\n")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


@contextmanager
def staged_directory(directory: str | os.PathLike) -> Iterator[str]:
    """A temporary directory inside ``directory`` to write a set of files to (also through other libraries'
    ``save_pretrained``); when the block ends without error each file is renamed to the same relative path in
    ``directory``, replacing what was there; on error nothing in ``directory`` changes."""
    directory = os.fspath(directory)
    with naming_failures(directory):
        os.makedirs(directory, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory)
    try:
        with naming_failures(directory):
            yield staging
        moves = [
            (os.path.join(root, name), os.path.normpath(os.path.join(directory, os.path.relpath(root, staging), name)))
            for root, _, files in os.walk(staging)
            for name in files
        ]
        for _, target in moves:  # before anything is moved: a failure here leaves the directory as it was
            if os.path.isdir(target):
                with naming_failures(target):
                    raise IsADirectoryError(errno.EISDIR, "Is a directory", target)
        for source, target in moves:
            with naming_failures(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(source, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
