"""Outgoing requests: one cached connection per neighbour address, replies validated."""

from __future__ import annotations

from collections import Counter, OrderedDict

from swarmnet.errors import ProtocolError
from swarmnet.peer.stats import PeerStats
from swarmnet.transport import Connection, TransportSet
from swarmnet.wire import Limits, Message, MsgType, decode, encode

MAX_CONNECTIONS = 128
"""Neighbour connections a peer keeps open at once; opening one more closes the least recently
used idle one. Each costs a few sockets and file descriptors (over ZeroMQ three sockets, of
the 1023 a context allows, and about four descriptors, of a default ulimit of 1024): a peer that
kept one for every member of a swarm of a few hundred would run out, and every new dial fail."""


class Rejected(ProtocolError):
    """The far end answered REJECT."""


class PeerClient:
    def __init__(
        self, *, sender: str, transports: TransportSet, limits: Limits, timeout: float,
        stats: PeerStats, max_frame_bytes: int, transfer_timeout: float | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.sender = sender
        self.transports = transports
        self.limits = limits
        self.timeout = timeout
        self.transfer_timeout = max(timeout, transfer_timeout or 0.0)
        """Deadline of a request that moves a snapshot (network.transfer_timeout)."""
        self.stats = stats
        self.max_frame_bytes = max_frame_bytes
        self.max_connections = max_connections
        self._connections: OrderedDict[str, Connection] = OrderedDict()
        """Least recently used first."""
        self._in_flight: Counter[str] = Counter()

    def connection(self, address: str) -> Connection:
        conn = self._connections.get(address)
        if conn is None:
            conn = self.transports.for_url(address).connect(address, max_frame_bytes=self.max_frame_bytes)
            self._connections[address] = conn
        else:
            self._connections.move_to_end(address)
        return conn

    def busy(self, address: str) -> bool:
        """Whether a request to ``address`` is in flight (another one would queue behind it)."""
        return self._in_flight[address] > 0

    async def _close_idle_beyond_cap(self) -> None:
        """Close least recently used connections with no request in flight while there are
        more than ``max_connections`` (the busy ones stay, so there may briefly be more)."""
        excess = len(self._connections) - self.max_connections
        if excess <= 0:  # the common case, on every request
            return
        for address in [a for a in self._connections if not self._in_flight[a]][:excess]:
            if not self._in_flight[address]:  # still idle: an earlier close may have let a request in
                await self.forget(address)

    async def call(self, address: str, msg: Message, timeout: float | None = None, *,
                   expect: MsgType | None = None) -> Message:
        """Send ``msg`` and return the validated reply, of type ``expect`` when given. Raises
        TransportError, RequestTimeout, ProtocolError for a malformed reply or one of another
        type (its fields would be missing), or Rejected."""
        frames = encode(msg)
        self.stats.bytes_out += sum(memoryview(f).nbytes for f in frames)
        conn = self.connection(address)
        self._in_flight[address] += 1
        try:
            await self._close_idle_beyond_cap()
            raw = await conn.request(frames, timeout or self.timeout)
        finally:
            self._in_flight[address] -= 1
            if not self._in_flight[address]:
                del self._in_flight[address]
        self.stats.bytes_in += sum(f.nbytes for f in raw)
        try:
            reply = decode(raw, self.limits)
        except ProtocolError:
            await self.forget(address)
            raise
        if reply.type is MsgType.REJECT and reply.re in (0, msg.mid):  # 0: our header was unreadable
            raise Rejected(reply.body["code"], reply.body["reason"])
        if reply.re != msg.mid:
            # A stray reply: later ones on this connection could be off by one, so start afresh.
            await self.forget(address)
            raise ProtocolError("malformed", f"reply to message {reply.re}, expected {msg.mid}")
        if expect is not None and reply.type is not expect:
            raise ProtocolError("unexpected_type", f"{address} answered {msg.type} with {reply.type}, not {expect}")
        return reply

    async def forget(self, address: str) -> None:
        """Close the connection to ``address`` (a peer that left, or one whose replies no longer
        line up with our requests); the next call opens a new one."""
        conn = self._connections.pop(address, None)
        if conn is not None:
            await conn.aclose()

    async def aclose(self) -> None:
        for conn in self._connections.values():
            await conn.aclose()
        self._connections.clear()
