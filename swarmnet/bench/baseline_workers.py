"""The processes of ``swarmnet bench baselines``: one per rank, every method measured in turn.

Each worker joins one torch.distributed process group (gloo over 127.0.0.1, NCCL when every rank
has its own GPU) and, for every repeat and model, runs the same phases side by side with the
other ranks, a barrier before each:

    solo                    plain SGD steps, no communication: the compute-only pace
    ddp                     DistributedDataParallel, gradients all-reduced every step
    localsgd                local SGD, parameters averaged every ``average_every`` steps
                            (torch's PeriodicModelAverager)
    allreduce               one all-reduce of a model-sized fp32 tensor (median time)
    swarm-solo              a real swarmnet peer with the exchange off: its compute-only pace
    swarm-fp32, swarm-lattice
                            a real swarmnet peer (SwarmSGD) with fp32 or lattice snapshots
    <method>+straggler      the same with the last rank slowed down ``slowdown`` times

Every phase records each rank's (step, wall-clock time) every ``WINDOW`` steps; the paces are
read from them where all ranks step at once (:func:`swarmnet.bench.baselines.common_window`).

Each rank is a process of its own (``python -m swarmnet.bench.baseline_workers``, started by
:func:`swarmnet.bench.baselines.run_world`). The swarmnet peers run in that process itself
(``run_peer``, the code path of ``swarmnet peer``), so each rank imports torch once for all phases: on a loaded 2-core machine a
fresh ``swarmnet up`` costs tens of seconds of start-up per measurement. Every phase writes one
JSON line per rank to ``<out>/rank<R>.jsonl``; :mod:`swarmnet.bench.baselines` aggregates them.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

WINDOW = 10
"""Steps per loss window and per pace record (as the peers' ``train.metrics_every``)."""

TORCH_METHODS = ("ddp", "localsgd")
SWARM_CODECS = {"swarm-fp32": ("fp32", {}), "swarm-lattice": ("lattice", {"eps_scale": 4.0})}


def time_to_target(windows: list[tuple[float, float]], target: float) -> float | None:
    """Seconds from the end of the first loss window to the end of the first window whose mean
    training loss is at most ``target``; None if never reached. ``windows``: (time, loss)."""
    if not windows:
        return None
    start = windows[0][0]
    return next((t - start for t, loss in windows if loss is not None and loss <= target), None)


def device_for(rank: int, backend: str) -> torch.device:
    return torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- torch.distributed phases ------------------------------------------------------------------


def torch_phase(method: str, *, rank: int, plan: dict[str, Any], model_spec: dict[str, Any],
                straggler_pad_s: float) -> dict[str, Any]:
    """``solo``, ``ddp`` or ``localsgd`` for ``model_spec['steps']`` steps; ``straggler_pad_s``
    seconds of sleep after each step (the straggler only)."""
    from torch.nn.parallel import DistributedDataParallel

    from swarmnet.peer.data import ShardSampler
    from swarmnet.tasks import load_task

    device = device_for(rank, plan["backend"])
    task = load_task(plan["task"], {"hidden": model_spec["hidden"]})
    torch.manual_seed(plan["seed"])
    model = task.build_model().to(device)
    train_data = tuple(t.to(device) for t in task.train)
    sampler = ShardSampler(task.num_samples, plan["batch_size"], shard="random", rank=rank,
                           peers=plan["world"], seed=plan["seed"], peer_seed=1000 + rank)
    net: torch.nn.Module = model
    averager = None
    if method == "ddp":
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif method == "localsgd":
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

        averager = PeriodicModelAverager(period=plan["average_every"], warmup_steps=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=plan["lr"], momentum=plan["momentum"])
    points: list[tuple[int, float]] = []
    windows: list[tuple[float, float]] = []
    step_times: list[float] = []
    loss_sum = 0.0
    dist.barrier()
    for step in range(1, model_spec["steps"] + 1):
        started = time.perf_counter()
        indices = sampler.next_indices()
        batch = tuple(t[indices.to(device)] for t in train_data)
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(net, batch)
        loss.backward()
        optimizer.step()
        if averager is not None:
            averager.average_parameters(model.parameters())
        loss_sum += loss.item()  # also the device sync that makes the step time true
        if straggler_pad_s:
            time.sleep(straggler_pad_s)
        step_times.append(time.perf_counter() - started)
        if step % WINDOW == 0:
            now = time.time()  # the clock of the peers' metrics, shared by all ranks on this machine
            points.append((step, now))
            windows.append((now, loss_sum / WINDOW))
            loss_sum = 0.0
    dist.barrier()
    model_bytes = 4 * sum(p.numel() for p in model.parameters())
    n = plan["world"]
    ring = 2 * (n - 1) / n * model_bytes  # bytes each rank receives (and sends) per ring all-reduce
    per_step = {"solo": 0.0, "ddp": ring, "localsgd": ring / plan["average_every"]}[method]
    return {"points": points, "median_step_s": statistics.median(step_times),
            "time_to_target_s": time_to_target(windows, plan["target_loss"]),
            "final_loss": windows[-1][1] if windows else None, "bytes_per_step": per_step,
            "bytes_per_step_source": "ring all-reduce formula 2(n-1)/n x model bytes",
            "parameters": model_bytes // 4}


def allreduce_phase(*, rank: int, plan: dict[str, Any], numel: int, repeats: int = 10) -> dict[str, Any]:
    """Median time of one all-reduce of an fp32 tensor of ``numel`` coordinates."""
    device = device_for(rank, plan["backend"])
    tensor = torch.ones(numel, device=device)
    times = []
    for i in range(repeats + 2):
        dist.barrier()
        _sync(device)
        started = time.perf_counter()
        dist.all_reduce(tensor)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - started)
    return {"allreduce_s": statistics.median(times), "numel": numel}


# -- swarmnet phases ---------------------------------------------------------------------------


def swarm_phase(method: str, *, rank: int, plan: dict[str, Any], model_spec: dict[str, Any],
                run_dir: Path, straggler_pad_s: float) -> dict[str, Any]:
    """One real swarmnet peer (in this process) in a swarm of all ranks; rank 0 is the seed."""
    from swarmnet.config import load_config
    from swarmnet.peer.metrics import read_metrics
    from swarmnet.peer.node import PeerIdentity, run_event_loop, run_peer
    from swarmnet.testing.processes import wait_until

    name = f"peer{rank}"
    codec, options = SWARM_CODECS.get(method, ("fp32", {}))
    overrides: dict[str, Any] = {
        "run.dir": str(run_dir), "run.peers": plan["world"], "run.seed": plan["seed"],
        "task.spec": plan["task"], "task.options": {"hidden": model_spec["hidden"]},
        "train.batch_size": plan["batch_size"], "train.lr": plan["lr"], "train.momentum": plan["momentum"],
        "train.steps": model_spec["steps"], "train.metrics_every": WINDOW, "train.checkpoint_every": 0.0,
        "train.tensorboard": False, "train.step_pad_s": straggler_pad_s, "device.threads": plan["threads"],
        "algorithm.name": "swarmsgd", "algorithm.local_steps": plan["local_steps"],
        "codec.name": codec, "codec.options": options,
        "network.exchange": method != "swarm-solo", "network.listen": "tcp://127.0.0.1:0",
        "network.min_peers": plan["world"] - 1,
        # All ranks start together, as DDP's do, and peers started together adopt nothing; even a
        # rank whose start condition timed out must not take a neighbour's model and step (a
        # newcomer's start), which would skip its phase.
        "network.adopt_model": False,
        # Merge every H steps as the algorithm says, unpaced, like the baselines' fixed rates
        # (`swarmnet bench exchange` measures the default CPU budget).
        "network.exchange_cpu": 0.0,
        "device.device": str(device_for(rank, plan["backend"])),
    }
    dist.barrier()
    if rank > 0:  # the seed's card appears once it listens
        card = run_dir / "peer0" / "card.json"
        wait_until(card.exists, 120, what="the seed peer's card")
        overrides["network.seeds"] = [json.loads(card.read_text())["addr"]]
    cfg = load_config(None, overrides)
    code = run_event_loop(run_peer(cfg, PeerIdentity(name, rank), resume=False, install_signals=False))
    dist.barrier()
    if code != 0:
        raise RuntimeError(f"swarmnet peer {name} exited with {code}; see {run_dir / name}")
    records = [r for r in read_metrics(run_dir / name / "metrics.jsonl") if "lr" in r]
    summary = json.loads((run_dir / name / "summary.json").read_text())
    # Traffic up to the row of the last step: after its budget a peer settles, pulling on while
    # the others train, which is not traffic of a training step.
    steps = max(r["step"] for r in records) if records else 0
    at_end = next((r for r in records if r["step"] == steps), {"bytes_in": 0, "bytes_out": 0})
    steps = max(1, steps)
    return {"points": [(r["step"], r["time"]) for r in records],
            "time_to_target_s": time_to_target([(r["time"], r["loss"]) for r in records], plan["target_loss"]),
            # the last row that carries a loss (rows written while settling or stopping may not)
            "final_loss": next((r["loss"] for r in reversed(records) if r.get("loss") is not None), None),
            "bytes_per_step": at_end["bytes_in"] / steps, "bytes_sent_per_step": at_end["bytes_out"] / steps,
            "bytes_per_step_source": "measured: bytes the peer received until its last step / its steps",
            "interactions": summary["interactions"]}


# -- the worker --------------------------------------------------------------------------------


def phases(plan: dict[str, Any], model: str) -> list[str]:
    """The phases of one repeat of one model, in the order they run."""
    out = ["solo", *TORCH_METHODS, "allreduce", "swarm-solo", *SWARM_CODECS]
    if model in plan["straggler_models"]:
        out += [f"{m}+straggler" for m in plan["straggler_methods"]]
    return out


def _exit_with_parent() -> None:
    """A rank must not outlive the bench that started it (it would wait at a barrier for long)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker(rank: int, plan: dict[str, Any], out_dir: str) -> None:
    """The body of one rank process (``python -m swarmnet.bench.baseline_workers RANK PLAN OUT``)."""
    from swarmnet.log import setup_logging

    setup_logging("WARNING", rich=False)
    _exit_with_parent()
    torch.set_num_threads(plan["threads"])
    if plan["backend"] == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(plan["backend"], init_method=plan["init_method"], rank=rank,
                            world_size=plan["world"])
    out = Path(out_dir)
    straggler = plan["world"] - 1
    try:
        with open(out / f"rank{rank}.jsonl", "a", encoding="utf-8") as fh:
            for repeat in range(plan["repeats"]):
                for model_spec in plan["models"]:
                    solo_step_s = 0.0
                    for phase in phases(plan, model_spec["name"]):
                        method, _, variant = phase.partition("+")
                        slowdown = plan["slowdown"] if variant == "straggler" and rank == straggler else 1.0
                        # The straggler sleeps (slowdown - 1) x its own solo step time (torch's, no
                        # communication) after every step, whatever the method: the same time for all.
                        pad_s = (slowdown - 1) * solo_step_s
                        if method == "allreduce":
                            numel = sum(p.numel() for p in _model_of(plan, model_spec).parameters())
                            result = allreduce_phase(rank=rank, plan=plan, numel=numel)
                        elif method.startswith("swarm"):
                            run_dir = out / f"{model_spec['name']}-r{repeat}-{phase}"
                            result = swarm_phase(method, rank=rank, plan=plan, model_spec=model_spec,
                                                 run_dir=run_dir, straggler_pad_s=pad_s)
                        else:
                            result = torch_phase(method, rank=rank, plan=plan, model_spec=model_spec,
                                                 straggler_pad_s=pad_s)
                            if method == "solo":
                                solo_step_s = result["median_step_s"]
                        record = {"rank": rank, "repeat": repeat, "model": model_spec["name"], "phase": phase,
                                  "world": plan["world"], **result}
                        fh.write(json.dumps(record) + "\n")
                        fh.flush()
    finally:
        dist.destroy_process_group()


def _model_of(plan: dict[str, Any], model_spec: dict[str, Any]) -> torch.nn.Module:
    from swarmnet.tasks import load_task

    return load_task(plan["task"], {"hidden": model_spec["hidden"]}).build_model()


if __name__ == "__main__":
    worker(int(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()), sys.argv[3])
