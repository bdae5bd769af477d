"""Real swarms (separate processes on 127.0.0.1) train and converge."""

from pathlib import Path

import pytest
import torch

from swarmnet.peer import checkpoint
from swarmnet.tasks.lsq import make_problem, objective

from .conftest import digits_config, lsq_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

PEERS = ["peer0", "peer1", "peer2", "peer3"]


def final_weights(swarm, names):
    return torch.stack([checkpoint.load(swarm.run_dir / n / "checkpoint.pt")["model"]["weight"].reshape(-1).double()
                        for n in names])


def time_averaged_excess(swarm, name, from_step):
    values = [r["eval"]["excess_loss"] for r in swarm.evaluations(name) if r["step"] >= from_step]
    assert len(values) >= 5, values
    return sum(values) / len(values)


def test_four_peers_converge_on_least_squares(swarm_factory):
    """SPEC 1.5 setting: d = 32, batch 1, eta = 0.01. One SGD model sits at an excess loss of about
    0.09; perfectly mixed, each of 4 peers would sit near 0.09 / 4. The same 4 peers run side by side
    with the exchange off (isolated SGD) and on."""
    steps, half = 6000, 3000
    runs = {}
    for exchange in (False, True):
        config = lsq_config(steps=steps, eval_every=200)
        config["network"]["exchange"] = exchange
        swarm = swarm_factory(config, name=f"exchange-{exchange}")
        assert swarm.wait(240) == 0, swarm.log()
        runs[exchange] = swarm
    on, off = runs[True], runs[False]
    summary = on.summary()
    assert summary["ok"] and all(p["interactions"] > 300 for p in summary["peers"]), summary["peers"]
    isolated = [time_averaged_excess(off, n, half) for n in PEERS]
    swarm = [time_averaged_excess(on, n, half) for n in PEERS]
    a, b, _, f_opt = make_problem(10_000, 32, 1.0, 0)
    mean = final_weights(on, PEERS).mean(0)
    excess_mean = float(objective(a, b, mean)) - f_opt
    print(f"lsq: time-averaged excess loss per peer, isolated {isolated}, swarm {swarm}; "
          f"final average model {excess_mean:.4f}; merges per peer {[p['interactions'] for p in summary['peers']]}")
    # Isolated peers reproduce the single-model level of SPEC 1.5 (0.091 +- noise) ...
    assert all(0.04 < x < 0.2 for x in isolated), isolated
    # ... and merging neighbours cuts every peer's excess loss below it: 1/4 of it when perfectly
    # mixed; with a merge every few steps, 0.61-0.82 measured (fewer merges per step on a faster, idle
    # CPU), hence 0.9. The isolated figures are deterministic: without merging the ratio is >= 1.
    assert max(swarm) < 0.9 * min(isolated), (swarm, isolated)
    # The average of the final models: about 0.09 / 4 by SPEC 1.5, 0.036-0.061 measured (one final
    # snapshot in d = 32 spreads by about 25%); it must beat one sequential model (0.091) clearly.
    assert excess_mean < 0.08, excess_mean
    assert summary["average"]["eval"]["excess_loss"] == pytest.approx(excess_mean, rel=1e-3, abs=1e-5)
    # ... and that average is the run's result, saved as a plain state_dict.
    assert summary["average"]["model"] == str(on.run_dir / "average.pt")
    saved = torch.load(on.run_dir / "average.pt", weights_only=True)
    assert torch.allclose(saved["weight"].reshape(-1).double(), mean, atol=1e-6)


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
    # As the config has it: merging every H steps whatever the CPU cost. Under the default budget's
    # 5% floor a lattice merge (about 12 ms of CPU here) fits 3-10 times into the 4 s each peer
    # trains, the peers end 0.3-4.5 apart, and one such run inside the full suite ended at 95.5%
    # (docs/results.md, Lattice under the default budget).
    lattice = LocalSwarm(tmp_path / "lattice", Path("configs/quickstart-lattice.toml"))
    try:
        assert lattice.wait(240) == 0, lattice.log()
    finally:
        lattice.kill_tree()
    swarm_result, seq_result, lattice_result = swarm.summary(), sequential.summary(), lattice.summary()
    seq_acc = seq_result["average"]["eval"]["accuracy"]
    avg_acc = swarm_result["average"]["eval"]["accuracy"]
    peer_accs = [p["eval"]["accuracy"] for p in swarm_result["peers"]]
    print(f"digits: sequential {seq_acc:.4f}, swarm average {avg_acc:.4f}, peers {peer_accs}, quickstart {quickstart_s:.0f}s")
    # Same budget: peers started together take no model (and step) from each other (newcomer.py),
    # so the swarm computes exactly the sequential run's samples.
    assert all(p["steps"] == seq_result["peers"][0]["steps"] / 4 for p in swarm_result["peers"])
    assert not any(p["adopted_from"] for r in (swarm_result, lattice_result) for p in r["peers"])
    assert avg_acc >= seq_acc - 0.02
    assert min(peer_accs) >= seq_acc - 0.02  # and it finished within swarm.wait's bound, a few minutes
    # Lattice snapshots (SPEC 3.4): the same 2-point bar against sequential SGD, and peers that
    # agree at the end (0.0000-0.0007 apart; 0.3-4.5 when merges are too rare to hold them
    # together). Single runs spread over about 1.5 points (0.969 to 0.986 over 15 runs, 0.975 to
    # 0.986 over the last 14; fp32 at the same merge rate 0.975 to 0.983 over 6; 1 point is 3.6
    # test images), so comparing one lattice run with one fp32 run more tightly would test the
    # noise; docs/results.md compares the means over repeated runs instead.
    lat_acc = lattice_result["average"]["eval"]["accuracy"]
    per_merge = {name: sum(p["bytes_received"] for p in r["peers"]) / sum(p["interactions"] for p in r["peers"])
                 for name, r in (("fp32", swarm_result), ("lattice", lattice_result))}
    print(f"digits lattice: average {lat_acc:.4f}, peers {[p['eval']['accuracy'] for p in lattice_result['peers']]}, "
          f"consensus distance {lattice_result['average']['consensus_distance']:.4f}, "
          f"bytes received per merge {per_merge}")
    assert lat_acc >= seq_acc - 0.02
    assert lattice_result["average"]["consensus_distance"] < 0.05
    # 15.6-17.4% of fp32's bytes per merge (the fp32 swarm above merges under the budget, 20-27
    # times per peer, at a larger distance, but fp32's bytes do not depend on it).
    assert per_merge["lattice"] <= per_merge["fp32"] / 3
    # Readers ask for the planes their last decode of that neighbour needed and escalate by 1, 2,
    # 4 planes when the distance grew: 1.5-1.8 requests per pull (the cap asserts that misses
    # stay few). Bounded over the swarm, not per peer.
    rounds = [(p["pulls_ok"], p["pull_rounds"]) for p in lattice_result["peers"]]
    assert all(ok <= pulls for ok, pulls in rounds), rounds
    assert sum(pulls for _, pulls in rounds) <= 3 * sum(ok for ok, _ in rounds), rounds


def test_popsgd_with_symmetric_merges_converges_under_dense_interactions(swarm_factory):
    """PopSGD's pairwise averaging with both sides moving (nudges), every peer pulling as fast as
    it can: each peer and the average converge as with pull-only merges. (How many nudges meet
    on one version depends on the machine's speed; test_peer_daemons forces the collision.)"""
    config = lsq_config(steps=4000, eval_every=0)
    config["algorithm"] = {"name": "popsgd", "symmetric": True}
    swarm = swarm_factory(config)
    assert swarm.wait(240) == 0, swarm.log()
    summary = swarm.summary()
    peers = summary["peers"]
    print("popsgd symmetric:", [(p["interactions"], p["nudges_applied"], p["nudges_refused"], p["eval"]["excess_loss"])
                                for p in peers], summary["average"]["eval"])
    assert sum(p["nudges_applied"] for p in peers) > 200, peers
    assert all(p["eval"]["excess_loss"] < 0.5 for p in peers), peers
    assert summary["average"]["eval"]["excess_loss"] < 0.08


def test_a_model_of_millions_of_coordinates_merges_over_the_received_frames(swarm_factory):
    """Two peers on a 2.4M-parameter digits MLP (9.6 MB snapshots over tcp) merge, agree and
    learn: each merge writes its gap over the frames it received, while the neighbour keeps
    serving its own copy."""
    from swarmnet.tasks import load_task

    options = {"hidden": 1500}
    model = load_task("swarmnet.tasks.digits:task", options).build_model()
    assert sum(p.numel() for p in model.parameters()) > 2_000_000
    config = digits_config(steps=150, eval_every=0)
    config["run"]["peers"] = 2
    config["task"]["options"] = options
    # Merge as often as H allows; the first to finish keeps serving until the other is done too
    # (a peer trailing by more than the linger would end its steps alone and apart).
    config["network"].update(exchange_cpu=0.0, linger=30.0)
    swarm = swarm_factory(config)
    assert swarm.wait(240) == 0, swarm.log()
    summary = swarm.summary()
    peers = summary["peers"]
    print("2.4M digits MLP:", [(p["interactions"], p["consensus"], p["eval"]) for p in peers], summary["average"])
    assert all(p["interactions"] >= 10 and not p["rejected"] for p in peers), peers
    assert summary["average"]["eval"]["accuracy"] > 0.9
    # Merging until the end keeps them together: 1e-5 to 0.023 apart in eight runs alone, 0.063 once
    # inside the loaded suite (a pull of 9.6 MB takes longer there, the last finisher steps on
    # meanwhile); 2.1 apart after a single merge (one run).
    assert summary["average"]["consensus_distance"] < 0.2
