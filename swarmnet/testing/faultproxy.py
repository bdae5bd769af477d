"""A fault-injecting TCP proxy for tests: stands between peers and delays, drops or cuts traffic.

The kernels these tests run on have no ``netem``; this proxy gives the same harms at the
application level. A peer listens on a private port and advertises the proxy's address, so
every connection to it passes here::

    with FaultProxy("127.0.0.1", peer_port) as proxy:   # proxy.address: what to advertise
        proxy.delay = 0.2      # seconds added to every chunk, each direction
        proxy.drop = 0.01      # chance per chunk of resetting the connection
        proxy.cut()            # close every connection and refuse new ones (a dead link)
        proxy.heal()

It runs its own event loop in a background thread; the knobs can be changed at any time.
"""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

CHUNK = 65536


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1", seed: int = 0) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.delay = 0.0
        self.drop = 0.0
        self.bytes_forwarded = 0
        self.connections_dropped = 0
        self._cut = False
        self._rng = random.Random(seed)
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, self.host, 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def cut(self) -> None:
        """Refuse new connections and reset the open ones (nothing gets through)."""
        self._cut = True
        self._call(self._close_all)

    def heal(self) -> None:
        self._cut = False

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._call(self._close_all)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- event loop side ---------------------------------------------------------------------

    def _call(self, fn: Any) -> None:
        asyncio.run_coroutine_threadsafe(fn(), self._loop).result(10)

    async def _close_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self._cut:
            client_w.transport.abort()
            return
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        self._writers |= {client_w, server_w}
        await asyncio.gather(self._pump(client_r, server_w, client_w), self._pump(server_r, client_w, server_w))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    other: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(CHUNK):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self._cut or (self.drop and self._rng.random() < self.drop):
                    self.connections_dropped += 1
                    break
                writer.write(data)
                await writer.drain()
                self.bytes_forwarded += len(data)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, other):
                w.transport.abort()
                self._writers.discard(w)
