"""Atomic checkpoints: a crash, a full disk or a read-only directory never leaves a torn file.

The state is written to a temporary file in the same directory, flushed and fsynced, then
renamed over the old checkpoint (rename is atomic on POSIX). On failure the temporary file is
removed, the previous checkpoint stays intact and the caller gets an OSError to report. torch
writes straight into the file (no copy of the state in memory: for a large model that was up to
three more copies of it, with the optimizer's), through a wrapper that keeps a failed write's
OSError, since torch's zip writer reports a full disk part-way through as a RuntimeError
("unexpected pos").
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


class _WriteErrors:
    """The file torch.save writes to, remembering the first OSError a write raised."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data: bytes | memoryview) -> int:
        try:
            return self._fh.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self._fh.flush()


def save_atomic(state: dict[str, Any], path: Path) -> None:
    def write(fh: IO[bytes]) -> None:
        sink = _WriteErrors(fh)
        try:
            torch.save(state, sink)  # type: ignore[arg-type]  # any object with write() will do
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise

    _replace_atomically(path, write)


def write_atomic(path: Path, data: bytes | memoryview, *, private: bool = True) -> None:
    """``path`` holds ``data`` or, if writing failed (OSError), what it held before. Readable by
    its owner only unless not ``private`` (a report for others to read: mode 0644)."""
    _replace_atomically(path, lambda fh: fh.write(data), private=private)


def _replace_atomically(path: Path, write: Callable[[IO[bytes]], Any], *, private: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if not private:
            os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def non_finite(state: Any, where: str = "") -> str | None:
    """Where a checkpoint's state holds a NaN or an infinity (e.g. ``optimizer.state.3.momentum_buffer``),
    None if nowhere: torch does not verify a file's contents, and a diverged state must not pass
    for a good one. Walks tensors in dicts, lists and tuples."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and not bool(torch.isfinite(state).all()):  # CPU<->GPU sync point, per tensor
            return where or "the state"
        return None
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for key, value in items:
        found = non_finite(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def load(path: Path) -> dict[str, Any]:
    """Tensors, numbers, strings and containers of them only (``weights_only``): unpickling a
    file may not run code, whoever put it in the run directory."""
    return torch.load(path, map_location="cpu", weights_only=True)
