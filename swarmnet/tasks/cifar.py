"""CIFAR-10-format data (the "python version": pickled batches) with a ResNet for CIFAR.

``path`` is a folder holding ``data_batch_1`` ... ``data_batch_5`` (any that exist) and
``test_batch``, each a pickled dict with ``data`` (uint8 [N, 3072], channel-major 32x32) and
``labels`` (or ``fine_labels``). Nothing is downloaded; the pickles are read with an unpickler
that accepts only plain containers and numpy arrays, so a hostile file cannot run code.
The model is the CIFAR ResNet of He et al. (3 stages of ``blocks`` basic blocks, widths w, 2w, 4w;
blocks=3 is ResNet-20) with BatchNorm; training batches get random crops and flips.
"""

from __future__ import annotations

import functools
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from swarmnet.errors import ConfigError
from swarmnet.tasks import Batch, Task, datasets
from swarmnet.tasks.classify import classification_metrics

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
_ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not CIFAR data")
        return super().find_class(module, name)


def read_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 3, 32, 32], labels int64 [N]) from one pickled CIFAR batch."""
    try:
        raw = _DataUnpickler(io.BytesIO(file.read_bytes()), encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ConfigError(f"{file}: not a readable CIFAR batch ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a pickled dict, got {type(raw).__name__}")
    get = lambda key: raw.get(key.encode(), raw.get(key))  # noqa: E731
    data, labels = get("data"), get("labels")
    if labels is None:
        labels = get("fine_labels")
    data = np.asarray(data) if data is not None else None
    if data is None or labels is None or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ConfigError(f"{file}: expected 'data' as uint8 [N, 3072] and 'labels' (CIFAR python format)")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise ConfigError(f"{file}: {data.shape[0]} images but {labels.shape} labels")
    return data.reshape(-1, 3, 32, 32), labels


@functools.lru_cache(maxsize=2)
def load(path: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if not path:
        raise ConfigError("the CIFAR task needs task.options.path: a folder with data_batch_1..5 and "
                          "test_batch (the CIFAR-10 'python version'); nothing is downloaded")
    folder = Path(path).expanduser()
    train = [folder / f for f in TRAIN_FILES if (folder / f).is_file()]
    if not train or not (folder / TEST_FILE).is_file():
        raise ConfigError(f"{folder}: needs data_batch_1 (up to data_batch_5) and test_batch, the "
                          "CIFAR-10 'python version' files; unpack cifar-10-python.tar.gz there, or point "
                          "task.options.path (--set task.options.path=DIR) to where they are; without "
                          "CIFAR-10, `python examples/fashion_as_cifar.py DIR` writes Fashion-MNIST in that format")
    parts = [read_batch(f) for f in train]
    x_test, y_test = read_batch(folder / TEST_FILE)
    classes = int(max(max(p[1].max() for p in parts), y_test.max())) + 1
    if classes > 100:
        raise ConfigError(f"{folder}: labels up to {classes - 1}; expected class indices")
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return x, y, torch.from_numpy(x_test.copy()), torch.from_numpy(y_test)


def normalize(images_u8: Tensor) -> Tensor:
    mean = torch.tensor(MEAN, device=images_u8.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images_u8.device).view(1, 3, 1, 1)
    return (images_u8.float() / 255.0 - mean) / std


def augment(x: Tensor) -> Tensor:
    """Random crops (4-pixel zero padding) and horizontal flips, one draw per image."""
    b = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (2, b), device=x.device)
    rows = (dy.view(b, 1) + torch.arange(32, device=x.device)).view(b, 1, 32, 1).expand(b, x.shape[1], 32, 40)
    out = padded.gather(2, rows)
    cols = (dx.view(b, 1) + torch.arange(32, device=x.device)).view(b, 1, 1, 32).expand(b, x.shape[1], 32, 32)
    out = out.gather(3, cols)
    flip = torch.rand(b, device=x.device) < 0.5
    return torch.where(flip.view(b, 1, 1, 1), out.flip(3), out)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks: int = 3, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers: list[nn.Module] = []
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(blocks):
                layers.append(BasicBlock(cin, cout, 2 if stage and i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def task(path: str = "", blocks: int = 3, width: int = 16, train_subset: int = 0, test_subset: int = 0,
         augmentation: bool = True) -> Task:
    datasets.check_subsets(train_subset, test_subset)
    xtr, ytr, xte, yte = load(path)
    (xtr, ytr), (xte, yte) = datasets.subsets((xtr, ytr), (xte, yte), train_subset, test_subset)
    classes = max(10, int(max(ytr.max(), yte.max())) + 1)

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        x = augment(x) if augmentation and model.training else x
        return F.cross_entropy(model(normalize(x)), y)

    def evaluate(model: nn.Module) -> dict[str, float]:
        return classification_metrics(model, xte, yte, normalize)

    return Task(name="cifar-resnet", build_model=lambda: CifarResNet(blocks, width, classes), train=(xtr, ytr),
                loss=loss, evaluate=evaluate, metric="accuracy", higher_is_better=True)
