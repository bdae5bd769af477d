import asyncio
import gc
import json
import random
import weakref

import pytest
import torch
from torch import nn

from swarmnet.algorithms import apply_nudge, apply_pull, pull_gap
from swarmnet.algorithms.local_steps import LocalSteps
from swarmnet.codecs import make_codec
from swarmnet.errors import ConfigError
from swarmnet.peer.compute import Replica
from swarmnet.peer.data import ShardSampler
from swarmnet.peer.state import (
    FlatParameters,
    Mailbox,
    MergeEntry,
    MergeGate,
    NudgeInbox,
    SnapshotStore,
)
from swarmnet.peer.stats import PeerStats


def test_flat_parameters_are_views_of_one_vector_and_buffers_stay_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    before = [p.detach().clone() for p in model.parameters()]
    flat = FlatParameters(model)
    assert flat.numel == sum(p.numel() for p in model.parameters())
    for p, old in zip(model.parameters(), before):
        assert torch.equal(p, old)
    flat.vector_N.add_(1.0)  # one vector op moves every parameter ...
    assert torch.equal(model[0].weight, before[0] + 1)
    assert torch.equal(model[1].running_mean, torch.zeros(4))  # ... and no BatchNorm statistic
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    assert torch.equal(flat.vector_N[:12].view(4, 3), model[0].weight)


def test_flat_parameters_refuse_non_float32():
    with pytest.raises(ValueError, match="float32"):
        FlatParameters(nn.Linear(2, 2).double())


def test_snapshot_store_keeps_a_bounded_history():
    store = SnapshotStore(history=2)
    codec = make_codec("fp32")
    for i in range(3):
        x = torch.full((4,), float(i))
        store.publish(x, codec.encode(x), step=i)
    assert store.get(1) is None and store.get(2).step == 1 and store.latest().version == 3


def test_older_snapshots_keep_only_their_wire_form_and_let_the_model_copies_go():
    """A lattice history of 8 whole snapshots held up to 16 copies of the model: an older
    version serves further planes only, from its frames."""
    store = SnapshotStore(history=3)
    codec = make_codec("lattice", chunk=64, seed=0)
    x = torch.randn(256)
    first = store.publish(x.clone(), codec.encode(x), step=0)
    held = weakref.ref(first.values_N), weakref.ref(first.encoded.quantized)
    first_frames, exact = first.encoded.frames, first.encoded.quantized.clone()
    del first
    store.publish(x.clone(), codec.encode(x), step=1)
    gc.collect()
    assert held[0]() is None and held[1]() is None  # both model-sized vectors were freed
    older = store.get(1)
    assert older.values_N.numel() == 0 and older.encoded.quantized.numel() == 0
    assert older.encoded.frames is first_frames and older.encoded.meta and older.version == 1
    meta, frames = codec.select(older.encoded, None)  # still served in full
    out = torch.empty(256)
    assert codec.decode(meta, frames, out, out, {}).complete and torch.equal(out, exact)
    assert store.latest().values_N.numel() == 256  # the latest stays whole


async def test_mailbox_latest_wins_and_signals_the_loop():
    box = Mailbox(asyncio.get_running_loop())
    entry = lambda v: MergeEntry(torch.full((2,), v), "p", 0.0, 0.0, 0.0)  # noqa: E731
    box.put(entry(1.0))
    box.put(entry(2.0))
    assert not box.emptied.is_set()
    taken = await asyncio.to_thread(box.take)
    assert taken.gap_N[0] == 2.0 and box.take() is None
    await asyncio.sleep(0.05)
    assert not box.emptied.is_set()  # taken is not merged yet
    await asyncio.to_thread(box.release)
    await asyncio.wait_for(box.emptied.wait(), 1)


def test_nudge_inbox_sums_and_refuses_after_close():
    inbox = NudgeInbox()
    assert inbox.add(torch.ones(3), 1) and inbox.add(torch.ones(3), 1)
    live, stale = torch.zeros(3), torch.zeros(3)
    assert inbox.drain_into(live, stale) == 2
    assert torch.equal(live, torch.full((3,), 2.0)) and torch.equal(stale, live)
    assert inbox.drain_into(live) == 0
    assert inbox.add(torch.full((3,), 3.0), 2) and inbox.drain_into(live) == 1  # a fresh sum after a drain
    assert torch.equal(live, torch.full((3,), 5.0))
    inbox.close()
    assert not inbox.add(torch.ones(3), 3)


def test_nudge_inbox_restarted_drops_waiting_nudges_and_refuses_those_from_older_versions():
    inbox = NudgeInbox()
    assert inbox.add(torch.ones(3), 4)
    inbox.restart_at(7)  # weights replaced, to be published as version 7
    assert inbox.pending == 0 and inbox.drained == 1  # dropped, yet counted: the merge gate waits for none
    assert not inbox.add(torch.ones(3), 6)  # measured from the replaced weights
    assert inbox.add(torch.ones(3), 7) and inbox.pending == 1


def test_partition_sharding_pairs_peers_and_reshuffles_per_epoch():
    n, peers = 40, 4
    samplers = [ShardSampler(n, 5, shard="partition", rank=r, peers=peers, seed=1, peer_seed=100 + r) for r in range(peers)]
    epoch0 = [set(torch.cat([s.next_indices() for _ in range(s.steps_per_epoch)]).tolist()) for s in samplers]
    assert epoch0[0] == epoch0[2] and epoch0[1] == epoch0[3]  # ranks r and r + n/2 share a shard
    assert epoch0[0].isdisjoint(epoch0[1]) and len(epoch0[0]) == n // 2
    first = samplers[0]
    epoch1 = set(torch.cat([first.next_indices() for _ in range(first.steps_per_epoch)]).tolist())
    assert epoch1 != epoch0[0]  # the shards are redrawn each epoch


@pytest.mark.parametrize(("shard", "num_samples", "batch_size"),
                         [("random", 10, 4), ("random", 1797, 32), ("partition", 45, 8), ("partition", 12, 5)])
def test_no_batch_holds_a_sample_twice_where_the_pool_fills_a_batch(shard, num_samples, batch_size):
    """The epoch walks a peer's pool more than once where ceil(|D| / B) batches need more samples
    than it holds; the batch straddling two walks still holds distinct samples, and each walk
    still covers the whole pool."""
    peers = 4
    for peer_seed in range(20):
        sampler = ShardSampler(num_samples, batch_size, shard=shard, rank=1, peers=peers, seed=0, peer_seed=peer_seed)
        batches = [sampler.next_indices() for _ in range(sampler.steps_per_epoch)]
        pool = num_samples if shard == "random" else len(torch.arange(num_samples).tensor_split(peers // 2)[1])
        assert all(len(b) == batch_size and len(set(b.tolist())) == batch_size for b in batches)
        walked = torch.cat(batches)
        assert set(walked[:pool].tolist()) == set(walked[pool:2 * pool].tolist()) or len(walked) < 2 * pool
        assert len(set(walked[:pool].tolist())) == pool


def test_partition_into_more_shards_than_samples_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"cuts 3 training samples into 5 shards .* use train.shard = 'random'"):
        ShardSampler(3, 2, shard="partition", rank=4, peers=10, seed=0, peer_seed=1)
    assert len(ShardSampler(3, 2, shard="random", rank=4, peers=10, seed=0, peer_seed=1).next_indices()) == 2


def test_sampler_resumes_where_it_stopped():
    a = ShardSampler(50, 8, shard="random", rank=0, peers=1, seed=0, peer_seed=3)
    for _ in range(9):
        a.next_indices()
    b = ShardSampler(50, 8, shard="random", rank=0, peers=1, seed=0, peer_seed=3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.next_indices(), b.next_indices())


def test_metrics_lines_are_strict_json_when_the_loss_diverges(tmp_path):
    from swarmnet.peer.metrics import MetricsWriter

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    writer = MetricsWriter(tmp_path / "p" / "metrics.jsonl", tensorboard=False)
    writer.write({"step": 100, "loss": float("nan"), "eval": {"loss": float("inf"), "excess": [float("nan"), 1.0]}})
    writer.close()
    line = (tmp_path / "p" / "metrics.jsonl").read_text().strip()
    assert json.loads(line, parse_constant=refuse) == {"step": 100, "loss": None,
                                                       "eval": {"loss": None, "excess": [None, 1.0]}}


@pytest.mark.parametrize("earlier", ["", '{"step": 1}\n', '{"step": 1}\n{"step": 2, "lo', '{"step": 2, "lo'])
def test_a_resumed_metrics_stream_starts_after_the_last_whole_line(tmp_path, earlier):
    """A row cut short (the process killed mid-write, a full disk) is removed at the next start:
    the first row of the resumed peer must not run on from it."""
    from swarmnet.peer.metrics import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    path.write_text(earlier)
    writer = MetricsWriter(path, tensorboard=False)
    writer.write({"step": 3})
    writer.close()
    kept = [1] if earlier.startswith('{"step": 1}') else []
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [*kept, 3]


def test_metrics_go_to_jsonl_and_to_tensorboard(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from swarmnet.peer.metrics import MetricsWriter, read_metrics

    writer = MetricsWriter(tmp_path / "p" / "metrics.jsonl")
    writer.write({"time": 1.0, "step": 10, "loss": 0.5, "lr": 0.1, "consensus": float("nan")})
    writer.write({"time": 2.0, "step": 20, "eval": {"accuracy": 0.75}})
    writer.close()
    assert read_metrics(tmp_path / "p" / "metrics.jsonl")[0]["consensus"] is None
    events = event_accumulator.EventAccumulator(str(tmp_path / "p" / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "lr", "eval/accuracy"}
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [(20, 0.75)]


def test_tensorboard_gets_progress_rows_at_most_once_a_period_and_every_evaluation(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from swarmnet.peer.metrics import MetricsWriter, read_metrics

    writer = MetricsWriter(tmp_path / "p" / "metrics.jsonl", tensorboard_every=3600.0)
    for step in range(10, 510, 10):
        writer.write({"time": 1.0, "step": step, "loss": 1.0 / step})
        if step % 100 == 0:
            writer.write({"time": 1.0, "step": step, "eval": {"accuracy": step / 1000}})
    writer.close()
    assert len(read_metrics(tmp_path / "p" / "metrics.jsonl")) == 55  # the JSON stream keeps every row
    events = event_accumulator.EventAccumulator(str(tmp_path / "p" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [10, 500]  # the first, then the last at close
    assert [e.step for e in events.Scalars("eval/accuracy")] == [100, 200, 300, 400, 500]


def test_merge_gate_admits_one_nudge_per_version_against_the_latest_only():
    gate = MergeGate()
    assert gate.admit_nudge(3, 4, published_nudges=0) is not None  # computed against an older version
    assert gate.admit_nudge(4, 4, published_nudges=0) is None
    assert "already" in gate.admit_nudge(4, 4, published_nudges=0)  # a second one: version 4's weight < 0
    gate.cancel_nudge(4)  # the first could not be applied after all
    assert gate.admit_nudge(4, 4, published_nudges=0) is None
    assert gate.admit_nudge(5, 5, published_nudges=1) is None  # version 5 holds that nudge
    assert "not in our latest" in gate.admit_nudge(6, 6, published_nudges=1)  # 6 lacks the one on 5


def test_merge_gate_refuses_a_nudge_on_a_version_published_while_the_last_one_was_decoding():
    """Nudge 1 is admitted against v; before it reaches the inbox the compute thread publishes
    v+1 (our own merge, or a refresh). Nudge 2 against v+1 would then land together with
    nudge 1, which was computed against v: three delta updates on one model."""
    gate = MergeGate()
    assert gate.admit_nudge(5, 5, published_nudges=0) is None  # nudge 1, decoding
    assert "not in our latest" in gate.admit_nudge(6, 6, published_nudges=0)  # v+1 published meanwhile
    assert gate.admit_nudge(7, 7, published_nudges=1) is None  # once a version holds nudge 1


def test_merge_gate_pairs_a_nudge_only_with_our_own_merge_on_the_same_version():
    gate = MergeGate()
    gate.begin_own(7)
    assert gate.admit_nudge(8, 8, published_nudges=0) is not None  # our merge in flight was computed against 7
    assert gate.admit_nudge(7, 7, published_nudges=0) is None  # own merge + one nudge on 7: (C_k + C_i) / 2
    gate.end_own()
    assert gate.admit_nudge(8, 8, published_nudges=1) is None


def test_own_merge_plus_one_nudge_on_a_version_stays_a_convex_combination():
    """The arithmetic the gate protects: two delta updates on K average, three overshoot."""
    k, c_k, c_i, c_m = (torch.full((4,), v) for v in (0.0, 1.0, 2.0, 3.0))
    two = apply_pull(k.clone(), pull_gap(c_k, k, k)) + apply_nudge(c_i, k)
    assert torch.allclose(two, (c_k + c_i) / 2)
    three = two + apply_nudge(c_m, k)
    assert torch.allclose(three, (c_k + c_i + c_m - k) / 2)  # K's weight is -1/2


async def test_our_next_merge_waits_for_a_version_holding_the_nudge_admitted_meanwhile():
    """Symmetric mode, one model: a neighbour's nudge against version v is admitted while our own
    merge against v is in flight, and reaches the inbox only after that merge was applied and
    v+1 published. Keyed on v+1, our next merge would give v's model a negative weight."""
    model = nn.Linear(4, 1, bias=False)
    nn.init.constant_(model.weight, 100.0)
    me = Replica(model, codec=make_codec("fp32"), store=SnapshotStore(), mailbox=Mailbox(asyncio.get_running_loop()),
                 stats=PeerStats(), local_steps=LocalSteps(1), rng=random.Random(0))
    gate, zeros = MergeGate(), torch.zeros(4)
    me.publish()
    v = me.store.latest()
    gate.begin_own(v.version)  # our merge with a neighbour at 0, against v
    me.mailbox.put(MergeEntry(pull_gap(zeros, v.values_N, v.values_N), "j", 0.0, 0.0, 0.0))
    assert gate.admit_nudge(v.version, v.version, published_nudges=v.nudges) is None  # another neighbour at 0 nudges us against v
    nudge = apply_nudge(zeros, v.values_N)  # ... still decoding
    me.since_merge = 1
    me.merge_pending()  # our merge lands: v+1 = 50
    me.mailbox.release()
    gate.end_own()
    assert not gate.may_key_on(me.store.latest())
    assert me.inbox.add(nudge, v.version)
    me.merge_pending()  # the nudge lands: v+2 = 0, as (0 + 0) / 2 of the two updates against v
    latest = me.store.latest()
    assert gate.may_key_on(latest) and latest.values_N.tolist() == [0.0] * 4
    far = torch.full((4,), 40.0)  # the next merge, keyed on v+2, stays between its two models
    assert apply_pull(latest.values_N.clone(), pull_gap(far, latest.values_N, latest.values_N)).tolist() == [20.0] * 4
    assert gate.admit_nudge(latest.version, latest.version, published_nudges=latest.nudges) is None and not gate.may_key_on(latest)
    gate.cancel_nudge(latest.version)  # that nudge could not be applied after all: nothing to wait for
    assert gate.may_key_on(latest)


@pytest.mark.parametrize("batch_size,num_samples", [(128, 1000), (8, 1000), (32, 200)])
def test_sampler_resumed_with_other_batches_keeps_its_share_of_the_epoch(batch_size, num_samples):
    """Saved 30 batches of 32 into an epoch of 1,000 samples; resumed with a config whose batches
    or data set differ: the same share of the epoch, and never an empty batch."""
    a = ShardSampler(1000, 32, shard="random", rank=0, peers=1, seed=0, peer_seed=3)
    for _ in range(30):
        a.next_indices()
    b = ShardSampler(num_samples, batch_size, shard="random", rank=0, peers=1, seed=0, peer_seed=3)
    b.load_state_dict(a.state_dict())
    assert b.position.epoch == 0
    assert b.position.batch == min(int(30 * 32 / 1000 * b.steps_per_epoch), b.steps_per_epoch - 1)
    for _ in range(3 * b.steps_per_epoch):
        assert len(b.next_indices()) == min(batch_size, num_samples)


def test_a_newcomer_joining_at_a_donors_step_walks_that_epochs_shard():
    """Partition mode: the shard of each epoch is drawn anew; a newcomer that took over rank 2 at
    step S (newcomer.py) walks the shard the peer of rank 0 walks then, not the shard of epoch 0."""
    partner = ShardSampler(1000, 10, shard="partition", rank=0, peers=4, seed=1, peer_seed=5)
    for _ in range(5 * partner.steps_per_epoch + 7):
        partner.next_indices()
    newcomer = ShardSampler(1000, 10, shard="partition", rank=2, peers=4, seed=1, peer_seed=9)
    newcomer.seek(5 * partner.steps_per_epoch + 7)
    assert newcomer.position == partner.position
    rest = partner.steps_per_epoch - partner.position.batch
    theirs = set(torch.cat([partner.next_indices() for _ in range(rest)]).tolist())
    ours = set(torch.cat([newcomer.next_indices() for _ in range(rest)]).tolist())
    assert ours == theirs == set(partner._epoch_order(5).tolist())  # 930 draws cover the 500-sample shard


def test_parameters_moved_after_flattening_are_noticed_and_empty_ones_are_no_false_alarm():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 1))
    model.marker = nn.Parameter(torch.empty(0))  # the device-marker idiom: no storage to compare
    flat = FlatParameters(model)
    assert not flat.moved() and not flat.moved(all_of_them=True)
    model[1].double()  # one layer: only the full check sees it
    assert flat.moved(all_of_them=True)
    model.double()
    assert flat.moved()
