"""What CURVE costs a pull: the same payload pulled over tcp loopback through a plain and a
CURVE-secured ZmqTransport, alternately, both ends in this process (median of ``repeats``).

    python -m swarmnet.bench.curve [SIZE_MIB [REPEATS]]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys

import numpy as np
import zmq

from swarmnet.bench.transports import MiB, _swarmnet_puller, _timed
from swarmnet.security import CurveKeys
from swarmnet.transport.zmq import ZmqTransport


async def measure(size_mb: float = 40, repeats: int = 7) -> dict[str, float]:
    """Median pull seconds, plain and with CURVE (a swarm key), and their ratio."""
    payload = np.random.default_rng(0).integers(0, 256, int(size_mb * MiB), dtype=np.uint8)
    public, secret = zmq.curve_keypair()
    plain = ZmqTransport()
    secured = ZmqTransport(CurveKeys(public, secret, frozenset({public}), check_servers=True))
    times: tuple[list[float], list[float]] = ([], [])
    try:
        async with _swarmnet_puller(plain, "tcp://127.0.0.1:0", payload) as pull_plain, \
                _swarmnet_puller(secured, "tcp://127.0.0.1:0", payload) as pull_curve:
            for pull in (pull_plain, pull_curve):
                await _timed(pull, payload.nbytes)  # warm-up: handshake, first page faults
            for _ in range(repeats):
                times[0].append(await _timed(pull_plain, payload.nbytes))
                times[1].append(await _timed(pull_curve, payload.nbytes))
    finally:
        await plain.aclose()
        await secured.aclose()
    p, c = statistics.median(times[0]), statistics.median(times[1])
    return {"size_mb": size_mb, "repeats": repeats, "plain_s": p, "curve_s": c, "ratio": p / c}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m swarmnet.bench.curve", description=__doc__.split("\n\n")[0])
    parser.add_argument("size", nargs="?", type=float, default=40.0, help="payload in MiB (default 40)")
    parser.add_argument("repeats", nargs="?", type=int, default=7, help="pulls of each kind (default 7)")
    args = parser.parse_args(argv)
    if args.size <= 0 or args.repeats < 1:
        parser.error("SIZE must be > 0 MiB and REPEATS >= 1")
    size, repeats = args.size, args.repeats
    r = asyncio.run(measure(size, repeats))
    print(f"{size:g} MiB over tcp loopback, median of {repeats}: plain {r['plain_s'] * 1e3:.1f} ms "
          f"({size / r['plain_s']:.0f} MiB/s), CURVE {r['curve_s'] * 1e3:.1f} ms "
          f"({size / r['curve_s']:.0f} MiB/s), plain/CURVE time ratio {r['ratio']:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
