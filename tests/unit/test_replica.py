"""The merge side of a model: merges move parameters only; momentum and BatchNorm stay local."""

import asyncio
import random
import time

import torch
from torch import nn

from swarmnet.algorithms import LocalSteps
from swarmnet.codecs import make_codec
from swarmnet.peer.compute import Replica
from swarmnet.peer.state import Mailbox, MergeEntry, SnapshotStore
from swarmnet.peer.stats import PeerStats


def test_a_merge_adds_half_its_gap_and_leaves_momentum_and_batchnorm_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    loop = asyncio.new_event_loop()
    try:
        store = SnapshotStore()
        replica = Replica(model, codec=make_codec("fp32"), store=store, mailbox=Mailbox(loop),
                          stats=PeerStats(), local_steps=LocalSteps(2), rng=random.Random(0))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        replica.publish()
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(16, 3)).pow(2).mean().backward()
            optimizer.step()
            replica.after_step()
        momentum = {p: optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()}
        running_mean = model[1].running_mean.clone()
        before = replica.live_N.clone()
        gap = torch.randn(replica.flat.numel)
        replica.mailbox.put(MergeEntry(gap, "other", 0.0, time.monotonic(), 1.0))
        replica.merge_pending()
        assert torch.equal(replica.live_N, before + gap / 2)  # the parameters moved, in place
        assert torch.equal(model[0].weight.detach().flatten(), replica.live_N[:24])
        assert torch.equal(replica.stale_N, replica.live_N) and store.latest().version == 2
        for p in model.parameters():  # the optimizer's momentum survives the merge untouched
            assert optimizer.state[p]["momentum_buffer"] is not None
            assert torch.equal(optimizer.state[p]["momentum_buffer"], momentum[p])
        assert torch.equal(model[1].running_mean, running_mean)
        assert replica.stats.interactions == 1 and replica.since_merge == 0
    finally:
        loop.close()


async def test_the_exchange_wakes_only_once_the_merged_model_is_published():
    """The next pull keys its delta on our latest snapshot; woken before the merged model is
    published, it would key on the one before and add the last merge a second time."""
    store = SnapshotStore()
    replica = Replica(nn.Linear(2, 2), codec=make_codec("fp32"), store=store, mailbox=Mailbox(asyncio.get_running_loop()),
                      stats=PeerStats(), local_steps=LocalSteps(1), rng=random.Random(0))
    replica.publish()
    publish = store.publish

    def slow_publish(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.2)  # an encode that takes a while, e.g. a large model on a busy core
        return publish(*args, **kwargs)

    store.publish = slow_publish  # type: ignore[method-assign]
    replica.mailbox.put(MergeEntry(torch.ones(6), "other", 0.0, time.monotonic(), 1.0))
    replica.after_step()
    merging = asyncio.get_running_loop().run_in_executor(None, replica.merge_pending)
    await asyncio.wait_for(replica.mailbox.emptied.wait(), 5)
    assert store.latest().version == 2  # what the exchange reads as K for its next pull
    await merging


def test_no_merge_before_h_local_steps():
    loop = asyncio.new_event_loop()
    try:
        replica = Replica(nn.Linear(2, 2), codec=make_codec("fp32"), store=SnapshotStore(), mailbox=Mailbox(loop),
                          stats=PeerStats(), local_steps=LocalSteps(3), rng=random.Random(0))
        replica.mailbox.put(MergeEntry(torch.ones(6), "other", 0.0, time.monotonic(), 1.0))
        before = replica.live_N.clone()
        for _ in range(2):
            replica.after_step()
            replica.merge_pending()
        assert torch.equal(replica.live_N, before) and replica.mailbox.full
        replica.after_step()
        replica.merge_pending()
        assert torch.equal(replica.live_N, before + 0.5) and not replica.mailbox.full
    finally:
        loop.close()


def test_the_next_merge_is_due_after_the_remaining_local_steps_at_the_observed_pace():
    model = nn.Linear(3, 2)
    loop = asyncio.new_event_loop()
    try:
        replica = Replica(model, codec=make_codec("fp32"), store=SnapshotStore(), mailbox=Mailbox(loop),
                          stats=PeerStats(), local_steps=LocalSteps(4), rng=random.Random(0))
        replica.publish()
        assert replica.seconds_to_merge() == 0.0  # no pace seen yet: pull at once
        for _ in range(3):
            time.sleep(0.05)
            replica.after_step()
        assert 0.04 < replica.step_seconds < 0.5
        assert replica.seconds_to_merge() == replica.step_seconds  # one local step to go
        pace = replica.step_seconds
        time.sleep(10 * pace)  # a long pause (an evaluation, a checkpoint) between two steps
        replica.after_step()
        assert replica.seconds_to_merge() == 0.0  # H = 4 steps done: due now
        assert replica.step_seconds <= 1.61 * pace  # the pause moved the pace by at most 0.2 x 4
    finally:
        loop.close()


def test_weights_replaced_between_steps_are_published_by_resync_and_older_merges_dropped():
    """A checkpoint loaded into a model already in the swarm: without resync the next merge
    takes the jump for progress, W + (C_j - K) / 2 with K the old weights, and overshoots."""
    loop = asyncio.new_event_loop()
    try:
        model = nn.Linear(2, 2)
        replica = Replica(model, codec=make_codec("fp32"), store=SnapshotStore(), mailbox=Mailbox(loop),
                          stats=PeerStats(), local_steps=LocalSteps(1), rng=random.Random(0))
        replica.publish()
        old = replica.store.latest()
        in_flight = MergeEntry(torch.ones(6), "other", 0.0, time.monotonic(), 1.0, old.version)
        assert replica.inbox.add(torch.ones(6), old.version)  # a neighbour's nudge, waiting to be applied
        with torch.no_grad():
            model.weight.fill_(5.0)  # load_state_dict copies into the parameters, as here
            model.bias.fill_(5.0)
        replica.resync()
        latest = replica.store.latest()
        assert latest.version > old.version and torch.equal(latest.values_N, torch.full((6,), 5.0))
        assert not replica.inbox.add(torch.ones(6), old.version)  # one still decoding then: refused
        assert replica.inbox.pending == 0 and latest.nudges == replica.inbox.drained  # the gate waits for none
        replica.mailbox.put(in_flight)  # pulled against the old weights, it lands after the resync
        replica.after_step()
        replica.merge_pending()
        assert torch.equal(replica.live_N, torch.full((6,), 5.0)) and not replica.mailbox.full  # dropped
        replica.mailbox.put(MergeEntry(torch.ones(6), "other", 0.0, time.monotonic(), 1.0, latest.version))
        replica.after_step()
        replica.merge_pending()
        assert torch.equal(replica.live_N, torch.full((6,), 5.5))  # one measured from the new weights lands
    finally:
        loop.close()


def test_a_peer_nudged_every_step_still_publishes_its_own_steps(monkeypatch):
    """Symmetric mode: a neighbour's nudge alone republishes the stale copy, without the steps
    trained since. That publish used to count as a refresh, so a peer nudged more often than
    REFRESH_MIN_S whose own merges did not land served its last merge's model indefinitely."""
    from swarmnet.peer import compute

    monkeypatch.setattr(compute, "REFRESH_MIN_S", 0.05)
    loop = asyncio.new_event_loop()
    try:
        replica = Replica(nn.Linear(2, 2), codec=make_codec("fp32"), store=SnapshotStore(), mailbox=Mailbox(loop),
                          stats=PeerStats(), local_steps=LocalSteps(1), rng=random.Random(0))
        replica.publish()
        steps, until = 0, time.monotonic() + 1.0
        while time.monotonic() < until:
            with torch.no_grad():
                replica.live_N.add_(1.0)  # a training step
            replica.after_step()
            steps += 1
            assert replica.inbox.add(torch.zeros(6), replica.store.latest().version)  # a (null) nudge every step
            replica.merge_pending()
            time.sleep(0.01)
        behind = (replica.live_N - replica.store.latest().values_N).max().item()
        assert steps > 40 and behind <= steps / 3, (steps, behind)  # a refresh every 0.05 s: a few steps behind
        assert replica.stats.nudges_applied == steps
    finally:
        loop.close()


async def test_a_pull_held_for_its_due_time_is_released_when_the_peer_starts_settling():
    """The exchange holds a pull until the next merge is due (up to H steps of a slow model);
    once the budget is spent the peer merges whatever comes, and a pull still held through the
    settling (the node wakes it) missed the merges that keep the swarm together."""
    from types import SimpleNamespace

    from swarmnet.peer.exchange import Exchange

    exchange = SimpleNamespace(_waker=None)
    held = asyncio.ensure_future(Exchange._rest(exchange, 30.0))
    await asyncio.sleep(0.05)
    began = time.monotonic()
    Exchange.wake(exchange)
    assert await asyncio.wait_for(held, 1.0) is True and time.monotonic() - began < 0.5
    assert await Exchange._rest(exchange, 0.01) is False and exchange._waker is None  # slept out: not woken
    Exchange.wake(exchange)  # no pull held: nothing to do
