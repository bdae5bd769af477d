"""16-bit float codecs (fp16, bf16): one implementation, parameterized by the format.

Wire: meta ``{"v": 1, "n": N, "r": 0|1}`` (r = 1: stochastic rounding was used; informational),
one frame of N little-endian 16-bit floats. Round to nearest even by default; with
``rounding="stochastic"`` each value goes to one of its two neighbours in the format with the
probability that makes E[Q(x)] = x (up to 2^-16 of the gap), which SwarmSGD's analysis assumes
(SPEC 4 item 9). Non-finite values, or values the format cannot hold (fp16 beyond 65504), are a
CodecError at encode: a reader could not average with them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from swarmnet.codecs.base import Buffer, Codec, DecodeResult, Encoded
from swarmnet.codecs.hostbuf import buffer_tensor, flat_float32, host_bytes
from swarmnet.codecs.rounding import RandomBits
from swarmnet.codecs.wirecheck import as_mapping, check_count, check_frames, get_int
from swarmnet.errors import CodecError, ConfigError

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
        h = x.to(self.dtype) if self.rounding == "nearest" else self._stochastic(x)
        quantized = h.to(torch.float32)
        lo_hi = torch.aminmax(quantized) if quantized.numel() else None
        if lo_hi is not None and not all(torch.isfinite(v).item() for v in lo_hi):
            raise CodecError(f"{self.name}: the vector has values that are not finite in {self.dtype}")
        meta = {"v": 1, "n": x.numel(), "r": int(self.rounding == "stochastic")}
        return Encoded(self.name, meta, (host_bytes(h),), quantized)

    def _stochastic(self, x: Tensor) -> Tensor:
        """Round each value to the neighbour below or above with probabilities (gap - d, d)."""
        near = x.to(self.dtype)
        near32 = near.to(torch.float32)
        err = x - near32  # exact: x and its nearest neighbour are within a factor 2
        inf = torch.tensor(float("inf"), dtype=self.dtype, device=x.device)
        other = torch.nextafter(near, torch.where(err >= 0, inf, -inf))
        gap = other.to(torch.float32) - near32
        u = self._bits.fill(torch.empty(x.shape, dtype=torch.int32, device=x.device))
        u = u.to(torch.float32).add_(0.5).mul_(2.0**-16)
        # err / gap lies in [0, 1/2]; gap is inf only past the largest finite value.
        take = u.mul_(gap.abs_()) < err.abs_()
        return torch.where(take, other, near)

    def decode(
        self,
        meta: Mapping[str, Any],
        frames: tuple[Buffer, ...],
        key_N: Tensor,
        out_N: Tensor,
        state: dict[str, Any],
    ) -> DecodeResult:
        meta = as_mapping(meta, self.name, "meta")
        get_int(meta, "v", self.name, 1, 1)
        n = out_N.numel()
        check_count(meta, self.name, n)
        check_frames(frames, [2 * n], self.name)
        received = buffer_tensor(frames[0], self.dtype, f"{self.name}.recv")
        out_N.copy_(received.view_as(out_N))  # host->device and widening in one copy
        return DecodeResult(True, stats={"bits_per_coord": 16.0})


class Fp16Codec(HalfCodec):
    name = "fp16"
    dtype = torch.float16


class Bf16Codec(HalfCodec):
    name = "bf16"
    dtype = torch.bfloat16
