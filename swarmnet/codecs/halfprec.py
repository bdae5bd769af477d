"""16-bit float codecs (fp16, bf16): one implementation, parameterized by the format.

Wire: meta ``{"v": 1, "n": N, "r": 0|1}`` (r = 1: stochastic rounding was used; checked, not needed to decode),
one frame of N little-endian 16-bit floats. Round to nearest even by default; with
``rounding="stochastic"`` each value goes to one of its two neighbours in the format with the
probability that makes E[Q(x)] = x (exactly in the normal range, to 2^-17 of the gap below it),
which SwarmSGD's analysis assumes (SPEC 4 item 9). Non-finite values, or values the format
cannot hold (fp16 beyond 65504), are refused at encode (NonFiniteInput: a peer ends as
diverged): a reader could not average with them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from swarmnet.codecs.base import Buffer, Codec, DecodeResult, Encoded
from swarmnet.codecs.hostbuf import buffer_tensor, flat_float32, host_bytes
from swarmnet.codecs.published import copies_done, published
from swarmnet.codecs.rounding import FRAC_BITS, ONE, RandomBits, round_with_offsets
from swarmnet.codecs.wirecheck import check_frames, versioned_meta
from swarmnet.codecs.workspace import scratch
from swarmnet.errors import CodecError, ConfigError, NonFiniteInput

ROUNDINGS = ("nearest", "stochastic")


class HalfCodec(Codec):
    """Casts to ``dtype``; subclasses only choose the format."""

    dtype: ClassVar[torch.dtype]

    def __init__(self, rounding: str = "nearest", seed: int | None = None) -> None:
        if rounding not in ROUNDINGS:
            raise ConfigError(f"{self.name}: rounding must be one of {ROUNDINGS}, got {rounding!r}")
        self.rounding = rounding
        self._bits = RandomBits(seed)

    def params(self) -> dict[str, Any]:
        return {"rounding": self.rounding}

    def encode(self, flat_N: Tensor, hints: Mapping[str, float] | None = None) -> Encoded:
        x = flat_float32(flat_N, self.name)
        n, dev = x.numel(), x.device
        # copy_ casts: round to nearest even, as .to() would, into memory that can be published
        h = published(n, self.dtype, dev).copy_(x if self.rounding == "nearest" else self._stochastic(x))
        quantized = published(n, torch.float32, dev).copy_(h)
        if quantized.numel() and not (  # CPU<->GPU sync point: refuse before publishing
            torch.isfinite(quantized.amax()) and torch.isfinite(quantized.amin())
        ):
            beyond = bool(torch.isfinite(x).all())  # only on the way out: which of the two it was
            raise NonFiniteInput(f"{self.name}: the vector has " + (
                f"values beyond the format's range (+-{torch.finfo(self.dtype).max:g})" if beyond
                else "non-finite values"))
        meta = {"v": 1, "n": n, "r": int(self.rounding == "stochastic")}
        return Encoded(self.name, meta, (host_bytes(h),), quantized, copies_done(dev))

    def _stochastic(self, x: Tensor) -> Tensor:
        """Round each value to its neighbour below or above in the format, picking the upper
        one with probability (distance to the lower) / gap: E[Q(x)] = x.

        A 16-bit format keeps the top m of float32's 23 mantissa bits. Adding d = 23 - m random
        bits to the float32 pattern (sign-magnitude: this grows |x|) and clearing them carries
        into the kept bits with exactly that probability, across binades too. Below the
        format's smallest normal value its grid is fixed (2^(E_min - m)); there (fp16 only:
        bf16 shares float32's exponent range) the value is rounded on that grid with the
        shared integer rounding of rounding.py.
        """
        n, dev = x.numel(), x.device
        if n and not (torch.isfinite(x.amax()) and torch.isfinite(x.amin())):
            raise NonFiniteInput(f"{self.name}: the vector has non-finite values")
        info = torch.finfo(self.dtype)
        drop = 23 - round(-math.log2(info.eps))
        offsets = self._bits.fill(scratch("half.bits", n, torch.int32, dev))
        pattern = scratch("half.pattern", n, torch.int32, dev).copy_(x.view(torch.int32))
        carry = scratch("half.carry", n, torch.int32, dev)
        pattern.add_(torch.bitwise_right_shift(offsets, FRAC_BITS - drop, out=carry))
        rounded = pattern.bitwise_and_(-(1 << drop)).view(torch.float32)
        if info.tiny > torch.finfo(torch.float32).tiny:  # fp16: a fixed grid below 2^-14
            step = info.tiny * info.eps
            scaled = torch.mul(x, ONE / step, out=scratch("half.scaled", n, torch.float32, dev))
            k = round_with_offsets(scaled, offsets, out=carry)
            small = torch.abs(x, out=scaled) < info.tiny
            torch.where(small, scaled.copy_(k).mul_(step), rounded, out=rounded)
        return rounded  # float32 values the format holds exactly: the caller's cast is exact

    def decode(
        self,
        meta: Mapping[str, Any],
        frames: tuple[Buffer, ...],
        key_N: Tensor,
        out_N: Tensor,
        state: dict[str, Any],
    ) -> DecodeResult:
        n = out_N.numel()
        rounding = versioned_meta(meta, self.name, n).get("r")
        if type(rounding) is not int or rounding not in (0, 1):
            raise CodecError(f"{self.name}: meta 'r' (stochastic rounding used) must be 0 or 1, got {rounding!r:.40}")
        check_frames(frames, [2 * n], self.name)
        received = buffer_tensor(frames[0], self.dtype, f"{self.name}.recv")
        out_N.copy_(received.view_as(out_N))  # host->device and widening in one copy: CPU<->GPU sync point
        return DecodeResult(True, stats={"bits_per_coord": 16.0})


class Fp16Codec(HalfCodec):
    name = "fp16"
    dtype = torch.float16


class Bf16Codec(HalfCodec):
    name = "bf16"
    dtype = torch.bfloat16
