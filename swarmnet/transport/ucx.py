"""UCX transport for ucx://host:port addresses, through UCX's Python bindings (``ucxx``).

UCX picks the fastest path it has between two processes: RDMA verbs (rc, ud, dc) on
InfiniBand/RoCE, shared memory, or TCP; ``UCX_TLS`` and ``UCX_NET_DEVICES`` choose among them
(see docs/transports.md). Install with ``pip install swarmnet[ucx]``.

Framing. Each connection is one UCX endpoint made through the listener API, and every message on
it is a sequence of tagged sends that UCX delivers in order:

1. a 16-byte prelude ``<magic u32, frame count u32, message id u64>``;
2. if there are frames, their lengths as ``frame count`` little-endian u64;
3. every non-empty frame, one send each, straight from the caller's buffer.

The receiver checks the lengths against ``max_frame_bytes`` before allocating, then receives each
frame straight into fresh numpy memory that the returned memoryview keeps alive. A reply carries
the id of its request, so a stale reply is detected rather than misread.

Dead peers. UCX reports a reset endpoint as an error on the pending operation; a peer that just
stops answering costs the request deadline, which swarmnet enforces itself with
``asyncio.timeout``. After any failure the endpoint is aborted and redialled on the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from swarmnet.errors import ConfigError, EndpointClosed, RequestTimeout, TransportError
from swarmnet.transport.base import (
    SLOWEST_RATE,
    Connection,
    Listener,
    Route,
    Transport,
    request_turn,
)

if TYPE_CHECKING:
    from swarmnet.buffers import Buffer

log = logging.getLogger(__name__)

_PRELUDE = struct.Struct("<IIQ")
_MAGIC = 0x53574E31  # "SWN1"
_ROUTE = struct.Struct("<QQ")  # (peer id at this listener, message id)
MAX_FRAMES = 1024
"""Frames per message accepted from the network; more drops the connection (the wire protocol
uses at most 65; the transport contract asks for hundreds)."""
QUEUED = 1000
"""Received requests a listener holds for the server; when full, it stops reading from the
endpoints until the server catches up (libzmq's default receive high-water mark)."""
REPLY_TIMEOUT = 30.0
"""Seconds a listener spends pushing one reply before it gives up on the requester, at least:
a large reply gets longer (its bytes at network.min_transfer_rate, and the caller's ``until_sent``)."""
CONNECT_TIMEOUT = 5.0
REPLIES_PER_REQUESTER = 16
"""Replies a listener holds for one requester that has not taken them yet; more are dropped, as
a ZeroMQ ROUTER drops what exceeds its high-water mark (the same 16)."""


def _ucxx() -> Any:
    """Import ucxx on first use, so the module imports (and entry points load) without it."""
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    try:
        import ucxx
    except ImportError as exc:
        raise ConfigError(
            f"ucx:// addresses need UCX's Python bindings: pip install 'swarmnet[ucx]' ({exc})"
        ) from exc
    return ucxx


def _split(url: str) -> tuple[str, int]:
    scheme, sep, rest = url.partition("://")
    host, colon, port = rest.rpartition(":")
    if scheme != "ucx" or not sep or not colon or not port.isdigit():
        raise ConfigError(f"bad UCX address {url!r}; use ucx://HOST:PORT (port 0 to pick one)")
    return host.strip("[]"), int(port)


def _contiguous(frame: Buffer) -> memoryview:
    view = memoryview(frame)
    return view if view.c_contiguous else memoryview(view.tobytes())


async def _send_message(ep: Any, msg_id: int, frames: Sequence[Buffer]) -> None:
    views = [_contiguous(f) for f in frames]
    await _move(ep, ep.send, np.frombuffer(_PRELUDE.pack(_MAGIC, len(views), msg_id), dtype=np.uint8))
    if views:
        await _move(ep, ep.send, np.array([v.nbytes for v in views], dtype="<u8"))
    for view in views:
        if view.nbytes:
            await _move(ep, ep.send, view.cast("B") if view.format != "B" or view.ndim != 1 else view)


async def _recv_message(ep: Any, max_frame_bytes: int) -> tuple[int, list[memoryview]]:
    prelude = np.empty(_PRELUDE.size, dtype=np.uint8)
    await _move(ep, ep.recv, prelude)
    magic, count, msg_id = _PRELUDE.unpack(prelude.tobytes())
    if magic != _MAGIC or count > MAX_FRAMES:
        raise TransportError(f"malformed UCX message header ({magic:#x}, {count} frames)")
    if not count:
        return msg_id, []
    lengths = np.empty(count, dtype="<u8")
    await _move(ep, ep.recv, lengths)
    if int(lengths.max()) > max_frame_bytes:
        raise TransportError(f"frame of {int(lengths.max())} bytes exceeds {max_frame_bytes}")
    frames = []
    for n in lengths.tolist():
        # Zeroed (fresh pages cost nothing more): a tagged receive into a larger buffer does not
        # say how many bytes came, and a sender that sends fewer than it declared must not hand
        # us leftovers of our own heap as its frame.
        buf = np.zeros(n, dtype=np.uint8)
        if n:
            await _move(ep, ep.recv, buf)
        frames.append(memoryview(buf))
    return msg_id, frames


def _failure(ucxx: Any, exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of the link rather than a bug of ours."""
    return isinstance(exc, ucxx.exceptions.UCXError | TransportError | OSError)


async def _move(ep: Any, transfer: Any, buffer: Any) -> None:
    """``await transfer(buffer)`` (``ep.send`` or ``ep.recv``). ucxx reports the use of an
    endpoint aborted meanwhile (a requester that left, a close) as an AttributeError from
    inside it: a failure of the link, like any other."""
    try:
        await transfer(buffer)
    except AttributeError as exc:
        if not getattr(ep, "closed", True):
            raise
        raise TransportError(f"the UCX endpoint was closed: {exc}") from exc


class _Peer:
    def __init__(self, ep: Any) -> None:
        self.ep = ep
        self.send_lock = asyncio.Lock()
        self.replies = 0
        """Replies queued for this requester or on their way to it."""


class UcxListener(Listener):
    def __init__(self, ucxx: Any, host: str, port: int, max_frame_bytes: int,
                 slowest_rate: float = SLOWEST_RATE) -> None:
        self._ucxx = ucxx
        self._max = max_frame_bytes
        self._slowest_rate = slowest_rate
        self._queue: asyncio.Queue[tuple[Route, list[memoryview]] | None] = asyncio.Queue(QUEUED)
        self._peers: dict[int, _Peer] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._replies: set[asyncio.Task[None]] = set()
        self._next_peer = 0
        self._closed = False
        try:
            self._listener = ucxx.create_listener(self._serve, port)
        except Exception as exc:
            raise TransportError(f"cannot bind ucx://{host}:{port}: {exc}") from exc
        if host in ("", "0.0.0.0", "::", "*"):
            host = self._listener.ip
        self.address = f"ucx://{host}:{self._listener.port}"

    async def _serve(self, ep: Any) -> None:
        """Called by ucxx for every accepted endpoint: queue its requests until it fails."""
        if self._closed:
            ep.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._next_peer += 1
        peer_id = self._next_peer
        self._peers[peer_id] = _Peer(ep)
        try:
            while True:
                msg_id, frames = await _recv_message(ep, self._max)
                await self._queue.put((_ROUTE.pack(peer_id, msg_id), frames))
        except Exception as exc:
            if not _failure(self._ucxx, exc):
                raise
            log.debug("UCX peer %d of %s left: %s", peer_id, self.address, exc)
        finally:
            self._handlers.discard(task)
            if self._peers.pop(peer_id, None) is not None:
                ep.abort()

    async def recv(self) -> tuple[Route, list[memoryview]]:
        if self._closed:
            raise EndpointClosed(f"listener {self.address} is closed")
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # wake the next waiter too
            raise EndpointClosed(f"listener {self.address} closed while receiving")
        return item

    async def send(self, route: Route, frames: Sequence[Buffer], *, until_sent: float = 0.0) -> None:
        """Queues the reply and returns, as a ZeroMQ ROUTER does (a large UCX send completes only
        once the requester receives it: awaited here, a requester that never reads would hold
        the server's request slot for the whole transfer deadline). ``until_sent`` > 0: returns
        once the transfer is done or abandoned. Each transfer is given the longest of
        REPLY_TIMEOUT, ``until_sent`` and the reply's bytes at the slowest rate allowed
        (network.min_transfer_rate)."""
        if self._closed:
            raise EndpointClosed(f"listener {self.address} is closed")
        peer_id, msg_id = _ROUTE.unpack(route)
        peer = self._peers.get(peer_id)
        if peer is None:
            return  # the requester vanished; like a ROUTER socket, drop the reply
        if until_sent > 0:
            await self._push(peer_id, peer, msg_id, frames, until_sent)
            return
        if peer.replies >= REPLIES_PER_REQUESTER:
            log.debug("dropping reply to UCX peer %d of %s: %d replies wait for it already", peer_id,
                      self.address, peer.replies)
            return
        reply = asyncio.ensure_future(self._push(peer_id, peer, msg_id, frames, 0.0, background=True))
        self._replies.add(reply)
        reply.add_done_callback(self._replies.discard)

    async def _push(self, peer_id: int, peer: _Peer, msg_id: int, frames: Sequence[Buffer], until_sent: float,
                    *, background: bool = False) -> None:
        """One reply's transfer; a requester that fails it is dropped. ``background``: nobody
        awaits it, so nothing is raised (a closed listener, a bug of ours: logged)."""
        peer.replies += 1
        try:
            size = sum(memoryview(f).nbytes for f in frames)
            async with peer.send_lock, asyncio.timeout(max(REPLY_TIMEOUT, until_sent, size / self._slowest_rate)):
                await _send_message(peer.ep, msg_id, frames)
        except Exception as exc:
            if not (isinstance(exc, TimeoutError) or _failure(self._ucxx, exc)):
                if background:
                    log.exception("reply to UCX peer %d of %s failed", peer_id, self.address)
                    return
                raise
            if self._closed:
                if background:
                    return
                raise EndpointClosed(f"listener {self.address} closed while replying") from None
            log.debug("dropping reply to UCX peer %d of %s: %r", peer_id, self.address, exc)
            if self._peers.pop(peer_id, None) is not None:
                peer.ep.abort()
        finally:
            peer.replies -= 1

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._listener.close()
        for peer in self._peers.values():
            peer.ep.abort()
        self._peers.clear()
        for task in [*self._handlers, *self._replies]:
            task.cancel()
        with contextlib.suppress(asyncio.QueueFull):  # full: nobody waits to be woken
            self._queue.put_nowait(None)


class UcxConnection(Connection):
    def __init__(self, ucxx: Any, address: str, max_frame_bytes: int) -> None:
        self._ucxx = ucxx
        self.address = address
        self._host, self._port = _split(address)
        self._max = max_frame_bytes
        self._ep: Any = None
        self._lock = asyncio.Lock()
        self._next_id = 0
        self._closed = False

    async def _endpoint(self) -> Any:
        if self._ep is None:
            try:
                ep = await self._ucxx.create_endpoint(self._host, self._port, connect_timeout=CONNECT_TIMEOUT)
            except Exception as exc:
                if not _failure(self._ucxx, exc):
                    raise
                raise TransportError(f"cannot connect to {self.address}: {exc}") from exc
            if self._closed:  # closed while dialling: the new endpoint must not outlive it
                ep.abort()
                raise EndpointClosed(f"connection to {self.address} closed while connecting")
            self._ep = ep
        return self._ep

    def _reset(self) -> None:
        if self._ep is not None:
            self._ep.abort()
            self._ep = None

    async def request(self, frames: Sequence[Buffer], timeout: float) -> list[memoryview]:
        if self._closed:
            raise EndpointClosed(f"connection to {self.address} is closed")
        async with request_turn(self._lock, self.address, timeout) as deadline:
            if self._closed:
                raise EndpointClosed(f"connection to {self.address} is closed")
            self._next_id += 1
            try:
                async with asyncio.timeout_at(deadline):
                    ep = await self._endpoint()
                    await _send_message(ep, self._next_id, frames)
                    msg_id, reply = await _recv_message(ep, self._max)
                if msg_id != self._next_id:
                    raise TransportError(f"reply {msg_id} from {self.address} to request "
                                         f"{self._next_id}")
                return reply
            except TimeoutError:
                self._reset()
                raise RequestTimeout(f"no reply from {self.address} within {timeout:g}s") from None
            except BaseException as exc:
                self._reset()
                if self._closed:
                    raise EndpointClosed(f"connection to {self.address} closed mid-request") from None
                if isinstance(exc, Exception) and _failure(self._ucxx, exc):
                    if isinstance(exc, TransportError):
                        raise
                    raise TransportError(f"request to {self.address} failed: {exc}") from exc
                raise

    async def aclose(self) -> None:
        self._closed = True
        self._reset()


class UcxTransport(Transport):
    """Listens and dials ``ucx://host:port``; one per process is enough (all share UCX's
    worker, which ucxx progresses on its own thread)."""

    schemes = ("ucx",)
    supports_slowest_rate = True

    def __init__(self, slowest_rate: float = SLOWEST_RATE) -> None:
        self._ucxx = _ucxx()
        self._slowest_rate = slowest_rate
        self._endpoints: list[UcxListener | UcxConnection] = []

    async def listen(self, url: str, *, max_frame_bytes: int = 2**31 - 1) -> Listener:
        self.check_open()
        host, port = _split(url)
        listener = UcxListener(self._ucxx, host, port, max_frame_bytes, self._slowest_rate)
        self._endpoints.append(listener)
        return listener

    def connect(self, url: str, *, max_frame_bytes: int = 2**31 - 1) -> Connection:
        self.check_open()
        conn = UcxConnection(self._ucxx, url, max_frame_bytes)
        # Connections to peers that left are closed by their owner: only the open ones stay here.
        self._endpoints = [e for e in self._endpoints if not e._closed]
        self._endpoints.append(conn)
        return conn

    async def aclose(self) -> None:
        self.closed = True
        for endpoint in self._endpoints:
            await endpoint.aclose()
        self._endpoints.clear()
