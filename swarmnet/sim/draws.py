"""The random inputs of a simulation, drawn per interaction in fixed-size blocks.

Everything random an interaction uses is drawn before it runs, in blocks of consecutive
interactions ("draws"), from two seeded generators:

- host (numpy PCG64): who interacts. PopSGD: both nodes uniform with replacement (SPEC 1.1;
  a self-pair is later dropped as a no-op). SwarmSGD: initiator uniform, neighbour uniform in
  its neighbourhood (SPEC 2.1); local steps H per interaction (SPEC 2.3);
- device (torch): the task's gradient inputs (sample indices) for every gradient the block
  needs, in interaction order: PopSGD draw t uses rows 2t (first node) and 2t+1 (second);
  SwarmSGD draw t uses rows offset[t] .. offset[t] + H[t] - 1 for the initiator's local steps;
  then, for quantized SwarmSGD, the rounding offsets of both buffers of every draw.

The block size is a function of n alone (:func:`block_size`), not a tuning knob: it fixes which
generator output feeds which interaction, so the vectorized and the one-pair-at-a-time paths,
and any way of chunking a run into windows, consume identical randomness for the same seed. It
grows with n because a window of draws is scheduled into layers on its own: about 4n draws
per window keep the thin layers at a window's end a small fraction (SPEC 3.5: about
0.24-0.30 x n/2 pairs per layer in steady state).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from swarmnet.algorithms.local_steps import LocalSteps, steps_from_uniform
from swarmnet.algorithms.topology import Topology

BLOCK = 4096
"""Granularity (and minimum) of the random block size."""
MAX_BLOCK = 16 * BLOCK


def block_size(nodes: int) -> int:
    """Interactions per random block for a run on ``nodes`` nodes: 4n rounded up to a multiple
    of :data:`BLOCK`, at most :data:`MAX_BLOCK` (bounds the memory of the pre-drawn samples)."""
    return min(MAX_BLOCK, max(BLOCK, -(-4 * nodes // BLOCK) * BLOCK))


class NeighbourSampler:
    """Uniform neighbour of each initiator in a topology (SPEC 2.1), vectorized.

    The complete graph is sampled as (i + U{1..n-1}) mod n, so it needs no n x n table.
    """

    def __init__(self, topology: Topology, nodes: int) -> None:
        self.nodes = nodes
        self.complete = topology.kind == "complete"
        if not self.complete:
            adjacency = topology.adjacency(nodes)
            self.degree = np.array([len(a) for a in adjacency], dtype=np.int64)
            if nodes > 1 and self.degree.min() == 0:
                raise ValueError(
                    f"topology {topology} leaves a node without neighbours at n={nodes}"
                )
            self.table = np.zeros((nodes, max(1, int(self.degree.max(initial=1)))), dtype=np.int64)
            for i, neighbours in enumerate(adjacency):
                self.table[i, : len(neighbours)] = neighbours

    def sample(self, initiator: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.nodes == 1:
            return initiator.copy()
        if self.complete:
            return (initiator + rng.integers(1, self.nodes, len(initiator))) % self.nodes
        slot = (rng.random(len(initiator)) * self.degree[initiator]).astype(np.int64)
        return self.table[initiator, slot]


@dataclass(frozen=True, slots=True)
class DrawBlock:
    """The random inputs of interactions ``start .. start + len(first) - 1``."""

    start: int
    first: np.ndarray
    """PopSGD: first node of the pair; SwarmSGD: the initiator."""
    second: np.ndarray
    """PopSGD: second node; SwarmSGD: the neighbour."""
    local_steps: np.ndarray | None
    """SwarmSGD: H of each interaction."""
    grad_offset: np.ndarray | None
    """SwarmSGD: row of ``grads`` holding the first local step's draw."""
    grads: Tensor
    """Gradient inputs, one row per stochastic gradient (see the module docstring). Valid until
    the next block is drawn when the task fills a reused buffer (``draw(..., out=)``)."""
    offsets: Tensor | None = None
    """Quantized SwarmSGD: rounding offsets [size, 2, d] (X_i's, X_j's) of each draw; also
    refilled by the next block."""

    def __len__(self) -> int:
        return len(self.first)


class DrawSource:
    """Produces the blocks of one run, in order, from ``seed``."""

    def __init__(
        self,
        *,
        algorithm: str,
        nodes: int,
        task: object,
        seed: int,
        device: torch.device,
        topology: Topology | None = None,
        local_steps: LocalSteps | None = None,
        registers: Any = None,
    ) -> None:
        self.algorithm = algorithm
        self.nodes = nodes
        self.task = task
        self.local_steps = local_steps or LocalSteps(1)
        self.host = np.random.Generator(np.random.PCG64(seed))
        self.device_gen = torch.Generator(device=device).manual_seed(seed + 0x5EED)
        self.neighbours = (
            NeighbourSampler(topology or Topology(), nodes) if algorithm == "swarmsgd" else None
        )
        self.registers = registers
        self.next_start = 0
        self.size = block_size(nodes)
        self._fills = "out" in inspect.signature(task.draw).parameters  # type: ignore[attr-defined]
        self._grads: Tensor | None = None
        self._offsets: Tensor | None = None

    def next_block(self) -> DrawBlock:
        rng, size = self.host, self.size
        first = rng.integers(0, self.nodes, size)
        h = offset = None
        if self.neighbours is None:
            second = rng.integers(0, self.nodes, size)
            rows = 2 * size
        else:
            second = self.neighbours.sample(first, rng)
            h = steps_from_uniform(self.local_steps, 1.0 - rng.random(size))
            offset = np.concatenate(([0], np.cumsum(h)[:-1])).astype(np.int64)
            rows = int(h.sum())
        if self._fills:
            # One buffer for all blocks (grown as needed): no fresh pages per block.
            reuse = self._grads if self._grads is not None and len(self._grads) >= rows else None
            grads = self.task.draw(
                rows, self.device_gen, out=None if reuse is None else reuse[:rows]
            )  # type: ignore[attr-defined]
            if reuse is None:
                self._grads = grads
        else:
            grads = self.task.draw(rows, self.device_gen)  # type: ignore[attr-defined]
        offsets = None
        if self.registers is not None:
            offsets = self._offsets = self.registers.draw_offsets(
                size,
                self.task.dim,
                self.device_gen,
                out=self._offsets,  # type: ignore[attr-defined]
            )
        block = DrawBlock(self.next_start, first, second, h, offset, grads, offsets)
        self.next_start += size
        return block
