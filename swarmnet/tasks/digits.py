"""Handwritten digits (scikit-learn, 8x8, 10 classes) with a small MLP: the quickstart task."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from swarmnet.tasks import Batch, Task, datasets
from swarmnet.tasks.classify import classification_metrics


def task(hidden: int = 128, seed: int = 0) -> Task:
    xtr, ytr, xte, yte = datasets.digits(seed=seed)

    def build_model() -> nn.Module:
        return nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def evaluate(model: nn.Module) -> dict[str, float]:
        return classification_metrics(model, xte, yte, prepare=lambda x: x)

    return Task(
        name="digits",
        build_model=build_model,
        train=(xtr, ytr),
        loss=loss,
        evaluate=evaluate,
        metric="accuracy",
        higher_is_better=True,
    )
