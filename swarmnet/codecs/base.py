"""The snapshot codec interface.

Legend: N = number of coordinates of the flat floating-point parameter vector.

A codec turns one flat float32 vector into an immutable :class:`Encoded` snapshot once per
publish; the snapshot server then answers any number of pulls from it without re-encoding.
Codecs with partial reads (the lattice codec serves only the low bit-planes a reader asks for)
take part in a small dialogue, driven by the exchange and opaque to it:

    want = codec.plan(state, hints)                 # reader: what to ask for first
    meta, frames = codec.select(encoded, want)      # server: that subset of the snapshot
    result = codec.decode(meta, frames, key, out, state)   # reader
    if not result.complete: pull again with want = result.more (same snapshot version)

A codec whose wire form is the vector itself may also offer ``codec.view(meta, frames, key)``,
the received vector without a copy, which the reader uses instead of ``decode`` when it can.

``meta`` and ``want`` are msgpack-able (they ride in the message header); frames are raw
buffers sent zero-copy. Codecs are pure tensor code: no sockets, no asyncio. Only floating-point
parameters ever reach a codec; integer buffers and BatchNorm statistics never travel (SPEC 4 item 2).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from swarmnet.buffers import Buffer

if TYPE_CHECKING:
    from swarmnet.codecs.published import CopiesDone

__all__ = ["Buffer", "Codec", "DecodeResult", "Encoded"]


@dataclass(frozen=True, slots=True)
class Encoded:
    """One encoded snapshot. Immutable once published: frames may be in flight on many sockets."""

    codec: str
    meta: dict[str, Any]
    """Everything the decoder needs besides the frames (msgpack-able)."""
    frames: tuple[Buffer, ...]
    """Payload buffers, host memory, C-contiguous."""
    quantized: Tensor
    """Q(x) exactly as readers will decode it (x itself for lossless codecs); the owner averages
    with this value (SPEC 4 item 9), on the model's device."""
    ready: CopiesDone | None = None
    """For frames copied from an accelerator: the event after which their bytes are in host
    memory (``published.copies_done``; the server awaits it with ``published.until_copied``).
    ``None``: the frames are ready now."""

    @property
    def nbytes(self) -> int:
        return sum(memoryview(f).nbytes for f in self.frames)


@dataclass(slots=True)
class DecodeResult:
    complete: bool
    """True when ``out`` holds the verified decode; False when more data must be pulled."""
    more: Any = None
    """The next ``want`` to pull from the same snapshot version when not complete."""
    stats: dict[str, float] = field(default_factory=dict)
    """Codec-specific numbers for the metrics stream (e.g. bits per coordinate)."""


class Codec(ABC):
    """Encodes a flat float32 vector for the wire; see the module docstring for the dialogue."""

    name: ClassVar[str]
    lossless: ClassVar[bool] = False
    partial_reads: ClassVar[bool] = False
    """A reader may ask for more of a snapshot version it already pulled from (``select``
    honours ``want``): the server then keeps a few older versions' wire form for it."""
    uses_progress: ClassVar[bool] = False
    """Wants ``hints["progress"]``: what the owner's own training steps moved since the last
    publish (merges excluded), a vector like the encoded one, over ``hints["progress_steps"]``."""

    @abstractmethod
    def encode(self, flat_N: Tensor, hints: Mapping[str, Any] | None = None) -> Encoded:
        """Called by the compute thread once per publish. ``hints`` carries training state a
        codec may follow (``lr``, ``local_steps``, and ``progress`` for codecs that set
        ``uses_progress``); a codec ignores what it does not use."""

    @abstractmethod
    def decode(
        self,
        meta: Mapping[str, Any],
        frames: tuple[Buffer, ...],
        key_N: Tensor,
        out_N: Tensor,
        state: dict[str, Any],
    ) -> DecodeResult:
        """Called by the exchange worker. ``key_N`` is the reader's own model (the lattice codec
        decodes relative to it); ``state`` is per-neighbour memory the codec may keep between
        pulls (e.g. the last distance seen). Raises CodecError on malformed input."""

    def view(self, meta: Mapping[str, Any], frames: tuple[Buffer, ...], key_N: Tensor) -> Tensor | None:
        """The neighbour's vector read in place, a view of the received frames, when a reply
        carries it as is in memory the reader's model can use (fp32 on a CPU model): the reader
        then skips ``decode`` and its copy, keeps the frames alive while it uses the view, and
        writes the merge's gap over it. So a view must be of the frames themselves (writable,
        and the reader's alone: the transport contract), never of a scratch buffer a codec
        reuses. None (the default): ``decode``. Raises CodecError on malformed input."""
        return None

    def plan(self, state: dict[str, Any], hints: Mapping[str, Any] | None = None) -> Any:
        """What to ask for in the first request of a pull from a neighbour; None means
        everything. It begins a new pull: what ``state`` held of an unfinished one is dropped.
        ``hints`` carries the exchange's circumstances: ``cpu_bound`` is True while its CPU
        budget, not the network, sets the pace of the pulls (peer/budget.py)."""
        return None

    def accepted(self, stats: Mapping[str, float]) -> None:
        """A pull this codec decoded (``stats`` from its DecodeResult) passed screening and is
        merged: a codec that learns from pulls (the lattice reader's first request to a new
        neighbour) learns here, never from nudges or refused models. Called on the event loop."""
        return None  # most codecs learn nothing

    def select(self, encoded: Encoded, want: Any) -> tuple[dict[str, Any], tuple[Buffer, ...]]:
        """Server side: the part of ``encoded`` that ``want`` asks for. Raises CodecError for a
        malformed ``want``."""
        return encoded.meta, encoded.frames

    def params(self) -> dict[str, Any]:
        """Configuration of this codec instance, for logs and benchmark records."""
        return {}
