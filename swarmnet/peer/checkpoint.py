"""Atomic checkpoints: a crash, a full disk or a read-only directory never leaves a torn file.

The state is serialized in memory, written to a temporary file in the same directory, flushed
and fsynced, then renamed over the old checkpoint (rename is atomic on POSIX). On failure the
temporary file is removed, the previous checkpoint stays intact and the caller gets an OSError
to report. (Serializing in memory first matters: torch's zip writer turns an ENOSPC part-way
through into a RuntimeError, "unexpected pos"; a plain write keeps the real error.)
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def save_atomic(state: dict[str, Any], path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getbuffer())


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """``path`` holds ``data`` or, if writing failed (OSError), what it held before."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)
