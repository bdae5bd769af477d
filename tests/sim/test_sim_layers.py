"""Layers of disjoint pairs (SPEC 3.5): the vectorized assignment equals the definition, layers
are disjoint and respect the order of interactions that share a node."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmnet.sim import layers
from swarmnet.sim.draws import BLOCK, MAX_BLOCK, block_size

pytestmark = pytest.mark.timeout(60)


def random_pairs(seed: int, nodes: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    first = rng.integers(0, nodes, count)
    second = (first + rng.integers(1, nodes, count)) % nodes
    return first, second


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), nodes=st.integers(2, 300), count=st.integers(0, 3000))
def test_chunked_relaxation_equals_the_scan(seed: int, nodes: int, count: int) -> None:
    first, second = random_pairs(seed, nodes, count)
    expected = layers.scan_layers(first, second)
    # Force the chunked relaxation at small n (it is normally used from SCAN_BELOW nodes up).
    original = layers.SCAN_BELOW
    layers.SCAN_BELOW = 0
    try:
        got = layers.assign_layers(first, second, nodes)
    finally:
        layers.SCAN_BELOW = original
    np.testing.assert_array_equal(got, expected)


def test_layers_are_disjoint_and_ordered_at_ten_thousand_nodes() -> None:
    nodes = 10_000
    first, second = random_pairs(1, nodes, 4 * nodes)
    layer = layers.assign_layers(first, second, nodes)
    np.testing.assert_array_equal(layer, layers.scan_layers(first, second))
    last_seen: dict[int, int] = {}
    for t, (i, j) in enumerate(zip(first.tolist(), second.tolist(), strict=True)):
        # strictly after every earlier interaction of either node (so also disjoint in a layer)
        assert layer[t] > max(last_seen.get(i, -1), last_seen.get(j, -1))
        last_seen[i] = last_seen[j] = int(layer[t])
    # ASAP: each interaction sits right after its latest predecessor.
    pred1, pred2 = layers.predecessors(first, second)
    padded = np.append(layer, -1)
    np.testing.assert_array_equal(layer, np.maximum(padded[pred1], padded[pred2]) + 1)
    sizes = np.bincount(layer)
    # SPEC 3.5: about 0.24-0.30 x n/2 pairs per layer in steady state (middle of the window).
    middle = sizes[len(sizes) // 4 : 3 * len(sizes) // 4]
    assert 0.2 * nodes / 2 < middle.mean() < 0.35 * nodes / 2


def test_layer_bounds() -> None:
    np.testing.assert_array_equal(layers.layer_bounds(np.array([0, 0, 1, 3, 3])), [0, 2, 3, 3, 5])
    np.testing.assert_array_equal(layers.layer_bounds(np.array([], dtype=np.int64)), [0])


def test_block_size_grows_with_n_and_is_bounded() -> None:
    assert block_size(1) == block_size(1000) == BLOCK
    assert block_size(10_000) == 40_960
    assert block_size(10**7) == MAX_BLOCK
