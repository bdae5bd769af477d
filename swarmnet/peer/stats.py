"""Counters a peer keeps about itself; read by metrics, status replies and the summary."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(slots=True)
class PeerStats:
    state: str = "starting"
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    clock: int = 0
    lr: float = 0.0
    loss: float = float("nan")
    interactions: int = 0
    """Merges applied by the compute thread (pulled snapshots)."""
    nudges_applied: int = 0
    pulls_ok: int = 0
    exchange_cpu: float = 0.0
    """CPU cores the peer may spend outside training steps (0: no limit)."""
    budget_wait_s: float = 0.0
    """Seconds the exchange waited for that budget."""
    exchange_cpu_s: float = 0.0
    """CPU seconds the exchange has used, as its budget counts them (event loop, decode worker,
    libzmq's I/O thread, merges and republishing in the training thread)."""
    compute_cpu_s: float = 0.0
    """CPU seconds of the training thread outside merges: steps, metrics, checkpoints."""
    pull_rounds: int = 0
    """Requests the successful pulls took; over pulls_ok, how often lattice readers escalate."""
    pulls_failed: int = 0
    nudges_sent: int = 0
    nudges_rejected: int = 0
    """Our nudges a neighbour refused (we then dropped our half of the interaction too)."""
    nudges_refused: int = 0
    """Neighbours' nudges we refused to keep our model a convex combination (MergeGate)."""
    bytes_in: int = 0
    bytes_out: int = 0
    pull_wall_s: float = 0.0
    """Wall seconds of the successful pulls so far, each from its first request until the
    neighbour's gap was ready for the compute thread (requests, decode, gap and its norm; in
    symmetric mode the nudge too)."""
    apply_wall_s: float = 0.0
    """Wall seconds the compute thread spent adding pulled gaps to its model (on a GPU: launching
    the add)."""
    staleness_s: float = 0.0
    """Mean age of applied snapshots (sender's publish to our merge), seconds."""
    consensus: float = 0.0
    """EMA of ||Q(C_j) - C_i|| / sqrt(2) over pulls, an estimate of sqrt(Gamma / n)."""
    bits_per_coord: float = 0.0
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    """Malformed or refused incoming messages by reason code."""
    clipped: int = 0
    """Neighbours' pulls scaled down by distance clipping (screening.clip_ratio)."""
    checkpoint_errors: int = 0
    metrics_errors: int = 0
    """Metrics rows lost (a full or read-only disk) and a TensorBoard mirror stopped."""
    peers_alive: int = 0
    adopted_from: str = ""
    """The neighbour whose model this peer started from (a newcomer), if any."""
    adopted_step: int = 0
    donations: int = 0
    """Newcomers that adopted this peer's model (lossless full pulls served)."""

    def as_dict(self) -> dict[str, Any]:
        # Field by field: the exchange's worker and the authenticator's thread count refusals
        # into ``rejected`` meanwhile, and only a one-call copy of it is safe from their inserts.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["rejected"] = dict(self.rejected)
        return data
