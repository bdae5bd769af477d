"""The swarm status snapshot: immutable per-peer rows and swarm totals built from STATUS replies.

A :class:`PeerStatus` is made from one peer's status map (docs/protocol.md, "Status") and the row
built from that peer's previous reply, so per-second rates come from two successive counters.
A :class:`SwarmSnapshot` is what the view renders and what ``swarmnet status --json`` prints.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from swarmnet.jsonsafe import finite_or_none


@dataclass(frozen=True, slots=True)
class Rates:
    """Per-second rates between two successive status replies of one peer."""

    interactions: float
    bytes_in: float
    bytes_out: float


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """One peer as last seen; ``stale`` once it stops answering (the row keeps its last values)."""

    name: str
    addr: str
    """The address the peer advertises."""
    reached: str = ""
    """The address it answered at (a seed may spell it otherwise: localhost, a port-forward)."""
    id: str = ""
    host: str = ""
    device: str = ""
    state: str = "unknown"
    step: int = 0
    total_steps: int = 0
    clock: int = 0
    loss: float = math.nan
    lr: float = math.nan
    interactions: int = 0
    pulls_failed: int = 0
    """Pulls that failed (timeouts, refused connections, refused snapshots): a peer failing
    every pull trains alone."""
    bytes_in: int = 0
    bytes_out: int = 0
    staleness_s: float = math.nan
    consensus: float = math.nan
    peers_alive: int = 0
    exchange_cpu: float = math.nan
    """The exchange's CPU budget in cores (0: none)."""
    budget_wait_s: float = math.nan
    """Seconds the exchange has waited for its budget."""
    rejected: dict[str, int] = field(default_factory=dict)
    """What this peer refused, by reason: requests (malformed, unauthenticated, ...) and
    neighbours' snapshots its screening turned down (the peer's ``rejected`` counts)."""
    sampled_at: float = 0.0
    """Wall time of the reply these values come from (the peer's last seen time)."""
    uptime: float = 0.0
    rates: Rates | None = None
    stale: bool = False
    error: str = ""

    @classmethod
    def from_reply(cls, status: dict[str, Any], *, addr: str, now: float,
                   previous: PeerStatus | None = None) -> PeerStatus:
        """Build the row for a fresh STATUS reply received at wall time ``now``.

        Rates are taken against ``previous`` when it came from the same peer process (same id,
        counters not reset) and is strictly older.
        """
        row = cls(
            name=str(status.get("name") or addr), addr=str(status.get("addr") or addr), reached=addr,
            id=str(status.get("id", "")), host=str(status.get("host", "")),
            device=str(status.get("device", "")), state=str(status.get("state", "unknown")),
            step=_int(status.get("step")), total_steps=_int(status.get("total_steps")),
            clock=_int(status.get("clock")), loss=_float(status.get("loss")), lr=_float(status.get("lr")),
            interactions=_int(status.get("interactions")), pulls_failed=_int(status.get("pulls_failed")),
            bytes_in=_int(status.get("bytes_in")),
            bytes_out=_int(status.get("bytes_out")), staleness_s=_float(status.get("staleness_s")),
            consensus=_float(status.get("consensus")), peers_alive=_int(status.get("peers_alive")),
            exchange_cpu=_float(status.get("exchange_cpu")), budget_wait_s=_float(status.get("budget_wait_s")),
            rejected=_counts(status.get("rejected")), sampled_at=now, uptime=_float(status.get("uptime")),
        )
        return replace(row, rates=_rates(previous, row))

    @property
    def refused(self) -> int:
        return sum(self.rejected.values())

    def gone_stale(self, error: str) -> PeerStatus:
        """The same row, marked as not answering; ``sampled_at`` keeps the last seen time."""
        return replace(self, stale=True, rates=None, error=error)

    def last_seen_age(self, now: float) -> float | None:
        """Seconds since this peer last answered; None when it never has."""
        return max(0.0, now - self.sampled_at) if self.sampled_at else None


def _rates(prev: PeerStatus | None, cur: PeerStatus) -> Rates | None:
    if prev is None or prev.stale or prev.id != cur.id:
        return None
    dt = cur.sampled_at - prev.sampled_at
    if dt <= 0 or cur.interactions < prev.interactions or cur.bytes_in < prev.bytes_in:
        return None
    return Rates(
        interactions=(cur.interactions - prev.interactions) / dt,
        bytes_in=(cur.bytes_in - prev.bytes_in) / dt,
        bytes_out=max(0, cur.bytes_out - prev.bytes_out) / dt,
    )


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to a peer: ``joined``, ``left``, ``suspected`` (from the peers'
    own event lists) or ``not answering`` / ``answering again`` (seen by this status client)."""

    time: float
    peer: str
    what: str
    source: str = ""
    """Who reported it: a peer's name, or ``status`` for this client."""


@dataclass(frozen=True, slots=True)
class SwarmSnapshot:
    """Everything one frame shows; built by the collector, rendered by ``view.render``."""

    taken_at: float
    peers: tuple[PeerStatus, ...]
    events: tuple[Event, ...] = ()
    mean_model_loss: float | None = None
    """Loss of the average of the final models, when a finished run's summary says so."""
    query_s: float = 0.0
    """How long the last round of STATUS queries took."""

    @property
    def alive(self) -> tuple[PeerStatus, ...]:
        return tuple(p for p in self.peers if not p.stale)

    @property
    def throughput(self) -> Rates | None:
        """Sum of the alive peers' rates (None until some peer has two replies)."""
        rated = [p.rates for p in self.alive if p.rates is not None]
        if not rated:
            return None
        return Rates(interactions=sum(r.interactions for r in rated), bytes_in=sum(r.bytes_in for r in rated),
                     bytes_out=sum(r.bytes_out for r in rated))

    @property
    def consensus(self) -> float:
        """Mean of the alive peers' consensus estimates (NaN when none reports one)."""
        values = [p.consensus for p in self.alive if math.isfinite(p.consensus)]
        return sum(values) / len(values) if values else math.nan

    def to_json(self) -> dict[str, Any]:
        """Plain data for ``--json`` (NaN becomes null so the document is strict JSON)."""
        through = self.throughput
        return finite_or_none({
            "taken_at": self.taken_at, "query_s": self.query_s,
            "swarm": {"peers": len(self.peers), "alive": len(self.alive), "consensus": self.consensus,
                      "mean_model_loss": self.mean_model_loss,
                      "throughput": asdict(through) if through else None},
            "peers": [{**asdict(p), "last_seen_s": p.last_seen_age(self.taken_at)} for p in self.peers],
            "events": [asdict(e) for e in self.events],
        })


def _counts(value: Any) -> dict[str, int]:
    """A peer's counts by name, as far as they are counts."""
    if not isinstance(value, dict):
        return {}
    return {str(k): _int(v) for k, v in value.items()}


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else 0


def _float(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
