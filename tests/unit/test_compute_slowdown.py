"""The compute loop of a real peer (real model and data): train.slowdown makes it a straggler, and a
resumed loop takes its recipe from the config and its momentum from the checkpoint."""

import asyncio
import dataclasses
import random
import time

import numpy as np
import pytest
import torch

from swarmnet.algorithms import PhaseClock
from swarmnet.codecs import make_codec
from swarmnet.config import load_config
from swarmnet.errors import ConfigError
from swarmnet.log import PeerLogAdapter, get_logger
from swarmnet.peer.compute import ComputeLoop
from swarmnet.peer.metrics import read_metrics
from swarmnet.peer.state import Mailbox, SnapshotStore
from swarmnet.peer.stats import PeerStats
from swarmnet.tasks import load_task

pytestmark = pytest.mark.timeout(60)


def compute_loop(tmp_path, *, steps: int, slowdown: float, metrics_every: int = 1000, peer_seed: int = 1,
                 **settings: object) -> ComputeLoop:
    """``settings``: more config keys, e.g. train.batch_size."""
    cfg = load_config(None, {"task.spec": "swarmnet.tasks.digits:task", "train.steps": steps,
                             "train.slowdown": slowdown, "train.tensorboard": False,
                             "train.checkpoint_every": 0.0, "train.metrics_every": metrics_every, **settings})
    loop = asyncio.new_event_loop()
    try:
        return ComputeLoop(cfg=cfg, task=load_task(cfg.task.spec), device=torch.device("cpu"),
                           codec=make_codec("fp32"), store=SnapshotStore(), mailbox=Mailbox(loop),
                           clock=PhaseClock(), stats=PeerStats(), peer_dir=tmp_path / f"x{slowdown}",
                           rank=0, peer_seed=peer_seed, log=PeerLogAdapter(get_logger("peer"), {"peer": "test"}))
    finally:
        loop.close()


def test_what_training_draws_differs_between_peers_and_resumes_where_it_left_off(tmp_path):
    """Dropout and augmentation draw from torch's generator: seeded as the shared initial model
    was, every peer drew the same crops; and a resumed peer replayed its draws from the start."""
    def draws():  # torch's, numpy's and Python's generators: a task may augment with any
        return torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)]

    a = compute_loop(tmp_path / "a", steps=5, slowdown=1.0, peer_seed=1)
    draw_a = draws()
    b = compute_loop(tmp_path / "b", steps=5, slowdown=1.0, peer_seed=2)
    draw_b = draws()
    assert torch.equal(a.live_N, b.live_N)  # one model, own draws
    assert all(x != y for x, y in zip(draw_a, draw_b, strict=True))
    a.save_checkpoint()
    next_draw = draws()
    resumed = compute_loop(tmp_path / "a", steps=5, slowdown=1.0, peer_seed=1)
    draws()
    assert resumed.resume() and draws() == next_draw


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
    # each of the 20 steps run() takes sleeps 10x the recent steps' median (a generous margin kept)
    assert elapsed >= 0.5 * (slowdown - 1) * (steps - 5) * fastest
    assert compute.step == steps


def test_one_long_step_does_not_stall_a_straggler(tmp_path):
    """A step that spans a pause of the whole process (SIGSTOP, swapping) is padded like the
    steps around it: padding by its own length would sleep ten times the pause here."""
    compute = compute_loop(tmp_path, steps=20, slowdown=11.0)
    loss, calls = compute.task.loss, [0]

    def loss_with_a_pause(model, batch):
        calls[0] += 1
        if calls[0] == 10:
            time.sleep(1.0)
        return loss(model, batch)

    compute.task = dataclasses.replace(compute.task, loss=loss_with_a_pause)
    pads, wait = [], compute.stop.wait

    def recorded_wait(seconds):
        pads.append(seconds)
        return wait(seconds)

    compute.stop.wait = recorded_wait
    assert compute.run() == "budget"
    assert len(pads) == 20
    # Padded by the recent steps' median, each pad is ten step lengths (milliseconds here, up
    # to a second on a loaded machine); padded by the paused step itself, one would be 10 s.
    assert max(pads) < 0.5 * (11.0 - 1) * 1.0, pads


def test_metrics_rows_count_the_training_threads_cpu_not_its_sleep(tmp_path):
    """compute_cpu_s is CPU time: a straggler sleeping 5/6 of each step shows far less than its wall time."""
    compute = compute_loop(tmp_path, steps=60, slowdown=6.0, metrics_every=10)
    assert compute.run() == "budget"
    compute.metrics.close()
    rows = [r for r in read_metrics(compute.peer_dir / "metrics.jsonl") if "compute_cpu_s" in r]
    assert len(rows) == 6
    cpu = [r["compute_cpu_s"] for r in rows]
    assert all(b > a for a, b in zip(cpu, cpu[1:])), cpu
    wall = rows[-1]["elapsed"] - rows[0]["elapsed"]
    assert 0 < cpu[-1] - cpu[0] < 0.5 * wall, (cpu, wall)


def test_a_resumed_peer_takes_its_recipe_from_the_config_and_its_momentum_from_the_checkpoint(tmp_path):
    def loop_with(momentum: float, weight_decay: float) -> ComputeLoop:
        cfg = load_config(None, {"task.spec": "swarmnet.tasks.digits:task", "train.steps": 20,
                                 "train.tensorboard": False, "train.checkpoint_every": 0.0,
                                 "train.momentum": momentum, "train.weight_decay": weight_decay})
        loop = asyncio.new_event_loop()
        try:
            return ComputeLoop(cfg=cfg, task=load_task(cfg.task.spec), device=torch.device("cpu"),
                               codec=make_codec("fp32"), store=SnapshotStore(), mailbox=Mailbox(loop),
                               clock=PhaseClock(), stats=PeerStats(), peer_dir=tmp_path / "peer",
                               rank=0, peer_seed=1, log=PeerLogAdapter(get_logger("peer"), {"peer": "test"}))
        finally:
            loop.close()

    first = loop_with(0.9, 5e-4)
    for _ in range(5):
        first.train_step()
    first.save_checkpoint()
    buffers = [first.optimizer.state[p]["momentum_buffer"].clone() for p in first.model.parameters()]
    second = loop_with(0.5, 0.0)
    assert second.resume() and second.step == 5
    group = second.optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.5, 0.0)
    for p, saved in zip(second.model.parameters(), buffers, strict=True):
        assert torch.equal(second.optimizer.state[p]["momentum_buffer"], saved)


def test_a_peer_resumed_with_another_batch_size_continues_from_its_place_in_the_data(tmp_path):
    """The budget and the schedule count steps: resumed with batches twice as large, the peer
    had done half as many of the new steps, not as many (it stopped with half its epochs left)."""
    first = compute_loop(tmp_path, steps=0, slowdown=1.0, **{"train.epochs": 4, "train.batch_size": 100})
    per_epoch = first.plan.steps_per_epoch  # 1,437 digits: 15 steps
    for _ in range(2 * per_epoch):
        first.train_step()
    first.save_checkpoint()
    resumed = compute_loop(tmp_path, steps=0, slowdown=1.0, **{"train.epochs": 4, "train.batch_size": 200})
    assert resumed.resume()
    assert resumed.sampler.position.epoch == 2 and resumed.step == 2 * resumed.plan.steps_per_epoch
    assert resumed.plan.total_steps - resumed.step == 2 * resumed.plan.steps_per_epoch  # two epochs left


def test_a_step_count_ahead_of_the_data_keeps_its_lead_when_the_epochs_change(tmp_path):
    """A newcomer's checkpoint from before adoption moved its sampler: step 450 (adopted), then
    30 steps of data. Resumed with batches twice as large, its place in the run is kept (about
    half as many of the new steps), not reset to the 30 steps of data it drew itself."""
    first = compute_loop(tmp_path, steps=0, slowdown=1.0, **{"train.epochs": 60, "train.batch_size": 100})
    for _ in range(30):
        first.train_step()
    first.step = 480  # what such a checkpoint holds: the donor's 450 plus its own 30
    first.save_checkpoint()
    resumed = compute_loop(tmp_path, steps=0, slowdown=1.0, **{"train.epochs": 60, "train.batch_size": 200})
    assert resumed.resume() and resumed.step == round(480 * 8 / 15)  # 15 steps an epoch before, 8 now


def test_a_newcomer_adopting_a_donors_step_draws_the_data_of_that_step(tmp_path):
    loop = compute_loop(tmp_path, steps=0, slowdown=1.0, **{"train.epochs": 20, "train.batch_size": 100})
    per_epoch = loop.plan.steps_per_epoch
    loop.adopt(loop.live_N.clone(), clock=3, step=5 * per_epoch + 7)
    assert (loop.step, loop.sampler.position.epoch, loop.sampler.position.batch) == (5 * per_epoch + 7, 5, 7)


def test_a_newcomer_adopting_a_step_past_its_budget_keeps_that_step_and_says_so(tmp_path, caplog):
    """A donor far ahead of a newcomer's own budget: the newcomer takes no step, and its
    checkpoint and summary keep the adopted model's place in the schedule (capped at the budget,
    a restart with a larger budget would have resumed that model's learning rate 14,000 steps
    early), and its log says why it took no step."""
    loop = compute_loop(tmp_path, steps=3000, slowdown=1.0)
    with caplog.at_level("WARNING"):
        loop.adopt(loop.live_N.clone(), clock=3, step=16_968)
    assert loop.step == loop.stats.step == 16_968
    assert any("the adopted model is at step 16968, the budget is 3000 steps: this run takes no step" in r.message
               and "network.adopt_model = false" in r.message for r in caplog.records), caplog.text
    assert loop.run() == "budget" and loop.step == 16_968
    loop.save_checkpoint()
    resumed = compute_loop(tmp_path, steps=20_000, slowdown=1.0)
    assert resumed.resume() and resumed.step == 16_968


@pytest.mark.parametrize(("model", "message"), [
    (torch.nn.Identity, "the model has no floating-point parameters to train"),
    (lambda: torch.nn.Linear(64, 10).double(), "swarmnet averages float32 parameters"),
])
def test_a_model_swarmnet_cannot_train_is_a_config_error_naming_the_task(tmp_path, model, message):
    """Not a traceback and exit status 1 from inside the peer: the task's name and the fix."""
    task = dataclasses.replace(load_task("swarmnet.tasks.digits:task"), build_model=model)
    cfg = load_config(None, {"task.spec": "mine:task", "train.tensorboard": False})
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ConfigError, match=rf"task 'mine:task': {message}.*fix the task's build_model"):
            ComputeLoop(cfg=cfg, task=task, device=torch.device("cpu"), codec=make_codec("fp32"), store=SnapshotStore(),
                        mailbox=Mailbox(loop), clock=PhaseClock(), stats=PeerStats(), peer_dir=tmp_path, rank=0,
                        peer_seed=1, log=PeerLogAdapter(get_logger("peer"), {"peer": "test"}))
    finally:
        loop.close()


def test_an_evaluation_without_the_tasks_metric_is_named_once(tmp_path, caplog):
    """Before: silently shown as '?' by `up` and `status`."""
    loop = compute_loop(tmp_path, steps=5, slowdown=1.0)
    loop.task = dataclasses.replace(loop.task, evaluate=lambda model: {"acc": 1.0})
    with caplog.at_level("WARNING"):
        assert loop.evaluate() == loop.evaluate() == {"acc": 1.0}
    said = [r.message for r in caplog.records if "without its metric" in r.message]
    assert said == ["[test] the task's evaluate returned ['acc'] without its metric 'accuracy' (Task.metric), which `up`, "
                    "`status` and `eval` show: return it too, or name one of these as the task's metric"], caplog.text


def test_a_final_publish_that_fails_still_checkpoints_the_whole_model(tmp_path):
    """Only a diverged model was expected to fail the final merge; any other error there (out of
    memory encoding the snapshot, say) skipped the final checkpoint of a model left whole."""
    from swarmnet.peer import checkpoint

    compute = compute_loop(tmp_path, steps=5, slowdown=1.0)
    assert compute.run() == "budget"

    def failing_encode(*args, **kwargs):
        raise MemoryError("no room for the snapshot")

    compute.codec.encode = failing_encode  # type: ignore[method-assign]
    compute.inbox.add(torch.zeros_like(compute.live_N), compute.store.latest().version)  # a nudge to publish
    assert compute.finalize() is None  # written
    saved = checkpoint.load(tmp_path / "x1.0" / "checkpoint.pt")
    assert saved["step"] == 5
