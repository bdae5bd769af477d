"""Unbiased rounding to integers with 16-bit random offsets, shared by the lossy codecs.

Legend: N = number of values rounded in one call (any shape, flattened).

Every stochastic or dithered rounding in swarmnet is one integer formula,

    k = (round(t * 2^16) + V) >> 16,        V uniform on {0, ..., 2^16 - 1},

which is ``floor(t + U)`` for U uniform on the grid ``V / 2^16`` after t is rounded to that
grid: E[k] = t up to 2^-17 (exactly when t has at most 16 fractional bits), and
t - 1 < k < t + 1. The codecs differ only in where V comes from: a private generator
(stochastic rounding) or a seed shared with the readers (subtractive dither, SPEC 3.2).
Integer arithmetic keeps the formula exact at any magnitude of t, where ``floor(t + U)`` in
float32 would round away the random offset once |t| >= 2^8.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

FRAC_BITS = 16
ONE = 1 << FRAC_BITS
_BLOCK_WORDS = 1 << 18


def seeded_bits16(seed: int | tuple[int, ...], n: int) -> np.ndarray:
    """N uniform 16-bit values from ``seed`` (an int or a tuple of ints, e.g. (snapshot seed,
    chunk index)), identical on every machine.

    The stream is the little-endian 16-bit lanes of numpy's SFC64 raw output seeded through
    SeedSequence; both are fixed by numpy's stream-compatibility policy, so a reader regenerates
    exactly the sender's values (the dither of SPEC 3.2 travels as one integer).
    """
    entropy = list(seed) if isinstance(seed, tuple) else seed
    raw = np.random.SFC64(np.random.SeedSequence(entropy)).random_raw((n + 3) // 4)
    return raw.view("<u2")[:n]


class RandomBits:
    """A private source of uniform 16-bit integers on the device of the tensor it fills."""

    def __init__(self, seed: int | None = None) -> None:
        self._seq = np.random.SeedSequence(seed)
        self._np = np.random.SFC64(self._seq)
        self._torch: dict[torch.device, torch.Generator] = {}

    def next_seed(self) -> int:
        """A fresh 63-bit seed, e.g. for one snapshot's dither."""
        return int(self._np.random_raw() >> np.uint64(1))

    def fill(self, out: Tensor) -> Tensor:
        """Fill the integer tensor ``out`` with values in [0, 2^16)."""
        n = out.numel()
        if out.device.type == "cpu" and out.is_contiguous():
            # Blocks of raw bits small enough for the allocator to reuse (one fresh 20 MB array
            # per call would cost more in page faults than generating it), widened by numpy.
            flat = out.view(-1).numpy()
            for start in range(0, n, 4 * _BLOCK_WORDS):
                stop = min(n, start + 4 * _BLOCK_WORDS)
                bits = self._np.random_raw((stop - start + 3) // 4).view("<u2")
                np.copyto(flat[start:stop], bits[: stop - start])
        elif out.device.type == "cpu":
            out.copy_(self.fill(torch.empty(out.shape, dtype=out.dtype)))
        else:
            gen = self._torch.get(out.device)
            if gen is None:
                gen = torch.Generator(device=out.device)
                gen.manual_seed(self.next_seed())
                self._torch[out.device] = gen
            out.random_(0, ONE, generator=gen)
        return out


def round_with_offsets(scaled: Tensor, offsets: Tensor, out: Tensor) -> Tensor:
    """``out = (round(scaled) + offsets) >> 16`` where ``scaled = t * 2^16`` (consumed).

    ``out`` (int32 or int64) must hold ``round(scaled)`` without overflow, i.e. ``|t| < 2^14``
    for int32; ``offsets`` has out's dtype and values in [0, 2^16). ``out`` may not alias
    ``offsets``.
    """
    out.copy_(scaled.round_())  # float -> int of an integral value: exact
    out.add_(offsets)
    return out.bitwise_right_shift_(FRAC_BITS)
