"""Fashion-MNIST (70k 28x28 grey images, 10 classes) with a small CNN that has BatchNorm.

The data comes from a folder holding the four standard IDX files (gzipped or not): the
``path`` option, else where Debian's ``dataset-fashion-mnist`` package installs them. Images
stay uint8 in memory (47 MB per peer instead of 188) and are normalized per batch.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from swarmnet.errors import ConfigError
from swarmnet.tasks import Batch, Task, datasets
from swarmnet.tasks.classify import classification_metrics

DEBIAN_PATH = Path("/usr/share/datasets/fashion-mnist")
FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
         "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
MEAN, STD = 0.2860, 0.3530
HOW_TO_GET = (f"install Debian's package (apt-get install dataset-fashion-mnist; files land in "
              f"{DEBIAN_PATH}) or put the four IDX files ({', '.join(FILES.values())}, .gz or not) "
              "from github.com/zalandoresearch/fashion-mnist in a folder and set task.options.path")


def locate(path: str = "") -> Path:
    """The folder holding all four files, or a ConfigError saying how to get them."""
    folder = Path(path).expanduser() if path else DEBIAN_PATH
    missing = [stem for stem in FILES.values() if datasets.find_file(folder, stem) is None]
    if missing:
        raise ConfigError(f"Fashion-MNIST: {folder} lacks {', '.join(missing)}; {HOW_TO_GET}")
    return folder


@functools.lru_cache(maxsize=2)
def load(path: str = "") -> dict[str, Tensor]:
    folder = locate(path)
    arrays = {}
    for key, stem in FILES.items():
        file = datasets.find_file(folder, stem)
        assert file is not None
        try:
            arrays[key] = datasets.read_idx(file)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"Fashion-MNIST: cannot read {file}: {exc}; {HOW_TO_GET}") from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (x.shape[0],):
            raise ConfigError(f"Fashion-MNIST: {split} files hold images {x.shape} and labels {y.shape}, "
                              "expected [N, 28, 28] and [N]")
    return {k: torch.from_numpy(np.array(v, dtype=np.uint8 if k.startswith("x") else np.int64))
            for k, v in arrays.items()}


def normalize(images_u8: Tensor) -> Tensor:
    """uint8 [B, 28, 28] -> float32 [B, 1, 28, 28], standardized with the training set's stats."""
    return ((images_u8.float() / 255.0 - MEAN) / STD).unsqueeze(1)


class FashionCNN(nn.Module):
    """Two conv-BN-ReLU-pool blocks and a two-layer head (about 0.4M parameters at width 32)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def task(path: str = "", width: int = 32, train_subset: int = 0, test_subset: int = 0) -> Task:
    """``train_subset`` / ``test_subset`` > 0 keep the first that many samples (quick runs, tests)."""
    datasets.check_subsets(train_subset, test_subset)
    data = load(path)
    xtr, ytr, xte, yte = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    (xtr, ytr), (xte, yte) = datasets.subsets((xtr, ytr), (xte, yte), train_subset, test_subset)

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(normalize(x)), y)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        return classification_metrics(model, xte, yte, normalize)

    return Task(name="fashion-mnist", build_model=lambda: FashionCNN(width), train=(xtr, ytr), loss=loss,
                evaluate=evaluate, metric="accuracy", higher_is_better=True)
