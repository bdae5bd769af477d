"""The transport conformance suite over the ZeroMQ transport with CURVE on (a swarm key):
authentication must not change the contract (deadlines, large frames, dead far ends). CURVE
runs the same over ipc:// (tests/integration/test_transport_zmq_curve.py dials it)."""

import os

import pytest

from swarmnet.security import CurveKeys, generate_keys, load_keypair
from swarmnet.testing.transport_suite import TransportCase, TransportConformance
from swarmnet.transport.zmq import ZmqTransport

KEY_VARIABLE = "SWARMNET_TEST_SWARM_KEY"


class SwarmKeyZmqTransport(ZmqTransport):
    """ZmqTransport closed by the swarm key named in $SWARMNET_TEST_SWARM_KEY; built with no
    arguments, as the suite builds transports (here and in its child processes)."""

    def __init__(self) -> None:
        public, secret = load_keypair(os.environ[KEY_VARIABLE])
        super().__init__(curve=CurveKeys(public, secret, frozenset({public}), check_servers=True))


@pytest.fixture(params=["tcp"])
def case(request, tmp_path, monkeypatch):
    _, secret = generate_keys(tmp_path / "keys", "swarm")
    monkeypatch.setenv(KEY_VARIABLE, str(secret))
    return TransportCase(
        name=f"{request.param}+curve", transport=f"{__name__}:SwarmKeyZmqTransport",
        bind_url=lambda: "tcp://127.0.0.1:0", env={KEY_VARIABLE: str(secret)},
    )


class TestZmqCurveConformance(TransportConformance):
    pass



def test_the_suite_runs_with_curve_on(case):
    """The suite above must exercise a closed transport, not a plain one."""
    keys = SwarmKeyZmqTransport()._curve
    assert keys is not None and keys.check_servers and keys.allowed == {keys.public}
