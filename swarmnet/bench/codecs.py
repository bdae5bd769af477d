"""Codec benchmark: encode/decode throughput of every codec and the lattice codec's bytes per pull.

Throughput is GB/s of fp32 input (4 bytes per coordinate), the median of ``repeats`` timed calls
after one warm-up call. Encode includes taking the published snapshot's memory from the host
pool (recycled here as soon as each snapshot is dropped, sooner than in a peer that keeps a
history, so per publish a peer can take somewhat longer; docs/benchmarks.md, Codecs); decode
writes into a preallocated output, as the exchange does.

Wire size: the lattice reader's bytes per pull relative to fp32 when its key is D lattice steps
away from the sender (key = x + U(-D, D) eps per coordinate, so D is the sup distance in units
of eps). "first" is a pull with no history (``first_bits`` planes, then escalation); "steady"
is the next pull of a fresh snapshot at the same distance, planned from the first. SPEC 3.4's
reference simulation saw 3.6-4.2 bits per coordinate at its working distances.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from swarmnet.bench import write_json
from swarmnet.codecs import kernels, make_codec
from swarmnet.codecs.base import Codec, Encoded

RESULT_VERSION = 1
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("fp32", "fp32", {}),
    ("fp16", "fp16", {}),
    ("bf16", "bf16", {}),
    ("bf16/stochastic", "bf16", {"rounding": "stochastic"}),
    ("blockwise8", "blockwise8", {}),
    ("blockwise4", "blockwise4", {}),
    ("blockwise8/torch passes", "blockwise8", {}),
    ("lattice", "lattice", {}),
    ("lattice/torch passes", "lattice", {}),
    ("lattice/g4", "lattice", {"width": 4}),
    ("lattice/g8", "lattice", {"width": 8}),
]
UNFUSED = {"lattice/torch passes", "blockwise8/torch passes"}
"""Rows timed with the torch passes instead of the fused CPU loops (kernels.py), side by side."""
DEFAULT_DISTANCES = [0.5, 2.0, 8.0, 32.0, 128.0, 1024.0]
DECODE_DISTANCE = 8.0
"""Key distance (in eps) of the lattice pulls whose decode is timed."""
BENCH_EPS = 2.0**-12
"""Lattice step of the wire-size runs; only D = distance / eps and b_full matter."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _encoded(codec: Codec, x: torch.Tensor, hints: dict[str, Any] | None = None) -> Encoded:
    """An encode whose frames are readable (on a GPU their host copy is queued; see ``ready``)."""
    enc = codec.encode(x, hints)
    if enc.ready is not None:
        enc.ready.synchronize()
    return enc


def _seconds(fn: Callable[[], Any], repeats: int, device: torch.device) -> list[float]:
    """``repeats`` timed calls after one warm-up call (scratch buffers, allocator, lazy init)."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _pull(
    codec: Codec, enc: Encoded, key: torch.Tensor, out: torch.Tensor, state: dict[str, Any]
) -> tuple[int, int]:
    """One complete pull as the runtime does it; returns (payload bytes, rounds)."""
    want = codec.plan(state)
    total = rounds = 0
    while True:
        meta, frames = codec.select(enc, want)
        total += sum(memoryview(f).nbytes for f in frames)
        res = codec.decode(meta, frames, key, out, state)
        rounds += 1
        if res.complete:
            return total, rounds
        want = res.more


def _keyed(x: torch.Tensor, distance_eps: float, eps: float, gen: torch.Generator) -> torch.Tensor:
    noise = torch.rand(x.shape, generator=gen).to(x.device).mul_(2).sub_(1)
    return x + noise * (distance_eps * eps)


def _throughput(
    label: str,
    name: str,
    params: dict[str, Any],
    x: torch.Tensor,
    repeats: int,
    gen: torch.Generator,
) -> dict[str, Any]:
    device = x.device
    codec = make_codec(name, seed=1, **params) if name != "fp32" else make_codec(name)
    hints = {"lr": 0.01, "local_steps": 1.0}

    def encode() -> Encoded:
        return codec.encode(x, hints)

    encode_times = _seconds(encode, repeats, device)
    enc = _encoded(codec, x, hints)
    out = torch.empty_like(x)
    if name == "lattice":
        eps = 2.0 ** max(enc.meta["e"])
        key = _keyed(enc.quantized, DECODE_DISTANCE, eps, gen)
        state: dict[str, Any] = {}
        _pull(codec, enc, key, out, state)  # history: the timed pulls are single-round
        want = codec.plan(state)
        meta, frames = codec.select(enc, want)

        def decode() -> None:
            res = codec.decode(meta, frames, key, out, {"dist": state["dist"]})
            assert res.complete

        wire = sum(memoryview(f).nbytes for f in frames)
    else:
        key = x

        def decode() -> None:
            codec.decode(enc.meta, enc.frames, key, out, {})

        wire = enc.nbytes
    decode_times = _seconds(decode, repeats, device)
    encode_s, decode_s = statistics.median(encode_times), statistics.median(decode_times)
    fp32_bytes = 4 * x.numel()
    return {
        "codec": name,
        "params": codec.params(),
        "encode_ms": 1e3 * encode_s,
        "decode_ms": 1e3 * decode_s,
        "encode_gbps": fp32_bytes / encode_s / 1e9,
        "decode_gbps": fp32_bytes / decode_s / 1e9,
        # slowest and fastest call
        "encode_gbps_range": [fp32_bytes / max(encode_times) / 1e9, fp32_bytes / min(encode_times) / 1e9],
        "decode_gbps_range": [fp32_bytes / max(decode_times) / 1e9, fp32_bytes / min(decode_times) / 1e9],
        "wire_bytes": wire,
        "ratio_vs_fp32": wire / fp32_bytes,
        "bits_per_coord": 8.0 * wire / x.numel(),
        "exact_roundtrip": bool(torch.equal(out, enc.quantized)),
    }


def _wire_sizes(
    x: torch.Tensor, distances: list[float], gen: torch.Generator
) -> list[dict[str, Any]]:
    rows = []
    fp32_bytes = 4 * x.numel()
    for distance in distances:
        codec = make_codec("lattice", eps=BENCH_EPS, seed=2)
        state: dict[str, Any] = {}
        out = torch.empty_like(x)
        enc = _encoded(codec, x)
        key = _keyed(enc.quantized, distance, BENCH_EPS, gen)
        first_bytes, first_rounds = _pull(codec, enc, key, out, state)
        exact = torch.equal(out, enc.quantized)
        moved = x + 1e-3 * BENCH_EPS * torch.randn(x.shape, generator=gen).to(x.device)
        enc2 = _encoded(codec, moved)
        key2 = _keyed(enc2.quantized, distance, BENCH_EPS, gen)
        steady_bytes, steady_rounds = _pull(codec, enc2, key2, out, state)
        exact = exact and torch.equal(out, enc2.quantized)
        rows.append(
            {
                "distance_eps": distance,
                "b_full_max": max(enc.meta["bf"]),
                "first_bits_per_coord": 8.0 * first_bytes / x.numel(),
                "first_rounds": first_rounds,
                "steady_bits_per_coord": 8.0 * steady_bytes / x.numel(),
                "steady_rounds": steady_rounds,
                "steady_ratio_vs_fp32": steady_bytes / fp32_bytes,
                "exact": bool(exact),
            }
        )
    return rows


def run(
    *,
    size: int = 10_000_000,
    repeats: int = 5,
    device: str = "cpu",
    distances: list[float] | None = None,
    json_path: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure every codec on ``size`` random float32 coordinates; return (and optionally write
    as JSON) a dict with stable keys: ``version``, ``size``, ``device``, ``repeats``,
    ``environment``, ``codecs`` (label -> throughput row) and ``lattice_wire`` (one row per
    key distance). Prints rich tables when ``progress`` is set."""
    dev = torch.device(device)
    console = Console(stderr=True) if progress else None
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(size, generator=gen) * 0.05).to(dev)
    codecs: dict[str, dict[str, Any]] = {}
    for label, name, params in CONFIGS:
        if console:
            console.log(f"codec {label} ...")
        with kernels.torch_passes() if label in UNFUSED else contextlib.nullcontext():
            codecs[label] = _throughput(label, name, params, x, repeats, gen)
    if console:
        console.log("lattice bytes per pull ...")
    wire = _wire_sizes(x, distances if distances is not None else DEFAULT_DISTANCES, gen)
    result = {
        "version": RESULT_VERSION,
        "size": size,
        "device": str(dev),
        "repeats": repeats,
        "environment": {
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "numba": kernels.numba_version(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
            "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "codecs": codecs,
        "lattice_wire": wire,
    }
    if console:
        console.print(main_table(result))
        console.print(wire_table(result))
    if json_path is not None:
        write_json(json_path, result)
    return result


def main_table(result: dict[str, Any]) -> Table:
    """Throughput and size per codec, as a rich table."""
    table = Table(
        title=escape(f"codecs, {result['size']:,} coordinates on {result['device']} "
                     f"(GB/s of fp32 input: median [min-max] of {result['repeats']} calls)")
    )
    for col in (
        "codec",
        "encode GB/s",
        "decode GB/s",
        "bits/coord",
        "vs fp32",
    ):
        table.add_column(col, justify="left" if col == "codec" else "right")
    for label, row in result["codecs"].items():
        table.add_row(
            label,
            _gbps(row, "encode"),
            _gbps(row, "decode"),
            f"{row['bits_per_coord']:.2f}",
            f"{row['ratio_vs_fp32']:.3f}",
        )
    return table


def _gbps(row: dict[str, Any], what: str) -> str:
    lo, hi = row[f"{what}_gbps_range"]
    return f"{row[f'{what}_gbps']:.2f} [{lo:.1f}-{hi:.1f}]"


def wire_table(result: dict[str, Any]) -> Table:
    """Lattice bytes per pull against the key's distance, as a rich table."""
    table = Table(title="lattice: bits per coordinate per pull vs key distance (sup, in eps)")
    for col in (
        "distance",
        "b_full",
        "first bits",
        "first rounds",
        "steady bits",
        "steady rounds",
        "steady vs fp32",
        "exact",
    ):
        table.add_column(col, justify="right")
    for row in result["lattice_wire"]:
        table.add_row(
            f"{row['distance_eps']:g}",
            str(row["b_full_max"]),
            f"{row['first_bits_per_coord']:.2f}",
            str(row["first_rounds"]),
            f"{row['steady_bits_per_coord']:.2f}",
            str(row["steady_rounds"]),
            f"{row['steady_ratio_vs_fp32']:.3f}",
            "yes" if row["exact"] else "NO",
        )
    return table
