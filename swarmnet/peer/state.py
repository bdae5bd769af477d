"""State shared between a peer's compute thread and its event loop.

Legend: N = number of floating-point parameter coordinates.

- :class:`FlatParameters` lays a model's floating-point parameters over one contiguous vector,
  so merging a neighbour is a single vector operation and the codec sees one buffer.
- :class:`SnapshotStore` keeps the latest published snapshot, immutable and versioned (and, for
  codecs with partial reads, the wire form of a few before it): readers always get a complete
  one and never hold a lock across the network (SPEC 4 item 8).
- :class:`Mailbox` hands the exchange's result to the compute thread (one slot, latest wins).
- :class:`NudgeInbox` accumulates symmetric-mode updates from neighbours in delta form.
- :class:`MergeGate` admits symmetric-mode updates only where they keep the model a convex
  combination of snapshots.

Only the compute thread writes the live model; everything here is how others talk to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from swarmnet.codecs.base import Encoded
from swarmnet.errors import ProtocolError


def layout_of(shapes: Iterable[Sequence[int]]) -> str:
    """A model's fingerprint as snapshots carry it (docs/protocol.md): BLAKE2b (8 bytes, in hex)
    of the shapes of the parameters it averages, in order, as compact JSON ([[64,64],[64],...])."""
    text = json.dumps([list(shape) for shape in shapes], separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def check_layout(theirs: object, ours: str, who: str) -> None:
    """Refuse the snapshot of another model (``theirs``: its fingerprint, None from a peer that
    sends none): one of as many coordinates in another arrangement would average silently."""
    if theirs is not None and theirs != ours:
        raise ProtocolError("mismatch", f"{who} trains another model: the shapes of its parameters (fingerprint "
                            f"{theirs}) are not ours ({ours}); every peer of a swarm must train the same model (one "
                            "task with the same options; through the API, one model with the same trainable "
                            "parameters)")


class FlatParameters:
    """Re-homes every floating-point parameter of ``model`` (or only those in ``only``) into one
    flat float32 vector, in the model's order.

    Must run before the optimizer is built. Buffers (BatchNorm statistics, counters) stay where
    they are and are never averaged (SPEC 4 item 2); so do parameters left out of ``only``.
    """

    def __init__(self, model: nn.Module, only: Iterable[nn.Parameter] | None = None) -> None:
        chosen = None if only is None else {id(p) for p in only}
        params = [p for p in model.parameters() if p.is_floating_point() and (chosen is None or id(p) in chosen)]
        if not params:
            raise ValueError("the model has no floating-point parameters to train")
        if any(p.is_meta for p in params):
            raise ValueError("the model's parameters are on the meta device and hold no values: materialize "
                             "them first (e.g. model.to_empty(device='cpu'), then initialize the weights)")
        if any(p.dtype != torch.float32 for p in params):
            raise ValueError("swarmnet averages float32 parameters; keep master weights in float32 "
                             "and use autocast for reduced precision")
        device = params[0].device
        self.numel = sum(p.numel() for p in params)
        self.layout = layout_of(p.shape for p in params)
        """Its fingerprint, which snapshots carry: a neighbour's of another is refused."""
        self.vector_N = torch.empty(self.numel, dtype=torch.float32, device=device)
        offset = 0
        with torch.no_grad():
            for p in params:
                view = self.vector_N[offset : offset + p.numel()].view_as(p)
                view.copy_(p)
                p.data = view
                offset += p.numel()
        self._params = [p for p in params if p.numel()]  # an empty one has no address to check
        self._ends = self._params[:1] + self._params[-1:]

    def moved(self, *, all_of_them: bool = False) -> bool:
        """Whether parameters were given storage of their own since (``model.to``, ``.cuda()``,
        ``.double()``): the optimizer then steps tensors that are no longer views of ``vector_N``,
        which merges and snapshots use. The first and the last for a few nanoseconds (a whole
        model moved), or ``all_of_them`` (one layer moved)."""
        storage = self.vector_N.untyped_storage().data_ptr()
        return any(p.untyped_storage().data_ptr() != storage
                   for p in (self._params if all_of_them else self._ends))


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    values_N: Tensor
    """The exact vector that was encoded (the owner's communication copy C)."""
    encoded: Encoded
    step: int
    nudges: int = 0
    """Neighbours' nudges applied to the model, in all, when this snapshot was published."""
    created: float = field(default_factory=time.monotonic)

    def wire_form(self) -> Snapshot:
        """This snapshot without its model-sized vectors: what serving more of it to a reader
        takes (``Codec.select`` reads the frames and meta only)."""
        return dataclasses.replace(self, values_N=_NOTHING,
                                   encoded=dataclasses.replace(self.encoded, quantized=_NOTHING))


_NOTHING = torch.empty(0)


class SnapshotStore:
    """The latest published snapshot and the wire form of up to ``history - 1`` before it;
    publish and get are thread-safe.

    Only readers of a codec with partial reads ask for an older version (more planes of the
    snapshot they started on), and only its frames serve them. A merge, a nudge and a
    newcomer's lossless pull all use the latest. Each whole snapshot holds one or two copies of
    the model: kept whole, a history of 8 put about 12 copies of a 9.2M-parameter model (450 MB)
    in a lattice peer's 1.8 GB above the interpreter's own, and 7 (250 MB) in an fp32 one's."""

    def __init__(self, history: int = 1) -> None:
        self.history = history
        """Versions held: the latest and ``history - 1`` older ones in their wire form."""
        self._snapshots: OrderedDict[int, Snapshot] = OrderedDict()
        self._lock = threading.Lock()
        self._next_version = 1

    @property
    def next_version(self) -> int:
        """The version the next :meth:`publish` will give."""
        return self._next_version

    def publish(self, values_N: Tensor, encoded: Encoded, step: int, nudges: int = 0) -> Snapshot:
        with self._lock:
            snap = Snapshot(self._next_version, values_N, encoded, step, nudges)
            self._next_version += 1
            if self._snapshots:
                previous = next(reversed(self._snapshots.values()))
                self._snapshots[previous.version] = previous.wire_form()
            self._snapshots[snap.version] = snap
            while len(self._snapshots) > self.history:
                self._snapshots.popitem(last=False)
            return snap

    def latest(self) -> Snapshot | None:
        with self._lock:
            return next(reversed(self._snapshots.values()), None)

    def get(self, version: int) -> Snapshot | None:
        """That version: the latest whole, an older one in its wire form only."""
        with self._lock:
            return self._snapshots.get(version)


@dataclass(slots=True)
class MergeEntry:
    """What the exchange hands the compute thread after one interaction."""

    gap_N: Tensor
    """Half of it is added to the live model (delta form, SPEC 2.9 item 3; see pull_gap)."""
    peer: str
    age: float
    """Seconds between the neighbour's publish and our receipt of it."""
    received: float
    distance: float
    """||Q(C_j) - K|| / sqrt(2): this pull's estimate of the consensus distance (SPEC 4 item 12)."""
    key_version: int = 0
    """The version of our own snapshot K the gap was measured from."""


class Mailbox:
    """One slot, latest wins. The exchange awaits ``emptied`` before its next interaction.

    ``emptied`` is set by :meth:`release`, once the compute thread has applied the entry it took
    and published the merged model, not by :meth:`take`: the next interaction keys its delta on
    our latest snapshot, and keyed on the one before the merge it would add that merge and the
    local steps since (live += (C_j - K) / 2 against an older K) a second time.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._entry: MergeEntry | None = None
        self.emptied = asyncio.Event()
        self.emptied.set()

    def put(self, entry: MergeEntry) -> None:
        with self._lock:
            self._entry = entry
            self.emptied.clear()

    def take(self) -> MergeEntry | None:
        """Compute thread: the pending entry, if any; call :meth:`release` once it is merged
        and republished (or dropped)."""
        with self._lock:
            entry, self._entry = self._entry, None
        return entry

    def release(self) -> None:
        """Compute thread: the entry taken last is applied and our snapshot republished."""
        with contextlib.suppress(RuntimeError):  # the loop has closed (a check first could race its closing)
            self._loop.call_soon_threadsafe(self.emptied.set)

    @property
    def full(self) -> bool:
        return self._entry is not None


class NudgeInbox:
    """Sum of neighbours' symmetric-mode updates not yet applied by the compute thread.

    ``add`` returns False once closed, so a stopping peer refuses updates it could not apply and
    the sender drops its half of the interaction too: the swarm's total mass is preserved.
    """

    def __init__(self) -> None:
        self._sum_N: Tensor | None = None
        """Allocated at the first nudge: a pull-only peer never holds this copy of the model.
        Valid while ``_count`` > 0 (the first nudge after a drain overwrites it)."""
        self._count = 0
        self.drained = 0
        """Nudges applied so far, in all."""
        self._closed = False
        self._first_version = 0
        """Nudges measured from an older published version are refused."""
        self._lock = threading.Lock()

    def add(self, delta_N: Tensor, version: int) -> bool:
        """Count in a nudge measured from our published ``version``; False once closed, or if
        that version's weights were replaced since (:meth:`restart_at`)."""
        with self._lock:
            if self._closed or version < self._first_version:
                return False
            if self._sum_N is None:
                self._sum_N = torch.empty_like(delta_N)
            if self._count:
                self._sum_N.add_(delta_N)
            else:
                self._sum_N.copy_(delta_N)
            self._count += 1
            return True

    def drain_into(self, *targets: Tensor) -> int:
        """Compute thread: add the pending sum to each target; returns how many were merged."""
        with self._lock:
            if not self._count:
                return 0
            assert self._sum_N is not None
            for target in targets:
                target.add_(self._sum_N)
            count, self._count = self._count, 0
            self.drained += count
            return count

    def restart_at(self, version: int) -> None:
        """The model's weights were replaced and will be published as ``version``: drop the
        nudges waiting (counted as drained, so that the merge gate waits for none of them) and
        refuse those still being decoded, measured from the old weights."""
        with self._lock:
            self._first_version = version
            self.drained += self._count
            self._count = 0

    def close(self) -> None:
        with self._lock:
            self._closed = True

    @property
    def pending(self) -> int:
        """Nudges added and not yet drained."""
        return self._count

    @property
    def closed(self) -> bool:
        return self._closed


class MergeGate:
    """Which symmetric-mode nudges a peer may accept (event-loop side only; no lock needed).

    Merges are applied in delta form, each computed against one published version K of our
    model. Two updates against the same K, our own merge ``(Q(C_k) - K) / 2`` and one nudge
    ``(Q(C_i) - K) / 2``, still leave a convex combination, ``(C_k + C_i) / 2``; a third would
    give K a negative weight, and many at once overshoot and diverge. So a nudge is admitted
    only against our latest version, only once per version, only when that version holds every
    nudge admitted before (none still decoding or waiting to be applied), and only while our own
    interaction in flight (if any) was computed against that same version. Conversely our next merge waits for a version that holds every
    nudge admitted (:meth:`may_key_on`): keyed on one without it, the nudge would land on top of
    a merge computed as if it were not there.
    """

    def __init__(self) -> None:
        self._own_base: int | None = None
        self._nudged: int | None = None
        self._admitted = 0

    def may_key_on(self, snapshot: Snapshot) -> bool:
        """Whether our own merge may be computed against ``snapshot``: every admitted nudge has
        been applied before it was published."""
        return snapshot.nudges >= self._admitted

    def begin_own(self, version: int) -> None:
        """Our exchange computes a merge against ``version``."""
        self._own_base = version

    def end_own(self) -> None:
        """That merge was applied (or dropped)."""
        self._own_base = None

    def admit_nudge(self, used: int, latest: int, *, published_nudges: int) -> str | None:
        """Reserve ``latest`` for a nudge computed against ``used``; None, or why not.
        ``published_nudges``: the nudges ``latest`` holds (:attr:`Snapshot.nudges`). Fewer than
        were admitted means one is still decoding or waiting in the inbox: it was computed
        against an older version, and with one more against ``latest`` that version's model
        would end with a negative weight."""
        if used != latest:
            return f"version {used} is no longer our latest ({latest})"
        if self._nudged == latest:
            return f"version {latest} already took a nudge"
        if self._admitted > published_nudges:
            return "a nudge admitted earlier is not in our latest version yet"
        if self._own_base not in (None, latest):
            return "our own merge in flight was computed against an older version"
        self._nudged = latest
        self._admitted += 1
        return None

    def cancel_nudge(self, version: int) -> None:
        """The admitted nudge could not be applied after all."""
        self._admitted -= 1
        if self._nudged == version:
            self._nudged = None
