"""A client for the dark-host test, run inside a host's network namespace: one request to an
echo listener at ADDR, then, after a line on stdin (the far host has gone dark), one request on
the established connection and one on a new one; prints each outcome as a JSON line.

    python tests/integration/dark_host_client.py tcp://HOST:PORT MAX_FRAME_BYTES
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from swarmnet.transport import TransportSet

DEADLINE_S = 20.0


async def main(address: str, max_frame: int) -> None:
    transports = TransportSet()
    established = transports.for_url(address).connect(address, max_frame_bytes=max_frame)
    await established.request([b"hello"], timeout=DEADLINE_S)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    new = transports.for_url(address).connect(address, max_frame_bytes=max_frame)
    for name, conn in (("established", established), ("new", new)):
        started = time.monotonic()
        try:
            await conn.request([b"x"], timeout=DEADLINE_S)
            outcome = "answered"
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        print(json.dumps({"connection": name, "seconds": time.monotonic() - started, "outcome": outcome}), flush=True)
    await transports.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
