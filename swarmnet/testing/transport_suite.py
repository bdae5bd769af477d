"""The transport conformance suite: one set of checks every swarmnet transport must pass.

Each check is an ``async def check_*(case)`` taking a :class:`TransportCase` (how to build the
transport, which address to bind, and whether the far end can live in another process). The
checks only use the public interface in :mod:`swarmnet.transport.base`, so a third-party
transport runs them unchanged. :class:`TransportConformance` wraps every check as a pytest test
bounded by a timeout; subclass it and provide a ``case`` fixture::

    import pytest
    from swarmnet.testing.transport_suite import TransportCase, TransportConformance

    class TestMyTransport(TransportConformance):
        @pytest.fixture
        def case(self):
            return TransportCase(
                name="my", transport="mypkg.transport:MyTransport",
                bind_url=lambda: "my://127.0.0.1:0",
            )

Requires the ``test`` extra (pytest, pytest-asyncio with ``asyncio_mode = "auto"``,
pytest-timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from swarmnet.errors import EndpointClosed, RequestTimeout, TransportError
from swarmnet.transport.base import Listener, Transport

SLACK = 3.0
"""Seconds a failure may take beyond the request deadline before the check calls it a hang."""

FROZEN_NOTICED_S = 6.0
"""How soon a request to a frozen far end (alive, connected, silent) must fail, whatever its
deadline, on a connection whose frames are at most 1 MiB: the ZeroMQ transport's heartbeat
takes 3-4 s, and its handshake deadline on a new connection 4 s."""


@dataclass
class TransportCase:
    """How to exercise one transport.

    Args:
        name: a label for test ids and messages.
        transport: ``"module:Class"`` of the transport; the class is built with no arguments,
            in this process and (for the process checks) in a child process.
        bind_url: returns a fresh address to listen on, port 0 allowed (called once per listener).
        cross_process: whether a listener in another process can be dialled (False for inproc).
        large_bytes: size of the payload of the large-payload check.
        env: extra environment for child processes (e.g. transport tuning variables).
        notices_frozen: whether a far end that hangs (frozen: connected, silent) fails a
            request within FROZEN_NOTICED_S; False skips that check for a transport that
            documents the deadline as the cost instead.
    """

    name: str
    transport: str
    bind_url: Callable[[], str]
    cross_process: bool = True
    large_bytes: int = 100 * 2**20
    env: dict[str, str] = field(default_factory=dict)
    notices_frozen: bool = True

    def new_transport(self) -> Transport:
        module, _, attr = self.transport.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        return cls()


@contextlib.asynccontextmanager
async def _transport(case: TransportCase) -> AsyncIterator[Transport]:
    transport = case.new_transport()
    try:
        yield transport
    finally:
        await asyncio.wait_for(transport.aclose(), 10)


@contextlib.asynccontextmanager
async def _serving(listener: Listener, handler: Callable[[list[memoryview]], list]
                   ) -> AsyncIterator[None]:
    """Answer every request on ``listener`` with ``handler(frames)`` until the block exits."""

    async def serve() -> None:
        while True:
            route, frames = await listener.recv()
            await listener.send(route, handler(frames))

    task = asyncio.create_task(serve())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TransportError):
            await task


def _reversed_copies(frames: list[memoryview]) -> list[bytes]:
    return [bytes(f) for f in reversed(frames)]


def _pattern(nbytes: int, seed: int) -> np.ndarray:
    """Random bytes: a shifted, truncated or stale buffer cannot pass for them."""
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


async def _expect_failure(coro, timeout: float) -> TransportError:
    """Await ``coro`` and require a TransportError (or subclass) well before a hang."""
    start = time.monotonic()
    with pytest.raises(TransportError) as info:
        await asyncio.wait_for(coro, timeout + SLACK)
    assert time.monotonic() - start < timeout + SLACK
    return info.value


def _noticed_at_once(error: TransportError, required: bool) -> None:
    """A far end gone is noticed when its connection drops (a peer waiting for a dead neighbour's
    reply would otherwise sit out every deadline): a RequestTimeout means it was not."""
    if required:
        assert not isinstance(error, RequestTimeout), f"the far end's loss was noticed only at the deadline: {error}"


# -- the checks ------------------------------------------------------------------------------


async def check_round_trip(case: TransportCase) -> None:
    """Frames of every buffer type arrive intact and in order, empty frames included."""
    async with _transport(case) as transport:
        listener = await transport.listen(case.bind_url())
        conn = transport.connect(listener.address)
        array = _pattern(1000, 7)
        matrix = np.arange(12, dtype=np.float32).reshape(3, 4)  # typed, 2-D: tensor memory
        frames = [b"head", bytearray(b"mutable"), memoryview(array), b"", memoryview(matrix),
                  memoryview(b"tail")]
        async with _serving(listener, _reversed_copies):
            reply = await conn.request(frames, timeout=10)
        assert [bytes(f) for f in reply] == [bytes(f) for f in reversed(frames)]
        assert all(memoryview(f).nbytes == len(bytes(f)) for f in reply)


async def check_many_frames(case: TransportCase) -> None:
    """Hundreds of frames in one message and hundreds of messages on one connection."""
    async with _transport(case) as transport:
        listener = await transport.listen(case.bind_url())
        conn = transport.connect(listener.address)
        frames = [bytes([i % 256]) * (i * 37 % 5000) for i in range(300)]
        async with _serving(listener, _reversed_copies):
            reply = await conn.request(frames, timeout=10)
            assert [bytes(f) for f in reply] == frames[::-1]
            for i in range(200):
                reply = await conn.request([i.to_bytes(4, "little")], timeout=10)
                assert bytes(reply[0]) == i.to_bytes(4, "little")


async def check_replies_belong_to_the_caller(case: TransportCase) -> None:
    """A reply's frames keep their bytes while later requests come and go on the connection:
    the caller may read them long after (an fp32 merge reads the neighbour's vector in place)."""
    async with _transport(case) as transport:
        listener = await transport.listen(case.bind_url())
        conn = transport.connect(listener.address)
        size = 1 << 20
        async with _serving(listener, _reversed_copies):
            kept = [await conn.request([memoryview(_pattern(size, seed))], timeout=10) for seed in range(3)]
            for seed in range(3, 9):
                await conn.request([memoryview(_pattern(size, seed))], timeout=10)
        for seed, reply in enumerate(kept):
            assert np.array_equal(np.frombuffer(reply[0], dtype=np.uint8), _pattern(size, seed))


async def check_callers_may_write_into_replies(case: TransportCase) -> None:
    """A reply's frames are the caller's alone: writing into them changes nothing the listener
    holds or sends next (the merge writes its gap over the neighbour's vector)."""
    async with _transport(case) as transport:
        listener = await transport.listen(case.bind_url())
        conn = transport.connect(listener.address)
        served = _pattern(1 << 20, 11)  # one buffer, sent as it is (zero-copy) to every request
        async with _serving(listener, lambda frames: [memoryview(served)]):
            first = await conn.request([b"pull"], timeout=10)
            mine = np.frombuffer(first[0], dtype=np.uint8)
            assert not memoryview(first[0]).readonly and mine.flags.writeable
            mine[:] = 0
            second = await conn.request([b"pull"], timeout=10)
        assert np.array_equal(served, _pattern(1 << 20, 11))  # the listener's buffer is untouched
        assert np.array_equal(np.frombuffer(second[0], dtype=np.uint8), served)


async def check_large_payload(case: TransportCase) -> None:
    """A payload of ``case.large_bytes`` goes out from array memory and comes back intact."""
    payload = _pattern(case.large_bytes, 3)
    async with _transport(case) as transport:
        listener = await transport.listen(case.bind_url())
        conn = transport.connect(listener.address)
        # The listener answers with the frame it received: no copy on the way back either.
        async with _serving(listener, lambda frames: [frames[1], frames[0]]):
            reply = await conn.request([b"big", memoryview(payload)], timeout=60)
        assert bytes(reply[1]) == b"big"
        got = np.frombuffer(reply[0], dtype=np.uint8)
        assert got.size == payload.size and np.array_equal(got, payload)


async def check_reply_until_sent(case: TransportCase) -> None:
    """``send(..., until_sent=...)`` returns only once the transport has let go of the frames:
    overwriting the buffer then changes nothing the requester receives."""
    payload = _pattern(case.large_bytes, 11)
    expected = payload.copy()
    async with _transport(case) as transport:
        listener = await transport.listen(case.bind_url())
        conn = transport.connect(listener.address)

        async def answer_then_overwrite() -> None:
            route, _ = await listener.recv()
            await listener.send(route, [memoryview(payload)], until_sent=30)
            payload[:] = 0

        server = asyncio.create_task(answer_then_overwrite())
        try:
            reply = await conn.request([b"give"], timeout=60)
            assert np.array_equal(np.frombuffer(reply[0], dtype=np.uint8), expected)
            del reply  # in-process transports share the buffer until the requester drops it
            await asyncio.wait_for(server, 30)
        finally:
            server.cancel()


async def check_concurrent_connections(case: TransportCase) -> None:
    """Several connections hold requests at one listener at once; each gets its own reply."""
    n = 6
    async with _transport(case) as transport:
        listener = await transport.listen(case.bind_url())
        conns = [transport.connect(listener.address) for _ in range(n)]

        async def answer_all_at_once() -> None:
            # Hold every request before answering any, then answer in reverse arrival order.
            pending = [await listener.recv() for _ in range(n)]
            for route, frames in reversed(pending):
                await listener.send(route, [b"re:" + bytes(frames[0])])

        server = asyncio.create_task(answer_all_at_once())
        replies = await asyncio.gather(
            *(c.request([f"conn-{i}".encode()], timeout=15) for i, c in enumerate(conns)))
        await asyncio.wait_for(server, 5)
        assert [bytes(r[0]) for r in replies] == [f"re:conn-{i}".encode() for i in range(n)]


async def check_concurrent_requests_one_connection(case: TransportCase) -> None:
    """Requests from several tasks on one connection: every caller gets its own reply."""
    async with _transport(case) as transport:
        listener = await transport.listen(case.bind_url())
        conn = transport.connect(listener.address)
        async with _serving(listener, lambda frames: [b"re:" + bytes(frames[0]), frames[1]]):
            replies = await asyncio.gather(*(
                conn.request([f"task-{i}".encode(), bytes([i]) * (i * 10_000)], timeout=15)
                for i in range(12)))
        for i, reply in enumerate(replies):
            assert bytes(reply[0]) == f"re:task-{i}".encode()
            assert bytes(reply[1]) == bytes([i]) * (i * 10_000)


async def check_timeout_and_recovery(case: TransportCase) -> None:
    """No answer -> RequestTimeout on time; a late answer is never taken for the next reply."""
    async with _transport(case) as transport:
        listener = await transport.listen(case.bind_url())
        conn = transport.connect(listener.address)
        start = time.monotonic()
        with pytest.raises(RequestTimeout):
            await asyncio.wait_for(conn.request([b"first"], timeout=0.3), 0.3 + SLACK)
        assert 0.25 < time.monotonic() - start < 0.3 + SLACK
        route, frames = await asyncio.wait_for(listener.recv(), 5)
        assert bytes(frames[0]) == b"first"
        await listener.send(route, [b"late reply to first"])
        async with _serving(listener, _reversed_copies):
            reply = await conn.request([b"second"], timeout=10)
        assert [bytes(f) for f in reply] == [b"second"]


async def check_late_reply_after_cancel(case: TransportCase) -> None:
    """A request cancelled by its caller (a peer stopping, an outer timeout) leaves the connection
    usable, and the answer that comes after is never taken for the next request's reply."""
    async with _transport(case) as transport:
        listener = await transport.listen(case.bind_url())
        conn = transport.connect(listener.address)
        first = asyncio.create_task(conn.request([b"first"], timeout=10))
        route, frames = await asyncio.wait_for(listener.recv(), 5)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await listener.send(route, [b"late reply to " + bytes(frames[0])])
        async with _serving(listener, _reversed_copies):
            reply = await conn.request([b"second"], timeout=10)
        assert [bytes(f) for f in reply] == [b"second"]


async def check_queued_request_keeps_its_own_deadline(case: TransportCase) -> None:
    """A request queued behind a long one on the same connection times out on its own deadline,
    the wait for its turn included, and leaves the one in flight alone."""
    async with _transport(case) as transport:
        listener = await transport.listen(case.bind_url())
        conn = transport.connect(listener.address)
        async with _serving(listener, _reversed_copies):
            await conn.request([b"dial"], timeout=10)  # connected: only the queueing is timed below
        long = asyncio.create_task(conn.request([b"long"], timeout=4 * SLACK))
        route, frames = await asyncio.wait_for(listener.recv(), 5)  # held: no answer yet
        start = time.monotonic()
        with pytest.raises(RequestTimeout):
            await conn.request([b"short"], timeout=0.3)
        assert time.monotonic() - start < 0.3 + SLACK
        assert not long.done()
        await listener.send(route, [b"re:" + bytes(frames[0])])
        assert [bytes(f) for f in await asyncio.wait_for(long, 5)] == [b"re:long"]


async def check_unreachable_address(case: TransportCase) -> None:
    """Dialling an address nobody listens on fails within the deadline, never hangs."""
    async with _transport(case) as transport:
        listener = await transport.listen(case.bind_url())
        address = listener.address
        await listener.aclose()
        conn = transport.connect(address)
        await _expect_failure(conn.request([b"anyone?"], timeout=0.5), 0.5)


async def check_listener_closed_mid_request(case: TransportCase) -> None:
    """The listener goes away while holding a request: the requester fails, never hangs; over a
    transport that spans processes, as soon as the connection drops, not at its deadline."""
    async with _transport(case) as transport:
        listener = await transport.listen(case.bind_url())
        conn = transport.connect(listener.address)
        # Dial first: on a loaded machine a UCX connection setup alone can outlast the deadline
        # below, and then the listener never sees the request the check is about.
        async with _serving(listener, _reversed_copies):
            await conn.request([b"dial"], timeout=10)
        request = asyncio.create_task(conn.request([b"x" * 100_000], timeout=2))
        await asyncio.wait_for(listener.recv(), 5)
        await listener.aclose()
        _noticed_at_once(await _expect_failure(request, 2), case.cross_process)


async def check_close_wakes_pending_calls(case: TransportCase) -> None:
    """Closing an endpoint wakes calls waiting on it with EndpointClosed, not a cancellation."""
    async with _transport(case) as transport:
        listener = await transport.listen(case.bind_url())
        waiting = asyncio.create_task(listener.recv())
        for _ in range(3):  # let the receive start and park on the endpoint before the close
            await asyncio.sleep(0)
        await listener.aclose()
        with pytest.raises(EndpointClosed):
            await asyncio.wait_for(waiting, 5)

        listener = await transport.listen(case.bind_url())
        conn = transport.connect(listener.address)
        request = asyncio.create_task(conn.request([b"x"], timeout=10))
        await asyncio.wait_for(listener.recv(), 5)
        await conn.aclose()
        with pytest.raises(EndpointClosed):
            await asyncio.wait_for(request, 5)


async def check_close_while_connecting(case: TransportCase) -> None:
    """A connection closed while its first request is still starting (a transport that dials
    then is dialling) fails that request with EndpointClosed; what the dial opened meanwhile is
    closed too, not left to carry on the request."""
    async with _transport(case) as transport:
        listener = await transport.listen(case.bind_url())
        async with _serving(listener, _reversed_copies):
            conn = transport.connect(listener.address)
            request = asyncio.create_task(conn.request([b"x"], timeout=10))
            await asyncio.sleep(0)  # the request has started, its reply cannot be back yet
            await conn.aclose()
            with pytest.raises(EndpointClosed):
                await asyncio.wait_for(request, 10)


async def check_frame_limit(case: TransportCase) -> None:
    """A frame over the listener's ``max_frame_bytes`` never reaches ``recv``; the sender fails
    and the listener keeps serving others. A frame of exactly the limit arrives (whatever the
    transport adds on the wire: CURVE's 33 bytes a frame once cut it off)."""
    async with _transport(case) as transport:
        listener = await transport.listen(case.bind_url(), max_frame_bytes=4096)
        seen: list[bytes] = []

        def record(frames: list[memoryview]) -> list[bytes]:
            seen.append(bytes(frames[0]))
            return [b"ok"]

        async with _serving(listener, record):
            await _expect_failure(
                transport.connect(listener.address).request([b"x" * 100_000], timeout=0.5), 0.5)
            reply = await transport.connect(listener.address).request([b"small"], timeout=10)
            at_limit = await transport.connect(listener.address).request([b"y" * 4096], timeout=10)
        assert bytes(reply[0]) == bytes(at_limit[0]) == b"ok" and seen == [b"small", b"y" * 4096]


async def check_close_twice_and_use_after_close(case: TransportCase) -> None:
    """aclose is idempotent everywhere; every call after it raises EndpointClosed."""
    transport = case.new_transport()
    listener = await transport.listen(case.bind_url())
    conn = transport.connect(listener.address)
    async with _serving(listener, _reversed_copies):
        await conn.request([b"warm"], timeout=10)
    for endpoint in (conn, listener):
        await endpoint.aclose()
        await endpoint.aclose()
    with pytest.raises(EndpointClosed):
        await conn.request([b"x"], timeout=1)
    with pytest.raises(EndpointClosed):
        await listener.recv()
    with pytest.raises(EndpointClosed):
        await listener.send(b"route", [b"x"])
    await transport.aclose()
    await transport.aclose()
    with pytest.raises(EndpointClosed):  # the transport itself, too
        await transport.listen(case.bind_url())
    with pytest.raises(EndpointClosed):
        transport.connect(listener.address)


async def check_a_held_address_is_refused(case: TransportCase) -> None:
    """A second listener on an address a live one holds is refused (TransportError) and takes
    none of its traffic: a misconfigured peer must not silently capture another's requests."""
    async with _transport(case) as first, _transport(case) as second:
        listener = await first.listen(case.bind_url())
        await _expect_failure(second.listen(listener.address), 30)
        conn = second.connect(listener.address)
        async with _serving(listener, _reversed_copies):
            assert [bytes(f) for f in await conn.request([b"a", b"b"], timeout=10)] == [b"b", b"a"]


async def check_advertised_address(case: TransportCase) -> None:
    """Port 0 binds a real port; the advertised address is dialable from a fresh transport."""
    url = case.bind_url()
    async with _transport(case) as server, _transport(case) as client:
        listener = await server.listen(url)
        scheme = url.partition("://")[0]
        assert listener.address.startswith(scheme + "://")
        assert not listener.address.endswith((":0", ":*"))
        if url.endswith(":0"):
            port = int(listener.address.rsplit(":", 1)[1])
            assert 0 < port < 65536
        conn = client.connect(listener.address)
        async with _serving(listener, _reversed_copies):
            reply = await conn.request([b"a", b"b"], timeout=10)
        assert [bytes(f) for f in reply] == [b"b", b"a"]


async def check_process_killed_mid_request(case: TransportCase) -> None:
    """The listener's process is killed while holding a request: fail as the connection drops,
    not at the request's deadline."""
    if not case.cross_process:
        pytest.skip(f"{case.name} endpoints live in one process")
    async with _transport(case) as transport, _child_listener(case, "hold") as (child, address):
        conn = transport.connect(address)
        request = asyncio.create_task(conn.request([b"hold this"], timeout=3))
        assert await _read_line(child) == "received"
        child.kill()
        _noticed_at_once(await _expect_failure(request, 3), True)


async def check_process_frozen_mid_request(case: TransportCase) -> None:
    """The listener's process is frozen (SIGSTOP: its connections stay open, nothing answers)
    while holding a request: the request fails well before its long deadline, as a peer
    waiting on a hung neighbour would otherwise stop merging for all of it."""
    if not case.cross_process:
        pytest.skip(f"{case.name} endpoints live in one process")
    if not case.notices_frozen:
        pytest.skip(f"{case.name} notices a frozen far end only at the request's deadline (documented)")
    async with _transport(case) as transport, _child_listener(case, "hold") as (child, address):
        conn = transport.connect(address, max_frame_bytes=2**20)  # a frame in transit may take long: none here
        request = asyncio.create_task(conn.request([b"hold this"], timeout=60))
        assert await _read_line(child) == "received"
        child.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(TransportError) as info:
                await asyncio.wait_for(request, FROZEN_NOTICED_S + SLACK)
            _noticed_at_once(info.value, True)
            assert time.monotonic() - started < FROZEN_NOTICED_S
        finally:
            child.send_signal(signal.SIGCONT)


async def check_process_frozen_before_connect(case: TransportCase) -> None:
    """The listener's process is frozen before the first request dials it (its kernel still
    accepts the connection, nothing answers): the request fails well before its long deadline,
    as a peer retrying a hung neighbour would otherwise stop merging for all of it."""
    if not case.cross_process:
        pytest.skip(f"{case.name} endpoints live in one process")
    if not case.notices_frozen:
        pytest.skip(f"{case.name} notices a frozen far end only at the request's deadline (documented)")
    async with _transport(case) as transport, _child_listener(case, "hold") as (child, address):
        child.send_signal(signal.SIGSTOP)
        try:
            conn = transport.connect(address, max_frame_bytes=2**20)
            started = time.monotonic()
            with pytest.raises(TransportError) as info:
                await asyncio.wait_for(conn.request([b"hold this"], timeout=60), FROZEN_NOTICED_S + SLACK)
            _noticed_at_once(info.value, True)
            assert time.monotonic() - started < FROZEN_NOTICED_S
        finally:
            child.send_signal(signal.SIGCONT)


async def check_process_killed_mid_reply(case: TransportCase) -> None:
    """The far process dies while sending a large reply: the requester gets an error or the
    whole reply, never a truncated frame and never a hang."""
    if not case.cross_process:
        pytest.skip(f"{case.name} endpoints live in one process")
    async with _transport(case) as transport, _child_listener(case, "big") as (child, address):
        conn = transport.connect(address)
        request = asyncio.create_task(conn.request([b"send big"], timeout=3))
        assert await _read_line(child) == "sending"
        child.kill()
        try:
            reply = await asyncio.wait_for(request, 3 + SLACK)
        except TransportError:
            return
        got = np.frombuffer(reply[0], dtype=np.uint8)
        assert got.size == _BIG_REPLY and np.array_equal(got, _pattern(_BIG_REPLY, 5))


CHECKS: dict[str, Callable[[TransportCase], object]] = {
    name.removeprefix("check_"): fn for name, fn in dict(globals()).items()
    if name.startswith("check_")
}
"""Every check by short name, in definition order."""


# -- a listener in a child process ------------------------------------------------------------

_BIG_REPLY = 128 * 2**20


@contextlib.asynccontextmanager
async def _child_listener(case: TransportCase, mode: str
                          ) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    env = {**os.environ, **case.env}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "swarmnet.testing.transport_suite",
        case.transport, case.bind_url(), mode, stdout=subprocess.PIPE, env=env)
    try:
        address = await _read_line(child, timeout=30)
        yield child, address
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()


_SAY = "transport-suite:"
"""Prefix of the child's lines for the parent; native libraries may log to stdout as well."""


async def _read_line(child: asyncio.subprocess.Process, timeout: float = 10) -> str:
    """The child's next line for us, skipping anything else it printed."""
    assert child.stdout is not None
    async with asyncio.timeout(timeout):
        while line := (await child.stdout.readline()).decode():
            if line.startswith(_SAY):
                return line.removeprefix(_SAY).strip()
    raise AssertionError(f"child exited with {await child.wait()} before saying anything")


def _say(line: str) -> None:
    print(_SAY + line, flush=True)


async def _child_main(spec: str, url: str, mode: str) -> None:
    """Child side: listen, print the address, then follow ``mode`` for the first request."""
    module, _, attr = spec.partition(":")
    transport: Transport = getattr(importlib.import_module(module), attr)()
    listener = await transport.listen(url)
    _say(listener.address)
    big = memoryview(_pattern(_BIG_REPLY, 5)) if mode == "big" else None
    route, _ = await listener.recv()
    if mode == "hold":
        _say("received")
        await asyncio.Event().wait()  # the parent kills us here
    _say("sending")
    await listener.send(route, [big])
    await asyncio.Event().wait()


class TransportConformance:
    """Every check as a pytest test. Subclass it where a ``case`` fixture returning a
    :class:`TransportCase` is visible (on the subclass, in the module or in a conftest)."""


def _as_test(check: Callable[[TransportCase], object]) -> Callable[..., object]:
    async def test(self: TransportConformance, case: TransportCase) -> None:
        await check(case)  # type: ignore[misc]

    test.__name__ = check.__name__.replace("check_", "test_", 1)
    test.__doc__ = check.__doc__
    return pytest.mark.timeout(60)(test)


for _name, _check in CHECKS.items():
    setattr(TransportConformance, f"test_{_name}", _as_test(_check))
del _name, _check


if __name__ == "__main__":
    asyncio.run(_child_main(*sys.argv[1:4]))

__all__ = ["CHECKS", "SLACK", "TransportCase", "TransportConformance"]
