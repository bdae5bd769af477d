"""Real data: sets that ship inside installed packages, and readers for standard file formats
the user points to (nothing is downloaded at run time)."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):  # type: ignore[no-untyped-def]
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _sklearn_csv(name: str, *, header: bool = False) -> np.ndarray:
    """One of the CSV files in scikit-learn's wheel (sklearn/datasets/data), features then label
    in each row, read without importing scikit-learn: its import (SciPy included) cost each peer
    1.3 s of CPU and 73 MB at start, for 100 KB of data. ``header``: skip the first line
    (scikit-learn's own "samples,features,class names" line)."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("scikit-learn is not installed: pip install scikit-learn (its "
                                  "wheel carries this data set)")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: this scikit-learn does not ship {name} where 1.x does")
    return np.loadtxt(path, delimiter=",", skiprows=1 if header else 0)


@functools.lru_cache(maxsize=4)
def digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 1,797 8x8 handwritten digits, scaled to [0, 1]: (x_train, y_train, x_test,
    y_test) with x as float32 [N, 64] and y as int64 class labels."""
    rows = _sklearn_csv("digits.csv.gz")
    x = (rows[:, :-1] / 16.0).astype(np.float32)
    xtr, ytr, xte, yte = _split(x, rows[:, -1].astype(np.int64), test_fraction, seed)
    return torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte)


@functools.lru_cache(maxsize=4)
def breast_cancer(test_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's Wisconsin breast cancer set (569 x 30), standardized with the training
    split's statistics; labels as float32 0/1."""
    rows = _sklearn_csv("breast_cancer.csv", header=True)
    xtr, ytr, xte, yte = _split(rows[:, :-1], rows[:, -1].astype(np.int64), test_fraction, seed)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-8
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return f32(xtr), f32(ytr), f32(xte), f32(yte)


IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """An IDX file (the MNIST family's format), gzipped or not, as a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # BadGzipFile is an OSError: named alike
        raise ValueError(f"{path}: the compressed file is truncated or corrupt ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX header announces shape {shape} ({expected} bytes), "
                         f"the file holds {len(raw) - header}; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def find_file(directory: Path, stem: str) -> Path | None:
    """``stem`` or ``stem.gz`` in ``directory``."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def check_subsets(train_subset: int, test_subset: int) -> None:
    """Before the data is read: the sizes :func:`subsets` will cut to are sizes."""
    for name, size in (("train_subset", train_subset), ("test_subset", test_subset)):
        if size < 0:
            raise ValueError(f"task.options.{name} = {size}: must be >= 0 (0: the whole split)")


def subsets(train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], train_subset: int,
            test_subset: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The first ``train_subset`` / ``test_subset`` samples of each split (0: all of it)."""
    check_subsets(train_subset, test_subset)
    if train_subset:
        train = (train[0][:train_subset], train[1][:train_subset])
    if test_subset:
        test = (test[0][:test_subset], test[1][:test_subset])
    return train, test
