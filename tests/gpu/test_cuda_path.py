"""The CUDA path (issue 5): codecs on the GPU, host copies that leave the training thread alone,
and peers bound to one GPU training together. Skipped, saying so, where torch sees no GPU;
``make gpu-check`` runs these and the GPU benchmarks on a GPU machine."""

from __future__ import annotations

import time

import pytest
import torch

from swarmnet.codecs import make_codec
from swarmnet.codecs.published import copies_done, host_copy
from swarmnet.testing.processes import LocalSwarm, write_config

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device"),
    pytest.mark.timeout(300),
]

CUDA = torch.device("cuda:0")
CODECS = {"fp32": {}, "fp16": {"seed": 3}, "bf16": {"seed": 3}, "blockwise8": {"seed": 3},
          "blockwise4": {"seed": 3}, "lattice": {"seed": 3}}


_cycles_per_s: list[float] = []


def _busy_gpu(seconds: float) -> None:
    """Queue about ``seconds`` of spinning on the current stream (returns at once)."""
    if not _cycles_per_s:  # calibrate the spin loop once
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(10**7)
        end.record()
        end.synchronize()
        _cycles_per_s.append(10**7 / (start.elapsed_time(end) / 1e3))
    torch.cuda._sleep(int(seconds * _cycles_per_s[0]))


def test_a_host_copy_is_queued_behind_the_stream_and_does_not_wait_for_it() -> None:
    t = torch.arange(1 << 22, dtype=torch.float32, device=CUDA)
    host_copy(t)  # the pool's first pinned block of this size: pinning memory may synchronize
    copies_done(CUDA).synchronize()
    _busy_gpu(1.0)
    t.add_(1)  # still queued: the copy must see this
    began = time.perf_counter()
    host = host_copy(t)
    done = copies_done(CUDA)
    queued_in = time.perf_counter() - began
    assert queued_in < 0.2, f"host_copy waited {queued_in:.3f} s for the device"
    assert not done.query(), "the copy cannot have finished before the work queued ahead of it"
    done.synchronize()
    assert host.device.type == "cpu" and host.is_pinned()
    assert torch.equal(host, torch.arange(1 << 22, dtype=torch.float32) + 1)


def test_a_copy_source_dropped_at_once_stays_whole_until_copied() -> None:
    expected = torch.randn(1 << 20)
    source = expected.to(CUDA)
    _busy_gpu(0.5)
    host = host_copy(source)
    done = copies_done(CUDA)
    del source  # the caching allocator must not hand its memory to the next tensor yet
    torch.full((1 << 20,), float("nan"), device=CUDA)
    done.synchronize()
    assert torch.equal(host, expected)


@pytest.mark.parametrize("name", list(CODECS))
def test_codecs_on_the_gpu_publish_frames_a_cpu_reader_decodes_exactly(name: str) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(300_001, generator=g)
    encoded = make_codec(name, **CODECS[name]).encode(x.to(CUDA))
    assert encoded.quantized.device == CUDA
    assert encoded.ready is not None
    encoded.ready.synchronize()
    reader = make_codec(name, **CODECS[name])
    meta, frames = reader.select(encoded, None)  # what a server sends (lattice: one frame)
    out = torch.full_like(x, float("nan"))
    result = reader.decode(meta, tuple(bytes(f) for f in frames), x, out, {})
    assert result.complete
    assert torch.equal(out, encoded.quantized.cpu())


@pytest.mark.parametrize(("codec", "precision"), [("fp32", "fp32"), ("lattice", "fp32"), ("fp32", "fp16")])
def test_peers_sharing_one_gpu_train_together(tmp_path, codec: str, precision: str) -> None:
    config = write_config(tmp_path / "gpu.toml", {
        "run": {"peers": 3},
        "task": {"spec": "swarmnet.tasks.digits:task"},
        "train": {"batch_size": 64, "lr": 0.05, "steps": 600, "metrics_every": 50, "precision": precision},
        "device": {"device": "cuda:0"},
        "codec": {"name": codec},
    })
    swarm = LocalSwarm(tmp_path / "run", config)
    try:
        assert swarm.wait(240) == 0, swarm.log()
    finally:
        swarm.kill_tree()
    summary = swarm.summary()
    assert [swarm.card(p["name"])["device"] for p in summary["peers"]] == ["cuda:0"] * 3
    for p in summary["peers"]:
        assert p["steps"] == 600 and p["interactions"] >= 3, p
        assert p["eval"]["accuracy"] > 0.8, p  # each peer evaluated its model on its GPU
    assert summary["average"]["eval"]["accuracy"] > 0.85, summary["average"]


def test_the_user_api_steps_a_gpu_model_and_refuses_a_stream_of_its_own(tmp_path) -> None:
    import swarmnet
    from swarmnet.errors import SwarmError

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).to(CUDA)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(32, 8, device=CUDA)
    with swarmnet.SwarmOptimizer(optimizer, model, run_dir=tmp_path, settings={"network.linger": 0.0}) as opt:
        for _ in range(3):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        with torch.cuda.stream(torch.cuda.Stream()), pytest.raises(SwarmError, match="default stream"):
            opt.step()
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):  # weights loaded on a stream of the user's, then published
            with torch.no_grad():
                model[0].weight.fill_(3.0)
            opt.resync()
        torch.cuda.synchronize()
        latest = opt.replica.store.latest()
        assert torch.equal(latest.values_N, opt.replica.live_N) and float(model[0].weight[0, 0]) == 3.0
