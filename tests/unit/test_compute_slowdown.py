"""train.slowdown: the compute loop of a real peer (real model and data) becomes a straggler."""

import asyncio
import time

import pytest
import torch

from swarmnet.algorithms import PhaseClock
from swarmnet.codecs import make_codec
from swarmnet.config import load_config
from swarmnet.log import PeerLogAdapter, get_logger
from swarmnet.peer.compute import ComputeLoop
from swarmnet.peer.state import Mailbox, SnapshotStore
from swarmnet.peer.stats import PeerStats
from swarmnet.tasks import load_task

pytestmark = pytest.mark.timeout(60)


def compute_loop(tmp_path, *, steps: int, slowdown: float) -> ComputeLoop:
    cfg = load_config(None, {"task.spec": "swarmnet.tasks.digits:task", "train.steps": steps,
                             "train.slowdown": slowdown, "train.tensorboard": False,
                             "train.checkpoint_every": 0.0, "train.metrics_every": 1000})
    loop = asyncio.new_event_loop()
    try:
        return ComputeLoop(cfg=cfg, task=load_task(cfg.task.spec), device=torch.device("cpu"),
                           codec=make_codec("fp32"), store=SnapshotStore(), mailbox=Mailbox(loop),
                           clock=PhaseClock(), stats=PeerStats(), peer_dir=tmp_path / f"x{slowdown}",
                           rank=0, peer_seed=1, log=PeerLogAdapter(get_logger("peer"), {"peer": "test"}))
    finally:
        loop.close()


def test_each_step_is_stretched_by_the_slowdown(tmp_path):
    slowdown, steps = 11.0, 25
    compute = compute_loop(tmp_path, steps=steps, slowdown=slowdown)
    fastest = float("inf")
    for _ in range(5):  # unpadded steps outside run(): a lower bound of one step's duration
        started = time.perf_counter()
        compute.train_step()
        fastest = min(fastest, time.perf_counter() - started)
    started = time.perf_counter()
    assert compute.run() == "budget"
    elapsed = time.perf_counter() - started
    # each of the 20 steps run() takes sleeps 10x its own duration (a generous margin kept)
    assert elapsed >= 0.5 * (slowdown - 1) * (steps - 5) * fastest
    assert compute.step == steps

