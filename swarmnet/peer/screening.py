"""Screening of neighbours' models before they are merged: poisoned snapshots are refused.

A neighbour that serves NaN/Inf or an absurdly large model must not be averaged in. The
exchange measures the distance d = ||x_j - x_i|| between the neighbour's decoded model and our
own snapshot (it already computes the norm of the merge delta, d = 2 ||delta|| for lossless
codecs), and :meth:`Screen.check` applies the rule of docs/reliability.md:

- d not finite                              -> refused ("non_finite")
- d > ``max_distance`` (absolute, if set)   -> refused ("too_far")
- d > ``distance_ratio`` * reference        -> refused ("too_far"), where reference is the
  larger of our own model's norm ||x_i|| and the median of the last accepted distances of the
  snapshots we pulled (a nudge's, pushed by whoever claims to be a neighbour, would let each
  nudge pass at ten times the last: a ratchet); unless
  most of the distinct neighbours we pulled from lately (three at least) are that far too: then
  the swarm has moved away from us (we adopted a young model, restarted, or sat in a partition),
  not they from it, and refusing them all would leave our reference stale for good
- otherwise, with ``clip_ratio`` > 0 and at least ``warmup`` accepted distances: if
  d > clip_ratio * median, the delta is scaled by clip_ratio * median / d (the neighbour pulls
  us at most that far); the accepted distance recorded is the clipped one.

A refusal raises :class:`Poisoned` (a CodecError), so the exchange puts the neighbour on
back-off like any other faulty one, and is counted in the peer's status under ``rejected``.
Runs in the exchange's worker thread. Legend: N = number of float parameter coordinates.
"""

from __future__ import annotations

import collections
import math
import statistics
import threading

import torch
from torch import Tensor

from swarmnet.config import ScreeningConfig
from swarmnet.errors import CodecError
from swarmnet.peer.state import Snapshot
from swarmnet.peer.stats import PeerStats

WINDOW = 32
"""Accepted distances kept for the running median."""
MOVED_AWAY = 3
"""Distinct neighbours, and a majority of those pulled from lately, that must all be too far
before we take it that the swarm moved away from us: fewer could be colluding poisoners met by
chance in our first pulls."""


class Poisoned(CodecError):
    """A neighbour's model failed screening; ``code`` is its status counter."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Screen:
    def __init__(self, config: ScreeningConfig, stats: PeerStats) -> None:
        self.config = config
        self.stats = stats
        self._accepted: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self._far: collections.deque[tuple[str, bool]] = collections.deque(maxlen=WINDOW)
        """(neighbour, found too far) for the last pulls screened."""
        self._own_norm: tuple[int, float] = (-1, 0.0)
        self._lock = threading.Lock()

    def typical(self) -> float:
        """Median of the recently accepted distances (0 before any)."""
        with self._lock:
            return statistics.median(self._accepted) if self._accepted else 0.0

    def own_norm(self, own: Snapshot) -> float:
        version, norm = self._own_norm
        if version != own.version:  # one pass over our snapshot per published version
            norm = float(torch.linalg.vector_norm(own.values_N))  # CPU<->GPU sync point
            self._own_norm = (own.version, norm)
        return norm

    def check(self, distance: float, own: Snapshot, delta_N: Tensor, what: str = "snapshot",
              source: str | None = None, *, pushed: bool = False) -> float:
        """Refuse (raise Poisoned) or accept the neighbour at ``distance`` = ||x_j - x_i||,
        clipping ``delta_N`` in place when clipping is on; returns the accepted distance.
        ``source``: the neighbour, for pulls (a nudge's sender is only a claim, so nudges never
        count towards "the swarm moved away"). ``pushed``: a nudge, whose distance is not kept
        for the reference either."""
        cfg = self.config
        if not math.isfinite(distance):
            self._refuse("non_finite", f"the neighbour's {what} holds non-finite or overflowing values")
        if cfg.max_distance and distance > cfg.max_distance:
            self._refuse("too_far", f"the neighbour's {what} is {distance:.3g} away from ours "
                         f"(screening.max_distance = {cfg.max_distance:g})")
        typical = self.typical()
        if cfg.distance_ratio:
            reference = max(self.own_norm(own), typical)
            far = reference > 0 and distance > cfg.distance_ratio * reference
            if source is not None:
                self._far.append((source, far))
            if far and not self._swarm_moved_away():
                self._refuse("too_far", f"the neighbour's {what} is {distance:.3g} away from ours, over "
                             f"{cfg.distance_ratio:g} x {reference:.3g} (the larger of our model's norm and "
                             "the typical distance; screening.distance_ratio)")
        if cfg.clip_ratio and len(self._accepted) >= cfg.warmup and typical > 0:
            bound = cfg.clip_ratio * typical
            if distance > bound:
                delta_N.mul_(bound / distance)
                self.stats.clipped += 1
                distance = bound
        if not pushed:  # a nudge's distance must not raise the reference the next nudge is held to
            with self._lock:
                self._accepted.append(distance)
        return distance

    def _swarm_moved_away(self) -> bool:
        """Most distinct neighbours in the window, three at least, were too far when last pulled."""
        latest = dict(self._far)
        far = sum(latest.values())
        return far >= MOVED_AWAY and 2 * far > len(latest)

    def _refuse(self, code: str, message: str) -> None:
        self.stats.rejected[code] += 1
        raise Poisoned(code, message)
