"""The population-model runners: exact sequential semantics, applied one pair at a time or
one layer of disjoint pairs at a time.

Legend: n nodes, d coordinates, B interactions in a batch (one layer, or 1 in the naive loop).

State on one device: models X [n, d]; SwarmSGD also keeps the stale copies X_hat [n, d]
(SPEC 2.2); PopSGD the phase clocks V [n]; both count local SGD steps per node.

One interaction, as the batch functions :meth:`Engine._apply_popsgd` and
:meth:`Engine._apply_swarmsgd` do it for B disjoint interactions at once:

- PopSGD (SPEC 1.2): read both clocks, take the rates eta0 / (1 + V / V0) **from the clocks
  before the exchange** (the paper leaves it open; we read them before), move exactly one
  clock (:func:`~swarmnet.algorithms.clock.clock_exchange_many`), one local SGD step at each
  node with its own fresh sample, then both take the pairwise average
  (:func:`~swarmnet.algorithms.averaging.pop_average`). A drawn self-pair (probability 1/n) is
  dropped: no clock move, no step, no averaging (it still counts as a draw). With n = 1 every
  draw is one sequential SGD step of the only node.
- SwarmSGD (SPEC 2.4): the initiator's H local steps start from its stale copy X_hat_i, one
  fresh sample each; Delta_i = X_hat_i - y_H; then
  (X_i, X_j) <- :func:`~swarmnet.algorithms.averaging.swarm_interaction` (Q(X_i), Q(X_j),
  Delta_i) and X_hat_i <- X_i. Q is the identity, or the lattice quantizer with each side
  reading the other with its own model as key (:mod:`.registers`, SPEC 3.4). With n = 1 the
  node averages with itself, i.e. X <- X_hat - Delta, and nothing is quantized.

Computing Delta_i at the moment of the interaction is exact: X_hat_i changes only when i
initiates, and the local steps' samples are pre-drawn per interaction (:mod:`.draws`).

Drivers: ``naive`` runs every draw as a batch of one, in order (the reference and the
benchmark baseline); ``vectorized`` assigns each window of draws to layers (:mod:`.layers`)
and runs one batch per layer. Both call the same batch functions with the same random inputs,
and every kernel involved computes row k from row k's inputs alone, so the two give bit-for-bit
the same models on a CPU (tested). Nothing in a layer reads a device value back to the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from swarmnet.algorithms.averaging import consensus_distance, pop_average, swarm_interaction
from swarmnet.algorithms.clock import clock_exchange_many
from swarmnet.algorithms.local_steps import LocalSteps
from swarmnet.algorithms.schedules import clock_rate
from swarmnet.algorithms.topology import Topology
from swarmnet.errors import ConfigError
from swarmnet.sim.draws import DrawBlock, DrawSource
from swarmnet.sim.errors import SettingError
from swarmnet.sim.layers import assign_layers, layer_bounds
from swarmnet.sim.registers import LatticeRegisters

ALGORITHMS = ("popsgd", "swarmsgd", "minibatch")
CODECS = ("none", "lattice")



@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    algorithm: str = "popsgd"
    """popsgd, swarmsgd, or minibatch (sequential SGD with batch n x B, the SPEC 1.5 baseline)."""
    nodes: int = 8
    lr: float = 0.01
    """eta0 (constant rate unless ``lr_clock_scale`` is set)."""
    lr_clock_scale: float | None = None
    """V0 of PopSGD's eta0 / (1 + V / V0) on each node's phase clock (minibatch: on its step)."""
    topology: Topology = field(default_factory=Topology)
    """SwarmSGD only: who may be picked as neighbour."""
    local_steps: LocalSteps = field(default_factory=lambda: LocalSteps(1))
    """SwarmSGD only: H, fixed or geometric."""
    codec: str = "none"
    """SwarmSGD only: ``none`` (Q = identity) or ``lattice`` (:mod:`.registers`)."""
    lattice_eps: float | None = None
    """Lattice step; None means the SPEC 3.4 reference eta * H * 6 / 11."""
    rounding: str = "stochastic"
    """Lattice rounding: stochastic or dither (SPEC 3.2)."""
    seed: int = 0
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    naive: bool = False
    """Run every draw on its own, in order, instead of layer by layer."""

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(
                f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}"
            )
        if self.nodes < 1:
            raise ConfigError(f"nodes must be >= 1, got {self.nodes}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise SettingError("lr", "lr", f"must be a finite number >= 0, got {self.lr}")
        if self.lr_clock_scale is not None and not (math.isfinite(self.lr_clock_scale) and self.lr_clock_scale > 0):
            raise SettingError("lr_clock_scale", "lr decay clock scale",
                               f"V0 must be a finite number > 0, got {self.lr_clock_scale}")
        if self.lr_clock_scale is not None and self.algorithm == "swarmsgd":
            raise ConfigError(
                "the clock-based rate decay is PopSGD's; SwarmSGD runs a constant rate"
            )
        if self.codec not in CODECS:
            raise SettingError("codec", "codec", f"must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.codec != "none" and self.algorithm != "swarmsgd":
            raise ConfigError("quantized registers are simulated for SwarmSGD only (SPEC 2.5)")
        self.registers()  # the lattice step is checked here, also for n = 1, which never reads one

    def registers(self) -> LatticeRegisters | None:
        if self.codec == "none":
            return None
        if self.lattice_eps is not None:
            return LatticeRegisters(self.lattice_eps, self.rounding)
        eps = self.lr * self.local_steps.mean * 6 / 11
        if not eps > 0:
            raise ConfigError(f"the lattice step eps = lr x H x 6 / 11 is {eps:g}: give --lr > 0, or set --lattice-eps")
        return LatticeRegisters(eps, self.rounding)


class Engine:
    """PopSGD or SwarmSGD on n simulated nodes; :meth:`advance` runs draws, the properties and
    :meth:`observe` read the state."""

    def __init__(self, config: EngineConfig, task: Any) -> None:
        if config.algorithm == "minibatch":
            raise ConfigError("use MiniBatchSGD for the minibatch baseline")
        self.config = config
        self.n = config.nodes
        self.device = torch.device(config.device)
        self.task = task.to(self.device, config.dtype)
        init_gen = torch.Generator(device=self.device).manual_seed(config.seed + 0x1417)
        self.models = self.task.init(self.n, init_gen).to(self.device, config.dtype).contiguous()
        self.swarm = config.algorithm == "swarmsgd"
        self.stale = self.models.clone() if self.swarm else None
        self.clocks = torch.zeros(self.n, dtype=torch.int64, device=self.device)
        self.steps = torch.zeros(self.n, dtype=torch.int64, device=self.device)
        self.draws = 0
        self.interactions = 0
        self.batches = 0
        """Batches applied: layers (vectorized) or single interactions (naive)."""
        self.registers = config.registers() if self.n > 1 else None  # n = 1 never communicates
        self._bits_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._bits_max = torch.zeros((), dtype=torch.int64, device=self.device)
        self._reads = 0
        self.source = DrawSource(
            algorithm=config.algorithm,
            nodes=self.n,
            task=self.task,
            seed=config.seed,
            device=self.device,
            topology=config.topology,
            local_steps=config.local_steps,
            registers=self.registers,
        )
        self._block: DrawBlock | None = None
        self._cursor = 0

    # ---------------------------------------------------------------- driving

    def advance(self, draws: int) -> None:
        """Run the next ``draws`` draws (interactions, self-pairs included) of the sequence."""
        while draws > 0:
            if self._block is None or self._cursor == len(self._block):
                self._block = self.source.next_block()
                self._cursor = 0
            stop = min(self._cursor + draws, len(self._block))
            if self.config.naive:
                self._run_naive(self._block, self._cursor, stop)
            else:
                self._run_layers(self._block, self._cursor, stop)
            draws -= stop - self._cursor
            self.draws += stop - self._cursor
            self._cursor = stop

    def _window(self, block: DrawBlock, start: int, stop: int) -> tuple[np.ndarray, ...]:
        """The applied interactions of draws start..stop-1 of the block: (first, second, t)."""
        first, second = block.first[start:stop], block.second[start:stop]
        t = np.arange(start, stop)
        if self.n > 1 and not self.swarm:
            keep = first != second  # PopSGD drops self-pairs
            first, second, t = first[keep], second[keep], t[keep]
        self.interactions += len(t)
        return first, second, t

    def _run_naive(self, block: DrawBlock, start: int, stop: int) -> None:
        for i, j, t in zip(*(a.tolist() for a in self._window(block, start, stop)), strict=True):
            self.batches += 1
            if self.swarm:
                assert block.local_steps is not None and block.grad_offset is not None
                h = int(block.local_steps[t])
                self._apply_swarmsgd(
                    block,
                    self._tensor([i]),
                    self._tensor([j]),
                    self._tensor([t]),
                    self._tensor([int(block.grad_offset[t])]),
                    self._tensor([h]),
                    [1] * h,
                )
            elif self.n == 1:
                self._apply_popsgd(block, self._tensor([i]), self._tensor([2 * t]))
            else:
                self._apply_popsgd(block, self._tensor([i, j]), self._tensor([2 * t, 2 * t + 1]))

    def _run_layers(self, block: DrawBlock, start: int, stop: int) -> None:
        first, second, t = self._window(block, start, stop)
        if len(t) == 0:
            return
        layer = assign_layers(first, second, self.n) if self.n > 1 else np.arange(len(t))
        self.batches += int(layer.max()) + 1
        if self.swarm:
            assert block.local_steps is not None and block.grad_offset is not None
            h = block.local_steps[t]
            # Inside a layer the order is free (disjoint pairs commute): sort by H descending so
            # the nodes still stepping in local round q are always a prefix.
            order = np.lexsort((np.arange(len(t)), -h, layer))
            h = h[order]
            bounds = layer_bounds(layer[order])
            first_d = self._tensor(first[order])
            second_d = self._tensor(second[order])
            at_d = self._tensor(t[order])
            offset_d = self._tensor(block.grad_offset[t][order])
            h_d = self._tensor(h)
            for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
                rounds = _active_counts(h[a:b])
                self._apply_swarmsgd(
                    block, first_d[a:b], second_d[a:b], at_d[a:b], offset_d[a:b], h_d[a:b], rounds
                )
            return
        order = np.argsort(layer, kind="stable")
        bounds = layer_bounds(layer[order])
        t = t[order]
        if self.n == 1:
            rows, grad_rows, width = first[order], 2 * t, 1
        else:
            rows = np.stack((first[order], second[order]), 1).reshape(-1)
            grad_rows = np.stack((2 * t, 2 * t + 1), 1).reshape(-1)
            width = 2
        rows_d, grad_rows_d = self._tensor(rows), self._tensor(grad_rows)
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            self._apply_popsgd(
                block, rows_d[width * a : width * b], grad_rows_d[width * a : width * b]
            )

    def _tensor(self, values: Any) -> Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.int64)).to(
            self.device, non_blocking=True
        )

    # ------------------------------------------------------- one batch of interactions

    def _apply_popsgd(self, block: DrawBlock, rows: Tensor, grad_rows: Tensor) -> None:
        """B disjoint PopSGD interactions; ``rows`` = [i_1, j_1, i_2, j_2, ...] ([i] for n = 1)."""
        x = self.models.index_select(0, rows)
        clocks = self.clocks.index_select(0, rows)  # before the exchange: they set the rates
        g = self.task.grad(x, block.grads.index_select(0, grad_rows))
        if self.n == 1:
            moves = clock_exchange_many(clocks, clocks)[0]
        else:
            moves = torch.stack(clock_exchange_many(clocks[0::2], clocks[1::2]), 1).view(-1)
        self.clocks.index_add_(0, rows, moves)
        x = x - g * self._rate(clocks)
        if self.n > 1:
            average = pop_average(x[0::2], x[1::2])
            x = torch.stack((average, average), 1).view_as(x)
        self.models.index_copy_(0, rows, x)
        self.steps.index_add_(0, rows, torch.ones_like(rows))

    def _apply_swarmsgd(
        self,
        block: DrawBlock,
        first: Tensor,
        second: Tensor,
        at: Tensor,
        grad_start: Tensor,
        local_steps: Tensor,
        rounds: list[int],
    ) -> None:
        """B disjoint SwarmSGD interactions (draws ``at`` of the block), sorted by H
        descending; ``rounds[q]`` = how many of them take a local step in round q (H > q)."""
        assert self.stale is not None
        stale = self.stale.index_select(0, first)
        live = stale.clone()
        for q, active in enumerate(rounds):
            draws = block.grads.index_select(0, grad_start[:active] + q)
            g = self.task.grad(live[:active], draws)
            live[:active] -= g * self.config.lr
        delta = stale - live
        x_i = self.models.index_select(0, first)
        x_j = self.models.index_select(0, second)
        if self.registers is None:
            new_i, new_j = swarm_interaction(x_i, x_j, delta)
        else:
            assert block.offsets is not None
            reads = self.registers.exchange(x_i, x_j, block.offsets.index_select(0, at))
            new_i = swarm_interaction(reads.own_i, reads.read_by_i, delta)[0]
            new_j = swarm_interaction(reads.read_by_j, reads.own_j, delta)[1]
            self._bits_sum += reads.bits.sum()
            self._bits_max = torch.maximum(self._bits_max, reads.bits.max())
            self._reads += len(reads.bits)
        self.models.index_copy_(0, second, new_j)
        self.models.index_copy_(0, first, new_i)  # after j's: with n = 1, i and j coincide
        self.stale.index_copy_(0, first, new_i)
        self.steps.index_add_(0, first, local_steps)

    def _rate(self, clocks: Tensor) -> Tensor | float:
        scale = self.config.lr_clock_scale
        if scale is None:
            return self.config.lr
        return clock_rate(self.config.lr, scale, clocks.double()).to(self.models.dtype).unsqueeze(1)

    # ---------------------------------------------------------------- reading

    def observe(self, node: int = 0) -> dict[str, float]:
        """Curve point: losses of one node and of the mean model, consensus distance, clocks.

        ``time`` = interactions per node (2 x applied / n; applied for n = 1): each node's
        average number of local SGD steps for PopSGD. ``parallel_time`` = draws / n (SPEC 1.1).
        """
        mean = self.models.mean(dim=0, dtype=torch.float64)
        both = torch.stack((self.models[node].double(), mean))
        metrics = self.task.metrics(both)
        point: dict[str, float] = {
            "draws": float(self.draws),
            "interactions": float(self.interactions),
            "parallel_time": self.draws / self.n,
            "time": self.interactions * (2.0 / self.n if self.n > 1 else 1.0),
            "node_steps": float(self.steps[node]),
            "consensus": consensus_distance(self.models, mean),
        }
        for key, value in metrics.items():
            point[f"{key}_node"] = float(value[0])
            point[f"{key}_mean"] = float(value[1])
        if self.registers is not None:
            # Both sides of an interaction read b planes: mean and max per coordinate and read,
            # over the interactions since the previous curve point.
            point["bits_mean"] = (
                float(self._bits_sum) / self._reads if self._reads else float("nan")
            )
            point["bits_max"] = float(self._bits_max) if self._reads else float("nan")
            self._bits_sum.zero_()
            self._bits_max.zero_()
            self._reads = 0
        if not self.swarm:
            clocks = self.clocks.double()
            point["clock_sum"] = float(self.clocks.sum())
            point["clock_dev"] = float((clocks - self.interactions / self.n).abs().max())
            point["clock_spread"] = float(clocks.max() - clocks.min())
        return point


def _active_counts(h_desc: np.ndarray) -> list[int]:
    """For H sorted descending: [#(H > 0), #(H > 1), ...] up to max H."""
    if len(h_desc) == 0:
        return []
    q = np.arange(int(h_desc[0]))
    return np.searchsorted(-h_desc, -q, side="left").tolist()


class MiniBatchSGD:
    """Sequential mini-batch SGD with batch n x B: the SPEC 1.5 baseline PopSGD is compared
    with. One draw = one step of the single model on n fresh gradient inputs."""

    def __init__(self, config: EngineConfig, task: Any) -> None:
        self.config = config
        self.n = config.nodes
        self.device = torch.device(config.device)
        self.task = task.to(self.device, config.dtype)
        init_gen = torch.Generator(device=self.device).manual_seed(config.seed + 0x1417)
        self.models = self.task.init(1, init_gen).to(self.device, config.dtype)
        self.gen = torch.Generator(device=self.device).manual_seed(config.seed + 0x5EED)
        self.draws = 0

    def advance(self, draws: int) -> None:
        for _ in range(draws):
            inputs = self.task.draw(self.n, self.gen)
            g = self.task.grad(self.models.expand(self.n, -1), inputs).mean(dim=0, keepdim=True)
            rate: float = self.config.lr
            if self.config.lr_clock_scale is not None:
                rate = clock_rate(self.config.lr, self.config.lr_clock_scale, self.draws)
            self.models = self.models - g * rate
            self.draws += 1

    def observe(self, node: int = 0) -> dict[str, float]:
        metrics = self.task.metrics(self.models)
        point = {
            "draws": float(self.draws),
            "interactions": float(self.draws),
            "parallel_time": float(self.draws),
            "time": float(self.draws),
            "node_steps": float(self.draws),
            "consensus": 0.0,
        }
        for key, value in metrics.items():
            point[f"{key}_node"] = point[f"{key}_mean"] = float(value[0])
        return point


def make_engine(config: EngineConfig, task: Any) -> Engine | MiniBatchSGD:
    return MiniBatchSGD(config, task) if config.algorithm == "minibatch" else Engine(config, task)
