"""A swarm split in two by a cut link keeps training on both sides; once healed, its models
come back together. Two network namespaces joined by a veth pair stand for two hosts."""

import statistics
import time

import pytest
import torch

from swarmnet.peer import checkpoint
from swarmnet.peer.metrics import read_metrics
from swarmnet.testing import PeerProcessHandle, wait_until

from .conftest import write_config

pytestmark = [pytest.mark.slow, pytest.mark.netns, pytest.mark.timeout(300)]

HOSTS = {"a0": (0, "tcp://10.200.1.1:7000"), "a1": (0, "tcp://10.200.1.1:7001"),
         "b0": (1, "tcp://10.200.1.2:7000"), "b1": (1, "tcp://10.200.1.2:7001")}
"""name: (namespace, address). Each half has its own data (a least-squares problem drawn with
its own seed), as peers with local data do: cut off from each other, the halves head for
different optima; together, averaging holds them close."""


def gamma(run):
    """Consensus distance of the latest checkpoints: mean squared distance to the average model."""
    models = torch.stack([torch.cat([t.reshape(-1) for t in checkpoint.load(run / n / "checkpoint.pt")["model"].values()])
                          for n in HOSTS]).double()
    return float((models - models.mean(0)).pow(2).sum(1).mean())


def sample_gamma(run, seconds, every=0.5):
    values = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        values.append(gamma(run))
        time.sleep(every)
    return statistics.median(values)


def progress(run, name):
    records = [r for r in read_metrics(run / name / "metrics.jsonl") if "lr" in r]
    return (records[-1]["step"], records[-1]["interactions"]) if records else (0, 0)


def test_partitioned_halves_keep_training_and_reconverge_after_the_heal(tmp_path, two_hosts):
    config = write_config(tmp_path / "partition.toml", {
        "run": {"peers": 4},
        "task": {"spec": "swarmnet.tasks.lsq:task", "options": {"samples": 400, "dim": 32}},
        "train": {"batch_size": 8, "lr": 0.01, "steps": 10**9, "metrics_every": 50,
                  "checkpoint_every": 0.5, "tensorboard": False},
        "network": {"request_timeout": 1.0, "dead_after": 2.0, "failure_backoff": 0.5},
    })
    run = tmp_path / "run"
    seeds = ["--seed", HOSTS["a0"][1], "--seed", HOSTS["b0"][1]]
    peers = [PeerProcessHandle(run, name, config, "--listen", addr, *seeds,
                               "--set", f'task.options={{"samples": 400, "dim": 32, "seed": {host}}}',
                               prefix=two_hosts.prefix(host))
             for name, (host, addr) in HOSTS.items()]
    try:
        for p in peers:
            p.card()
        wait_until(lambda: all(progress(run, n)[1] > 200 and (run / n / "checkpoint.pt").exists() for n in HOSTS),
                   90, interval=0.5, what="four peers merging")
        before = sample_gamma(run, 5)
        two_hosts.set_link(False)
        cut = time.monotonic()
        time.sleep(3)  # timeouts, suspicion
        at_cut = {n: progress(run, n) for n in HOSTS}
        during = sample_gamma(run, 10)
        after_cut = {n: progress(run, n) for n in HOSTS}
        two_hosts.set_link(True)
        healed = time.monotonic()
        samples = []

        def back_together():
            samples.append(gamma(run))
            return len(samples) >= 4 and statistics.median(samples[-4:]) <= 2 * before
        wait_until(back_together, 90, interval=0.5, what="the consensus distance back to its pre-partition level")
        recovered_s = time.monotonic() - healed
        for p in peers:
            assert p.proc.poll() is None, p.log()
    finally:
        two_hosts.set_link(True)
        for p in peers:
            p.kill_tree()
    print(f"\npartition: Gamma {before:.3g} before, {during:.3g} while cut (cut for {healed - cut:.0f}s), "
          f"back to <= 2x {recovered_s:.1f}s after the heal; steps and interactions while cut "
          f"{ {n: (after_cut[n][0] - at_cut[n][0], after_cut[n][1] - at_cut[n][1]) for n in HOSTS} }")
    for n in HOSTS:  # both halves kept training and merging among themselves
        assert after_cut[n][0] > at_cut[n][0] + 100 and after_cut[n][1] > at_cut[n][1] + 10, (at_cut, after_cut)
    # The halves drifted apart: past twice the level they come back under after the heal. (From
    # checkpoints written at different moments, the level before reads 0.26-1.08 on an idle machine
    # and up to 5.8 under a heavy load; while cut, 16.3.)
    assert during > 2 * before, (before, during)
