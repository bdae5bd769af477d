"""Exact sequential semantics: the layered runner reproduces the one-pair-at-a-time loop bit for
bit (CPU), whatever the windows; PopSGD with n = 1 is sequential SGD; the mean recursion of
SPEC 1.2 holds; the batched helpers added to swarmnet.algorithms agree with the scalar ones."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmnet.algorithms.clock import clock_exchange, clock_exchange_many
from swarmnet.algorithms.local_steps import LocalSteps, steps_from_uniform
from swarmnet.algorithms.schedules import Schedule, clock_rate
from swarmnet.algorithms.topology import parse_topology
from swarmnet.sim import draws
from swarmnet.sim.engine import Engine, EngineConfig
from swarmnet.sim.problems import logreg, lsq

pytestmark = pytest.mark.timeout(90)

CASES = [
    ("popsgd", {}),
    ("popsgd", {"lr_clock_scale": 40.0}),
    ("swarmsgd", {}),
    ("swarmsgd", {"local_steps": LocalSteps(3, True), "topology": parse_topology("ring")}),
    ("swarmsgd", {"local_steps": LocalSteps(2), "topology": parse_topology("random-regular:4")}),
    ("swarmsgd", {"local_steps": LocalSteps(2, True), "codec": "lattice"}),
    ("swarmsgd", {"codec": "lattice", "rounding": "dither", "topology": parse_topology("ring")}),
]


def run(config: EngineConfig, task: object, chunks: list[int]) -> Engine:
    engine = Engine(config, task)
    for chunk in chunks:
        engine.advance(chunk)
    return engine


def assert_same_state(a: Engine, b: Engine) -> None:
    assert torch.equal(a.models, b.models)
    assert torch.equal(a.clocks, b.clocks)
    assert torch.equal(a.steps, b.steps)
    if a.stale is not None:
        assert b.stale is not None and torch.equal(a.stale, b.stale)
    assert a.interactions == b.interactions and a.draws == b.draws


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random blocks of 256 draws, so short runs cross block boundaries."""
    monkeypatch.setattr(draws, "BLOCK", 256)


@pytest.mark.parametrize("algorithm,extra", CASES)
@pytest.mark.parametrize("nodes", [1, 2, 48])
def test_layers_equal_the_naive_loop_bit_for_bit(
    algorithm: str, extra: dict, nodes: int, small_blocks: None
) -> None:
    task = lsq(batch=3, dim=5)
    dtype = torch.float64 if nodes == 48 else torch.float32
    common = dict(algorithm=algorithm, nodes=nodes, lr=0.05, seed=7, dtype=dtype, **extra)
    # 700 draws over three random blocks, in windows cut at different places.
    naive = run(EngineConfig(naive=True, **common), task, [300, 400])
    layered = run(EngineConfig(**common), task, [1, 299, 100, 300])
    assert_same_state(naive, layered)
    assert naive.models.abs().sum() > 0  # something happened


def test_layers_equal_the_naive_loop_on_logistic_regression_at_many_nodes() -> None:
    """Many nodes (chunked layering) and an odd batch: the sigmoid must not round a row
    differently inside a layer than alone (no scalar remainder loop)."""
    task = logreg(batch=5)
    common = {"algorithm": "popsgd", "nodes": 3000, "lr": 0.5, "seed": 3}
    naive = run(EngineConfig(naive=True, **common), task, [1500])
    layered = run(EngineConfig(**common), task, [1500])
    assert_same_state(naive, layered)


def test_popsgd_with_one_node_is_sequential_sgd() -> None:
    task = lsq(batch=2, dim=4).to("cpu", torch.float64)
    config = EngineConfig(
        algorithm="popsgd", nodes=1, lr=0.1, lr_clock_scale=25.0, seed=5, dtype=torch.float64
    )
    engine = Engine(config, task)
    engine.advance(300)
    # The same sample draws, one plain SGD step each with the per-node schedule read from the
    # step counter (the clock of a lone node counts its steps).
    source = Engine(config, task).source
    block = source.next_block()
    schedule = Schedule(kind="popsgd", lr=0.1, clock_scale=25.0)
    x = torch.zeros(1, 4, dtype=torch.float64)
    for t in range(300):
        g = task.grad(x, block.grads[2 * t : 2 * t + 1])
        x = x - g * schedule(t, clock=t)
    assert torch.equal(engine.models, x)
    assert int(engine.clocks[0]) == 300 == int(engine.steps[0])


def test_popsgd_mean_recursion() -> None:
    """mu_{t+1} = mu_t - (eta_i g_i + eta_j g_j) / n for every drawn pair (SPEC 1.2, 3.5 item 11)."""
    task = lsq(batch=2, dim=6).to("cpu", torch.float64)
    config = EngineConfig(
        algorithm="popsgd",
        nodes=10,
        lr=0.2,
        lr_clock_scale=10.0,
        seed=2,
        dtype=torch.float64,
        naive=True,
    )
    engine = Engine(config, task)
    engine.advance(50)
    for _ in range(200):
        block, t = engine._block, engine._cursor
        assert block is not None
        i, j = int(block.first[t]), int(block.second[t])
        before = engine.models.clone()
        clocks = engine.clocks.clone()
        engine.advance(1)
        mu_before, mu_after = before.mean(0), engine.models.mean(0)
        if i == j:  # dropped self-pair
            assert torch.equal(before, engine.models)
            continue
        rate = lambda v: 0.2 / (1 + int(v) / 10.0)
        g = task.grad(before[[i, j]], block.grads[[2 * t, 2 * t + 1]])
        expected = mu_before - (rate(clocks[i]) * g[0] + rate(clocks[j]) * g[1]) / 10
        torch.testing.assert_close(mu_after, expected, rtol=0, atol=1e-14)
        # both hold the same average afterwards
        assert torch.equal(engine.models[i], engine.models[j])


@settings(max_examples=60, deadline=None)
@given(a=st.integers(0, 50), b=st.integers(0, 50))
def test_batched_clock_exchange_is_the_scalar_rule(a: int, b: int) -> None:
    d_i, d_j = clock_exchange_many(torch.tensor([a]), torch.tensor([b]))
    assert (int(d_i), int(d_j)) == clock_exchange(a, b)


def test_batched_helpers_agree_with_the_scalar_ones() -> None:
    clocks = torch.arange(0, 500, dtype=torch.float64)
    schedule = Schedule(kind="popsgd", lr=0.3, clock_scale=7.0)
    assert clock_rate(0.3, 7.0, clocks).tolist() == [schedule(0, clock=int(v)) for v in clocks]
    # Integer clocks (the simulator keeps them as int64) give the same rates, not a truncated V0 and eta0.
    assert clock_rate(0.3, 7.5, clocks.long()).tolist() == [clock_rate(0.3, 7.5, int(v)) for v in clocks]
    steps = LocalSteps(4, geometric=True)
    uniforms = np.random.default_rng(0).random(2000)

    class Fixed(random.Random):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def random(self) -> float:
            return self.value

    vectorized = steps_from_uniform(steps, 1.0 - uniforms)
    assert vectorized.tolist() == [steps.sample(Fixed(u)) for u in uniforms]
    assert steps_from_uniform(LocalSteps(3), uniforms).tolist() == [3] * len(uniforms)


@pytest.mark.parametrize("rounding", ["stochastic", "dither"])
def test_quantized_reads_are_exact_far_from_the_origin_in_float32(rounding) -> None:
    """Each side reads exactly what the other quantized, also for float32 models at |x / eps|
    near 1e9, where a float32 key cannot tell neighbouring integers apart (SPEC 3.4: u in float64)."""
    from swarmnet.sim.registers import LatticeRegisters

    eps = 1e-5
    gen = torch.Generator().manual_seed(0)
    base = 3000.0 * torch.randn(64, 100, generator=gen, dtype=torch.float64)  # |x / eps| up to ~1e9
    x_i, x_j = ((base + 1e-4 * torch.randn(64, 100, generator=gen, dtype=torch.float64)).float() for _ in range(2))
    registers = LatticeRegisters(eps, rounding)
    reads = registers.exchange(x_i, x_j, registers.draw_offsets(64, 100, gen))
    assert torch.equal(reads.read_by_i, reads.own_j) and torch.equal(reads.read_by_j, reads.own_i)
