"""The algorithms as pure math: no I/O, no asyncio, shared by the daemon and the simulator.

- :mod:`.clock`: PopSGD's phase clock (SPEC 1.2-1.3) and its pull-based exchange rule.
- :mod:`.schedules`: learning-rate schedules and the epoch multiplier (SPEC 1.3, 1.4, 2.7).
- :mod:`.local_steps`: how many local steps H between interactions (SPEC 2.3).
- :mod:`.topology`: who may talk to whom (SPEC 2.1).
- :mod:`.averaging`: the interaction updates on tensors (SPEC 1.2, 2.4, 2.9).
"""

import importlib
from typing import Any

# Exports resolve on first use, so light users (configs, the status view) never import torch.
_EXPORTS = {
    "apply_nudge": "averaging",
    "apply_pull": "averaging",
    "consensus_distance": "averaging",
    "pop_average": "averaging",
    "pull_gap": "averaging",
    "swarm_interaction": "averaging",
    "PhaseClock": "clock",
    "clock_exchange": "clock",
    "LocalSteps": "local_steps",
    "Schedule": "schedules",
    "clock_rate": "schedules",
    "compress_epochs": "schedules",
    "Topology": "topology",
    "parse_topology": "topology",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'swarmnet.algorithms' has no attribute {name!r}")
    return getattr(importlib.import_module(f"swarmnet.algorithms.{module}"), name)


ALGORITHMS = ("swarmsgd", "popsgd")

__all__ = [
    "ALGORITHMS",
    "LocalSteps",
    "PhaseClock",
    "Schedule",
    "Topology",
    "apply_nudge",
    "apply_pull",
    "clock_exchange",
    "compress_epochs",
    "consensus_distance",
    "parse_topology",
    "pop_average",
    "pull_gap",
    "swarm_interaction",
]
