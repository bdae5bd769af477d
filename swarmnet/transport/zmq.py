"""ZeroMQ transport for tcp://, ipc:// and inproc:// addresses.

A listener is a ROUTER socket; each remote address gets one DEALER socket used for one request
at a time. Payload frames go out with ``copy=False`` (zero-copy) and come back as zmq frames
viewed through memoryviews. ``MAXMSGSIZE`` makes libzmq drop any connection that sends a frame
larger than the configured limit before it is buffered. inproc:// needs both ends in one
process, so all transports of a process share one zmq context.

With :class:`~swarmnet.security.CurveKeys` the transport is closed to strangers: every socket
runs CURVE (encrypted, both ends authenticated), and a listener's handshakes go to a ZAP handler
that admits only allowed client keys. A refused client gets no reply at all: its requests time
out or fail as the refused connection drops. inproc:// is refused then, as libzmq skips the security handshake inside a process.
Handshakes that fail before the key check (a client without CURVE, or one that does not hold the
listener's key; on a plain listener, a client with CURVE) are logged and, when secured, counted
by the listener from its monitor events, and a client's request ends at once saying which side
of the handshake to look at.

A request fails fast when its peer goes away: each DEALER has a monitor socket, and a
disconnect (the peer died mid-transfer, or stopped answering ZMTP heartbeats: frozen) or a
refused connection (nobody listens there any more) seen while the request is pending ends it at
once with a TransportError, instead of waiting out its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import itertools
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from swarmnet.buffers import Buffer
from swarmnet.errors import (
    ConfigError,
    EndpointClosed,
    HandshakeFailed,
    RequestTimeout,
    TransportError,
)
from swarmnet.log import Throttle
from swarmnet.security import CurveKeys, dial_target, refuse_inproc, split_address, with_key
from swarmnet.transport.base import (
    SLOWEST_RATE,
    Connection,
    Listener,
    Route,
    Transport,
    request_turn,
)

log = logging.getLogger(__name__)


def _bind_url(url: str) -> str:
    """Map port 0 to zmq's wildcard so the kernel picks a free port."""
    if url.startswith("tcp://") and url.endswith(":0"):
        return url[:-2] + ":*"
    return url


def size_kernel_buffers(sock: zmq.Socket[Any]) -> None:
    """Large snapshots: bigger kernel buffers cut syscalls on loopback and real links alike
    (benchmarks give their raw pyzmq sockets the same, to compare like with like)."""
    sock.setsockopt(zmq.SNDBUF, 4 * 1024 * 1024)
    sock.setsockopt(zmq.RCVBUF, 4 * 1024 * 1024)


CURVE_FRAME_OVERHEAD = 33
"""Bytes CURVE adds to every frame on the wire (command name, nonce, MAC, flags). libzmq checks
MAXMSGSIZE on the encrypted frame, so a secured socket allows this much more."""


def _configure(sock: zmq.asyncio.Socket, max_frame_bytes: int, url: str, *, secured: bool) -> None:
    """``url``: where the socket binds or dials. IPv6 only for an IPv6 literal (tcp://[::1]:P):
    with it on, an IPv4 listener reports itself as tcp://[::ffff:127.0.0.1]:P."""
    sock.setsockopt(zmq.LINGER, 0)
    if "://[" in url:
        sock.setsockopt(zmq.IPV6, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes + (CURVE_FRAME_OVERHEAD if secured else 0))
    size_kernel_buffers(sock)


def _secure_client(sock: zmq.asyncio.Socket, curve: CurveKeys, server_key: bytes) -> None:
    sock.curve_secretkey = curve.secret
    sock.curve_publickey = curve.public
    sock.curve_serverkey = server_key


_ZAP_CLIENT: contextvars.ContextVar[str] = contextvars.ContextVar("zap_client", default="")
"""The network address of the client whose handshake the ZAP handler is deciding (pyzmq hands
the key check the key only)."""


class _KeyPolicy:
    """ZAP credentials provider for one listener: admits allowed keys, reports refusals."""

    def __init__(self, curve: CurveKeys, address: str) -> None:
        self.curve = curve
        self.address = address
        self.refused: set[bytes] = set()

    def callback(self, domain: str, client_key: bytes) -> bool:
        """Runs in the ZAP thread, which an exception would end for every listener of the
        process (their handshakes then stall): anything unexpected refuses this client only."""
        try:
            if self.curve.admits(client_key):
                return True
            if client_key not in self.refused and len(self.refused) < 1024:
                self.refused.add(client_key)  # log each stranger once, not every reconnect
                client = _ZAP_CLIENT.get()  # none over ipc://
                log.warning("%s refused a client%s with unknown key %s (hex %s)", self.address,
                            f" at {client}" if client else "", client_key.decode(), z85.decode(client_key).hex())
            if self.curve.on_refused is not None:
                self.curve.on_refused(client_key)
        except Exception:
            log.exception("%s: checking a client's key failed; the client is refused", self.address)
        return False


class _RefuseAll:
    """The ZAP provider of a closed listener's domain."""

    @staticmethod
    def callback(domain: str, client_key: bytes) -> bool:
        return False


class _ZapGate:
    """The ZAP handler of the shared zmq context (libzmq takes one per context): started with
    the first secured listener and kept for the life of the process (libzmq frees its inproc
    endpoint lazily, so a stopped handler cannot be restarted at once). Each listener gets its
    own ZAP domain, so listeners with different allow-lists can share a process."""

    _domains = itertools.count(1)

    def __init__(self) -> None:
        self._auth: Any = None
        self._ctx: zmq.asyncio.Context | None = None
        self._pid = 0
        """The process and context the handler serves: a forked child, or a process whose
        shared context was destroyed and made anew, needs its own."""

    def open(self, ctx: zmq.asyncio.Context, policy: _KeyPolicy) -> str:
        if self._auth is None or self._ctx is not ctx or self._pid != os.getpid():
            auth = _addressed_authenticator()(ctx, log=logging.getLogger("swarmnet.zap"))
            auth.start()
            self._auth, self._ctx, self._pid = auth, ctx, os.getpid()
        domain = f"swarmnet-{next(self._domains)}"
        self._auth.configure_curve_callback(domain, policy)
        return domain

    def close(self, domain: str) -> None:
        """Refuse every handshake naming a closed listener's domain. Its entry is replaced, not
        removed: the ZAP thread looks a domain up twice, and an entry gone in between would
        raise there and end the thread."""
        if self._auth is not None:
            self._auth.credentials_providers[domain] = _RefuseAll()


_GATE = _ZapGate()


def _addressed_authenticator() -> type:
    """pyzmq's ZAP handler thread, telling the key check the client's network address."""
    from zmq.auth.thread import ThreadAuthenticator

    class AddressedAuthenticator(ThreadAuthenticator):
        async def handle_zap_message(self, msg: list[bytes]) -> None:
            # ZAP request: version, request id, domain, address, identity, mechanism, credentials
            _ZAP_CLIENT.set(msg[3].decode("utf-8", "replace") if len(msg) > 3 else "")
            await super().handle_zap_message(msg)

    return AddressedAuthenticator


def _closed_under_us() -> bool:
    """True when a CancelledError came from pyzmq cancelling the pending future of a socket we
    closed, rather than from our own task being cancelled."""
    task = asyncio.current_task()
    return task is None or task.cancelling() == 0


LISTENER_HWM = 16
"""Messages a listener queues per requester, each way. An honest requester has one request in
flight per connection; one that sends on without reading the replies would otherwise have
libzmq hold up to 1,000 of them, each a zero-copy reference to a published snapshot (1,000
model copies kept alive). Past the mark a reply is dropped, as for a vanished route."""

REBIND_WAIT_S = 2.0
"""How long a bind waits for a port that is still held before it is refused."""

HEARTBEAT_IVL_S = 1.0
HEARTBEAT_TIMEOUT_S = 3.0
"""A connection that receives nothing for this long after a ZMTP PING (sent every
HEARTBEAT_IVL_S) is dropped, which ends its request in flight at once. A frozen peer (SIGSTOP, a
hung host) keeps its TCP connections open and would otherwise hold a pull for its whole
deadline (10 s and more); a live one answers from libzmq's I/O thread whatever its Python code is
doing. libzmq counts only whole frames as an answer, and a PONG queues behind a frame in
transit either way, so a connection allows this plus the time its largest frame takes at the
slowest rate a transfer may go (:func:`silence_allowed`): long transfers are never cut."""


HANDSHAKE_TIMEOUT_S = HEARTBEAT_TIMEOUT_S + HEARTBEAT_IVL_S
"""A connection whose ZeroMQ handshake has not completed in this long is dropped, a listener's
incoming ones too; on a client's it ends its request at once (libzmq's own default is 30 s). The kernel of a frozen peer still
accepts TCP connections, so a request on a new connection to it would otherwise wait out its
whole deadline where the heartbeat ends one on an established connection; a live peer answers
the greeting from libzmq's I/O thread (CURVE keys from a ZAP thread) within milliseconds."""


CONNECT_TIMEOUT_S = HANDSHAKE_TIMEOUT_S
"""A client connection whose TCP connection is not made in this long gives up, which ends its
request at once. A host that is down or cut off answers nothing, and the kernel would retry for
about two minutes (libzmq's own default), past any request's deadline: a pull of a 400 MB model
waited out its whole 18 s. A live host answers within a round trip; this allows two lost
connection requests (the kernel resends at 1 and 3 s)."""

UNACKED_TIMEOUT_S = 5.0
"""A client connection on which what this side sent has gone unacknowledged this long is dropped
(TCP_USER_TIMEOUT, which libzmq sets as TCP_MAXRT), which ends its request at once. A host that
went down or was cut off acknowledges nothing, where the kernel of a live peer, a frozen one
too, acknowledges the heartbeats at once: so unlike the heartbeat's allowance this needs no room
for a large frame in transit (a peer allows frames of twice its model's fp32 size, which
stretches the allowance to 19 s for a 400 MB model and 99 s for 2.4 GB)."""


def silence_allowed(max_frame_bytes: int, slowest_rate: float) -> float:
    """Seconds a connection may go without a whole frame from its peer before it is dropped."""
    return HEARTBEAT_TIMEOUT_S + max_frame_bytes / slowest_rate

LOST = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
"""Monitor events that end a pending request: the peer went away, or refused the connection."""

BROKEN_HANDSHAKE = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
"""Handshake failures, which end a pending request too, saying why."""

PROGRESS = zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
"""Monitor events that only tell how far the connection got, for a timeout's message."""

HANDSHAKE_LOG_EVERY_S = 10.0


def _lost_because(event: int, value: int, secured: bool, handshake_s: float, handshake_ivl: float,
                  silence_s: float = HEARTBEAT_TIMEOUT_S, dialing_s: float = 0.0) -> tuple[type[TransportError], str]:
    """The error a client's monitor event ends a request with, and what to say after
    "connection to ADDR". ``secured``: the client runs CURVE; ``handshake_s``: seconds since
    the TCP connection was made; ``handshake_ivl``: libzmq's deadline for the handshake;
    ``silence_s``: the heartbeat's allowance; ``dialing_s``: seconds since the dial began."""
    if event == zmq.EVENT_CONNECT_RETRIED:
        if dialing_s >= 0.9 * CONNECT_TIMEOUT_S:  # a refusal comes back within a round trip
            return TransportError, (f": no TCP connection within {CONNECT_TIMEOUT_S:g}s (the host is down or "
                                    "unreachable, or a firewall drops the packets)")
        return TransportError, (" refused or unreachable (nothing listens there, or no route to that "
                                "host, or no host at that address)")
    if event == zmq.EVENT_DISCONNECTED:
        return TransportError, (f" lost mid-request: the peer closed it or died, answered no heartbeat for "
                                f"{silence_s:.3g}s (frozen), or acknowledged nothing for {UNACKED_TIMEOUT_S:g}s "
                                "(its host down or cut off)")
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and handshake_s >= handshake_ivl / 2:
        # A peer that drops a bad handshake does so at once; this one never answered it.
        return TransportError, (f": no handshake within {handshake_ivl:g}s (a frozen or overloaded peer, or "
                                "something other than a swarmnet peer listens there)")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return HandshakeFailed, (
            ": the peer does not run CURVE (its config has no [security] section, ours has one)" if secured
            else ": the peer requires CURVE (its config has a [security] section): configure "
            "[security] (peers) or pass --key (tools)")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return HandshakeFailed, f": the handshake failed (ZeroMQ protocol error {value:#x}); is it a swarmnet peer?"
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return HandshakeFailed, (": the peer refused our key (allow-list mode: its list lacks this side's "
                                 "public key; swarm-key mode: the two sides hold different swarm key files)")
    if secured:
        return HandshakeFailed, (" dropped during the CURVE handshake: the peer does not hold the key we "
                                 "dialled it with (the two sides hold different swarm key files, or an "
                                 "allow-list address lacks its #curve= key or carries an old one), or it "
                                 "runs without [security], or it stopped meanwhile")
    return HandshakeFailed, (" dropped during the handshake: the peer stopped meanwhile, or it requires "
                             "CURVE (configure [security] for peers, pass --key to tools), or it is not a "
                             "swarmnet peer")


def _silent_because(tcp: bool, connected: bool, handshaken: bool) -> str:
    """What to add to a timeout's "no reply from ADDR within Ns", from how far the connection
    got (``tcp``: a tcp:// address, whose ways of failing the words name)."""
    if not tcp:
        return ""
    if handshaken:
        return (": the connection and its ZeroMQ handshake were made (a peer too busy to answer in time, "
                "or frozen since, or a ZeroMQ service other than a swarmnet peer)")
    if not connected:
        return (": no TCP connection was made (the host is down or unreachable, a firewall drops the packets, "
                "or the peer's queue of connections is full)")
    return (": a TCP connection opened but no ZeroMQ handshake came back (a frozen or overloaded peer, "
            "or something other than a swarmnet peer listens there)")


def _refused_handshake(value: int, secured: bool) -> str | None:
    """A listener's view of a failed handshake (HANDSHAKE_FAILED_PROTOCOL), None for noise;
    ``secured``: the listener runs CURVE."""
    if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
        return ("a client that does not hold this peer's key (another swarm key file, or an old "
                "key in the address it dials)")
    if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH and secured:
        return ("a client without CURVE (a peer with no [security] section, or `swarmnet status` "
                "without --key)")
    if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return ("a client with CURVE (a peer with a [security] section; this one has none, so the "
                "two cannot talk)")
    return None


async def _watch_handshakes(monitor: zmq.asyncio.Socket, address: str, curve: CurveKeys | None) -> None:
    """For a listener's lifetime: log (throttled) and count the handshakes that failed before
    the key check, which libzmq ends without a word to the peer otherwise."""
    throttle = Throttle(HANDSHAKE_LOG_EVERY_S)
    count = curve.on_broken_handshake if curve is not None else None
    with contextlib.suppress(asyncio.CancelledError, zmq.ZMQError):
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            who = _refused_handshake(int(event["value"]), curve is not None)
            if who is None:
                continue
            if count is not None:
                count()
            held = throttle.due(who)
            if held is not None:
                more = f" ({held} more since the last line)" if held else ""
                log.warning("%s refused a CURVE handshake from %s%s", address, who, more)


class ZmqListener(Listener):
    def __init__(self, sock: zmq.asyncio.Socket, address: str, max_frame_bytes: int,
                 zap_domain: str | None = None, curve: CurveKeys | None = None) -> None:
        self._sock: zmq.asyncio.Socket | None = sock
        self.address = address
        self._max = max_frame_bytes
        self._zap_domain = zap_domain
        self._monitor: zmq.asyncio.Socket | None = None
        self._watcher: asyncio.Task[None] | None = None
        if not address.startswith("inproc://"):  # no handshake inside a process
            self._monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
            self._watcher = asyncio.ensure_future(_watch_handshakes(self._monitor, address, curve))

    def _socket(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            raise EndpointClosed(f"listener {self.address} is closed")
        return self._sock

    async def recv(self) -> tuple[Route, list[memoryview]]:
        while True:
            try:
                parts = await self._socket().recv_multipart(copy=False)
            except zmq.ZMQError as exc:
                raise TransportError(f"receive on {self.address} failed: {exc}") from exc
            except asyncio.CancelledError:
                if self._sock is None and _closed_under_us():
                    raise EndpointClosed(f"listener {self.address} closed while receiving") from None
                raise
            # inproc:// bypasses libzmq's MAXMSGSIZE check (it has no wire decoder): enforce the
            # limit here too, dropping the message as libzmq drops an oversized tcp peer.
            if any(len(p) > self._max for p in parts[1:]):
                continue
            if len(parts) >= 2:  # a ROUTER always prepends the route; anything else is noise
                return parts[0].bytes, [p.buffer for p in parts[1:]]

    async def send(self, route: Route, frames: Sequence[Buffer], *, until_sent: float = 0.0) -> None:
        try:
            # ROUTER drops messages for vanished routes instead of blocking.
            tracker = await self._socket().send_multipart([route, *frames], copy=False, track=until_sent > 0)
            if until_sent > 0:
                # libzmq lets go of zero-copy frames once they are written out (or dropped).
                deadline = time.monotonic() + until_sent
                while not tracker.done and time.monotonic() < deadline:
                    await asyncio.sleep(0.002)
                    if self._sock is None:  # closed mid-send: the reply may be cut short
                        raise EndpointClosed(f"listener {self.address} closed while replying")
        except zmq.ZMQError as exc:
            raise TransportError(f"reply on {self.address} failed: {exc}") from exc
        except asyncio.CancelledError:
            if self._sock is None and _closed_under_us():
                raise EndpointClosed(f"listener {self.address} closed while replying") from None
            raise

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._sock is not None:
            if self._monitor is not None:
                self._sock.disable_monitor()
            self._sock.close(linger=0)
            self._sock = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None
        if self._zap_domain is not None:
            _GATE.close(self._zap_domain)
            self._zap_domain = None


async def _bind(sock: zmq.Socket, url: str) -> None:
    """Bind, waiting out a port that is still held for up to :data:`REBIND_WAIT_S`: libzmq
    closes a socket's listening descriptor in its I/O thread, a moment after close() returns,
    so a peer closed and started again on the same port in one process (a sweep of runs)
    would otherwise find it taken (0.5% of immediate rebinds on an idle machine, 39% with both
    cores busy). A port another process holds is refused once the wait is over."""
    deadline = time.monotonic() + REBIND_WAIT_S
    while True:
        try:
            if _ipc_held(url):
                raise zmq.ZMQError(errno.EADDRINUSE)
            sock.bind(url)
            return
        except zmq.ZMQError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.01)


def _ipc_held(url: str) -> bool:
    """Whether a live listener has this ipc:// path: libzmq would unlink its socket file and
    take its traffic over, where a tcp port is refused. A file nobody listens on (left by a
    process that was killed) is not held."""
    path = url.removeprefix("ipc://")
    if path == url or path.startswith("@") or not os.path.exists(path):  # @: Linux abstract namespace
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


class ZmqConnection(Connection):
    def __init__(self, ctx: zmq.asyncio.Context, address: str, max_frame_bytes: int,
                 curve: CurveKeys | None = None, slowest_rate: float = SLOWEST_RATE) -> None:
        self._ctx = ctx
        self.address = address
        self._max = max_frame_bytes
        self._silence_s = silence_allowed(max_frame_bytes, slowest_rate)
        self._curve = curve
        self._dial, self._server_key = address, b""
        self._refusal = ""
        """Why this address cannot be dialled; addresses come from gossip, so a bad one fails
        its requests (a TransportError) instead of the code that merely looked it up."""
        try:
            self._dial, server_key = dial_target(address, curve)
            self._server_key = server_key or b""
        except ConfigError as exc:
            self._refusal = str(exc)
        self._sock: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._queued: zmq.Socket | None = None
        """A blocking view of the monitor, to drop the events queued before a request starts."""
        self._event: asyncio.Future[Any] | None = None
        """The watcher's pending read of the monitor."""
        self._watcher: asyncio.Task[None] | None = None
        self._waiting: asyncio.Future[Any] | None = None
        """The send or receive of the request in flight, which the watcher cancels when the
        connection is lost or refused (``_lost`` then says which)."""
        self._lost: tuple[type[TransportError], str] | None = None
        self._loss_seen: tuple[type[TransportError], str] | None = None
        """The last loss the watcher read since the request in flight began, whether or not it
        could still end that request (see _loss_seen_late)."""
        self._dialing_since = 0.0
        """When the socket began dialing, or libzmq began again after a refusal or a loss."""
        self._connected_at: float | None = None
        """When the monitor last reported a TCP connection made (the handshake starts there);
        None while the socket has none."""
        self._handshaken = False
        """Whether that connection's ZeroMQ handshake completed."""
        self._down = False
        """The socket's connection was lost or refused since it last connected: libzmq redials
        on its own, but at intervals that grow to RECONNECT_IVL_MAX (2 s), longer than a short
        request's deadline; the next request dials afresh instead, and learns at once."""
        self._handshake_ivl = 30.0
        self._lock = asyncio.Lock()
        self._closed = False

    def _socket(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            if self._refusal:
                raise TransportError(self._refusal)
            try:
                sock = self._ctx.socket(zmq.DEALER)
            except zmq.ZMQError as exc:  # e.g. the context's socket limit, or no file descriptors left
                raise TransportError(f"cannot open a socket to {self.address}: {exc}") from exc
            monitor = None
            try:
                _configure(sock, self._max, self._dial, secured=self._curve is not None)
                # Queue nothing for a peer that is not connected: a dead peer costs a timeout,
                # never a pile of buffered snapshots.
                sock.setsockopt(zmq.IMMEDIATE, 1)
                sock.setsockopt(zmq.RECONNECT_IVL, 100)
                sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
                sock.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_IVL_S * 1000))
                sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, min(2**31 - 1, int(self._silence_s * 1000)))
                sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_TIMEOUT_S * 1000))
                sock.setsockopt(zmq.CONNECT_TIMEOUT, int(CONNECT_TIMEOUT_S * 1000))
                sock.setsockopt(zmq.TCP_MAXRT, int(UNACKED_TIMEOUT_S * 1000))
                if self._curve is not None:
                    _secure_client(sock, self._curve, self._server_key)
                monitor = sock.get_monitor_socket(PROGRESS | LOST | BROKEN_HANDSHAKE)
                self._handshake_ivl = sock.getsockopt(zmq.HANDSHAKE_IVL) / 1000
                sock.connect(self._dial)
                self._dialing_since = time.monotonic()
            except zmq.ZMQError as exc:  # nothing of a half-made socket may stay open
                if monitor is not None:
                    sock.disable_monitor()
                    monitor.close(linger=0)
                sock.close(linger=0)
                raise TransportError(f"cannot connect to {self.address}: {exc}") from exc
            self._sock, self._monitor = sock, monitor
            self._connected_at, self._handshaken, self._down = None, False, False
            self._queued = zmq.Socket.shadow(monitor.underlying)
            self._watcher = asyncio.ensure_future(self._watch(monitor))
        return self._sock

    def _reset(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._sock is not None:
            self._sock.disable_monitor()
            self._sock.close(linger=0)
            self._sock = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = self._queued = self._event = None

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        """For the socket's lifetime: end the request in flight, if any, when the connection is
        lost or refused. One task per connection rather than two per request, which cost more
        than half of a request's CPU time (docs/benchmarks.md, Profiling). Events while no request is in flight (a neighbour that
        restarted in between) are read and dropped."""
        with contextlib.suppress(asyncio.CancelledError, zmq.ZMQError):
            while True:
                self._event = monitor.recv_multipart()
                event = parse_monitor_message(await self._event)
                loss = self._loss(event)
                self._note(event["event"])
                if loss is None:
                    continue
                self._loss_seen = loss
                waiting = self._waiting
                if waiting is not None and not waiting.done():
                    self._lost = self._loss_seen
                    waiting.cancel()

    def _loss(self, event: dict[str, Any]) -> tuple[type[TransportError], str] | None:
        """What a monitor event that ends a request says (see _lost_because), None for progress.
        Read before :meth:`_note` follows the event, which restarts the clocks it reads."""
        if event["event"] & PROGRESS:
            return None
        now = time.monotonic()
        return _lost_because(event["event"], int(event["value"]), self._curve is not None,
                             now - (self._connected_at or now), self._handshake_ivl, self._silence_s,
                             now - self._dialing_since)

    def _read_queued(self) -> list[dict[str, Any]]:
        """The monitor's events that nobody has read yet, read now (without waiting)."""
        events = []
        while self._queued is not None and self._queued.get(zmq.EVENTS) & zmq.POLLIN:
            events.append(parse_monitor_message(self._queued.recv_multipart(zmq.DONTWAIT)))
        return events

    def _note(self, event: int) -> None:
        """Follow how far the connection got."""
        if event == zmq.EVENT_CONNECTED:
            self._connected_at, self._handshaken, self._down = time.monotonic(), False, False
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._handshaken = True
        elif event == zmq.EVENT_DISCONNECTED:
            self._connected_at, self._handshaken, self._down = None, False, True
            self._dialing_since = time.monotonic()
        elif event == zmq.EVENT_CONNECT_RETRIED:
            self._down, self._dialing_since = True, time.monotonic()

    async def _forget_earlier_events(self) -> None:
        """Drop what the monitor reported before this request, which the loop may not have had
        a turn to read yet (a neighbour that restarted while we were busy): it is about an
        earlier connection, not this request."""
        assert self._queued is not None
        if self._event is not None and self._event.done():
            # The watcher's wake-up is due with the oldest event: it goes first, and reads on
            # (in order) whatever is queued behind it while no request is in flight.
            await asyncio.sleep(0)
            if self._queued is None:  # closed meanwhile
                raise EndpointClosed(f"connection to {self.address} is closed")
        for event in self._read_queued():
            self._note(event["event"])

    def _loss_seen_late(self) -> tuple[type[TransportError], str] | None:
        """At the deadline: a loss the monitor reported that the watcher had no turn to act on
        before it (an event loop stalled past the deadline, on a loaded machine), read by then or
        still queued. The request failed for that reason, not for the peer's silence."""
        if self._loss_seen is not None:
            return self._loss_seen
        read = self._event is not None and self._event.done() and not self._event.cancelled() \
            and self._event.exception() is None
        events = [parse_monitor_message(self._event.result())] if read else []  # type: ignore[union-attr]
        for event in events + self._read_queued():
            loss = self._loss(event)
            self._note(event["event"])
            if loss is not None:
                return loss
        return None

    async def _await(self, fut: asyncio.Future[Any]) -> Any:
        """Await one step of the request; a cancellation by the watcher (not of our own task)
        becomes a TransportError."""
        self._waiting, self._lost = fut, None
        try:
            return await fut
        except asyncio.CancelledError:
            if self._lost is not None and _closed_under_us():
                error, why = self._lost
                raise error(f"connection to {self.address}{why}") from None
            raise
        finally:
            self._waiting = None

    async def request(self, frames: Sequence[Buffer], timeout: float) -> list[memoryview]:
        if not frames:
            raise ValueError("a message has at least one frame")
        if self._closed:
            raise EndpointClosed(f"connection to {self.address} is closed")
        async with request_turn(self._lock, self.address, timeout) as deadline:
            if self._closed:  # closed while this caller waited for the lock
                raise EndpointClosed(f"connection to {self.address} is closed")
            try:
                async with asyncio.timeout_at(deadline):
                    if self._sock is not None:  # a fresh socket's events are all about this request
                        await self._forget_earlier_events()
                        if self._down:
                            self._reset()
                    self._loss_seen = None
                    sock = self._socket()
                    await self._await(sock.send_multipart(frames, copy=False))
                    parts = await self._await(sock.recv_multipart(copy=False))
            except TimeoutError:
                lost = self._loss_seen_late()
                if lost is not None:
                    self._reset()
                    error, why = lost
                    raise error(f"connection to {self.address}{why}") from None
                why = _silent_because(self._dial.startswith("tcp://") and self._sock is not None,
                                      self._connected_at is not None, self._handshaken)
                self._reset()
                raise RequestTimeout(f"no reply from {self.address} within {timeout:g}s{why}") from None
            except zmq.ZMQError as exc:
                self._reset()
                raise TransportError(f"request to {self.address} failed: {exc}") from exc
            except BaseException as exc:
                self._reset()  # cancelled mid-request: the socket state is unknown
                if isinstance(exc, asyncio.CancelledError) and self._closed and _closed_under_us():
                    raise EndpointClosed(f"connection to {self.address} closed mid-request") from None
                raise
            return self._owned(parts)

    def _owned(self, parts: list[zmq.Frame]) -> list[memoryview]:
        """The reply's frames as the caller's alone (the contract of ``request``): over tcp and
        ipc libzmq received them into memory of their own; over inproc it passed the sender's
        own buffers, which are copied."""
        if self._dial.startswith("inproc://"):
            return [memoryview(bytearray(p.buffer)) for p in parts]
        return [p.buffer for p in parts]

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        self._closed = True
        self._reset()


class ZmqTransport(Transport):
    """``curve``: authenticate every socket with these keys (None: plain ZeroMQ).
    ``slowest_rate``: bytes per second a frame may arrive at, at the least (how long a
    connection waits for a frame in transit before taking its peer for frozen)."""

    schemes = ("tcp", "ipc", "inproc")
    supports_curve = True
    supports_slowest_rate = True

    def __init__(self, curve: CurveKeys | None = None, slowest_rate: float = SLOWEST_RATE) -> None:
        self._ctx = zmq.asyncio.Context.instance()
        self._curve = curve
        self._slowest_rate = slowest_rate
        self._listeners: list[ZmqListener] = []
        self._connections: list[ZmqConnection] = []

    async def listen(self, url: str, *, max_frame_bytes: int = 2**31 - 1) -> Listener:
        self.check_open()
        curve, policy, domain = self._curve, None, None
        if curve is not None:
            refuse_inproc(url)
            url, _ = split_address(url)
        sock = self._ctx.socket(zmq.ROUTER)
        _configure(sock, max_frame_bytes, url, secured=curve is not None)
        # A connection that never greets is dropped as a client's would be (libzmq keeps it 30 s):
        # 3,000 silent TCP connections otherwise held 3,000 descriptors of the peer.
        sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_TIMEOUT_S * 1000))
        sock.setsockopt(zmq.SNDHWM, LISTENER_HWM)
        sock.setsockopt(zmq.RCVHWM, LISTENER_HWM)
        if curve is not None:
            sock.curve_secretkey = curve.secret
            sock.curve_publickey = curve.public
            sock.curve_server = True
            policy = _KeyPolicy(curve, url)
            domain = _GATE.open(self._ctx, policy)
            sock.zap_domain = domain.encode()
            # With no ZAP handler answering in this context (a forked child, a handler that
            # died), libzmq would admit any key; enforced, it refuses every client instead.
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        try:
            await _bind(sock, _bind_url(url))
        except BaseException as exc:  # refused, or cancelled while waiting for the port
            sock.close(linger=0)
            if domain is not None:
                _GATE.close(domain)
            if isinstance(exc, zmq.ZMQError):
                advice = {
                    zmq.EADDRINUSE: "something else holds the port (another process, or a socket of this one): "
                                    "pick another, or port 0 for any free one" if url.startswith("tcp://") else
                                    "something else listens on this address (another process, or a socket of "
                                    "this one): pick another",
                    errno.EADDRNOTAVAIL: "no interface of this machine has that address: listen on one of its "
                                         "own, or 0.0.0.0 for all of them (--listen, network.listen), and give "
                                         "the one others dial with --advertise",
                }.get(exc.errno)
                raise TransportError(f"cannot bind {url}: {exc}{'; ' + advice if advice else ''}") from exc
            raise
        address = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        if curve is not None and curve.per_peer:
            address = with_key(address, curve.public)
        if policy is not None:
            policy.address = address  # its log lines name the address the peer advertises
        listener = ZmqListener(sock, address, max_frame_bytes, zap_domain=domain, curve=curve)
        self._listeners.append(listener)
        return listener

    def connect(self, url: str, *, max_frame_bytes: int = 2**31 - 1) -> Connection:
        self.check_open()
        conn = ZmqConnection(self._ctx, url, max_frame_bytes, self._curve, self._slowest_rate)
        self._connections = [c for c in self._connections if not c.closed]
        self._connections.append(conn)
        return conn

    async def aclose(self) -> None:
        self.closed = True
        for endpoint in [*self._listeners, *self._connections]:
            await endpoint.aclose()
        self._listeners.clear()
        self._connections.clear()
