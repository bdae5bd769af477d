"""Small versions of the reproductions (full sizes: docs/simulator.md). Deterministic given the
seeds; the thresholds leave room around the values these runs produce (in the comments)."""

from __future__ import annotations

import pytest

from swarmnet.sim.runner import SimConfig, run_simulation

pytestmark = pytest.mark.timeout(120)


def test_spec_1_5_table_small() -> None:
    """SPEC 1.5 / 3.5 item 13: synthetic least squares, d = 32, batch 1, eta = 0.01. Excess loss
    of node 0 over its steps 1000-2500 falls about as 1/n up to n = 8, keeps falling to 128
    and saturates there above mini-batch SGD with batch n, with a visibly larger spread."""
    result = run_simulation(
        SimConfig(
            task="lsq",
            algorithm="popsgd",
            nodes=(1, 8, 32, 128),
            interactions_per_node=2500,
            lr=0.01,
            batch=1,
            baseline=True,
            dtype="float64",
            records=100,
            progress=False,
        )
    )
    pop = {n: result.run("popsgd", n).window("loss_node", 1000, 2500) for n in (1, 8, 32, 128)}
    batch = {n: result.run("minibatch", n).window("loss_node", 1000, 2500) for n in (1, 8, 32, 128)}
    means = [pop[n][0] for n in (1, 8, 32, 128)]  # about 0.088, 0.011, 0.0039, 0.0020
    assert means == sorted(means, reverse=True)
    assert 4 < pop[1][0] / pop[8][0] < 16  # ~ 1/n (8.2)
    assert 0.5 < batch[8][0] / pop[8][0] < 2  # PopSGD ~ mini-batch with batch n at small n
    assert pop[128][0] > 2 * batch[128][0]  # saturation (0.0020 vs 0.0006)
    assert pop[128][1] > 2 * batch[128][1]  # larger spread (0.0010 vs 0.0002)
    for run in result.runs:
        assert run.final()["node_steps"] > 2000


def test_quantized_swarmsgd_bits_and_loss() -> None:
    """SPEC 3.4 reference: n = 32, complete graph, eta = 0.01, eps = eta H 6/11: mean 3.6-4.2
    bits per coordinate per read, max 7-8; loss of the mean close to unquantized."""
    common = {
        "task": "lsq",
        "algorithm": "swarmsgd",
        "nodes": (32,),
        "interactions_per_node": 1500,
        "lr": 0.01,
        "batch": 1,
        "dtype": "float64",
        "records": 60,
        "progress": False,
    }
    plain = run_simulation(SimConfig(**common)).runs[0]  # type: ignore[arg-type]
    quantized = run_simulation(SimConfig(codec="lattice", **common)).runs[0]  # type: ignore[arg-type]
    assert all("bits_mean" not in p for p in plain.curve)
    steady = [p["bits_mean"] for p in quantized.curve[20:]]
    mean_bits = sum(steady) / len(steady)
    peak = max(p["bits_max"] for p in quantized.curve[1:])
    assert 3.5 <= mean_bits <= 4.3  # 4.15
    assert 6 <= peak <= 9  # 8
    loss_plain = plain.window("loss_mean", 600, 1500)[0]
    loss_quantized = quantized.window("loss_mean", 600, 1500)[0]
    assert loss_quantized < 1.6 * loss_plain  # 0.0024 vs 0.0024
    assert loss_quantized < 0.01 * quantized.curve[0]["loss_mean"]  # it did converge


def test_logistic_regression_curves_separate_in_n() -> None:
    """Fig. 1 kind, small: breast-cancer logistic regression, batch 128 per node, constant
    eta. The mean model's excess loss falls about as 1/n; node 0 gains from 1 to 10 nodes
    and then sits at the consensus floor O(eta M), which does not depend on n (SPEC 1.3)."""
    result = run_simulation(
        SimConfig(
            task="logreg",
            task_options={"l2": 1e-2},
            algorithm="popsgd",
            nodes=(1, 10, 100),
            interactions_per_node=600,
            lr=1.0,
            batch=128,
            records=40,
            progress=False,
        )
    )
    mean = {run.nodes: run.window("loss_mean", 300, 600)[0] for run in result.runs}
    node = {run.nodes: run.window("loss_node", 300, 600)[0] for run in result.runs}
    assert mean[1] > 4 * mean[10] > 16 * mean[100]  # ~ 6e-4, 5e-5, 6e-6
    assert node[1] > 2 * node[10]  # ~ 6e-4, 1.6e-4
    assert all(run.final()["test_error_node"] < 0.1 for run in result.runs)
