"""Learning-rate schedules and the epoch multiplier.

- ``constant``: eta.
- ``popsgd``: eta0 / (1 + V / V0) read from the peer's phase clock V (SPEC 1.3: the per-node
  reading of b / (nV + a), with eta0 = b / a and V0 = a / n). No linear scaling with n.
- ``multistep``: eta * gamma^(number of milestones passed), milestones in local steps.
- ``cosine``: cosine decay from eta to eta * final_ratio over the whole budget.
All of them take an optional linear warm-up over ``warmup_steps`` local steps.

The epoch multiplier (SPEC 1.4, 2.7): a swarm of n peers keeps the sequential recipe and trains
each model for ``mult * E_seq / n`` epochs, with the milestones scaled by the same factor.
"""

from __future__ import annotations

import bisect
import math
import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from torch import Tensor

ClockT = TypeVar("ClockT", int, float, "Tensor")

SCHEDULES = ("constant", "popsgd", "multistep", "cosine")


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule:
    kind: str = "constant"
    lr: float = 0.1
    """Base rate (eta0 for popsgd)."""
    clock_scale: float = 100.0
    """V0 of the popsgd schedule, in clock ticks."""
    milestones: tuple[int, ...] = ()
    """Local steps at which multistep multiplies the rate by gamma."""
    gamma: float = 0.1
    total_steps: int = 0
    """Budget in local steps, for cosine."""
    final_ratio: float = 0.0
    warmup_steps: int = 0
    _sorted: tuple[int, ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}")
        if self.lr < 0 or not math.isfinite(self.lr):
            raise ValueError(f"learning rate must be finite and >= 0, got {self.lr}")
        if self.clock_scale <= 0:
            raise ValueError(f"clock_scale (V0) must be > 0, got {self.clock_scale}")
        if self.kind == "cosine" and self.total_steps <= 0:
            raise ValueError("the cosine schedule needs a step budget (total_steps > 0)")
        object.__setattr__(self, "_sorted", tuple(sorted(self.milestones)))

    def __call__(self, step: int, clock: int = 0) -> float:
        """Rate for local step ``step`` (0-based) at phase clock ``clock``."""
        if self.kind == "constant":
            rate = self.lr
        elif self.kind == "popsgd":
            rate = clock_rate(self.lr, self.clock_scale, clock)
        elif self.kind == "multistep":
            rate = self.lr * self.gamma ** bisect.bisect_right(self._sorted, step)
        else:
            progress = min(1.0, step / self.total_steps)
            low = self.lr * self.final_ratio
            rate = low + 0.5 * (self.lr - low) * (1.0 + math.cos(math.pi * progress))
        if self.warmup_steps and step < self.warmup_steps:
            rate *= (step + 1) / self.warmup_steps
        return rate


def clock_rate(lr: float, clock_scale: float, clock: ClockT) -> ClockT:
    """PopSGD's per-node rate eta0 / (1 + V / V0) (SPEC 1.3) for one clock or a tensor of clocks.

    The single place the formula lives: :class:`Schedule` calls it for one peer, the simulator
    for a float64 tensor of clocks. Both branches do the same two IEEE divisions and one
    addition (torch would otherwise divide by a scalar through its reciprocal), so they give
    identical values.
    """
    if isinstance(clock, numbers.Real):
        return lr / (1.0 + clock / clock_scale)
    import torch  # a tensor of clocks: torch is already loaded by whoever made it

    if not clock.is_floating_point():  # full_like would keep an integer dtype: V0 truncated, eta0 0
        clock = clock.double()
    ratio = clock / torch.full_like(clock, clock_scale)
    return torch.full_like(clock, lr) / (ratio + 1.0)


def compress_epochs(
    sequential_epochs: float, milestones: tuple[float, ...], multiplier: float, peers: int
) -> tuple[float, tuple[float, ...]]:
    """Per-peer epochs and milestones (in epochs) for a swarm of ``peers`` (SPEC 1.4, 2.7)."""
    if peers < 1 or multiplier <= 0:
        raise ValueError("peers must be >= 1 and the multiplier > 0")
    factor = multiplier / peers
    return sequential_epochs * factor, tuple(m * factor for m in milestones)
