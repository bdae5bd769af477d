"""The transport conformance suite over the ZeroMQ transport: tcp on loopback, ipc, inproc."""

import itertools

import pytest

from swarmnet.testing.transport_suite import TransportCase, TransportConformance

_inproc_names = itertools.count()


@pytest.fixture(params=["tcp", "ipc", "inproc"])
def case(request, tmp_path):
    sockets = itertools.count()
    urls = {
        "tcp": lambda: "tcp://127.0.0.1:0",
        "ipc": lambda: f"ipc://{tmp_path}/l{next(sockets)}.sock",
        "inproc": lambda: f"inproc://conformance-{next(_inproc_names)}",
    }
    return TransportCase(
        name=request.param, transport="swarmnet.transport.zmq:ZmqTransport",
        bind_url=urls[request.param], cross_process=request.param != "inproc",
    )


class TestZmqConformance(TransportConformance):
    pass


def test_each_scheme_resolves_to_the_zmq_transport(case):
    from swarmnet.transport import transport_class
    from swarmnet.transport.zmq import ZmqTransport

    assert transport_class(case.bind_url()) is ZmqTransport
