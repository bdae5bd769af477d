"""The conformance suite fails transports that break the contract (checks of the checks)."""

import asyncio
import contextlib
import itertools

import pytest
import zmq

from swarmnet.testing.transport_suite import CHECKS, TransportCase
from swarmnet.transport.zmq import ZmqConnection, ZmqTransport

pytestmark = pytest.mark.timeout(30)
_names = itertools.count()
SUITE_FAILURE = (AssertionError, TimeoutError, pytest.fail.Exception)


class AdvertisesTheBindUrl(ZmqTransport):
    """Reports the address it was asked for, port 0 included, not the one it bound."""

    async def listen(self, url, **kw):
        listener = await super().listen(url, **kw)
        listener.address = url
        return listener


class IgnoresDeadlines(ZmqTransport):
    def connect(self, url, **kw):
        conn = super().connect(url, **kw)
        plain = conn.request
        conn.request = lambda frames, timeout: plain(frames, 3600)
        return conn


class DropsEmptyFrames(ZmqTransport):
    def connect(self, url, **kw):
        conn = super().connect(url, **kw)
        plain = conn.request
        conn.request = lambda frames, timeout: plain([f for f in frames if len(f)], timeout)
        return conn


class CloseTwiceFails(ZmqConnection):
    async def aclose(self):
        if self._closed:
            raise RuntimeError("already closed")
        await super().aclose()


class CloseNotIdempotent(ZmqTransport):
    def connect(self, url, *, max_frame_bytes=2**31 - 1):
        return CloseTwiceFails(self._ctx, url, max_frame_bytes)


class ReturnsBeforeSent(ZmqTransport):
    """Ignores until_sent: hands zero-copy frames to libzmq and returns at once."""

    async def listen(self, url, **kw):
        listener = await super().listen(url, **kw)
        plain = listener.send
        listener.send = lambda route, frames, until_sent=0.0: plain(route, frames)
        return listener


class SharesTheSendersBuffers(ZmqTransport):
    """Hands inproc replies over as libzmq passes them: the sender's own memory."""

    def connect(self, url, **kw):
        conn = super().connect(url, **kw)
        conn._owned = lambda parts: [p.buffer for p in parts]
        return conn


class DeafToLoss(ZmqConnection):
    """Never hears that its connection dropped: a request to a vanished peer waits its deadline."""

    async def _watch(self, monitor):
        with contextlib.suppress(asyncio.CancelledError, zmq.ZMQError):
            while True:
                await monitor.recv_multipart()


class NoticesLossOnlyAtDeadline(ZmqTransport):
    def connect(self, url, *, max_frame_bytes=2**31 - 1):
        return DeafToLoss(self._ctx, url, max_frame_bytes)


@pytest.mark.parametrize(("fault", "check", "error"), [
    (AdvertisesTheBindUrl, "advertised_address", SUITE_FAILURE),
    (IgnoresDeadlines, "timeout_and_recovery", SUITE_FAILURE),
    (DropsEmptyFrames, "round_trip", SUITE_FAILURE),
    (CloseNotIdempotent, "close_twice_and_use_after_close", RuntimeError),
    (ReturnsBeforeSent, "reply_until_sent", SUITE_FAILURE),
    (SharesTheSendersBuffers, "callers_may_write_into_replies", SUITE_FAILURE),
    (NoticesLossOnlyAtDeadline, "listener_closed_mid_request", SUITE_FAILURE),
])
async def test_check_fails_a_faulty_transport(fault, check, error):
    tcp = ("advertised_address", "reply_until_sent", "listener_closed_mid_request")
    scheme = "tcp" if check in tcp else "inproc"
    case = TransportCase(
        name=fault.__name__, transport=f"{__name__}:{fault.__name__}", cross_process=scheme == "tcp",
        bind_url=lambda: "tcp://127.0.0.1:0" if scheme == "tcp" else f"inproc://fault-{next(_names)}",
    )
    with pytest.raises(error):
        await CHECKS[check](case)


async def test_the_sound_transport_passes_the_same_checks():
    case = TransportCase(name="zmq", transport="swarmnet.transport.zmq:ZmqTransport",
                         bind_url=lambda: f"inproc://sound-{next(_names)}", cross_process=False)
    for check in ("timeout_and_recovery", "round_trip", "close_twice_and_use_after_close"):
        await CHECKS[check](case)
