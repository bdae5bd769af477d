"""Interaction updates on tensors (SPEC 1.2 step 4, 2.4, 2.9).

Every function works on one model (shape [d]) or on a batch of disjoint pairs (shape [B, d]), so
the simulator's vectorized layers and the daemon run the same arithmetic. ``q_*`` are quantized
values Q(x) (equal to x for full-precision codecs).

Delta form (SPEC 2.9 item 3-4): the daemon never assigns an average; it adds a difference
computed against the version of its own snapshot that the exchange used as key, so updates that
arrive concurrently compose instead of overwriting each other.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pop_average(x_i: Tensor, x_j: Tensor) -> Tensor:
    """PopSGD's pairwise average (SPEC 1.2 step 4): both sides take (x_i + x_j) / 2."""
    return 0.5 * (x_i + x_j)


def swarm_interaction(q_i: Tensor, q_j: Tensor, delta_i: Tensor) -> tuple[Tensor, Tensor]:
    """SwarmSGD's interaction (SPEC 2.4): new (X_i, X_j) given Q(X_i), Q(X_j) and the
    initiator's accumulated local update delta_i = stale_i - live_i."""
    average = 0.5 * (q_i + q_j)
    return average - delta_i, average


def pull_gap(q_remote: Tensor, q_own: Tensor, own: Tensor, out: Tensor | None = None) -> Tensor:
    """``q_remote + q_own - 2 own``: twice what the initiator adds to its live model after
    pulling (SPEC 2.9 item 3, delta form); :func:`apply_pull` adds half of it.

    With the own snapshot ``own`` (exact) and its published quantization ``q_own``:
    ``C <- Q(C)/2 + Q(C_j)/2 - (stale - live)`` becomes ``live += (q_remote + q_own)/2 - own``.
    The halving is left to the add that applies the gap, where it costs nothing, so building the
    gap takes one pass over the model for a lossless codec (Q(K) = K) and two for a lossy one.
    """
    if q_own is own:
        return torch.sub(q_remote, own, out=out)
    out = torch.add(q_remote, q_own, out=out)
    return out.sub_(own, alpha=2)


def apply_pull(live: Tensor, gap: Tensor) -> Tensor:
    """``live += gap / 2`` in place, one pass: the merge of a pull (see :func:`pull_gap`)."""
    return live.add_(gap, alpha=0.5)


def apply_nudge(q_initiator: Tensor, q_used: Tensor, out: Tensor | None = None) -> Tensor:
    """Symmetric mode (SPEC 2.9 item 4): what the neighbour adds to its model,
    ``(Q(C_i) - Q(C_j used)) / 2``. Added in delta form, it composes under concurrency."""
    out = torch.sub(q_initiator, q_used, out=out)
    return out.mul_(0.5)


def consensus_distance(models: Tensor, mean: Tensor | None = None) -> float:
    """sqrt(Gamma / n) with Gamma = sum_i ||X_i - mu||^2, for models stacked as [n, d];
    ``mean``: mu in float64, where the caller has it already."""
    if mean is None:
        mean = models.mean(dim=0, dtype=torch.float64)
    gamma = torch.sub(models, mean).pow_(2).sum()  # in float64, with no float64 copy of the models first
    return float(torch.sqrt(gamma / models.shape[0]))
