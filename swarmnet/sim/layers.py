"""Scheduling a sequence of pairwise interactions into layers of disjoint pairs (SPEC 3.5).

Interaction t (nodes first[t], second[t]) goes to layer 1 + max(last layer of first[t], last
layer of second[t]), counting from 0 within the window. Two interactions in one layer share no
node, and every interaction sits in a later layer than each earlier interaction it shares a
node with. So applying the layers in order, each as one vectorized batch in any internal order,
gives exactly the state of the one-at-a-time loop: only interactions that commute were
reordered.

Two ways to compute the layers, with identical results (tested):

- chunked relaxation (many nodes): the layer of t is the length of the longest chain of
  predecessors ending at t. The window is cut into chunks of about n/4 draws; inside a chunk,
  pred1[t] and pred2[t] (the previous interaction of the chunk touching first[t] / second[t])
  come from one stable sort of the endpoints, and ``layer <- max(base, 1 + layer[pred1],
  1 + layer[pred2])`` is iterated to its fixed point, where ``base`` = 1 + the last layer of
  either node in earlier chunks. A chunk of n/4 draws is only a few layers deep, so each
  needs a handful of O(chunk) array passes;
- a plain scan with a per-node "last layer" table, O(T) Python steps (few nodes: there the
  chunks would be tiny and deep windows make the scan the cheaper one).
"""

from __future__ import annotations

import numpy as np

SCAN_BELOW = 2048
"""Node counts below which the scan is used."""


def predecessors(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the previous interaction touching first[t] (resp. second[t]), or -1;
    ``first[t] != second[t]`` is required."""
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
    if nodes < SCAN_BELOW:
        return scan_layers(first, second)
    count = len(first)
    chunk = max(256, nodes // 4)
    last = np.full(nodes, -1, dtype=np.int64)
    out = np.empty(count, dtype=np.int64)
    for start in range(0, count, chunk):
        f, s = first[start : start + chunk], second[start : start + chunk]
        size = len(f)
        base = np.maximum(last[f], last[s]) + 1
        pred1, pred2 = predecessors(f, s)
        padded = np.full(size + 1, -1, dtype=np.int64)  # padded[-1] = -1: "no predecessor"
        layer = base
        while True:
            padded[:size] = layer
            new = np.maximum(base, np.maximum(padded[pred1], padded[pred2]) + 1)
            if np.array_equal(new, layer):
                break
            layer = new
        out[start : start + size] = layer
        # Layers grow along each node's chain, so the maximum is its last layer in the chunk.
        np.maximum.at(last, f, layer)
        np.maximum.at(last, s, layer)
    return out


def scan_layers(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The definition, one interaction at a time (also the reference in the tests)."""
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
