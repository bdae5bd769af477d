"""Host memory for published snapshots, handed out again once nothing refers to it.

A published snapshot's buffers leave as zero-copy frames and stay referenced by the snapshot
store's history and by every send still in flight, so they cannot be scratch tensors
(workspace.py). Allocated fresh at every publish they cost a page fault on each page first
touched: copying a 40 MB model into fresh memory took 60 ms on the development machine, ten
times the copy itself (docs/benchmarks.md, Codecs). The pool below recycles that memory, and
knows exactly when it may: each hand-out is a tensor over a private numpy view of the pooled
block, torch keeps that view alive for as long as any tensor, array or memoryview derived from
the tensor exists, and the view's weak-reference callback returns the block to the pool when the
last one goes, whichever thread drops it (the compute thread, the event loop, pyzmq's I/O).

Only host memory is pooled: on an accelerator torch's caching allocator already reuses device
memory. Host copies of accelerator tensors (what crosses the wire) come from pinned blocks, so
the device-to-host copy is one DMA transfer into memory that stays registered. The copies run on
a stream of their own, after the work already queued on the caller's stream and beside whatever
the training thread queues next; an event recorded after them (:func:`copies_done`) tells the
server when the bytes may leave, so neither thread waits for the transfer.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from typing import Any

import numpy as np
import torch
from torch import Tensor

_ALIGN = 64
"""Byte alignment of every block (torch's own CPU allocations are 64-byte aligned)."""

_FORGET_AFTER = 64
"""Idle blocks of a size not asked for in this many hand-outs are released: a size that stopped
being used (a codec's plane count changed, a model was replaced) does not hold memory forever."""


class HostPool:
    """Recycled host blocks, keyed by exact byte size and pinning; thread-safe."""

    def __init__(self) -> None:
        self._idle: dict[tuple[int, bool], deque[np.ndarray]] = {}
        self._last_asked: dict[tuple[int, bool], int] = {}
        self._asked = 0
        self._lock = threading.Lock()
        self.allocated = 0
        """Blocks allocated so far (a steady state allocates none)."""

    def empty(self, numel: int, dtype: torch.dtype, *, pinned: bool = False) -> Tensor:
        """A flat CPU tensor of ``numel`` elements, contents undefined, that may be published:
        its memory returns to the pool only after every reference to it is gone."""
        key = (numel * dtype.itemsize, pinned)
        with self._lock:
            self._asked += 1
            self._last_asked[key] = self._asked
            idle = self._idle.setdefault(key, deque())
            block = idle.popleft() if idle else None
            self._forget_unused()
        if block is None:
            block = self._allocate(*key)
        view = block[:]  # private: only the tensor below refers to it
        weakref.finalize(view, self._give_back, key, block).atexit = False
        return torch.from_numpy(view).view(dtype)

    def _allocate(self, nbytes: int, pinned: bool) -> np.ndarray:
        self.allocated += 1
        if pinned:
            return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True).numpy()[:nbytes]
        raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
        start = -raw.ctypes.data % _ALIGN
        return raw[start : start + nbytes]

    def _give_back(self, key: tuple[int, bool], block: np.ndarray) -> None:
        # Runs on whichever thread dropped the last reference: a deque append needs no lock.
        idle = self._idle.get(key)
        if idle is not None:
            idle.append(block)
        # else: the size was forgotten in the meantime, and the block goes with its last reference.

    def _forget_unused(self) -> None:
        stale = [k for k, t in self._last_asked.items() if self._asked - t > _FORGET_AFTER]
        for key in stale:
            del self._last_asked[key]
            self._idle.pop(key, None)

    def idle_blocks(self) -> int:
        """Blocks waiting in the pool now (tests and diagnostics)."""
        return sum(len(d) for d in self._idle.values())


_pool = HostPool()


def published(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An empty flat tensor for a snapshot about to be published, on ``device``."""
    if device.type == "cpu":
        return _pool.empty(numel, dtype)
    return torch.empty(numel, dtype=dtype, device=device)


_copy_streams: dict[torch.device, Any] = {}
_in_flight: deque[tuple[Any, Tensor]] = deque()
"""Host copies whose transfer may still be running, with the event that ends it: their pinned
blocks must not return to the pool before the bytes land, even if every reader dropped them."""
_in_flight_lock = threading.Lock()  # the training thread encodes, the event loop donates


def _copy_stream(device: torch.device) -> Any:
    """The device's stream for host copies (one of torch's pooled streams: other work may share
    it, which orders copies after that work but never breaks them)."""
    stream = _copy_streams.get(device)
    if stream is None:
        stream = _copy_streams.setdefault(device, torch.cuda.Stream(device))
    return stream


class CopiesDone:
    """The end of the host copies queued for one device so far (see :func:`copies_done`).

    Event calls run on the event's device: on a thread that never chose one, CUDA would
    otherwise set up a context on GPU 0 (hundreds of MB there for every peer of the node)."""

    __slots__ = ("device", "_event")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        with torch.cuda.device(device):
            # Blocking: a thread that waits for it sleeps instead of spinning.
            self._event = torch.cuda.Event(blocking=True)
            self._event.record(_copy_stream(device))

    def query(self) -> bool:
        with torch.cuda.device(self.device):
            return bool(self._event.query())

    def synchronize(self) -> None:
        """CPU<->GPU sync point: returns once the copies have landed."""
        with torch.cuda.device(self.device):
            self._event.synchronize()


def host_copy(t: Tensor) -> Tensor:
    """A flat host copy of an accelerator tensor, in pool memory.

    For CUDA the copy is queued and the call returns at once: on the device's copy stream, after
    the work already queued on the caller's stream, into pinned memory (one DMA transfer). The
    bytes may be read once :func:`copies_done` (asked for after this call) has completed; ``t``
    stays allocated until then even if the caller drops it. Other devices copy synchronously.
    """
    if t.device.type != "cuda":
        return _pool.empty(t.numel(), t.dtype).copy_(t.reshape(-1))
    out = _pool.empty(t.numel(), t.dtype, pinned=True)
    stream = _copy_stream(t.device)
    with _in_flight_lock, torch.cuda.device(t.device):
        while _in_flight and _in_flight[0][0].query():
            _in_flight.popleft()
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            out.copy_(t.reshape(-1), non_blocking=True)
        t.record_stream(stream)  # the caching allocator keeps t's memory until the copy has read it
        done = torch.cuda.Event()
        done.record(stream)
        _in_flight.append((done, out))
    return out


def copies_done(device: torch.device) -> CopiesDone | None:
    """What completes once every host copy queued so far for ``device`` has landed (``None``
    where :func:`host_copy` copies synchronously)."""
    return CopiesDone(device) if device.type == "cuda" else None


async def until_copied(done: CopiesDone | None) -> None:
    """For the event loop: return once ``done`` (from :func:`copies_done`) has completed,
    waiting in a thread of the default executor when it has not yet.

    CPU<->GPU sync point, off the loop and off the training thread: a frame leaves host memory
    only after its device-to-host copy."""
    if done is not None and not done.query():
        await asyncio.to_thread(done.synchronize)
