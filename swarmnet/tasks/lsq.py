"""Synthetic least squares (SPEC 1.5): f(x) = 1/(2m) ||A x - b||^2, A and x* ~ N(0, 1),
b = A x* + N(0, noise^2). Evaluation reports the excess loss f(x) - f(x_opt) on the training
objective (the quantity the PopSGD analysis bounds)."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from swarmnet.tasks import Batch, Task


@functools.lru_cache(maxsize=8)
def make_problem(samples: int, dim: int, noise: float, seed: int) -> tuple[Tensor, Tensor, Tensor, float]:
    """(A [m, d], b [m], x_opt [d], f(x_opt)) for the given seed, float64."""
    if samples < 1 or dim < 1:
        raise ValueError(f"samples and dim must be >= 1, got samples={samples}, dim={dim}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise}")
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(samples, dim, generator=gen, dtype=torch.float64)
    x_true = torch.randn(dim, generator=gen, dtype=torch.float64)
    b = a @ x_true + noise * torch.randn(samples, generator=gen, dtype=torch.float64)
    x_opt = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
    f_opt = float(0.5 * (a @ x_opt - b).pow(2).mean())
    return a, b, x_opt, f_opt


def objective(a: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """f(x) for x of shape [d] or a batch of models [n, d] (returns [n])."""
    residual = x.to(a.dtype) @ a.T - b
    return 0.5 * residual.pow(2).mean(dim=-1)


def task(samples: int = 10_000, dim: int = 32, noise: float = 1.0, seed: int = 0, init_scale: float = 0.0) -> Task:
    """``init_scale`` > 0 draws the initial model from N(0, init_scale^2) (under the seed the
    runtime sets) instead of starting at zero."""
    a, b, _, f_opt = make_problem(samples, dim, noise, seed)

    def build_model() -> nn.Module:
        model = nn.Linear(dim, 1, bias=False)
        with torch.no_grad():
            model.weight.normal_(0.0, init_scale) if init_scale > 0 else model.weight.zero_()
        return model

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return 0.5 * (model(x).squeeze(1) - y).pow(2).mean()

    def evaluate(model: nn.Module) -> dict[str, float]:
        weight = model.weight.detach().double().reshape(-1).cpu()  # a peer's own device, a GPU where it has one
        value = float(objective(a, b, weight))
        return {"loss": value, "excess_loss": value - f_opt}

    return Task(
        name="lsq",
        build_model=build_model,
        train=(a.float(), b.float()),
        loss=loss,
        evaluate=evaluate,
        metric="excess_loss",
    )
