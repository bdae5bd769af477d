"""The number of local steps H between two interactions (SPEC 2.3)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class LocalSteps:
    """H is either fixed or Geometric on {1, 2, ...} with mean ``mean`` (p = 1/mean)."""

    mean: float
    geometric: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and self.mean >= 1):
            raise ValueError(f"local steps must be a finite number >= 1, got {self.mean}")
        if not self.geometric and self.mean != int(self.mean):
            raise ValueError(f"fixed local steps must be an integer, got {self.mean}")

    def sample(self, rng: random.Random) -> int:
        if not self.geometric or self.mean == 1:
            return int(self.mean)
        p = 1.0 / self.mean
        # Inverse CDF of the geometric law on {1, 2, ...}: P(H > k) = (1 - p)^k.
        u = 1.0 - rng.random()  # in (0, 1]
        return max(1, math.ceil(math.log(u) / math.log1p(-p)))


def steps_from_uniform(steps: LocalSteps, u: np.ndarray) -> np.ndarray:
    """H for many interactions at once from uniforms ``u`` in (0, 1] (the simulator's draws).

    The inverse CDF of :meth:`LocalSteps.sample`, vectorized: for the same ``u`` it returns the
    same H (int64 array of the shape of ``u``).
    """
    if not steps.geometric or steps.mean == 1:
        return np.full(np.shape(u), int(steps.mean), dtype=np.int64)
    p = 1.0 / steps.mean
    h = np.ceil(np.log(u) / math.log1p(-p))
    return np.maximum(h, 1).astype(np.int64)
