"""The bundled real-data tasks: Fashion-MNIST (Debian's package or a folder) and CIFAR-format
pickles, at small size; the Fashion-MNIST swarm runs as real processes."""

import gzip
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from swarmnet.config import load_config
from swarmnet.errors import ConfigError
from swarmnet.tasks import cifar, datasets, fashion, load_task, textlm

FASHION_MISSING = None
try:
    fashion.locate()
except ConfigError as exc:
    FASHION_MISSING = f"Fashion-MNIST data absent ({exc})"
needs_fashion = pytest.mark.skipif(FASHION_MISSING is not None, reason=FASHION_MISSING or "")


@pytest.mark.parametrize("name", ["fashion-cnn", "cifar-resnet", "textlm"])
def test_bundled_configs_name_importable_tasks(name):
    cfg = load_config(f"configs/{name}.toml")
    module, _, func = cfg.task.spec.partition(":")
    assert callable(getattr(__import__(module, fromlist=[func]), func))


def test_missing_fashion_data_says_how_to_get_it(tmp_path):
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist.*task.options.path"):
        fashion.task(path=str(tmp_path))


def test_idx_reader_round_trip_and_truncation(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    header = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in images.shape)
    (tmp_path / "x.gz").write_bytes(gzip.compress(header + images.tobytes()))
    assert np.array_equal(datasets.read_idx(tmp_path / "x.gz"), images)
    (tmp_path / "short").write_bytes(header + images.tobytes()[:-5])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        datasets.read_idx(tmp_path / "short")
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX file"):
        datasets.read_idx(tmp_path / "text")
    whole = gzip.compress(header + images.tobytes())
    for name, content in (("cut.gz", whole[:-20]), ("flipped.gz", whole[:30] + bytes([whole[30] ^ 0xFF]) + whole[31:])):
        (tmp_path / name).write_bytes(content)  # a download cut short, a bit flipped on disk
        with pytest.raises(ValueError, match="compressed file is truncated or corrupt"):
            datasets.read_idx(tmp_path / name)


def test_a_negative_subset_size_is_a_config_error_naming_it():
    xtr, ytr = torch.zeros(10, 2), torch.zeros(10)
    train, test = datasets.subsets((xtr, ytr), (xtr[:4], ytr[:4]), 3, 0)
    assert len(train[0]) == len(train[1]) == 3 and len(test[0]) == 4  # 0: the whole split
    with pytest.raises(ValueError, match=r"task.options.test_subset = -100: must be >= 0"):
        datasets.subsets((xtr, ytr), (xtr, ytr), 0, -100)  # sliced from the end: a test set of one sample


def test_bundled_sklearn_sets_are_read_as_sklearn_loads_them_without_importing_it():
    """The digits and breast cancer tasks read the CSVs in scikit-learn's wheel directly (a peer
    then starts without scikit-learn's import); the values are scikit-learn's own."""
    code = ("import sys; from swarmnet.tasks import datasets; datasets.digits(); datasets.breast_cancer(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    from sklearn.datasets import load_breast_cancer, load_digits

    for rows, ours in ((datasets._sklearn_csv("digits.csv.gz"), load_digits()),
                       (datasets._sklearn_csv("breast_cancer.csv", header=True), load_breast_cancer())):
        assert np.array_equal(rows[:, :-1], ours.data)
        assert np.array_equal(rows[:, -1], ours.target)
    xtr, ytr, xte, yte = datasets.digits()
    assert (xtr.shape, xte.shape, xtr.dtype, ytr.dtype) == ((1438, 64), (359, 64), torch.float32, torch.int64)
    assert float(xtr.max()) == 1.0 and set(ytr.tolist()) == set(range(10))


@needs_fashion
def test_fashion_task_reads_the_full_set_and_a_cnn_learns_it():
    full = fashion.task()
    assert full.train[0].shape == (60000, 28, 28) and full.train[0].dtype == torch.uint8
    task = fashion.task(width=8, train_subset=3000, test_subset=1000)
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(120):
        idx = torch.randint(task.num_samples, (32,), generator=gen)
        opt.zero_grad()
        task.loss(model, (task.train[0][idx], task.train[1][idx])).backward()
        opt.step()
    model.eval()
    result = task.evaluate(model)
    assert result["accuracy"] > 0.6, result  # 10 classes; ~0.7-0.75 after 120 steps


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fashion_swarm_trains_and_the_average_is_evaluated_with_fresh_batchnorm_stats(swarm_factory):
    config = load_config("configs/fashion-cnn.toml")
    swarm = swarm_factory({
        "run": {"peers": 2, "seed": 0},
        "task": {"spec": config.task.spec, "options": {"width": 8, "train_subset": 4000, "test_subset": 1000}},
        "train": {"batch_size": 32, "lr": 0.05, "momentum": 0.9, "steps": 200, "schedule": "cosine",
                  "metrics_every": 20, "checkpoint_every": 0.0},
        "algorithm": {"name": "swarmsgd", "local_steps": 2},
        "network": {"linger": 2.0},
    })
    assert swarm.wait(240) == 0, swarm.log()
    summary = swarm.summary()
    assert summary["ok"] and all(p["interactions"] > 10 for p in summary["peers"]), summary["peers"]
    average = summary["average"]
    assert average["peers_averaged"] == 2 and average["batchnorm_batches"] == 20
    # Each peer ~0.7-0.75 after 200 steps on 4000 images; the average, with its own statistics, alike.
    assert average["eval"]["accuracy"] > 0.6, average
    assert all(p["eval"]["accuracy"] > 0.6 for p in summary["peers"]), summary["peers"]
    # The saved average carries the statistics it was evaluated with: loaded into a fresh model,
    # it scores what the summary says.
    task = load_task(config.task.spec, {"width": 8, "train_subset": 4000, "test_subset": 1000})
    model = task.build_model()
    model.load_state_dict(torch.load(average["model"], weights_only=True))
    model.eval()
    assert task.evaluate(model)["accuracy"] == pytest.approx(average["eval"]["accuracy"], abs=1e-6)


# -- CIFAR format ------------------------------------------------------------------------------


def write_cifar(folder: Path, n_train=256, n_test=128, seed=0):
    """A tiny learnable set in the CIFAR-10 python format: the class sets the mean colour."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("data_batch_1", n_train), ("test_batch", n_test)):
        labels = rng.integers(0, 10, n)
        base = np.stack([labels * 25, (9 - labels) * 25, (labels % 3) * 80], axis=1)[:, :, None]
        data = np.clip(base + rng.normal(0, 20, (n, 3, 1024)), 0, 255).astype(np.uint8).reshape(n, 3072)
        with open(folder / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": data}, fh, protocol=2)
    return folder


def test_cifar_task_reads_the_python_format_and_a_resnet_learns_it(tmp_path):
    folder = write_cifar(tmp_path / "cifar")
    task = load_task("swarmnet.tasks.cifar:task", {"path": str(folder), "blocks": 1, "width": 8})
    assert task.train[0].shape == (256, 3, 32, 32) and task.train[0].dtype == torch.uint8
    torch.manual_seed(0)
    model = task.build_model()
    assert isinstance(model, cifar.CifarResNet)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(40):
        idx = torch.randint(task.num_samples, (32,))
        opt.zero_grad()
        task.loss(model, (task.train[0][idx], task.train[1][idx])).backward()
        opt.step()
    model.eval()
    assert task.evaluate(model)["accuracy"] > 0.5  # chance is 0.1


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_fashion_written_as_cifar_reads_back_padded_in_three_channels(tmp_path):
    """examples/fashion_as_cifar.py, run as a user would, on a small IDX folder."""
    rng = np.random.default_rng(0)
    source = tmp_path / "fashion"
    source.mkdir()
    sets = {"train": (rng.integers(1, 256, (23, 28, 28)), rng.integers(0, 10, 23)),
            "t10k": (rng.integers(1, 256, (7, 28, 28)), rng.integers(0, 10, 7))}
    for split, (x, y) in sets.items():
        write_idx(source / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(source / f"{split}-labels-idx1-ubyte.gz", y)
    out = tmp_path / "as-cifar"
    subprocess.run([sys.executable, "examples/fashion_as_cifar.py", str(out), "--fashion", str(source)],
                   check=True, capture_output=True, timeout=60)
    x_train, y_train, x_test, y_test = cifar.load(str(out))
    for x, y, (want_x, want_y) in ((x_train, y_train, sets["train"]), (x_test, y_test, sets["t10k"])):
        assert x.shape == (len(want_y), 3, 32, 32) and y.tolist() == want_y.tolist()
        assert all(np.array_equal(x[:, c, 2:30, 2:30].numpy(), want_x) for c in range(3))
        assert x.sum().item() == 3 * int(want_x.sum())  # the border is zero


def test_cifar_augmentation_crops_and_flips_within_the_padding():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    torch.manual_seed(0)
    out = cifar.augment(x)
    assert out.shape == x.shape
    centre = out[:, :, 4:28, 4:28]  # any crop of a 4-padded image keeps a 24x24 window of pixels
    assert all(torch.isin(centre[i], torch.cat([x[i].flatten(), torch.zeros(1)])).all() for i in range(2))


def test_cifar_errors_and_hostile_pickles(tmp_path):
    with pytest.raises(ConfigError, match="needs task.options.path"):
        cifar.task()
    with pytest.raises(ConfigError, match="data_batch_1"):
        cifar.task(path=str(tmp_path))
    folder = write_cifar(tmp_path / "c")

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    cifar.load.cache_clear()
    with pytest.raises(ConfigError, match="not a readable CIFAR batch"):
        cifar.task(path=str(folder))
    assert not (tmp_path / "pwned").exists()


# -- byte-level language model ------------------------------------------------------------------


def test_byte_transformer_learns_the_stdlib_corpus():
    task = textlm.task(corpus_bytes=300_000, width=32, layers=1, heads=2)
    assert task.train[0].shape[1] == 65 and task.train[0].dtype == torch.uint8
    torch.manual_seed(0)
    model = task.build_model()
    model.eval()
    before = task.evaluate(model)
    assert 7.5 < before["bits_per_byte"] < 8.5  # uniform over 256 bytes: 8 bits
    assert before["accuracy"] < 5.0
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(task.num_samples, (32,), generator=gen)
        opt.zero_grad()
        task.loss(model, (task.train[0][idx],)).backward()
        opt.step()
    model.eval()
    after = task.evaluate(model)
    assert after["bits_per_byte"] < 5.5, after  # ~4.1-4.5 measured: it learned the byte statistics of Python code
    # better than always guessing the held-out set's most common byte (a space: 23%); 26% measured
    corpus = textlm.stdlib_corpus(300_000)
    targets = textlm.windows(corpus[int(len(corpus) * 0.95):], 65)[:512, 1:]
    most_common = 100.0 * targets.flatten().bincount().max().item() / targets.numel()
    assert after["accuracy"] > most_common + 1.0, (after, most_common)


def test_byte_transformer_is_causal():
    torch.manual_seed(0)
    model = textlm.ByteTransformer(context=16, width=16, layers=1, heads=2).eval()
    a = torch.randint(256, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 256  # change only the future after position 9
    with torch.no_grad():
        assert torch.allclose(model(a)[0, :10], model(b)[0, :10], atol=1e-5)
        assert not torch.allclose(model(a)[0, 10:], model(b)[0, 10:])
