"""Simulator throughput: layers of disjoint pairs versus the one-pair-at-a-time loop.

Both paths run the same PopSGD population (least squares, n nodes, d coordinates, batch B per
gradient, float32) from the same seed; the measurement alternates short segments of each so
that load from other processes on a shared machine hits both alike. It reports interactions
(draws) per second of each, the ratio, the mean layer size, and whether the layered run
reproduced the naive one bit for bit over the naive run's draws.

    python -m swarmnet.bench.sim --json runs/bench-sim.json

Threads: the naive loop runs on one torch thread (its tiny operations only lose from a
second one); the layered path on ``threads`` (default 1: on a busy shared 2-core machine a
second OpenMP thread waiting for a core costs more than it brings; pass 2 on an idle one).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import torch

from swarmnet.bench import write_json
from swarmnet.sim.engine import Engine, EngineConfig
from swarmnet.sim.problems import lsq


def run(
    *,
    nodes: int = 10_000,
    dim: int = 90,
    batch: int = 128,
    interactions: int = 200_000,
    device: str = "cpu",
    json_path: str | Path | None = None,
    progress: bool = True,
    naive_interactions: int = 2_000,
    rounds: int = 4,
    threads: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure and print; return the figures (stable keys, also written to ``json_path``)."""
    task = lsq(batch=batch, dim=dim, seed=seed)
    common = {
        "algorithm": "popsgd",
        "nodes": nodes,
        "lr": 0.01,
        "seed": seed,
        "device": device,
        "dtype": torch.float32,
    }
    layered = Engine(EngineConfig(**common), task)  # type: ignore[arg-type]
    naive = Engine(EngineConfig(naive=True, **common), task)  # type: ignore[arg-type]
    before = torch.get_num_threads()
    seconds = {"layered": 0.0, "naive": 0.0}
    done = {"layered": 0, "naive": 0}
    plan = [
        ("layered", layered, threads, interactions // rounds),
        ("naive", naive, 1, naive_interactions // rounds),
    ]
    bar = _bar(progress)
    try:
        # Warm-up: one full random block through the layered path (layering, kernels, buffers),
        # a few draws through the naive one; not timed.
        for _name, engine, count, warm in (
            ("layered", layered, threads, min(interactions, 4 * nodes)),
            ("naive", naive, 1, 50),
        ):
            torch.set_num_threads(count)
            engine.advance(warm)
        if bar is not None:
            bar.start()
            task_id = bar.add_task("bench sim", total=2 * rounds)
        for _ in range(rounds):
            for name, engine, count, draws in plan:
                torch.set_num_threads(count)
                _sync(device)
                started = time.perf_counter()
                engine.advance(draws)
                _sync(device)
                seconds[name] += time.perf_counter() - started
                done[name] += draws
                if bar is not None:
                    bar.advance(task_id)
    finally:
        if bar is not None:
            bar.stop()
        torch.set_num_threads(before)
    # Exactness over the naive run's draws: a fresh layered engine, advanced as far.
    check = Engine(EngineConfig(**common), task)  # type: ignore[arg-type]
    torch.set_num_threads(threads)
    check.advance(naive.draws)
    torch.set_num_threads(before)
    identical = bool(
        torch.equal(check.models, naive.models) and torch.equal(check.clocks, naive.clocks)
    )
    rate = {name: done[name] / seconds[name] for name in seconds}
    figures: dict[str, Any] = {
        "benchmark": "sim",
        "task": "lsq",
        "algorithm": "popsgd",
        "nodes": nodes,
        "dim": dim,
        "batch": batch,
        "dtype": "float32",
        "device": device,
        "threads": {"layered": threads, "naive": 1},
        "layered": {
            "interactions": done["layered"],
            "seconds": seconds["layered"],
            "interactions_per_second": rate["layered"],
            "pairs_per_layer": layered.interactions / max(1, layered.batches),
        },
        "naive": {
            "interactions": done["naive"],
            "seconds": seconds["naive"],
            "interactions_per_second": rate["naive"],
        },
        "ratio": rate["layered"] / rate["naive"],
        "identical": identical,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    _report(figures)
    if json_path is not None:
        write_json(json_path, figures)
    return figures


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()  # timing boundary: wait for the queued kernels


def _bar(enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.progress import Progress

    return Progress(transient=True)


def _report(f: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"simulator, PopSGD least squares n={f['nodes']:,} d={f['dim']} batch={f['batch']} "
        f"({f['device']})"
    )
    table.add_column("path")
    table.add_column("threads", justify="right")
    table.add_column("interactions", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("interactions/s", justify="right")
    for name in ("layered", "naive"):
        table.add_row(
            name,
            str(f["threads"][name]),
            f"{f[name]['interactions']:,}",
            f"{f[name]['seconds']:.2f}",
            f"{f[name]['interactions_per_second']:,.0f}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"ratio layered/naive: {f['ratio']:.1f}x; {f['layered']['pairs_per_layer']:.0f} pairs per layer; "
        f"bit-identical to the naive loop: {f['identical']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=90)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--interactions", type=int, default=200_000)
    parser.add_argument("--naive-interactions", type=int, default=2_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    run(**vars(args))


if __name__ == "__main__":
    main()
