"""unused_port: below the ephemeral range, never a port someone listens on."""

import random
import socket

import pytest

from swarmnet.testing.ports import LOWEST, _ephemeral_start, unused_port

pytestmark = pytest.mark.timeout(30)


def test_the_port_is_below_the_ephemeral_range_and_can_be_bound():
    for _ in range(20):
        port = unused_port()
        assert LOWEST <= port < _ephemeral_start()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_someone_listens_on_is_passed_over():
    held = unused_port(rng=random.Random(7))
    with socket.create_server(("127.0.0.1", held)):
        assert unused_port(rng=random.Random(7)) != held  # the same first pick, now taken
