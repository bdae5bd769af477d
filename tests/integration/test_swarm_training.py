"""Real swarms (separate processes on 127.0.0.1) train and converge."""

from pathlib import Path

import pytest
import torch

from swarmnet.peer import checkpoint
from swarmnet.tasks.lsq import make_problem, objective

from .conftest import lsq_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def final_weights(swarm, names):
    return torch.stack([checkpoint.load(swarm.run_dir / n / "checkpoint.pt")["model"]["weight"].reshape(-1).double()
                        for n in names])


def test_four_peers_converge_on_least_squares(swarm_factory):
    swarm = swarm_factory(lsq_config())
    assert swarm.wait(240) == 0, swarm.log()
    summary = swarm.summary()
    assert summary["ok"]
    names = [p["name"] for p in summary["peers"]]
    assert all(p["interactions"] > 500 for p in summary["peers"]), summary["peers"]
    a, b, x_opt, f_opt = make_problem(10_000, 32, 1.0, 0)
    weights = final_weights(swarm, names)
    mean = weights.mean(0)
    excess_mean = float(objective(a, b, mean)) - f_opt
    excess_peers = [float(objective(a, b, w)) - f_opt for w in weights]
    print(f"lsq: excess loss of the average {excess_mean:.4f}, of the peers {excess_peers}")
    # SPEC 1.5: at eta = 0.01, batch 1, one SGD model sits at an excess loss of about 0.09 and
    # n = 4 PopSGD-like peers at about 0.09 / 4. The average of the swarm must be clearly below the
    # single-model level (half of it), starting from 16: variance reduction, not just convergence.
    assert excess_mean < 0.045, (excess_mean, excess_peers)
    # Every peer ends near the average: within the single-SGD-model noise level of it.
    assert max(excess_peers) < 0.09 * 1.5, excess_peers
    assert summary["average"]["eval"]["excess_loss"] == pytest.approx(excess_mean, rel=1e-3, abs=1e-5)


def test_quickstart_matches_sequential_sgd_on_digits(swarm_factory, tmp_path):
    """The README's quickstart (4 peers, 30 epochs each) against one model trained sequentially
    on the same total number of samples (120 epochs): accuracy within 2 points."""
    import time

    from swarmnet.testing import LocalSwarm

    started = time.monotonic()
    swarm = LocalSwarm(tmp_path / "quick", Path("configs/quickstart.toml"))
    try:
        assert swarm.wait(240) == 0, swarm.log()
    finally:
        swarm.kill_tree()
    quickstart_s = time.monotonic() - started
    sequential = LocalSwarm(tmp_path / "seq", Path("configs/quickstart.toml"), "--peers", "1", "--epochs", "120")
    try:
        assert sequential.wait(240) == 0, sequential.log()
    finally:
        sequential.kill_tree()
    swarm_result, seq_result = swarm.summary(), sequential.summary()
    seq_acc = seq_result["average"]["eval"]["accuracy"]
    avg_acc = swarm_result["average"]["eval"]["accuracy"]
    peer_accs = [p["eval"]["accuracy"] for p in swarm_result["peers"]]
    print(f"digits: sequential {seq_acc:.4f}, swarm average {avg_acc:.4f}, peers {peer_accs}, quickstart {quickstart_s:.0f}s")
    assert seq_result["peers"][0]["steps"] == sum(p["steps"] for p in swarm_result["peers"])
    assert avg_acc >= seq_acc - 0.02
    assert min(peer_accs) >= seq_acc - 0.02
    assert quickstart_s < 180
