"""Logistic regression on the Wisconsin breast cancer data (convex, real, ships with sklearn)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from swarmnet.tasks import Batch, Task, datasets


def check_l2(l2: float) -> None:
    if not (math.isfinite(l2) and l2 >= 0):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2}")


def task(l2: float = 1e-3, seed: int = 0) -> Task:
    check_l2(l2)
    xtr, ytr, xte, yte = datasets.breast_cancer(seed=seed)

    def build_model() -> nn.Module:
        model = nn.Linear(xtr.shape[1], 1)
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
        return model

    def regularized(model: nn.Module, logits: Tensor, y: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, y) + 0.5 * l2 * model.weight.pow(2).sum()

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return regularized(model, model(x).squeeze(1), y)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        device = model.weight.device  # a peer's own, a GPU where it has one
        x_test, y_test = xte.to(device), yte.to(device)
        logits = model(x_test).squeeze(1)
        return {
            "loss": float(regularized(model, logits, y_test)),
            "accuracy": float(((logits > 0).float() == y_test).float().mean()),
            "train_loss": float(regularized(model, model(xtr.to(device)).squeeze(1), ytr.to(device))),
        }

    return Task(
        name="logreg",
        build_model=build_model,
        train=(xtr, ytr),
        loss=loss,
        evaluate=evaluate,
        metric="accuracy",
        higher_is_better=True,
    )
