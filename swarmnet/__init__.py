"""swarmnet: an asyncio peer-to-peer runtime for decentralized asynchronous SGD.

Each peer is one process bound to one device. It trains locally without ever waiting on the
network, pulls random neighbours' model snapshots in the background and merges them following
PopSGD or SwarmSGD (docs/algorithms.md).
"""

from typing import Any

from swarmnet.errors import (
    CodecError,
    ConfigError,
    ModelDiverged,
    ProtocolError,
    SwarmError,
    TransportError,
)

__version__ = "0.1.0"
PROTOCOL_VERSION = 1

__all__ = [
    "PROTOCOL_VERSION",
    "CodecError",
    "ConfigError",
    "ModelDiverged",
    "ProtocolError",
    "SwarmError",
    "SwarmOptimizer",
    "TransportError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """``swarmnet.SwarmOptimizer`` loads torch on first use, not on ``import swarmnet``."""
    if name == "SwarmOptimizer":
        from swarmnet.api import SwarmOptimizer

        return SwarmOptimizer
    raise AttributeError(f"module 'swarmnet' has no attribute {name!r}")
