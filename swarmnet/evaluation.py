"""Evaluating the average of a swarm's models (SPEC 4 item 2).

BatchNorm statistics are buffers: they never travel and are never averaged, each peer keeps
its own. The average of several peers' parameters therefore has no statistics of its own, so
before evaluating it :func:`recompute_batchnorm` runs a few training batches through it in
training mode with the statistics reset. The launcher's summary and ``swarmnet eval`` (which
pulls the live snapshots of a running swarm) both evaluate this way.

Legend: N = number of float parameter coordinates.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from swarmnet.codecs import Codec, make_codec
from swarmnet.config import SwarmConfig
from swarmnet.errors import CodecError, SwarmError, TransportError
from swarmnet.log import get_logger
from swarmnet.peer.client import PeerClient
from swarmnet.peer.state import FlatParameters, layout_of
from swarmnet.peer.stats import PeerStats
from swarmnet.security import CurveKeys, client_keys
from swarmnet.tasks import Task, build_seeded, load_task
from swarmnet.transport import TransportSet
from swarmnet.wire import Limits, MsgType, request

log = get_logger("eval")

BN_BATCHES = 20
"""Training batches run through an averaged model to recompute its BatchNorm statistics."""


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, task: Task, *, batches: int = BN_BATCHES, batch_size: int = 128,
                        seed: int = 0) -> int:
    """Reset every BatchNorm layer's running statistics and re-estimate them as the plain mean
    over ``batches`` random training batches. Returns the batches used (0: the model has no
    BatchNorm, nothing to do). Leaves the model in eval mode."""
    layers = batchnorm_layers(model)
    if not layers or batches <= 0:
        model.eval()
        return 0
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches, not an EMA
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    model.train()
    try:
        for _ in range(batches):
            indices = torch.randint(task.num_samples, (min(batch_size, task.num_samples),), generator=generator)
            task.loss(model, tuple(t[indices].to(device) for t in task.train))
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.eval()
    return batches


def evaluate_averaged(model: nn.Module, task: Task, *, batch_size: int, seed: int,
                      bn_batches: int = BN_BATCHES) -> dict[str, Any]:
    """Recompute BatchNorm statistics (if any), then the task's held-out metrics."""
    used = recompute_batchnorm(model, task, batches=bn_batches, batch_size=batch_size, seed=seed)
    return {"batchnorm_batches": used, "eval": task.metrics(model)}


def save_model(model: nn.Module, path: Path) -> None:
    """The averaged model as a plain ``state_dict`` of CPU tensors, its recomputed BatchNorm
    statistics included: ``model.load_state_dict(torch.load(path))`` restores it. Written whole
    or not at all (an OSError leaves what ``path`` held)."""
    from swarmnet.peer.checkpoint import save_atomic

    save_atomic({name: t.detach().cpu() for name, t in model.state_dict().items()}, path)


def saved_to(model: nn.Module, path: Path) -> dict[str, str]:
    """:func:`save_model`, reported as ``{"model": path}`` or ``{"model_error": why}``."""
    try:
        save_model(model, path)
    except OSError as exc:
        why = f"cannot write {exc.filename or path} ({exc.strerror or exc}); free space or pick a writable path"
        log.warning("the average model was not saved: %s", why)
        return {"model_error": why}
    return {"model": str(path)}


# -- swarmnet eval: average live snapshots ------------------------------------------------------


@dataclass(slots=True)
class PulledModel:
    name: str
    addr: str
    step: int
    """The peer's step as of discovery (its status reply)."""
    version: int


class SnapshotReader:
    """Pulls peers' current snapshots without taking part in the swarm: it moves nobody's phase
    clock (it sends clock -1, below any peer's) and is never gossiped about (it sends no HELLO)."""

    def __init__(self, codec: Codec, *, max_frame_bytes: int, timeout: float = 30.0,
                 curve: CurveKeys | None = None, slowest_rate: float | None = None) -> None:
        self.codec = codec
        self.transports = TransportSet(curve, slowest_rate=slowest_rate)
        self.client = PeerClient(sender=f"eval-{secrets.token_hex(3)}", transports=self.transports,
                                 limits=Limits(max_frame_bytes=max_frame_bytes), timeout=timeout,
                                 stats=PeerStats(), max_frame_bytes=max_frame_bytes)

    async def pull(self, addr: str, out_for: Callable[[int, str | None], Tensor]) -> int:
        """Decode ``addr``'s latest snapshot into ``out_for(n, layout)`` (n: its coordinates, as
        its meta says; layout: its model's fingerprint, None from a peer that sends none);
        returns the snapshot's version.

        A one-off reader asks for the whole snapshot in one request (``want`` None: every
        lattice plane, decoded without a key). Keyed lattice pulls escalate in rounds against
        one snapshot version, and a peer that merges every few milliseconds retires that
        version before the rounds end: ``swarmnet eval`` once failed with "version 421 is gone"
        on the lattice quickstart."""
        reply = await self.client.call(addr, request(MsgType.PULL, self.client.sender, clock=-1, want=None,
                                                     version=None), expect=MsgType.SNAPSHOT)
        if reply.body["codec"] != self.codec.name:
            raise SwarmError(f"{addr} publishes codec {reply.body['codec']}, the config says "
                             f"{self.codec.name}; pass the swarm's own config")
        n = reply.body["meta"].get("n")
        if not isinstance(n, int) or isinstance(n, bool):
            raise CodecError(f"{addr}'s snapshot does not say its size")
        out_N = out_for(n, reply.body.get("layout"))
        result = self.codec.decode(reply.body["meta"], reply.frames, out_N, out_N, {})
        if not result.complete:
            raise CodecError(f"{addr}'s whole snapshot did not decode")
        if not bool(torch.isfinite(out_N).all()):
            raise CodecError(f"{addr}'s snapshot holds non-finite values")
        return int(reply.body["version"])

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.transports.aclose()


async def discover(seeds: list[str], run_dir: Path | None, timeout: float,
                   curve: CurveKeys | None = None) -> list[tuple[str, str, int]]:
    """(name, address, step) of every peer that answers, found from seeds or a run dir's cards;
    a SwarmError saying what the requests ran into when none does."""
    from swarmnet.ui.collect import StatusCollector, check_seeds, nobody_answered

    check_seeds(seeds)
    collector = StatusCollector(seeds, timeout=timeout, run_dir=run_dir, curve=curve)
    try:
        snapshot = await collector.poll()
    finally:
        await collector.aclose()
    if not snapshot.alive:
        raise SwarmError(nobody_answered(snapshot, run_dir))
    # Pulled where each answered: the address it advertises may not resolve from here.
    return [(row.name, row.reached or row.addr, row.step) for row in snapshot.alive]


def evaluate_swarm(cfg: SwarmConfig, *, seeds: list[str], run_dir: Path | None = None, peers: int = 0,
                   bn_batches: int = BN_BATCHES, timeout: float = 5.0,
                   key_file: str | os.PathLike[str] | None = None, save: Path | None = None) -> dict[str, Any]:
    """Pull the current snapshots of all (or the first ``peers``, by name) live peers, average
    them, recompute BatchNorm statistics and evaluate the average on the task's held-out data;
    with ``save``, write the average there (:func:`save_model`; where that fails, the result's
    ``model_error`` says why). A closed swarm is read with ``key_file``, else with the key of the config's
    [security]."""
    curve = client_keys(key_file, None if key_file else cfg.security)
    task = load_task(cfg.task.spec, cfg.task.options)
    model = build_seeded(task, cfg.run.seed)
    floats = [p for p in model.parameters() if p.is_floating_point()]
    trained = [p for p in floats if p.requires_grad]
    # What a swarm of this model may average, by its size: the parameters (None: all float ones)
    # and their fingerprint.
    averaged = {sum(p.numel() for p in params): (only, layout_of(p.shape for p in params))
                for params, only in ((floats, None), (trained, trained))}
    received: list[Tensor] = []

    def out_for(n: int, layout: str | None) -> Tensor:
        """A vector to decode a snapshot of ``n`` coordinates into. The first pull says which
        parameters the swarm averages: all the model's float ones, or only those it trains
        (a SwarmOptimizer leaves frozen ones out), whichever has its size."""
        if not received:
            if n not in averaged or layout not in (None, averaged[n][1]):
                shape = f"{n} coordinates" if n not in averaged else f"another layout of {n} coordinates"
                raise SwarmError(f"the swarm's model has {shape}, not this config's model; pass the swarm's own "
                                 "config (--config, and the --set overrides it ran with)")
            received.append(torch.empty(n))
        if n != received[0].numel():
            raise SwarmError(f"its model has {n} coordinates, the first peer's {received[0].numel()}")
        if layout not in (None, averaged[n][1]):
            raise SwarmError(f"it trains another model than this config's: as many coordinates in another "
                             f"layout (fingerprint {layout}, the config's {averaged[n][1]})")
        return received[0]

    codec = make_codec(cfg.codec.name, **cfg.codec.options)

    async def pull_all() -> tuple[list[PulledModel], Tensor, float]:
        from swarmnet.ui.collect import name_order

        found = sorted(await discover(seeds, run_dir, timeout, curve), key=lambda peer: name_order(peer[0]))
        if peers > len(found):
            log.warning("--peers %d: only %d peer(s) answered; averaging those", peers, len(found))
        chosen = found[:peers] if peers > 0 else found
        net, largest = cfg.network, max(averaged)
        reader = SnapshotReader(codec, max_frame_bytes=net.frame_limit(largest),
                                timeout=max(timeout, net.transfer_timeout(largest)), curve=curve,
                                slowest_rate=net.min_transfer_rate)
        sum_N: Tensor | None = None
        squares, pulled = 0.0, []
        try:
            for name, addr, step in chosen:
                try:
                    version = await reader.pull(addr, out_for)
                except TransportError as exc:  # libzmq drops a frame over the limit without a word
                    raise SwarmError(f"pulling {name} at {addr}: {exc} (a snapshot over this config's frame "
                                     f"limit, {reader.client.max_frame_bytes} bytes, ends the same way: pass the "
                                     "swarm's own config)") from None
                except SwarmError as exc:
                    raise SwarmError(f"pulling {name} at {addr}: {exc}") from None
                out_N = received[0]
                sum_N = out_N.double() if sum_N is None else sum_N.add_(out_N)
                squares += float(out_N.double().pow(2).sum())
                pulled.append(PulledModel(name, addr, step, version))
        finally:
            await reader.aclose()
        assert sum_N is not None, "discover() found at least one peer"
        mean_N = sum_N / len(pulled)
        spread = max(0.0, squares - len(pulled) * float(mean_N.pow(2).sum()))
        return pulled, mean_N, math.sqrt(spread / len(pulled))

    pulled, mean_N, consensus = asyncio.run(pull_all())
    FlatParameters(model, averaged[mean_N.numel()][0]).vector_N.copy_(mean_N)
    result = evaluate_averaged(model, task, batch_size=cfg.train.batch_size, seed=cfg.run.seed,
                               bn_batches=bn_batches)
    if save is not None:
        result.update(saved_to(model, save))
    return {"task": task.name, "metric": task.metric, "peers_averaged": len(pulled),
            "peers": [{"name": p.name, "addr": p.addr, "step": p.step, "version": p.version} for p in pulled],
            "consensus_distance": consensus, **result}
