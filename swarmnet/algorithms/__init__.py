"""The algorithms as pure math: no I/O, no asyncio, shared by the daemon and the simulator.

- :mod:`.clock`: PopSGD's phase clock (SPEC 1.2-1.3) and its pull-based exchange rule.
- :mod:`.schedules`: learning-rate schedules and the epoch multiplier (SPEC 1.3, 1.4, 2.7).
- :mod:`.local_steps`: how many local steps H between interactions (SPEC 2.3).
- :mod:`.topology`: who may talk to whom (SPEC 2.1).
- :mod:`.averaging`: the interaction updates on tensors (SPEC 1.2, 2.4, 2.9).
"""

from swarmnet.algorithms.averaging import (
    apply_nudge,
    consensus_distance,
    pop_average,
    pull_delta,
    swarm_interaction,
)
from swarmnet.algorithms.clock import PhaseClock, clock_exchange
from swarmnet.algorithms.local_steps import LocalSteps
from swarmnet.algorithms.schedules import Schedule, compress_epochs, make_schedule
from swarmnet.algorithms.topology import Topology, parse_topology

ALGORITHMS = ("swarmsgd", "popsgd")

__all__ = [
    "ALGORITHMS",
    "LocalSteps",
    "PhaseClock",
    "Schedule",
    "Topology",
    "apply_nudge",
    "clock_exchange",
    "compress_epochs",
    "consensus_distance",
    "make_schedule",
    "parse_topology",
    "pop_average",
    "pull_delta",
    "swarm_interaction",
]
