"""Atomic writes: every file cmp_hf writes appears whole or not at all.

A write that fails half-way (a value JSON cannot hold, a full disk, a killed process) must not leave a truncated
``metrics.json`` or adapter that a reader, a resumed run or a push would take for a finished one. Each file is
written to a temporary name in its own directory (same filesystem) and renamed over the target with
``os.replace``, which POSIX and Windows make atomic. Files written by other libraries (peft's adapter) are staged
in a temporary directory with :func:`staged_directory` and moved into place one by one the same way.
"""

from __future__ import annotations

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


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside ``path`` to write to; renamed to ``path`` when the block ends without error,
    removed otherwise."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
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
    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory)
    try:
        yield staging
        for root, _, files in os.walk(staging):
            target_root = os.path.join(directory, os.path.relpath(root, staging))
            os.makedirs(target_root, exist_ok=True)
            for name in files:
                os.replace(os.path.join(root, name), os.path.join(target_root, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
