"""PopSGD's phase clock (SPEC 1.2 step 1, 1.3, 3.5 item 9).

In every interaction exactly one of the two clocks moves: the lower one, and on a tie the
initiator's. Then the sum of all clocks equals the number of interactions, and two-choice load
balancing keeps every clock within O(log T) of t/n, so ``eta0 / (1 + V / V0)`` read from the
local clock tracks the swarm-wide schedule without any coordination.

Pull-based form used by the daemon: the initiator sends its clock V_i in the request; the server
increments its own clock iff V_j < V_i and replies with the value it had *before*; the initiator
increments iff V_i (as sent) <= V_j (as received). Deciding on the sent value, not the current
one, keeps "exactly one increments" true even while other pulls move either clock meanwhile.
"""

from __future__ import annotations

import threading

from torch import Tensor


def clock_exchange(v_initiator: int, v_other: int) -> tuple[int, int]:
    """Increments (d_initiator, d_other) of one interaction; exactly one of them is 1."""
    if v_other < v_initiator:
        return 0, 1
    return 1, 0


def clock_exchange_many(v_initiator: Tensor, v_other: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`clock_exchange` for a batch of disjoint pairs (the simulator's layers): int64
    increments (d_initiator, d_other), elementwise equal to the scalar rule."""
    d_initiator = (v_initiator <= v_other).long()
    return d_initiator, 1 - d_initiator


class PhaseClock:
    """A peer's local clock V. Thread-safe: the server and the exchange both move it."""

    def __init__(self, value: int = 0) -> None:
        self._value = int(value)
        self._lock = threading.Lock()

    @property
    def value(self) -> int:
        return self._value

    def restore(self, value: int) -> None:
        """Set the clock from a checkpoint."""
        with self._lock:
            self._value = int(value)

    def serve(self, v_initiator: int) -> int:
        """Server side of an interaction; returns the clock value before this interaction."""
        with self._lock:
            before = self._value
            self._value += clock_exchange(v_initiator, before)[1]
            return before

    def initiate(self, v_sent: int, v_other_before: int) -> None:
        """Initiator side, once the reply with the other clock (before its move) has arrived."""
        with self._lock:
            self._value += clock_exchange(v_sent, v_other_before)[0]
