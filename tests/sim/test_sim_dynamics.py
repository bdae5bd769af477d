"""Population dynamics the analysis predicts (SPEC 3.5 items 9, 10, 12): the phase clock, the
contraction of pure gossip, the law of geometric local steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from swarmnet.algorithms.local_steps import LocalSteps
from swarmnet.algorithms.topology import parse_topology
from swarmnet.sim.draws import DrawSource
from swarmnet.sim.engine import Engine, EngineConfig
from swarmnet.sim.problems import gossip, lsq

pytestmark = pytest.mark.timeout(60)


def gamma(models: torch.Tensor) -> float:
    centred = models - models.mean(dim=0)
    return float(centred.pow(2).sum())


@pytest.mark.parametrize("nodes", [16, 128])
def test_phase_clock_sums_to_t_and_stays_within_log_t(nodes: int) -> None:
    draws = 2000 * nodes if nodes == 16 else 1000 * nodes
    engine = Engine(EngineConfig(algorithm="popsgd", nodes=nodes, lr=0.0, seed=4), gossip(dim=1))
    worst = 0.0
    for _ in range(10):
        engine.advance(draws // 10)
        point = engine.observe()
        assert point["clock_sum"] == engine.interactions  # exactly one clock moves per interaction
        worst = max(worst, point["clock_dev"])
    assert engine.interactions < engine.draws  # self-pairs were drawn and dropped
    assert worst <= math.log(draws)  # SPEC 3.5 item 9 (reference sim: 6-8)


def per_draw_contraction(algorithm: str, topology: str, nodes: int, draws: int) -> np.ndarray:
    """Gamma_{t+1} / Gamma_t for every draw of pure gossip (eta = 0, Q = id)."""
    config = EngineConfig(
        algorithm=algorithm,
        nodes=nodes,
        lr=0.0,
        topology=parse_topology(topology),
        seed=11,
        dtype=torch.float64,
        naive=True,
    )
    engine = Engine(config, gossip(dim=4))
    total = engine.models.sum(dim=0)
    ratios = np.empty(draws)
    current = gamma(engine.models)
    for t in range(draws):
        engine.advance(1)
        after = gamma(engine.models)
        ratios[t] = after / current
        current = after
        if t % 100 == 99:
            # The gossip update is linear and translation invariant: re-centring and rescaling
            # between draws changes no ratio and keeps Gamma far from underflow.
            torch.testing.assert_close(engine.models.sum(dim=0), total, rtol=0, atol=1e-12)
            engine.models.sub_(engine.models.mean(dim=0)).mul_(1 / math.sqrt(current))
            total = engine.models.sum(dim=0)
            current = gamma(engine.models)
    return ratios


@pytest.mark.parametrize(
    "algorithm,expected",
    [("popsgd", lambda n: 1 - 1 / n), ("swarmsgd", lambda n: 1 - 1 / (n - 1))],
)
def test_gossip_contraction_rate(algorithm: str, expected) -> None:  # type: ignore[no-untyped-def]
    """E[Gamma_{t+1} | X_t] = (1 - 1/n) Gamma_t for PopSGD pairs drawn with replacement (a
    self-pair is a no-op draw) and (1 - 1/(n-1)) Gamma_t for SwarmSGD on the complete graph
    (SPEC 3.5 item 10).

    Statistics: rho_t - E[rho_t | X_t] are martingale differences, so the mean of T ratios has
    standard error sd(rho) / sqrt(T); we accept within 4 standard errors. At n = 8 the two
    rates differ by 1/56 = 0.018, more than 8 standard errors at T = 8000, so swapping the
    rules (or counting self-pairs wrongly) passes with probability below 1e-4.
    """
    nodes, draws = 8, 8000
    ratios = per_draw_contraction(algorithm, "complete", nodes, draws)
    stderr = ratios.std(ddof=1) / math.sqrt(draws)
    assert abs(ratios.mean() - expected(nodes)) < 4 * stderr
    assert 8 * stderr < 1 / (nodes - 1) - 1 / nodes  # power against the other rule


def test_ring_mixes_slower_than_the_complete_graph() -> None:
    nodes, draws = 8, 2000
    ring = per_draw_contraction("swarmsgd", "ring", nodes, draws)
    complete = per_draw_contraction("swarmsgd", "complete", nodes, draws)
    stderr = math.hypot(ring.std(ddof=1), complete.std(ddof=1)) / math.sqrt(draws)
    assert ring.mean() - complete.mean() > 10 * stderr
    # and over a whole run from one start: ring Gamma stays orders of magnitude higher
    results = {}
    for topology in ("ring", "complete"):
        config = EngineConfig(
            algorithm="swarmsgd",
            nodes=32,
            lr=0.0,
            topology=parse_topology(topology),
            seed=3,
            dtype=torch.float64,
        )
        engine = Engine(config, gossip(dim=4))
        start = gamma(engine.models)
        engine.advance(32 * 20)
        results[topology] = gamma(engine.models) / start
    assert results["ring"] > 100 * results["complete"]


@pytest.mark.parametrize("mean", [2, 5])
def test_geometric_local_steps_have_mean_h_and_second_moment_2h2_minus_h(mean: int) -> None:
    """SPEC 3.5 item 12, on the H the simulator actually draws (4 standard errors)."""
    source = DrawSource(
        algorithm="swarmsgd",
        nodes=64,
        task=lsq(batch=1, dim=2),
        seed=9,
        device=torch.device("cpu"),
        local_steps=LocalSteps(mean, geometric=True),
    )
    h = np.concatenate([source.next_block().local_steps for _ in range(5)]).astype(np.float64)
    assert h.min() >= 1
    for values, target in ((h, mean), (h**2, 2 * mean**2 - mean)):
        stderr = values.std(ddof=1) / math.sqrt(len(values))
        assert abs(values.mean() - target) < 4 * stderr
