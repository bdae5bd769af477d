"""The lattice codec's reader dialogue (plan / select / decode), its step policy, and its
validation of everything that crosses the network."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmnet.codecs import make_codec
from swarmnet.codecs.lattice_codec import (
    MAX_CHUNK,
    STAT_SAMPLES,
    LatticeCodec,
    _samples,
    auto_chunk,
    sample_stride,
)
from swarmnet.errors import CodecError, ConfigError

pytestmark = pytest.mark.timeout(60)


def run_pull(codec, enc, key, state, out=None, wire=True, limit=12):
    """What the runtime does; with ``wire`` every meta and want goes through msgpack and frames
    arrive as read-only bytes, as from a socket."""
    out = torch.full_like(key, float("nan")) if out is None else out
    want = codec.plan(state)
    log = []
    for _ in range(limit):
        if wire:
            want = msgpack.unpackb(msgpack.packb(want))
        meta, frames = codec.select(enc, want)
        if wire:
            meta = msgpack.unpackb(msgpack.packb(meta))
            frames = tuple(bytes(f) for f in frames)
        res = codec.decode(meta, frames, key, out, state)
        log.append((want, meta, res))
        if res.complete:
            return out, log
        want = res.more
    raise AssertionError("pull did not complete")


def drifted(
    x: torch.Tensor, eps: float, fraction: float, seed: int, far: float = 1e4
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    key = x + torch.randn(x.shape, generator=g) * 3 * eps
    hit = torch.rand(x.shape, generator=g) < fraction
    return torch.where(hit, key + far * eps * torch.sign(torch.randn(x.shape, generator=g)), key)


# ------------------------------------------------------------------- the dialogue


@pytest.mark.parametrize("width", [1, 4, 8])
@pytest.mark.parametrize("mode", ["stochastic", "dither"])
def test_drifted_neighbour_escalates_and_ends_exact(width, mode) -> None:
    codec = LatticeCodec(chunk=256, width=width, mode=mode, seed=1)
    x = torch.randn(3000)
    enc = codec.encode(x)
    eps = 2.0 ** max(enc.meta["e"])
    key = drifted(x, eps, 0.001, seed=2)  # a few coordinates 1e4 eps away, in some chunks
    state: dict = {}
    out, log = run_pull(codec, enc, key, state)
    assert torch.equal(out, enc.quantized)
    assert len(log) >= 2 and not log[0][2].complete
    _first_want, _, first = log[0]
    more = first.more
    # `more` asks again only for failing chunks, for the planes after those already received.
    failing = [i for i, (a, b) in enumerate(zip(more["from"], more["to"], strict=True)) if b > a]
    assert failing and len(failing) < len(enc.meta["bf"])
    for i in failing:
        assert more["from"][i] == log[0][1]["hi"][log[0][1]["ck"].index(i)]
        assert more["to"][i] == min(more["from"][i] + 1, enc.meta["bf"][i])
    second_meta = log[1][1]
    assert set(second_meta["ck"]) == set(failing)
    assert "pull" not in state and len(state["dist"]) == len(enc.meta["bf"])


def test_a_failing_chunk_is_asked_for_1_2_4_more_planes_until_exact() -> None:
    # Small steps first (a pull that just missed costs one plane more, not twice the planes),
    # growing so that a far key still ends in a few rounds.
    codec = LatticeCodec(chunk=64, width=1, eps=2.0**-10, seed=7, first_bits=4)
    x = torch.randn(64)
    enc = codec.encode(x)
    key = x.clone()
    key[3] += 200 * 2.0**-10  # needs 1 + ceil(log2(201)) = 9 bits
    state: dict = {}
    out, log = run_pull(codec, enc, key, state)
    assert torch.equal(out, enc.quantized)
    asked = [want["to"] if isinstance(want["to"], int) else want["to"][0] for want, _, _ in log]
    assert asked == [4, 5, 7, 11]


def test_verified_chunks_are_written_at_once_and_never_requested_again() -> None:
    codec = LatticeCodec(chunk=128, width=1, seed=3, first_bits=6)
    x = torch.randn(1024)
    enc = codec.encode(x)
    eps = 2.0 ** max(enc.meta["e"])
    key = x.clone()
    key[5] += 1e3 * eps  # only chunk 0 is far
    out = torch.full_like(x, float("nan"))
    state: dict = {}
    meta, frames = codec.select(enc, codec.plan(state))
    res = codec.decode(meta, frames, key, out, state)
    assert not res.complete
    assert torch.isnan(out[:128]).all()  # the failing chunk is left alone
    assert torch.equal(out[128:], enc.quantized[128:])
    assert res.more["to"][1:] == [0] * 7 and res.more["to"][0] > res.more["from"][0] == 6
    meta2, frames2 = codec.select(enc, res.more)
    assert meta2["ck"] == [0] and meta2["lo"] == [6]
    assert memoryview(frames2[0]).nbytes == (meta2["hi"][0] - 6) * 128 // 8
    while not res.complete:
        meta2, frames2 = codec.select(enc, res.more)
        res = codec.decode(meta2, frames2, key, out, state)
    assert torch.equal(out, enc.quantized)
    assert res.stats["rounds"] >= 2 and res.stats["failed_chunks"] >= 1


def test_history_lowers_the_next_request_to_the_distance() -> None:
    codec = LatticeCodec(chunk=512, width=1, eps=2.0**-10, seed=4)
    x = torch.randn(2048)
    key = x + (torch.rand(2048) * 2 - 1) * 20 * 2.0**-10  # 20 eps away
    state: dict = {}
    run_pull(codec, codec.encode(x), key, state)
    nxt = codec.plan(state)
    # b = 1 + ceil(log2(margin * D)), D (window statistic) about 21, margin 1.25 -> 6 bits.
    assert nxt["to"] == [6] * 4
    x2 = x + torch.randn(2048) * 1e-4
    _out, log = run_pull(codec, codec.encode(x2), key, state)
    assert len(log) == 1 and log[0][2].stats["bits_per_coord"] <= 6


def test_a_cpu_bound_reader_asks_for_more_planes_up_front() -> None:
    codec = LatticeCodec(margin=1.25, margin_cpu=1.6)
    state = {"dist": [22.0, 3.0]}
    # b = 1 + ceil(log2(margin * D)): 27.5 -> 6 and 3.75 -> 3 bits; 35.2 -> 7 and 4.8 -> 4 bits.
    assert codec.plan(state)["to"] == [6, 3]
    assert codec.plan(state, {"cpu_bound": False})["to"] == [6, 3]
    assert codec.plan(state, {"cpu_bound": True})["to"] == [7, 4]


def test_a_new_neighbour_is_first_asked_for_what_the_last_pull_needed() -> None:
    codec = LatticeCodec(chunk=512, width=1, eps=2.0**-10, seed=4)
    assert codec.plan({})["to"] == codec.first_bits  # nothing seen yet
    x = torch.randn(2048)
    key = x + (torch.rand(2048) * 2 - 1) * 300 * 2.0**-10  # 300 eps away: 10 bits
    _out, log = run_pull(codec, codec.encode(x), key, {})
    assert len(log) > 1  # 8 bits did not reach
    assert codec.plan({})["to"] == codec.first_bits  # decoded, not yet accepted by the runtime
    codec.accepted(log[-1][2].stats)
    assert codec.plan({})["to"] == 1 + math.ceil(math.log2(1.25 * log[-1][2].stats["dist_max"]))
    assert codec.plan({})["to"] in (10, 11)


def test_select_serves_the_planes_back_to_back_in_one_frame() -> None:
    codec = LatticeCodec(chunk=256, seed=5)
    enc = codec.encode(torch.randn(1000))
    meta, frames = codec.select(enc, None)
    assert meta is enc.meta and frames == (b"".join(enc.frames),)
    out = torch.empty(1000)
    assert codec.decode(meta, frames, torch.zeros(1000), out, {}).complete  # no key needed
    assert torch.equal(out, enc.quantized)
    meta, part = codec.select(enc, {"v": 1, "from": 0, "to": 3})
    prefixes = [bytes(full)[: 3 * 256 // 8] if i < 3 else bytes(full)[: 3 * 232 // 8]
                for i, full in enumerate(enc.frames)]  # 3 planes; the tail chunk has 232 coordinates
    assert meta["hi"] == [3] * 4 and part == (b"".join(prefixes),)
    assert enc.nbytes == sum(memoryview(f).nbytes for f in enc.frames)
    assert len(msgpack.packb(enc.meta)) < 600
    _, one = codec.select(enc, {"v": 1, "from": 0, "to": [3, 0, 0, 0]})  # a single range: no copy
    assert len(one) == 1 and np.shares_memory(np.asarray(one[0]), np.asarray(enc.frames[0]))


def test_a_model_of_more_chunks_than_a_message_has_frames_travels() -> None:
    """Replies carry one payload frame whatever the number of chunks: a 400k-parameter model
    in 98 chunks once exceeded the wire's 64-frame limit and every pull of it was refused."""
    from swarmnet.wire import Limits, MsgType, decode, encode, reply, request

    n = 98 * 4096
    codec = LatticeCodec(seed=8)
    x = torch.randn(n)
    enc = codec.encode(x)
    assert len(enc.frames) == 98 > Limits().max_frames
    state: dict = {}
    out = torch.empty(n)
    want = codec.plan(state)
    for _ in range(8):
        meta, frames = codec.select(enc, want)
        asked = request(MsgType.PULL, "reader", clock=0, want=want, version=None)
        sent = reply(asked, MsgType.SNAPSHOT, "server", frames, version=1, codec="lattice", meta=meta, clock=0, age=0.0)
        got = decode([bytes(memoryview(f)) for f in encode(sent)])
        res = codec.decode(got.body["meta"], got.frames, x, out, state)
        if res.complete:
            break
        want = res.more
    assert res.complete and torch.equal(out, enc.quantized)


def test_snapshot_change_within_a_pull_is_an_error_and_a_new_pull_resets() -> None:
    codec = LatticeCodec(chunk=128, seed=6, first_bits=4)
    x = torch.randn(512)
    enc1, enc2 = codec.encode(x), codec.encode(x + 1.0)
    eps = 2.0 ** max(enc1.meta["e"])
    key = x.clone()
    key[0] += 1e4 * eps
    state: dict = {}
    out = torch.empty(512)
    meta, frames = codec.select(enc1, codec.plan(state))
    res = codec.decode(meta, frames, key, out, state)
    assert not res.complete
    meta2, frames2 = codec.select(enc2, res.more)
    with pytest.raises(CodecError, match="changed"):
        codec.decode(meta2, frames2, key, out, state)
    # An abandoned pull does not leak into the next one (new pull id).
    out2, _ = run_pull(codec, enc2, x + 1.0, state)
    assert torch.equal(out2, enc2.quantized)


def test_a_new_pull_never_resumes_an_abandoned_one() -> None:
    """A pull left unfinished (a timeout, a refusal) while the decode buffer served another
    neighbour: a reply under the old pull's id must not complete it from what the buffer holds."""
    codec = LatticeCodec(chunk=64, seed=1)
    x = torch.randn(256, generator=torch.Generator().manual_seed(0)) * 0.05
    key = x.clone()
    key[64:] += 0.5  # chunk 0 near, chunks 1-3 far: the first round verifies chunk 0 only
    enc, state, out = codec.encode(x), {}, torch.empty(256)
    first = codec.decode(*codec.select(enc, codec.plan(state)), key, out, state)
    assert not first.complete
    out.fill_(123.0)  # the buffer meanwhile held another neighbour's model
    codec.plan(state)  # the next interaction with this neighbour begins
    meta, frames = codec.select(enc, {**first.more, "to": [0, 64, 64, 64]})  # answered under the old id
    with pytest.raises(CodecError, match="only 0 bits were received"):  # it continues nothing
        codec.decode(meta, frames, key, out, state)
    done, _ = run_pull(codec, enc, key, state)
    assert torch.equal(done, enc.quantized)


@pytest.mark.parametrize("field,value", [("chunk", 56), ("e", None), ("seed", 2)])
def test_a_layout_change_within_a_pull_is_an_error(field, value) -> None:
    """A later round whose layout differs from the first one's (a chunk size giving the same
    number of chunks and plane bytes, another scale, another dither seed) is refused, not read
    against the planes the first round left (it once escaped as a ValueError and stopped the peer)."""
    codec = LatticeCodec(chunk=64, width=1, seed=1, first_bits=1, mode="dither")
    x = torch.randn(200, generator=torch.Generator().manual_seed(0))
    enc = codec.encode(x)
    key = x + 50 * 2.0 ** max(enc.meta["e"]) * torch.randn(200, generator=torch.Generator().manual_seed(1))
    state: dict = {}
    out = torch.empty(200)
    meta, frames = codec.select(enc, codec.plan(state))
    first = codec.decode(msgpack.unpackb(msgpack.packb(meta)), tuple(bytes(f) for f in frames), key, out, state)
    assert not first.complete
    meta, frames = codec.select(enc, first.more)
    meta = msgpack.unpackb(msgpack.packb(meta))
    meta[field] = [e + 1 for e in meta["e"]] if field == "e" else value
    with pytest.raises(CodecError, match="layout changed"):
        codec.decode(meta, tuple(bytes(f) for f in frames), key, out, state)


@pytest.mark.parametrize("where", ["low", "high"])
def test_corrupted_planes_are_never_accepted(where) -> None:
    # One flipped bit in plane 0 (first round) or in the first escalated plane of chunk 0: the
    # escalation reuses the planes it holds, fails at b_full and reports corruption.
    codec = LatticeCodec(chunk=128, width=1, seed=7, first_bits=4)
    x = torch.randn(256)
    enc = codec.encode(x)
    key = x if where == "low" else torch.zeros(256)  # zeros: far, so higher planes are pulled
    state: dict = {}
    out = torch.full_like(x, float("nan"))
    want = codec.plan(state)
    with pytest.raises(CodecError, match="corrupted"):
        for _ in range(12):
            meta, frames = codec.select(enc, want)
            frames = [bytearray(f) for f in frames]
            if meta["ck"][0] == 0 and (meta["lo"][0] == 0) == (where == "low"):
                frames[0][0] ^= 1
            res = codec.decode(meta, tuple(frames), key, out, state)
            assert not res.complete
            want = res.more
    assert torch.isnan(out[:128]).all()


def test_decode_into_the_key_itself() -> None:
    codec = LatticeCodec(chunk=256, seed=8)
    x = torch.randn(1000)
    enc = codec.encode(x)
    eps = 2.0 ** max(enc.meta["e"])
    key = drifted(x, eps, 0.002, seed=3)
    out, _ = run_pull(codec, enc, key, {}, out=key)
    assert out is key and torch.equal(key, enc.quantized)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(0, 3000),
    chunk=st.sampled_from([64, 192, 1024]),
    width=st.sampled_from([1, 4, 8]),
    mode=st.sampled_from(["stochastic", "dither"]),
    far=st.sampled_from([0.0, 50.0, 1e6]),
    seed=st.integers(0, 2**20),
)
def test_any_size_and_distance_pulls_exactly(n, chunk, width, mode, far, seed) -> None:
    codec = LatticeCodec(chunk=chunk, width=width, mode=mode, seed=seed)
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    enc = codec.encode(x)
    eps = 2.0 ** max(enc.meta["e"], default=0)
    key = drifted(x, eps, 0.01, seed, far) if n else x
    out, _ = run_pull(codec, enc, key, {})
    assert torch.equal(out, enc.quantized)


def test_the_default_chunk_grows_with_the_model_and_keeps_headers_small() -> None:
    assert [auto_chunk(n) for n in (10, 26_122, 4096 * 1024, 4096 * 1024 + 1, 10_000_000)] == [
        4096, 4096, 4096, 8192, 16384]
    assert auto_chunk(10**12) == MAX_CHUNK
    codec = LatticeCodec(seed=13)
    for n in (5000, 10_000_000):
        meta = codec.encode(torch.zeros(n)).meta
        assert meta["chunk"] == auto_chunk(n)
        assert len(msgpack.packb(meta)) < 16 * 1024  # far inside the 64 KiB header limit


def test_short_chunks_send_far_coordinates_high_bits_only_where_they_are() -> None:
    """One layer's worth of coordinates far from the reader's copy: a chunk holding it needs more
    planes, and with the default short chunks only the chunks around it pay for them."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(65536, generator=g)
    bits = {}
    for chunk in (None, 65536):
        codec = LatticeCodec(chunk=chunk, seed=14, eps=2.0**-10)
        enc = codec.encode(x)
        key = x + torch.randn(x.shape, generator=g) * 2.0**-9
        key[:3000] += torch.randn(3000, generator=g) * 2.0**-2  # 256 eps
        state: dict = {}
        run_pull(codec, enc, key, state)  # learns the per-chunk distances
        out, log = run_pull(codec, enc, key, state)
        assert torch.equal(out, enc.quantized)
        bits[chunk] = log[-1][2].stats["bits_per_coord"]
    # 65536: every coordinate needs the far ones' 10-11 bits; 4096: only the first chunk does
    assert bits[None] < 0.6 * bits[65536], bits


# ------------------------------------------------------------------- step policy and overflow


def test_eps_follows_the_learning_rate() -> None:
    codec = LatticeCodec(chunk=1024, seed=9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g)
    codec.encode(x, {"lr": 0.1, "local_steps": 1})
    exps = []
    for lr in (0.1, 0.1, 0.1, 0.025, 0.025):
        x = x - lr * torch.randn(4096, generator=g)  # updates scale with lr
        exps.append(codec.encode(x, {"lr": lr, "local_steps": 1}).meta["e"])
    # eps ~ scale * lr * H * rms(g) = 0.5 * lr: 0.05 -> 2^-5, 0.0125 -> 2^-7; a 4x lr drop
    # moves eps by 2 octaves at once instead of waiting for the EMA.
    assert all(e == -5 for e in exps[1] + exps[2])
    assert all(e == -7 for e in exps[3] + exps[4])


def test_eps_follows_the_training_progress_not_the_merge_moves() -> None:
    """Each snapshot follows a merge that moves x by far more than the training steps did; with
    the steps' own move given as ``progress``, eps follows that, not the merge."""
    codec = LatticeCodec(chunk=1024, seed=11)
    plain = LatticeCodec(chunk=1024, seed=11)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4096, generator=g)
    for c in (codec, plain):
        c.encode(x, {"lr": 0.1, "local_steps": 2})
    for _ in range(5):
        progress = 1.5e-3 * torch.randn(4096, generator=g)  # what 2 training steps moved
        x = x + progress + 0.3 * torch.randn(4096, generator=g)  # plus the merge's move
        hinted = codec.encode(x, {"lr": 0.1, "local_steps": 2, "progress": progress, "progress_steps": 2})
        unhinted = plain.encode(x, {"lr": 0.1, "local_steps": 2})
    # eps = 0.5 * rms(progress) = 7.5e-4 -> 2^-11; the plain difference (rms 0.3) gives 2^-3.
    assert all(e == -11 for e in hinted.meta["e"]), hinted.meta["e"]
    assert all(e == -3 for e in unhinted.meta["e"]), unhinted.meta["e"]


def test_eps_sees_every_column_of_a_weight_whose_dead_inputs_never_move() -> None:
    """A [64, 64] weight whose inputs 0, 8, ..., 56 are always zero (image borders): their
    weights never move. Sampled every 8th coordinate, the step size saw only those, found no
    movement and fell back to the first-snapshot step; scattered samples see the real one."""
    codec = LatticeCodec(chunk=4096, seed=12)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4096, generator=g)
    live = (torch.arange(4096) % 8 != 0).float()
    codec.encode(x, {"lr": 0.1, "local_steps": 2})
    for _ in range(3):
        progress = 1e-3 * torch.randn(4096, generator=g) * live
        x = x + progress
        enc = codec.encode(x, {"lr": 0.1, "local_steps": 2, "progress": progress, "progress_steps": 2})
    # eps = 0.5 * rms(progress) = 0.5 * 1e-3 * sqrt(7/8) = 4.7e-4 -> 2^-12 (2^-11 is 4.9e-4).
    assert enc.meta["e"] == [-12]


@pytest.mark.parametrize("cols", [7, 512, 4096, 3 * 5 * 7 * 64, 1 << 20, MAX_CHUNK])
def test_a_chunks_samples_are_distinct_and_spread_over_all_of_it(cols) -> None:
    offsets = np.sort(_samples(2 * cols, cols, torch.device("cpu")).index.numpy()[: min(cols, STAT_SAMPLES)])
    count = len(offsets)
    assert len(np.unique(offsets)) == count and math.gcd(sample_stride(cols), cols) == 1
    gaps = np.diff(np.append(offsets, offsets[0] + cols))  # around the chunk
    assert gaps.max() <= 3 * cols / count, (gaps.max(), cols / count)
    if count == STAT_SAMPLES and cols % 64 == 0:  # every column of a layer 64 wide is seen as often
        assert np.bincount(offsets % 64, minlength=64).min() >= STAT_SAMPLES // 64 - 1


def test_the_step_size_of_a_large_chunk_follows_all_of_it() -> None:
    """A 2^20 chunk (auto-chunked models from about 268M parameters) whose first quarter barely
    moves: a stride that is small modulo the chunk sampled only its first fifth and took the
    chunk for still, 13 octaves too fine a step; spread samples see the true RMS."""
    cols = 1 << 20
    values = torch.randn(cols, generator=torch.Generator().manual_seed(5))
    values[: cols // 4] *= 1e-4
    where = _samples(cols, cols, torch.device("cpu"))
    measured = float(where.rms(values[where.index])[0])
    true = float(values.pow(2).mean().sqrt())
    assert 0.8 < measured / true < 1.25, (measured, true)


def test_a_replica_hands_its_steps_move_to_the_codec() -> None:
    """What the Replica passes as progress: live - stale before the merge, over the steps since
    the last publish; the merge's delta is not part of it."""
    import asyncio
    import random
    import time

    from torch import nn

    from swarmnet.algorithms import LocalSteps
    from swarmnet.peer.compute import Replica
    from swarmnet.peer.state import Mailbox, MergeEntry, SnapshotStore
    from swarmnet.peer.stats import PeerStats

    seen = []

    class Recording(LatticeCodec):
        def encode(self, flat_N, hints=None):
            if hints and "progress" in hints:
                seen.append((hints["progress"].clone(), hints["progress_steps"]))
            return super().encode(flat_N, hints)

    model = nn.Linear(64, 16)
    loop = asyncio.new_event_loop()
    try:
        replica = Replica(model, codec=Recording(chunk=64, seed=1), store=SnapshotStore(), mailbox=Mailbox(loop),
                          stats=PeerStats(), local_steps=LocalSteps(2), rng=random.Random(0))
        replica.publish()
        start = replica.live_N.clone()
        for _ in range(3):
            with torch.no_grad():
                replica.live_N.add_(0.01)  # a "training step"
            replica.after_step()
        replica.mailbox.put(MergeEntry(torch.full_like(start, 5.0), "other", 0.0, time.monotonic(), 1.0))
        replica.merge_pending()
    finally:
        loop.close()
    (progress, steps), = seen
    assert steps == 3 and torch.allclose(progress, torch.full_like(start, 0.03))


def test_eps_without_hints_tracks_the_update_size_and_falls_back_first() -> None:
    codec = LatticeCodec(chunk=1024, seed=10, eps_init=2.0**-8)
    g = torch.Generator().manual_seed(1)
    x = 1.5 * torch.randn(2048, generator=g)
    first = codec.encode(x).meta["e"]
    assert first == [-8, -8]  # eps_init * rms(x) = 1.5 * 2^-8, rounded down
    for _ in range(30):
        x = x + 1.5e-3 * torch.randn(2048, generator=g)
        later = codec.encode(x).meta["e"]
    assert later == [-11, -11]  # 0.5 * 1.5e-3 = 7.5e-4, rounded down to 2^-11


def test_fixed_eps_and_int64_fallback() -> None:
    big = torch.tensor([3e5, -2.5e5, 1.0, 0.0] * 40)
    codec = LatticeCodec(chunk=64, eps=2.0**-20, seed=11)  # |x|/eps ~ 2^38: int64 coordinates
    enc = codec.encode(big)
    assert enc.meta["ib"] == 64 and enc.meta["e"] == [-20] * 3 and max(enc.meta["bf"]) > 32
    out, _ = run_pull(codec, enc, big + 2.0**-18, {})
    assert torch.equal(out, enc.quantized) and torch.equal(out, big)
    with pytest.raises(CodecError, match="too small"):
        LatticeCodec(eps=2.0**-40).encode(big)
    adaptive = LatticeCodec(chunk=64, eps_init=2.0**-60, seed=12).encode(big)
    assert adaptive.meta["ib"] == 32  # the adaptive step is raised to keep int32
    assert max(adaptive.meta["bf"]) <= 31


def test_config_errors() -> None:
    for bad in (
        {"chunk": 100},
        {"chunk": 32},
        {"width": 2},
        {"mode": "nearest"},
        {"eps": -1.0},
        {"eps": math.nan},
        {"margin": 0},
        {"eps_ema": 1.0},
        {"first_bits": 0},
    ):
        with pytest.raises(ConfigError):
            make_codec("lattice", **bad)


# ------------------------------------------------------------------- untrusted input


def _pair(n: int = 700):
    codec = LatticeCodec(chunk=256, width=4, seed=13)
    x = torch.randn(n)
    enc = codec.encode(x)
    meta, frames = codec.select(enc, {"v": 1, "p": 5, "from": 0, "to": 8})
    return codec, x, dict(meta), list(frames)


BAD_META = {
    "not a map": lambda m: "meta",
    "missing v": lambda m: _drop(m, "v"),
    "version": lambda m: {**m, "v": 1},  # layout 1 digests were SHA-256,
    "n": lambda m: {**m, "n": m["n"] - 1},
    "chunk zero": lambda m: {**m, "chunk": 0},
    "chunk odd": lambda m: {**m, "chunk": 100},
    "chunk bool": lambda m: {**m, "chunk": True},
    "width": lambda m: {**m, "g": 2},
    "width float": lambda m: {**m, "g": float(m["g"])},
    "int bits float": lambda m: {**m, "ib": float(m["ib"])},
    "version float": lambda m: {**m, "v": float(m["v"])},
    "int bits": lambda m: {**m, "ib": 16},
    "stored bits": lambda m: {**m, "sb": 12},
    "stored below b_full": lambda m: {**m, "sb": 8, "bf": [16] * len(m["bf"])},
    "mode": lambda m: {**m, "mode": "round"},
    "seed": lambda m: {**m, "seed": -1},
    "sid float": lambda m: {**m, "sid": 1.5},
    "eps nan": lambda m: {**m, "e": [math.nan] * len(m["e"])},
    "eps float": lambda m: {**m, "e": [0.5] * len(m["e"])},
    "eps range": lambda m: {**m, "e": [500] * len(m["e"])},
    "eps short": lambda m: {**m, "e": m["e"][:-1]},
    "b_full zero": lambda m: {**m, "bf": [0] * len(m["bf"])},
    "b_full big": lambda m: {**m, "bf": [40] * len(m["bf"])},
    "b_full not list": lambda m: {**m, "bf": 7},
    "hash short": lambda m: {**m, "h": m["h"][:-1]},
    "hash type": lambda m: {**m, "h": "abc"},
    "pull id": lambda m: {**m, "p": -3},
    "chunks unsorted": lambda m: {**m, "ck": m["ck"][::-1]},
    "chunk index": lambda m: {**m, "ck": [*m["ck"][:-1], 99]},
    "chunks not list": lambda m: {**m, "ck": None},
    "lo length": lambda m: {**m, "lo": m["lo"][:-1]},
    "lo above hi": lambda m: {**m, "lo": m["hi"]},
    "hi partial plane": lambda m: {**m, "hi": [h - 1 for h in m["hi"]]},
    "hi above stored": lambda m: {**m, "hi": [m["sb"] + 4] * len(m["hi"])},
    "hi nan": lambda m: {**m, "hi": [math.nan] * len(m["hi"])},
}


def _drop(m, key):
    return {k: v for k, v in m.items() if k != key}


@pytest.mark.parametrize("label", list(BAD_META))
def test_malformed_meta_raises_codec_error(label) -> None:
    codec, x, meta, frames = _pair()
    with pytest.raises(CodecError):
        codec.decode(BAD_META[label](meta), tuple(frames), x, torch.empty_like(x), {})


def test_malformed_frames_raise_codec_error() -> None:
    codec, x, meta, frames = _pair()
    out = torch.empty_like(x)
    for bad in (
        frames[:-1],
        [*frames, b"\0"],
        [frames[0][:-1], *frames[1:]],
        [bytes(frames[0]) + b"\0", *frames[1:]],
        [None, *frames[1:]],
        "frames",
    ):
        with pytest.raises(CodecError):
            codec.decode(meta, bad if isinstance(bad, str) else tuple(bad), x, out, {})
    # A reply that continues planes this reader never received.
    with pytest.raises(CodecError, match="received before"):
        codec.decode(
            {**meta, "lo": [4] * len(meta["lo"])},
            tuple(f[: len(f) // 2] for f in frames),
            x,
            out,
            {},
        )


BAD_WANT = [
    "want",
    {"from": 0, "to": 8},
    {"v": 9, "from": 0, "to": 8},
    {"v": 1, "to": 8},
    {"v": 1, "from": 0},
    {"v": 1, "from": -1, "to": 8},
    {"v": 1, "from": 0, "to": 65},
    {"v": 1, "from": 0, "to": True},
    {"v": 1, "from": 0, "to": 8.0},
    {"v": 1, "from": 0, "to": math.nan},
    {"v": 1, "from": 0, "to": [8]},
    {"v": 1, "from": [0, 0, 0], "to": [8, 8, "8"]},
    {"v": 1, "p": "x", "from": 0, "to": 8},
]


@pytest.mark.parametrize("want", BAD_WANT, ids=[str(i) for i in range(len(BAD_WANT))])
def test_malformed_want_raises_codec_error(want) -> None:
    codec = LatticeCodec(chunk=256, seed=14)
    enc = codec.encode(torch.randn(700))
    with pytest.raises(CodecError):
        codec.select(enc, want)


def test_a_want_range_of_the_wrong_type_says_both_forms_it_may_take() -> None:
    codec = LatticeCodec(chunk=256, seed=14)
    enc = codec.encode(torch.randn(700))
    with pytest.raises(CodecError, match=r"want field 'to' must be an int \(every chunk\) or a list of 3 ints"):
        codec.select(enc, {"v": 1, "from": 0, "to": 8.0})


def test_plan_and_more_are_small_plain_data() -> None:
    codec = LatticeCodec(chunk=256, seed=15, first_bits=4)
    x = torch.randn(2000)
    enc = codec.encode(x)
    key = drifted(x, 2.0 ** max(enc.meta["e"]), 0.01, seed=1)
    state: dict = {}
    _, log = run_pull(codec, enc, key, state)
    for want, meta, res in log:
        assert msgpack.unpackb(msgpack.packb(want)) == want
        assert len(msgpack.packb(meta)) < 400
        assert all(isinstance(v, float) for v in res.stats.values())
    assert msgpack.unpackb(msgpack.packb(codec.plan(state))) is not None


@pytest.mark.parametrize("bad", [math.nan, math.inf, 3e38])
def test_unusable_keys_still_end_exact(bad) -> None:
    # A reader whose own model went non-finite or absurd still gets the exact snapshot (through
    # b_full, which ignores the key) and never a wrong value.
    codec = LatticeCodec(chunk=128, seed=16)
    x = torch.randn(500)
    enc = codec.encode(x)
    key = x.clone()
    key[::3] = bad
    out, log = run_pull(codec, enc, key, {})
    assert torch.equal(out, enc.quantized) and len(log) >= 2


def test_eps_holds_when_a_chunk_stops_changing() -> None:
    # Chunk 0 is frozen after a few updates, chunk 1 keeps moving: the frozen chunk keeps its
    # step instead of reading its own quantization noise as updates and shrinking.
    codec = LatticeCodec(chunk=1024, seed=17)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2048, generator=g)
    for _ in range(5):
        x = x + 1.5e-3 * torch.randn(2048, generator=g)
        settled = codec.encode(x).meta["e"]
    assert settled == [-11, -11]
    for _ in range(10):
        x[1024:] += 1.5e-3 * torch.randn(1024, generator=g)
        later = codec.encode(x).meta["e"]
    assert later == [-11, -11]
    assert max(codec.encode(x).meta["bf"]) <= 14


def test_fused_loops_and_torch_passes_ask_alike_for_a_key_past_the_integer_range() -> None:
    """A reader's key more than 2^30 steps away (int32 chunks): both paths clamp it alike, so
    they take the same rounds and keep the same statistic for the next pull."""
    import contextlib

    from swarmnet.codecs import kernels

    eps = 2.0**-10
    x, key = torch.full((64,), (2**30 - 128) * eps), torch.full((64,), (2**30 + 2048) * eps)
    codec = make_codec("lattice", chunk=64, eps=eps, seed=0, first_bits=12)
    enc = codec.encode(x)
    seen = []
    for path in (contextlib.nullcontext(), kernels.torch_passes()):
        with path:
            state: dict = {}
            out, log = run_pull(codec, enc, key, state)
            assert torch.equal(out, enc.quantized)
            seen.append(([(want["to"], res.stats.get("dist_max")) for want, _, res in log], state["dist"]))
    assert seen[0] == seen[1], seen
