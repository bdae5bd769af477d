"""The transport interface: moving multipart frames between endpoints, nothing about messages.

A transport is chosen by the URL scheme of an address. A peer owns one :class:`Listener` (it
receives requests and sends replies by route) and one :class:`Connection` per remote address
(request/reply with a deadline). Third-party transports register under the entry-point group
``swarmnet.transports`` (see :mod:`swarmnet.transport.registry`).

Contract every implementation keeps (checked by the conformance suite in swarmnet.testing):
- ``listen`` accepts port 0 / wildcards and ``Listener.address`` is the address actually bound.
- Payload buffers are sent without copying where the transport allows; received frames are
  returned as buffers (memoryview-compatible) that stay valid while referenced.
- Every await on the network honours a deadline and raises ``RequestTimeout``; failures of the far
  end raise ``TransportError``; use after ``aclose`` raises ``EndpointClosed``; ``aclose`` is
  idempotent.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import ClassVar

from swarmnet.buffers import Buffer
from swarmnet.errors import EndpointClosed, RequestTimeout

Route = bytes
"""Opaque identity of the requester, handed back to ``Listener.send``."""

SLOWEST_RATE = 50e6
"""Bytes per second a transfer may move at, at the least, unless a peer says otherwise
(network.min_transfer_rate's default): how long transports wait for a frame in transit."""


class Listener(ABC):
    address: str
    """The address actually bound, as others should dial it (unless overridden by advertise)."""

    @abstractmethod
    async def recv(self) -> tuple[Route, list[memoryview]]:
        """Next request: the route to answer on and the frames."""

    @abstractmethod
    async def send(self, route: Route, frames: Sequence[Buffer], *, until_sent: float = 0.0) -> None:
        """Reply to the requester identified by ``route``; never blocks on a vanished peer.
        With ``until_sent`` > 0, return only once the transport has let go of the frames (they
        have left this process, or an in-process requester has dropped them), or after that
        many seconds: a caller can then tell a transfer in progress, and reuse the buffers."""

    @abstractmethod
    async def aclose(self) -> None: ...


class Connection(ABC):
    address: str

    @abstractmethod
    async def request(self, frames: Sequence[Buffer], timeout: float) -> list[memoryview]:
        """Send one request and return its reply. Requests on one connection are serialized,
        so a reply always belongs to the request in flight; after a timeout or failure the
        connection is rebuilt so a late reply can never be taken for the next one. The reply's
        frames belong to the caller alone, writable: the transport never touches their memory
        again and nothing else holds it (an fp32 merge writes its gap over the neighbour's
        vector in the frames, codecs/base.py ``view``; an in-process transport copies).
        Raises RequestTimeout after ``timeout`` seconds, the wait behind earlier requests
        included (:func:`request_turn`), TransportError on failure."""

    @abstractmethod
    async def aclose(self) -> None: ...


@asynccontextmanager
async def request_turn(lock: asyncio.Lock, address: str, timeout: float) -> AsyncIterator[float]:
    """A connection's turn for one request: ``lock`` held, waited for within the request's own
    ``timeout``; yields the loop time by which the request must be done. A gossip queued behind
    a large pull, or behind a request to a frozen neighbour, then times out on its own deadline
    instead of waiting the other one's out first."""
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        async with asyncio.timeout_at(deadline):
            await lock.acquire()
    except TimeoutError:
        raise RequestTimeout(f"no reply from {address} within {timeout:g}s (an earlier request to it "
                             "still held the connection)") from None
    try:
        yield deadline
    finally:
        lock.release()


class Transport(ABC):
    schemes: ClassVar[tuple[str, ...]]
    closed = False
    """Set by :meth:`aclose`; :meth:`check_open` then refuses listen and connect."""

    def check_open(self) -> None:
        """For listen and connect: EndpointClosed once the transport is closed."""
        if self.closed:
            raise EndpointClosed("this transport is closed")

    @abstractmethod
    async def listen(self, url: str, *, max_frame_bytes: int = 2**31 - 1) -> Listener: ...

    @abstractmethod
    def connect(self, url: str, *, max_frame_bytes: int = 2**31 - 1) -> Connection: ...

    @abstractmethod
    async def aclose(self) -> None: ...
