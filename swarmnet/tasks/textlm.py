"""A small byte-level transformer language model on Python's own standard library sources.

The corpus is guaranteed wherever Python runs: the ``.py`` files at the top of the stdlib
directory, in name order, concatenated up to ``corpus_bytes`` (the exact text differs a little
between Python versions, so compare runs made with the same interpreter). The last
``test_fraction`` of it is held out. Samples are non-overlapping windows of ``context + 1``
bytes; the model predicts each next byte. Evaluation reports the held-out loss in nats per byte,
bits per byte, and next-byte accuracy (top-1, in percent).
"""

from __future__ import annotations

import functools
import math
import sysconfig
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from swarmnet.errors import ConfigError
from swarmnet.tasks import Batch, Task


@functools.lru_cache(maxsize=2)
def stdlib_corpus(corpus_bytes: int) -> bytes:
    folder = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for file in sorted(folder.glob("*.py")):
        try:
            data = file.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        size += len(data)
        if size >= corpus_bytes:
            break
    corpus = b"".join(chunks)[:corpus_bytes]
    if len(corpus) < 10_000:
        raise ConfigError(f"the standard library sources in {folder} hold only {len(corpus)} bytes; "
                          "this Python install ships without its .py files")
    return corpus


def windows(data: bytes, length: int) -> Tensor:
    """uint8 [len(data) // length, length]: consecutive non-overlapping windows."""
    n = len(data) // length
    if n == 0:
        return torch.empty((0, length), dtype=torch.uint8)
    return torch.frombuffer(bytearray(data[: n * length]), dtype=torch.uint8).view(n, length)


class ByteTransformer(nn.Module):
    """Pre-norm causal transformer over bytes: embeddings, ``layers`` blocks, a tied output."""

    def __init__(self, context: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied output: small initial logits (loss ln 256)
        self.position = nn.Parameter(torch.zeros(context, width))
        nn.init.normal_(self.position, std=0.02)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.position[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.norm(h) @ self.embed.weight.T  # logits [B, T, 256]


def task(corpus_bytes: int = 2_000_000, context: int = 64, width: int = 64, layers: int = 2, heads: int = 4,
         test_fraction: float = 0.05, test_windows: int = 512) -> Task:
    if heads < 1 or width % heads:
        raise ConfigError(f"textlm: task.options.width {width} must be a multiple of task.options.heads {heads} (>= 1)")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"textlm: task.options.test_fraction {test_fraction} must be between 0 and 1")
    if corpus_bytes < 10_000:
        raise ConfigError(f"textlm: task.options.corpus_bytes {corpus_bytes} must be at least 10,000")
    corpus = stdlib_corpus(corpus_bytes)
    split = int(len(corpus) * (1 - test_fraction))
    train = windows(corpus[:split], context + 1)
    test = windows(corpus[split:], context + 1)[:test_windows]
    if not len(train) or not len(test):
        raise ConfigError(f"textlm: a corpus of {len(corpus)} bytes split {1 - test_fraction:g} / {test_fraction:g} "
                          f"leaves no window of task.options.context + 1 = {context + 1} bytes for "
                          f"{'training' if not len(train) else 'testing'}; lower context or raise corpus_bytes")

    def next_byte_logits(model: nn.Module, w: Tensor) -> tuple[Tensor, Tensor]:
        """Logits [B*T, 256] for every position of windows ``w`` and the bytes that follow."""
        w = w.long()
        return model(w[:, :-1]).reshape(-1, 256), w[:, 1:].reshape(-1)

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        return F.cross_entropy(*next_byte_logits(model, batch[0]))

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        total = torch.zeros((), dtype=torch.float64, device=device)
        hits = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, len(test), 128):
            logits, targets = next_byte_logits(model, test[start : start + 128].to(device))
            total += F.cross_entropy(logits, targets, reduction="sum")
            hits += (logits.argmax(dim=1) == targets).sum()
        predicted = max(1, test[:, 1:].numel())
        nats = float(total) / predicted  # CPU<->GPU sync point
        return {"loss": nats, "bits_per_byte": nats / math.log(2), "accuracy": 100.0 * float(hits) / predicted}

    return Task(name="textlm", build_model=lambda: ByteTransformer(context, width, layers, heads),
                train=(train,), loss=loss, evaluate=evaluate, metric="bits_per_byte")
