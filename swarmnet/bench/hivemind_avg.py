"""hivemind's decentralized averaging of one fp32 tensor between local peers, timed.

Standalone on purpose (imports only torch and hivemind): ``swarmnet bench baselines`` runs it as a
script under whichever Python has hivemind installed (``--hivemind-python``), since hivemind pins
packages (numpy < 2.4 for its 8-bit codecs) that may not suit the main environment.

    python swarmnet/bench/hivemind_avg.py --peers 2 --numel 10000000 --compression 8bit

Each peer is a process with its own DHT node on 127.0.0.1 (NAT port mapping, AutoNAT and relays
off: loopback only, no outside address). Per step, every peer asks for a group of all peers;
once the group is formed (hivemind's matchmaking), a barrier starts the all-reduce on all peers
together, and the time from trigger to the slowest peer's result is the averaging time reported
(median of ``--steps`` after one warm-up, each step's time listed too). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import statistics
import sys
import time
from typing import Any

COMPRESSIONS = ("none", "fp16", "8bit")


def _compression(name: str) -> Any:
    from hivemind.compression import Float16Compression, NoCompression, Uniform8BitQuantization

    return {"none": NoCompression, "fp16": Float16Compression, "8bit": Uniform8BitQuantization}[name]()


def _peer(rank: int, args: argparse.Namespace, maddrs: Any, barrier: Any, results: Any) -> None:
    import hivemind
    import torch
    from hivemind.averaging.control import AveragingStage

    torch.set_num_threads(1)
    p2p = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_relay=False, use_auto_relay=False,
               auto_nat=False, nat_port_map=False, use_ipfs=False)
    if rank == 0:
        dht = hivemind.DHT(start=True, **p2p)
        for _ in range(args.peers - 1):
            maddrs.put([str(a) for a in dht.get_visible_maddrs()])
    else:
        dht = hivemind.DHT(start=True, initial_peers=maddrs.get(timeout=120), **p2p)
    def values(r: int) -> torch.Tensor:  # each peer's data, reproducible by every peer
        return torch.randn(args.numel, generator=torch.Generator().manual_seed(r))

    tensor = values(rank)
    averager = hivemind.averaging.DecentralizedAverager(
        [tensor], dht, start=True, prefix="swarmnet-bench", target_group_size=args.peers,
        min_group_size=args.peers, min_matchmaking_time=args.matchmaking, request_timeout=args.matchmaking / 2,
        compression=_compression(args.compression))
    times, steps = [], []
    try:
        for i in range(args.steps + 1):
            barrier.wait(120)
            started = time.perf_counter()
            control = averager.step(wait=False, require_trigger=True, timeout=120)
            while control.stage == AveragingStage.LOOKING_FOR_GROUP or control.stage == AveragingStage.IDLE:
                time.sleep(0.001)
            barrier.wait(120)
            triggered = time.perf_counter()
            control.allow_allreduce()
            group = control.result(timeout=120)
            finished = time.perf_counter()
            if group is None:
                raise RuntimeError("hivemind averaging found no group (is numpy < 2.4 for its 8-bit codecs?)")
            if i:
                times.append(finished - triggered)
                steps.append(finished - started)
        with averager.get_tensors() as (averaged,):
            # averaging the average again keeps it: compare with the mean of the initial values
            expected = torch.stack([values(r) for r in range(args.peers)]).mean(0)
            error = float((averaged - expected).abs().max())
        results.put({"rank": rank, "allreduce_s": times, "step_s": steps, "max_error": error})
    finally:
        averager.shutdown()
        dht.shutdown()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--numel", type=int, default=10_000_000)
    parser.add_argument("--compression", choices=COMPRESSIONS, default="none")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--matchmaking", type=float, default=2.0, help="hivemind's min_matchmaking_time (s)")
    args = parser.parse_args(argv)
    ctx = mp.get_context("fork")  # hivemind forks its own helpers from each peer
    maddrs, results, barrier = ctx.Queue(), ctx.Queue(), ctx.Barrier(args.peers)
    procs = [ctx.Process(target=_peer, args=(r, args, maddrs, barrier, results))
             for r in range(args.peers)]
    for p in procs:
        p.start()
    rows: list[dict[str, Any]] = []
    deadline = time.monotonic() + 600
    while len(rows) < len(procs):
        try:
            rows.append(results.get(timeout=1))
        except queue.Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"hivemind peers failed (exit codes {failed}) or timed out") from None
    for p in procs:
        p.join(30)
    import hivemind
    import numpy

    # A step ends when its slowest peer has the result.
    allreduce_s = [max(step) for step in zip(*(r["allreduce_s"] for r in rows))]
    step_s = [max(step) for step in zip(*(r["step_s"] for r in rows))]
    return {"peers": args.peers, "numel": args.numel, "compression": args.compression, "steps": args.steps,
            "allreduce_s": statistics.median(allreduce_s), "allreduce_s_steps": allreduce_s,
            "step_s": statistics.median(step_s), "step_s_steps": step_s,
            "max_error": max(r["max_error"] for r in rows), "min_matchmaking_time": args.matchmaking,
            "hivemind": hivemind.__version__, "numpy": numpy.__version__}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
