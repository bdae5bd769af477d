"""Public helpers for testing swarmnet and code built on it: real peer processes on loopback,
bounded waits, and a status client. No mocks: everything here starts and talks to real peers."""

from swarmnet.testing.processes import (
    LocalSwarm,
    PeerProcessHandle,
    query_status,
    wait_until,
    write_config,
)

__all__ = ["LocalSwarm", "PeerProcessHandle", "query_status", "wait_until", "write_config"]
