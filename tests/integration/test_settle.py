"""Peers that spend their budget first keep merging (without stepping) until the others finish."""

import itertools

import pytest
import torch

from swarmnet.peer.metrics import read_metrics
from swarmnet.testing import PeerProcessHandle

from .conftest import write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _finish_apart(tmp_path, linger: float) -> tuple[float, dict]:
    """Two fast peers and one four times slower, same step budget: the largest distance between
    the final models, and how many merges each fast peer made after its last step."""
    config = write_config(tmp_path / f"linger{linger}.toml", {
        "run": {"peers": 3, "seed": 0},
        "task": {"spec": "swarmnet.tasks.digits:task"},
        # A constant learning rate: the slow peer's steps after the others finished move its model.
        "train": {"batch_size": 32, "lr": 0.05, "momentum": 0.9, "steps": 600, "metrics_every": 20,
                  "checkpoint_every": 0.0},
        "algorithm": {"name": "swarmsgd", "local_steps": 2},
        "network": {"linger": linger, "min_peers": 2, "exchange_cpu": 0.0, "adopt_model": False},
    })
    run = tmp_path / f"run-linger{linger}"
    peers = [PeerProcessHandle(run, "fast0", config)]
    try:
        seed = peers[0].card()["addr"]
        peers += [PeerProcessHandle(run, "fast1", config, "--seed", seed),
                  PeerProcessHandle(run, "slow", config, "--seed", seed, "--set", "train.slowdown=4")]
        for peer in peers:
            assert peer.proc.wait(180) == 0, peer.log()
    finally:
        for peer in peers:
            peer.kill_tree()
    models = {p.name: torch.cat([v.flatten().float() for v in
                                 torch.load(run / p.name / "checkpoint.pt", weights_only=False)["model"].values()])
              for p in peers}
    spread = max(float((models[a] - models[b]).norm()) for a, b in itertools.combinations(models, 2))
    after = {}
    for peer in peers[:2]:
        summary = peer.summary()
        assert summary["reason"] == "budget" and summary["steps"] == 600, summary
        last_step = [r for r in read_metrics(run / peer.name / "metrics.jsonl") if r.get("step") == 600 and "lr" in r]
        after[peer.name] = summary["interactions"] - last_step[0]["interactions"]
    return spread, after


def test_first_to_finish_follow_the_others_until_they_finish(tmp_path):
    apart, merges_leaving = _finish_apart(tmp_path, linger=0.0)
    together, merges_settling = _finish_apart(tmp_path, linger=60.0)
    print(f"\nlargest distance between final models: {apart:.4f} leaving at once, {together:.4f} settling; "
          f"fast peers' merges after their budget: {merges_leaving} and {merges_settling}")
    assert all(m <= 1 for m in merges_leaving.values())  # at most the final acknowledged one
    assert all(m >= 10 for m in merges_settling.values())
    assert together < 0.25 * apart, (together, apart)
