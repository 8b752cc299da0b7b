"""Writing result files so that no reader ever sees half of one: a temporary file beside the target, then a rename."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``: a process killed
    mid-write leaves the old file (or none), never a truncated one that a later reader would take as complete."""
    directory = os.path.dirname(os.fspath(path)) or "."
    fd, staging = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.unlink(staging)
        raise


def write_json_atomic(path: str | os.PathLike, content: Any) -> None:
    """``content`` as indented JSON, written atomically (:func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(content, indent=2) + "\n")
