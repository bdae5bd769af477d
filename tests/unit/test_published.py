"""The host pool for published snapshots: a block is handed out again only once nothing refers
to it, wherever the last reference lived (a tensor view, a numpy array, a memoryview slice, a
zero-copy ZeroMQ frame in flight, another thread)."""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
import torch
import zmq

from swarmnet.codecs import make_codec
from swarmnet.codecs.published import _FORGET_AFTER, HostPool

pytestmark = pytest.mark.timeout(60)

N = 4096


def _bytes(obj: object) -> bytes:
    return obj.numpy().tobytes() if isinstance(obj, torch.Tensor) else np.asarray(obj).tobytes()


def _wait_for(cond, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            return False
        gc.collect()
        time.sleep(0.01)
    return True


def test_a_dropped_block_is_reused_without_a_new_allocation():
    pool = HostPool()
    first = pool.empty(N, torch.float32)
    addr = first.data_ptr()
    del first
    again = pool.empty(N, torch.float32)
    assert again.data_ptr() == addr
    assert pool.allocated == 1


@pytest.mark.parametrize("derive", [
    lambda t: t.view(torch.uint8)[100:200],
    lambda t: t.numpy(),
    lambda t: memoryview(t.view(torch.uint8).numpy())[8:16],
    lambda t: t.reshape(64, -1),
], ids=["tensor view", "numpy", "memoryview slice", "reshape"])
def test_a_block_is_never_handed_out_while_anything_derived_from_it_lives(derive):
    pool = HostPool()
    t = pool.empty(N, torch.float32)
    t.fill_(7.0)
    addr = t.data_ptr()
    held = derive(t)
    before = _bytes(held)
    del t
    other = pool.empty(N, torch.float32)
    assert other.data_ptr() != addr
    other.fill_(-1.0)
    assert _bytes(held) == before
    del held, other
    assert pool.idle_blocks() == 2


def test_held_contents_survive_new_hand_outs():
    pool = HostPool()
    kept = pool.empty(N, torch.float32).fill_(3.0)
    for _ in range(5):
        pool.empty(N, torch.float32).fill_(-1.0)
    assert torch.all(kept == 3.0)
    assert pool.allocated == 2  # kept, plus one block cycling through the five others


def test_a_reference_dropped_on_another_thread_returns_the_block():
    pool = HostPool()
    box = [pool.empty(N, torch.float32)]
    addr = box[0].data_ptr()
    thread = threading.Thread(target=box.clear)
    thread.start()
    thread.join()
    assert pool.empty(N, torch.float32).data_ptr() == addr


def test_a_zero_copy_frame_in_flight_keeps_its_block_until_the_receiver_lets_go():
    pool = HostPool()
    ctx = zmq.Context()
    tx, rx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        rx.bind("inproc://published")
        tx.connect("inproc://published")
        payload = pool.empty(1 << 18, torch.uint8).fill_(5)  # above pyzmq's copy threshold
        addr = payload.data_ptr()
        tx.send(memoryview(payload.numpy()), copy=False)
        del payload
        gc.collect()
        frame = rx.recv(copy=False)  # inproc: the receiver reads our block itself
        assert pool.empty(1 << 18, torch.uint8).data_ptr() != addr
        assert set(frame.bytes) == {5}
        del frame
        assert _wait_for(lambda: pool.idle_blocks() == 2)
    finally:
        tx.close(linger=0)
        rx.close(linger=0)
        ctx.term()


def test_sizes_no_longer_asked_for_are_released():
    pool = HostPool()
    pool.empty(N, torch.float32)
    assert pool.idle_blocks() == 1
    for _ in range(_FORGET_AFTER + 1):
        pool.empty(8, torch.float32)
    assert pool.idle_blocks() == 1  # only the small block: the idle N-block was let go


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16", "blockwise8", "blockwise4", "lattice"])
def test_snapshots_kept_by_their_readers_stay_intact_while_others_are_encoded(name):
    """What the store and in-flight sends rely on: a held snapshot never changes under them."""
    codec = make_codec(name)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, generator=gen)
    kept = codec.encode(x)
    frames_before = [bytes(f) for f in kept.frames]
    quantized_before = kept.quantized.clone()
    for i in range(6):
        codec.encode(torch.randn(50_000, generator=gen) * (i + 2))
    assert [bytes(f) for f in kept.frames] == frames_before
    assert torch.equal(kept.quantized, quantized_before)


@pytest.mark.parametrize("name", ["fp32", "fp16", "blockwise4", "lattice"])
def test_host_frames_are_ready_at_once_and_nothing_is_awaited(name):
    """On a CPU the frames are the published memory itself: no copy, no event to wait for
    (tests/gpu covers the copies queued from a GPU)."""
    import asyncio

    from swarmnet.codecs.published import copies_done, until_copied

    encoded = make_codec(name).encode(torch.randn(5000))
    assert encoded.ready is None and copies_done(torch.device("cpu")) is None
    asyncio.run(until_copied(encoded.ready))
