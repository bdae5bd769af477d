import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmnet.algorithms import (
    LocalSteps,
    PhaseClock,
    Schedule,
    apply_nudge,
    apply_pull,
    clock_exchange,
    compress_epochs,
    consensus_distance,
    parse_topology,
    pull_gap,
    swarm_interaction,
)
from swarmnet.peer.exchange import gap_over


@settings(deadline=None)  # a loaded CI machine stalls an example now and then; not a speed test
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), min_size=1, max_size=300))
def test_clock_sum_equals_interactions(pairs):
    clocks = [0] * 8
    t = 0
    for i, j in pairs:
        if i == j:
            continue
        di, dj = clock_exchange(clocks[i], clocks[j])
        assert di + dj == 1
        clocks[i] += di
        clocks[j] += dj
        t += 1
    assert sum(clocks) == t


def test_pull_based_clock_rule_moves_exactly_one_side_even_when_clocks_move_meanwhile():
    initiator, server = PhaseClock(5), PhaseClock(5)
    sent = initiator.value
    before = server.serve(sent)
    initiator.serve(0)  # another pull reaches the initiator meanwhile (no change: 0 < 5)
    server.serve(100)  # and the server moves because of someone else
    initiator.initiate(sent, before)
    assert initiator.value == 6 and before == 5


def test_phase_clock_concentrates_within_log_t():
    # SPEC 3.5 item 9 with the pull rule: random pairs, spread stays O(log T).
    rng = random.Random(0)
    n, steps = 64, 64 * 500
    clocks = [PhaseClock() for _ in range(n)]
    for _ in range(steps):
        i, j = rng.sample(range(n), 2)
        sent = clocks[i].value
        clocks[i].initiate(sent, clocks[j].serve(sent))
    values = [c.value for c in clocks]
    assert sum(values) == steps
    assert max(abs(v - steps / n) for v in values) <= math.log(steps)


def test_schedules():
    assert Schedule(kind="popsgd", lr=0.2, clock_scale=10)(0, clock=10) == pytest.approx(0.1)
    multi = Schedule(kind="multistep", lr=1.0, milestones=(10, 20), gamma=0.5)
    assert [multi(s) for s in (0, 9, 10, 19, 20)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    cos = Schedule(kind="cosine", lr=1.0, total_steps=100, final_ratio=0.1)
    assert cos(0) == pytest.approx(1.0) and cos(100) == pytest.approx(0.1) and cos(50) == pytest.approx(0.55)
    warm = Schedule(kind="constant", lr=1.0, warmup_steps=4)
    assert [warm(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule(kind="linear")


def test_epoch_multiplier_compresses_epochs_and_milestones():
    # SPEC 2.7 worked example: 90 epochs, drops at 30/60, 32 peers, multiplier 2.
    epochs, milestones = compress_epochs(90, (30, 60), 2, 32)
    assert epochs == pytest.approx(5.625)
    assert milestones == pytest.approx((1.875, 3.75))


def test_geometric_local_steps_moments():
    rng = random.Random(1)
    h = 3
    draws = [LocalSteps(h, geometric=True).sample(rng) for _ in range(200_000)]
    assert min(draws) == 1
    assert sum(draws) / len(draws) == pytest.approx(h, rel=0.02)
    assert sum(x * x for x in draws) / len(draws) == pytest.approx(2 * h * h - h, rel=0.04)
    assert LocalSteps(4).sample(rng) == 4


@pytest.mark.parametrize("text,n,degrees", [("complete", 7, [6] * 7), ("ring", 9, [2] * 9),
                                             ("random-regular:4", 30, [4] * 30),
                                             ("random-regular:3", 9, [3] * 8 + [2])])  # 9 * 3 stubs: one short
def test_topologies_are_symmetric_connected_and_regular(text, n, degrees):
    adjacency = parse_topology(text, seed=3).adjacency(n)
    assert [len(nb) for nb in adjacency] == degrees
    for i, neighbours in enumerate(adjacency):
        assert i not in neighbours
        assert all(i in adjacency[j] for j in neighbours)
    seen, frontier = {0}, [0]
    while frontier:
        for j in adjacency[frontier.pop()]:
            if j not in seen:
                seen.add(j)
                frontier.append(j)
    assert len(seen) == n


def test_topology_neighbours_by_sorted_membership():
    ring = parse_topology("ring")
    assert ring.neighbours_of("c", ["a", "b", "d", "e"]) == ["b", "d"]
    with pytest.raises(ValueError):
        parse_topology("random-regular")
    with pytest.raises(ValueError):
        parse_topology("star")


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 64), st.integers(0, 2**16))
def test_delta_form_matches_the_swarmsgd_interaction(d, seed):
    # SPEC 2.9 item 3: live += (Q(Cj) + Q(K)) / 2 - K equals C <- avg - (stale - live) with stale = K.
    g = torch.Generator().manual_seed(seed)
    own, remote, live, rounding = (torch.randn(d, generator=g, dtype=torch.float64) for _ in range(4))
    expected, neighbour = swarm_interaction(own, remote, own - live)
    got = apply_pull(live.clone(), pull_gap(remote, own, own))
    assert torch.allclose(got, expected)
    # A lossy codec publishes Q(K) != K: the same formula with Q(K) where the average takes it.
    q_own = own + 0.01 * (rounding.abs() + 0.5)  # a rounding error well above allclose's tolerance
    lossy, _ = swarm_interaction(q_own, remote, own - live)
    assert torch.allclose(apply_pull(live.clone(), pull_gap(remote, q_own, own)), lossy)
    assert not torch.allclose(lossy, expected)
    # The symmetric nudge moves the neighbour to the same average: the sum is preserved.
    moved = remote + apply_nudge(own, remote)
    assert torch.allclose(moved, neighbour)
    assert torch.allclose(got + moved, own + remote - (own - live))


def test_consensus_distance():
    models = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    assert consensus_distance(models) == pytest.approx(1.0)


@pytest.mark.parametrize("lossless", [True, False])
def test_the_merge_writes_the_gap_over_the_neighbours_vector_and_takes_its_norm(lossless) -> None:
    n = 3 * (1 << 16) + 123
    g = torch.Generator().manual_seed(n)
    remote, own, rounding = (torch.randn(n, generator=g) for _ in range(3))
    q_own = own if lossless else own + 0.01 * rounding  # a lossy codec's Q(K)
    expected = pull_gap(remote, q_own, own)
    norm = gap_over(remote, q_own, own)
    if lossless:
        assert torch.equal(remote, expected)  # one subtraction, the same either way
    else:
        assert torch.allclose(remote, expected, rtol=0, atol=1e-6)
    # torch sums float32 squares in float32: off by 1e-6 of the norm here, by up to 3e-4
    # at 9M coordinates, nothing to screening's thresholds or the consensus estimate
    assert norm == pytest.approx(float(torch.linalg.vector_norm(expected.double())), rel=1e-5)
    for bad in (math.inf, math.nan):
        remote[n - 1] = bad
        assert not math.isfinite(gap_over(remote, q_own, own))
