"""A loopback port for a listener that a test starts later, by number.

A port the kernel hands out for ``bind(("127.0.0.1", 0))`` comes from the ephemeral range, the
one outgoing connections take their local ports from: between the pick and the bind, any
connection made on the machine can take it. A port below that range is taken only by a process
that asks for it by number.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 10_000
"""Ports below this are left to services."""


def _ephemeral_start() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP socket can bind ``host:port`` now (nothing holds it)."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def unused_port(host: str = "127.0.0.1", rng: random.Random | None = None) -> int:
    """A TCP port on ``host`` that nothing listens on now, outside the ephemeral range."""
    rng = rng or random.SystemRandom()
    top = _ephemeral_start() - 1
    if top <= LOWEST:
        raise RuntimeError(f"the ephemeral port range starts at {top + 1}: no port below it to pick")
    for _ in range(100):
        port = rng.randint(LOWEST, top)
        if port_is_free(port, host):
            return port
    raise RuntimeError(f"no free port between {LOWEST} and {top} on {host} in 100 tries")
