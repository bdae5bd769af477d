"""The transport conformance suite over UCX (ucx://), skipped where ucxx is not usable.

UCX_TLS defaults to tcp here: the PyPI wheels have no verbs/rdmacm, and the shared-memory
transports do not serve the listener (connection manager) path.
"""

import os

import pytest

from swarmnet.testing.transport_suite import TransportCase, TransportConformance

UCX_ENV = {"UCX_TLS": os.environ.get("UCX_TLS", "tcp"), "UCX_WARN_UNUSED_ENV_VARS": "n"}


def _ucx_unusable() -> str | None:
    # UCX reads its variables when it initialises, and ucxx.init() adds some of its own; put the
    # environment back afterwards so that the processes later tests start never inherit them.
    saved = dict(os.environ)
    for key, value in UCX_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import ucxx
    except Exception as exc:  # ImportError, or a broken native library
        return f"ucxx cannot be imported: {exc!r}"
    try:
        ucxx.init()
    except Exception as exc:
        return f"UCX fails to initialise: {exc!r}"
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return None


_reason = _ucx_unusable()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")


class TestUcxConformance(TransportConformance):
    @pytest.fixture
    def case(self):
        return TransportCase(
            name="ucx", transport="swarmnet.transport.ucx:UcxTransport",
            bind_url=lambda: "ucx://127.0.0.1:0", env=UCX_ENV,
            notices_frozen=False,  # a hung peer costs the deadline (docs/transports.md, UCX)
        )


def test_ucx_scheme_resolves_to_the_ucx_transport():
    from swarmnet.transport import transport_class
    from swarmnet.transport.ucx import UcxTransport

    assert transport_class("ucx://127.0.0.1:0") is UcxTransport


def test_the_configured_slowest_rate_reaches_the_ucx_listener():
    """Before, UCX's replies were cut at their bytes over a fixed 50 MB/s whatever
    network.min_transfer_rate said, while the clients waited for the configured rate."""
    import asyncio

    from swarmnet.transport.registry import TransportSet

    async def main():
        transports = TransportSet(slowest_rate=1e6)
        try:
            listener = await transports.for_url("ucx://127.0.0.1:0").listen("ucx://127.0.0.1:0")
            return listener._slowest_rate
        finally:
            await transports.aclose()

    saved = dict(os.environ)
    os.environ.update(UCX_ENV)
    try:
        assert asyncio.run(main()) == 1e6
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_a_requester_that_never_reads_its_replies_does_not_hold_the_server():
    """A large UCX send completes only once the requester receives it. Awaited in send(), a
    requester that sent requests and never read the replies held the server's request slot
    for the transfer deadline (30 s or more) each time. Replies are queued now, as a ZeroMQ
    ROUTER queues them, at most REPLIES_PER_REQUESTER for one requester; more are dropped."""
    import asyncio
    import time

    from swarmnet.transport.ucx import REPLIES_PER_REQUESTER, UcxTransport, _send_message, _ucxx

    async def main():
        transport = UcxTransport()
        try:
            listener = await transport.listen("ucx://127.0.0.1:0")
            port = int(listener.address.rsplit(":", 1)[1])
            ep = await _ucxx().create_endpoint("127.0.0.1", port)
            asked = REPLIES_PER_REQUESTER + 4
            for i in range(asked):
                await _send_message(ep, i + 1, [b"pull"])
            reply = bytes(8 << 20)  # well past UCX's eager limit: a rendezvous send waits for the reader
            started = time.monotonic()
            for _ in range(asked):
                route, _ = await asyncio.wait_for(listener.recv(), 10)
                await asyncio.wait_for(listener.send(route, [reply]), 5)
            took = time.monotonic() - started
            held = max(p.replies for p in listener._peers.values())
            ep.abort()
            return took, held
        finally:
            await transport.aclose()

    saved = dict(os.environ)
    os.environ.update(UCX_ENV)
    try:
        took, held = asyncio.run(main())
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert took < 5 and held <= REPLIES_PER_REQUESTER, (took, held)
