"""Transport benchmark: the time to pull one large payload, swarmnet transport vs. raw library.

A pull is one small request answered with a preallocated payload of ``size_mb`` MiB, timed at the
requester until the whole reply is in its memory; both ends live in this process on loopback.
Each transport is measured twice in the same run: through the swarmnet interface
(``Connection.request`` against a ``Listener`` that replies the payload) and through the raw
library moving the same bytes (pyzmq ROUTER/DEALER with ``copy=False``; ucxx endpoints receiving
into a preallocated array). Times are the median of ``repeats`` pulls after one warm-up pull;
the two sides pull alternately so that load from other processes falls on both alike.

Called by ``swarmnet bench transports``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from swarmnet.bench import write_json
from swarmnet.errors import SwarmError
from swarmnet.transport.base import Transport
from swarmnet.transport.ucx import UcxTransport
from swarmnet.transport.zmq import ZmqTransport, size_kernel_buffers

RESULT_VERSION = 1
TRANSPORTS = ("tcp", "ipc", "inproc", "ucx")
MiB = 2**20

Pull = Callable[[], Awaitable[int]]
"""One timed pull; returns the number of payload bytes that arrived."""


def _bind_url(name: str, tmpdir: str, side: str = "swarmnet") -> str:
    """Where one side of the comparison listens (``side``: swarmnet or raw)."""
    return {
        "tcp": "tcp://127.0.0.1:0",
        "ipc": f"ipc://{tmpdir}/{side}.sock",
        "inproc": f"inproc://bench-{side}",
        "ucx": "ucx://127.0.0.1:0",
    }[name]


async def _timed(pull: Pull, nbytes: int) -> float:
    start = time.perf_counter()
    got = await pull()
    elapsed = time.perf_counter() - start
    if got != nbytes:
        raise SwarmError(f"pull returned {got} of {nbytes} bytes")
    return elapsed


async def _paired_times(ours: Pull, raw: Pull, nbytes: int, repeats: int
                       ) -> tuple[list[float], list[float]]:
    """Pull times of both sides, alternating pulls so that load from other processes falls on
    both alike; one warm-up pull each (connection setup, first page faults)."""
    await _timed(ours, nbytes)
    await _timed(raw, nbytes)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        times[0].append(await _timed(ours, nbytes))
        times[1].append(await _timed(raw, nbytes))
    return times


@contextlib.asynccontextmanager
async def _swarmnet_puller(transport: Transport, url: str, payload: np.ndarray
                           ) -> AsyncIterator[Pull]:
    listener = await transport.listen(url)
    reply = [memoryview(payload)]

    async def serve() -> None:
        while True:
            route, _ = await listener.recv()
            await listener.send(route, reply)

    server = asyncio.create_task(serve())
    conn = transport.connect(listener.address)

    async def pull() -> int:
        frames = await conn.request([b"pull"], timeout=120)
        return sum(memoryview(f).nbytes for f in frames)

    try:
        yield pull
    finally:
        server.cancel()
        await conn.aclose()
        await listener.aclose()


@contextlib.asynccontextmanager
async def _raw_zmq_puller(url: str, payload: np.ndarray) -> AsyncIterator[Pull]:
    ctx = zmq.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        for sock in (router, dealer):
            size_kernel_buffers(sock)  # as swarmnet's sockets
        router.bind(url.replace(":0", ":*") if url.startswith("tcp") else url)
        dealer.connect(router.getsockopt(zmq.LAST_ENDPOINT).decode())

        async def pull() -> int:
            # Single-threaded is fine: libzmq's I/O thread moves the bytes between the queues.
            dealer.send(b"pull")
            route, _ = router.recv_multipart()
            router.send_multipart([route, payload], copy=False)
            frame = dealer.recv(copy=False)
            return len(frame.buffer)

        yield pull
    finally:
        router.close(linger=0)
        dealer.close(linger=0)


@contextlib.asynccontextmanager
async def _raw_ucxx_puller(payload: np.ndarray) -> AsyncIterator[Pull]:
    import ucxx

    request, received = np.empty(1, np.uint8), np.empty_like(payload)

    async def serve(ep: Any) -> None:
        try:
            while True:
                await ep.recv(request)
                await ep.send(payload)
        except Exception:  # the bench closed the endpoint
            return

    listener = ucxx.create_listener(serve, 0)
    ep = await ucxx.create_endpoint("127.0.0.1", listener.port)

    async def pull() -> int:
        await ep.send(np.ones(1, np.uint8))
        await ep.recv(received)
        return received.nbytes

    try:
        yield pull
    finally:
        ep.abort()
        listener.close()


async def _measure(names: list[str], sizes_mb: Iterable[float], repeats: int
                   ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    transports: dict[str, Transport] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        for name in names:
            try:
                transports[name] = UcxTransport() if name == "ucx" else ZmqTransport()
            except SwarmError as exc:
                skipped[name] = str(exc)
        try:
            for size_mb in sizes_mb:
                payload = np.random.default_rng(0).integers(
                    0, 256, int(size_mb * MiB), dtype=np.uint8)
                for name, transport in transports.items():
                    url = _bind_url(name, tmpdir)
                    raw_puller = (_raw_ucxx_puller(payload) if name == "ucx" else
                                  _raw_zmq_puller(_bind_url(name, tmpdir, "raw"), payload))
                    async with _swarmnet_puller(transport, url, payload) as ours_pull, \
                            raw_puller as raw_pull:
                        ours_times, raw_times = await _paired_times(
                            ours_pull, raw_pull, payload.nbytes, repeats)
                    ours, raw = statistics.median(ours_times), statistics.median(raw_times)
                    rows.append({
                        "transport": name, "size_mb": size_mb,
                        "swarmnet_s": ours, "raw_s": raw,
                        "swarmnet_s_range": [min(ours_times), max(ours_times)],
                        "raw_s_range": [min(raw_times), max(raw_times)],
                        "swarmnet_gb_per_s": payload.nbytes / ours / 1e9,
                        "raw_gb_per_s": payload.nbytes / raw / 1e9,
                        "swarmnet_over_raw": ours / raw,
                    })
        finally:
            for transport in transports.values():
                await transport.aclose()
    return rows, skipped


def run(*, sizes_mb: Iterable[float] = (40, 400), repeats: int = 5,
        json_path: str | Path | None = None, transports: Iterable[str] | None = None
        ) -> dict[str, Any]:
    """Measure pull times, print them as a table, and return (and optionally write) the result.

    Args:
        sizes_mb: payload sizes in MiB.
        repeats: timed pulls per measurement (after one warm-up pull); the median is reported.
        json_path: where to write the result as JSON, if given.
        transports: names among ``TRANSPORTS``; all of them by default. ucx is reported under
            ``skipped`` with the reason when ucxx is unavailable.

    Returns:
        ``{"version", "machine", "repeats", "results": [row...], "skipped": {name: reason}}``,
        each row with ``transport, size_mb, swarmnet_s, raw_s`` (medians), ``swarmnet_s_range,
        raw_s_range`` ([min, max]), ``swarmnet_gb_per_s, raw_gb_per_s, swarmnet_over_raw``.
    """
    names = list(transports or TRANSPORTS)
    unknown = sorted(set(names) - set(TRANSPORTS))
    if unknown:
        raise SwarmError(f"unknown transports {unknown}; choose from {', '.join(TRANSPORTS)}")
    from rich.console import Console

    with Console(stderr=True).status(f"bench transports: {', '.join(names)} at {list(sizes_mb)} MiB ..."):
        rows, skipped = asyncio.run(_measure(names, list(sizes_mb), repeats))
    result = {
        "version": RESULT_VERSION,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "pyzmq": zmq.pyzmq_version(),
                    "libzmq": zmq.zmq_version(), "UCX_TLS": os.environ.get("UCX_TLS", "")},
        "repeats": repeats,
        "results": rows,
        "skipped": skipped,
    }
    _print(result)
    if json_path is not None:
        write_json(json_path, result)
    return result


def _ms(row: dict[str, Any], key: str) -> str:
    lo, hi = row[f"{key}_range"]
    return f"{row[key] * 1e3:.1f} ms [{lo * 1e3:.1f}-{hi * 1e3:.1f}]"


def _print(result: dict[str, Any]) -> None:
    table = Table(title=escape(f"pull time, median [min-max] of {result['repeats']} (loopback, one process)"))
    for column in ("transport", "MiB", "swarmnet", "raw library", "swarmnet GB/s", "raw GB/s",
                   "swarmnet / raw"):
        table.add_column(column, justify="left" if column == "transport" else "right")
    for row in result["results"]:
        table.add_row(row["transport"], f"{row['size_mb']:g}", _ms(row, "swarmnet_s"), _ms(row, "raw_s"),
                      f"{row['swarmnet_gb_per_s']:.2f}",
                      f"{row['raw_gb_per_s']:.2f}", f"{row['swarmnet_over_raw']:.2f}x")
    console = Console()
    console.print(table)
    for name, reason in result["skipped"].items():
        console.print(f"[yellow]{escape(name)} skipped:[/] {escape(reason)}")
