"""Write Fashion-MNIST as a CIFAR-10 "python version" folder, to run the CIFAR ResNet task on
real images where CIFAR-10 itself is not at hand (it is never downloaded).

Each 28x28 grey image is zero-padded to 32x32 and repeated over three channels; the 60,000
training images go to data_batch_1..5, the 10,000 test images to test_batch.

    python examples/fashion_as_cifar.py /tmp/fashion-cifar [--fashion PATH]
    swarmnet up --config configs/cifar-resnet.toml --set 'task.options={"path": "/tmp/fashion-cifar"}'
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

from swarmnet.tasks import cifar, fashion


def as_cifar(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> uint8 [N, 3072], the CIFAR row layout (channel, row, column)."""
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[:, None], 3, axis=1).reshape(len(images), 3072)


def write(folder: Path, fashion_path: str = "") -> None:
    data = fashion.load(fashion_path)
    folder.mkdir(parents=True, exist_ok=True)
    x_train, y_train = data["x_train"].numpy(), data["y_train"].numpy()
    batches = np.array_split(np.arange(len(x_train)), len(cifar.TRAIN_FILES))
    files = [(name, x_train[i], y_train[i]) for name, i in zip(cifar.TRAIN_FILES, batches)]
    files.append((cifar.TEST_FILE, data["x_test"].numpy(), data["y_test"].numpy()))
    for name, x, y in files:
        batch = {b"batch_label": name.encode(), b"labels": y.tolist(), b"data": as_cifar(x)}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=4)
        print(f"{folder / name}: {len(y)} images")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--fashion", default="", help="the Fashion-MNIST IDX folder (default: Debian's)")
    args = parser.parse_args()
    write(args.folder, args.fashion)
