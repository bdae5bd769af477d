"""Fixtures for the status view tests: status maps shaped exactly like a peer's STATUS reply."""

from __future__ import annotations

import time
from typing import Any

from swarmnet.peer.stats import PeerStats


def fake_status(i: int, addr: str, *, peers: list[dict[str, Any]] | None = None, t: float = 0.0,
                peer_id: str | None = None) -> dict[str, Any]:
    """Peer ``i``'s status map after ``t`` seconds of steady training (counters grow with t)."""
    stats = PeerStats(state="training", step=100 + int(10 * t), total_steps=1000, epoch=2.0, clock=50 + i,
                      lr=0.05, loss=0.5 / (i + 1), interactions=int(4 * t), bytes_in=int(1000 * t),
                      bytes_out=int(2000 * t), staleness_s=0.01 * i, consensus=0.1 * (i % 4), peers_alive=3)
    return {
        "id": peer_id or f"peer{i}-abcdef", "name": f"peer{i}", "addr": addr, "host": "node-a", "pid": 1000 + i,
        "device": f"cuda:{i % 8}", "algorithm": "swarmsgd", "codec": "fp32", "version": "0.1",
        "uptime": t, **stats.as_dict(), "peers": peers or [],
        "events": [[time.time() - 5, f"peer{(i + 1) % 64}", "joined"]],
    }
