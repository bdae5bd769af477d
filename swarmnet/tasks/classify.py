"""Helpers shared by the image-classification tasks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@torch.no_grad()
def classification_metrics(model: nn.Module, x: Tensor, y: Tensor, prepare: Callable[[Tensor], Tensor],
                           chunk: int = 1000) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y) in chunks; ``prepare`` turns raw
    stored samples (e.g. uint8 images) into model input on the model's device."""
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(x), chunk):
        xb, yb = prepare(x[start : start + chunk].to(device)), y[start : start + chunk].to(device)
        logits = model(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    n = max(1, len(x))
    return {"loss": float(loss_sum) / n, "accuracy": int(correct) / n}  # CPU<->GPU sync point
