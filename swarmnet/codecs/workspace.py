"""Reusable scratch tensors for codec hot paths, one set per thread.

Touching a fresh 40 MB buffer costs several times a pass over an existing one (page faults, see
DESIGN.md), so temporaries of encode and decode live here and are reused call after call. The
set is thread-local: the compute thread (encode) and any number of exchange workers (decode) can
run codecs at the same time without sharing a buffer. Nothing handed out here may escape a call:
published snapshots and decoded outputs are always fresh or caller-owned tensors.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

_local = threading.local()


def scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A flat tensor of ``numel`` elements, contents undefined, reused across calls.

    Two names never share memory; asking for the same name again invalidates the previous
    result. Capacity only grows (a smaller request returns a prefix view).
    """
    pool: dict[tuple[str, torch.dtype, torch.device], Tensor] | None = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = {}
    key = (name, dtype, device)
    buf = pool.get(key)
    if buf is None or buf.numel() < numel:
        buf = pool[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def release_all() -> None:
    """Drop this thread's scratch tensors (tests and benchmarks use it to measure cold paths)."""
    _local.pool = {}
