"""Scheduling a sequence of pairwise interactions into layers of disjoint pairs (SPEC 3.5).

Interaction t (nodes first[t], second[t]) goes to layer 1 + max(last layer of first[t], last
layer of second[t]), counting from 0 within the window. Two interactions in one layer share no
node, and every interaction sits in a later layer than each earlier interaction it shares a
node with. So applying the layers in order, each as one vectorized batch in any internal order,
gives exactly the state of the one-at-a-time loop: only interactions that commute were
reordered.

Two ways to compute the layers, with identical results (tested):

- relaxation: the layer is the longest chain of predecessors ending at t. With pred1[t] and
  pred2[t] = the previous interaction in the window touching first[t] / second[t] (found for
  all t at once by one stable sort of the 2T endpoints), iterate
  ``layer <- 1 + max(layer[pred1], layer[pred2])`` from 0; after k rounds every interaction of
  depth <= k is final, so it stops after depth + 1 rounds of O(T) array work. Used when the
  window is shallow (many nodes per interaction in the window: the 10^4-node regime);
- a plain scan over the window with a per-node "last layer" table, O(T) Python steps. Used
  for deep windows (few nodes), where the relaxation would need thousands of rounds.
"""

from __future__ import annotations

import numpy as np

_MAX_ROUNDS = 48
"""Expected depth above which the scan is cheaper than the relaxation."""


def predecessors(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the previous interaction in the window touching first[t] (resp. second[t]),
    or -1; ``first[t] != second[t]`` is required."""
    count = len(first)
    nodes = np.concatenate((first, second))
    owner = np.concatenate((np.arange(count), np.arange(count)))
    order = np.lexsort((owner, nodes))  # by node, then by time
    sorted_nodes, sorted_owner = nodes[order], owner[order]
    pred = np.full(2 * count, -1, dtype=np.int64)
    same = sorted_nodes[1:] == sorted_nodes[:-1]
    pred[order[1:]] = np.where(same, sorted_owner[:-1], -1)
    return pred[:count], pred[count:]


def assign_layers(first: np.ndarray, second: np.ndarray, nodes: int) -> np.ndarray:
    """0-based layer of every interaction of the window (int64 array)."""
    count = len(first)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if 4 * count / max(nodes, 1) + 2 > _MAX_ROUNDS:
        return _scan(first, second, nodes)
    pred1, pred2 = predecessors(first, second)
    padded = np.full(count + 1, -1, dtype=np.int64)  # padded[-1] = -1 stands for "no predecessor"
    layer = np.zeros(count, dtype=np.int64)
    while True:
        padded[:count] = layer
        new = np.maximum(padded[pred1], padded[pred2]) + 1
        if np.array_equal(new, layer):
            return layer
        layer = new


def _scan(first: np.ndarray, second: np.ndarray, nodes: int) -> np.ndarray:
    last: dict[int, int] = {}
    out = np.empty(len(first), dtype=np.int64)
    for t, (i, j) in enumerate(zip(first.tolist(), second.tolist(), strict=True)):
        layer = max(last.get(i, -1), last.get(j, -1)) + 1
        last[i] = last[j] = layer
        out[t] = layer
    return out


def layer_bounds(layer_sorted: np.ndarray) -> np.ndarray:
    """Start offsets of each layer in a layer-sorted array, plus the end (length L + 1)."""
    counts = np.bincount(layer_sorted) if len(layer_sorted) else np.zeros(0, dtype=np.int64)
    return np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
