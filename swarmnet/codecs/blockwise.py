"""Blockwise absmax integer codecs (blockwise8, blockwise4): one implementation, two widths.

Legend: N = coordinates, R = blocks of ``block`` coordinates (the last one may be shorter),
L = 2^(bits-1) - 1 = 127 or 7 levels on each side of zero.

Per block the scale is s = max |x| over the block; each value becomes q = round(x L / s) with
stochastic rounding (:mod:`swarmnet.codecs.rounding`), so E[Q(x)] = x with Q(x) = q s / L (up
to 2^-17 of a level and a relative 2^-23), and |Q(x) - x| <= s / L.
Wire (meta ``{"v": 1, "n": N, "block": B, "bits": 8|4}``):

- frame 0, values: N int8 (bits=8), or ceil(N/2) bytes (bits=4) holding value 2j in the low
  nibble and value 2j+1 in the high nibble of byte j, as 4-bit two's complement;
- frame 1, scales: R = ceil(N / B) little-endian float32 values s, finite and >= 0.

The reader multiplies by s / L computed in float32 exactly as the encoder does, so it decodes
bit-for-bit the ``Encoded.quantized`` the owner averages with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from swarmnet.codecs import kernels
from swarmnet.codecs.base import Buffer, Codec, DecodeResult, Encoded
from swarmnet.codecs.hostbuf import buffer_tensor, flat_float32, host_bytes
from swarmnet.codecs.published import copies_done, published
from swarmnet.codecs.rounding import ONE, RandomBits, round_with_offsets
from swarmnet.codecs.wirecheck import (
    check_frames,
    get_choice,
    get_int,
    versioned_meta,
)
from swarmnet.codecs.workspace import scratch
from swarmnet.errors import CodecError, ConfigError, NonFiniteInput

MAX_BLOCK = 1 << 20


def _row_views(flat: Tensor, block: int) -> list[Tensor]:
    """``flat`` as at most two 2-D views: full blocks [R, B] and the short tail [1, N mod B]."""
    return [flat[coords].view(rows, cols) for coords, _, rows, cols in kernels.block_spans(flat.numel(), block)]


def dequantize_blocks(
    q_N: Tensor, scales_R: Tensor, levels: int, block: int, out_N: Tensor
) -> Tensor:
    """``out = q * (s / L)`` per block; the one formula both sides use."""
    step_R = scales_R / levels
    start = 0
    for q_rows, out_rows in zip(_row_views(q_N, block), _row_views(out_N, block), strict=True):
        rows = q_rows.shape[0]
        out_rows.copy_(q_rows)
        out_rows.mul_(step_R[start : start + rows, None])
        start += rows
    return out_N


def pack_nibbles(q_N: Tensor, out: Tensor) -> Tensor:
    """int8 values in [-8, 7] -> bytes with value 2j in the low and 2j+1 in the high nibble.

    ``q_N`` must have an even length (the caller pads with a zero).
    """
    pairs = q_N.view(torch.int16)  # little-endian: low byte = value 2j, high byte = value 2j+1
    lo = scratch("bw.pack.lo", pairs.numel(), torch.int16, q_N.device)
    hi = scratch("bw.pack.hi", pairs.numel(), torch.int16, q_N.device)
    torch.bitwise_and(pairs, 0x0F, out=lo)
    torch.bitwise_right_shift(pairs, 4, out=hi)
    hi.bitwise_and_(0xF0)
    lo.bitwise_or_(hi)
    return out.copy_(lo)


def unpack_nibbles(packed: Tensor, out_2M: Tensor) -> Tensor:
    """Inverse of :func:`pack_nibbles`: M bytes -> 2M int8 values, sign-extended."""
    signed = packed.view(torch.int8)
    pairs = out_2M.view(-1, 2)
    torch.bitwise_left_shift(signed, 4, out=pairs[:, 0])
    pairs[:, 0].bitwise_right_shift_(4)
    torch.bitwise_right_shift(signed, 4, out=pairs[:, 1])
    return out_2M


SCALE_LIMIT = torch.finfo(torch.float32).max / 2
"""Largest block scale (absolute value) encoded: q * scale / levels stays finite below it."""

class BlockwiseCodec(Codec):
    """Absmax-scaled ``bits``-bit integers per block; subclasses only choose ``bits``."""

    bits: ClassVar[int]

    def __init__(self, block: int = 64, seed: int | None = None) -> None:
        if not isinstance(block, int) or not 1 <= block <= MAX_BLOCK:
            raise ConfigError(
                f"{self.name}: block must be an int in [1, {MAX_BLOCK}], got {block!r}"
            )
        self.block = block
        self.levels = (1 << (self.bits - 1)) - 1
        self._bits = RandomBits(seed)

    def params(self) -> dict[str, Any]:
        return {"block": self.block}

    def _values_bytes(self, n: int) -> int:
        return n if self.bits == 8 else (n + 1) // 2

    def encode(self, flat_N: Tensor, hints: Mapping[str, float] | None = None) -> Encoded:
        x = flat_float32(flat_N, self.name)
        n, dev = x.numel(), x.device
        rows = -(-n // self.block)
        scales = published(rows, torch.float32, dev)
        q_n = n + (n & 1 if self.bits == 4 else 0)
        # 8-bit values are published as they are; 4-bit ones are packed into a published buffer
        q = published(q_n, torch.int8, dev) if self.bits == 8 else scratch("bw.q", q_n, torch.int8, dev)
        q[n:] = 0  # the pad nibble of an odd count
        quantized = published(n, torch.float32, dev)
        if kernels.usable(x):
            kernels.blockwise_quantize(
                x, self.block, self.levels, self._bits.next_seed(), q, scales, quantized
            )
        else:
            self._quantize(x, q, scales, quantized)
        # CPU<->GPU sync point: refuse before publishing. NaN fails the comparison; a block whose
        # largest value nears float32's limit would dequantize to inf.
        if n and not bool(scales.amax() < SCALE_LIMIT):
            raise NonFiniteInput(f"{self.name}: the vector has non-finite values, or values beyond +-{SCALE_LIMIT:.3g}")
        if self.bits == 8:
            values = q
        else:
            packed = published(q.numel() // 2, torch.uint8, dev)
            values = (kernels.pack_nibbles if kernels.usable(q) else pack_nibbles)(q, packed)
        meta = {"v": 1, "n": n, "block": self.block, "bits": self.bits}
        return Encoded(self.name, meta, (host_bytes(values), host_bytes(scales)), quantized, copies_done(dev))

    def _quantize(self, x: Tensor, q: Tensor, scales: Tensor, quantized: Tensor) -> None:
        """The torch passes of :func:`kernels.blockwise_quantize` (accelerators, or fused loops
        off); offsets from the codec's private generator."""
        n, dev = x.numel(), x.device
        scaled = scratch("bw.scaled", n, torch.float32, dev)
        ints = scratch("bw.ints", n, torch.int32, dev)
        offsets = self._bits.fill(scratch("bw.offsets", n, torch.int32, dev))
        start = 0
        views = zip(
            _row_views(x, self.block),
            _row_views(scaled, self.block),
            _row_views(ints, self.block),
            _row_views(offsets, self.block),
            strict=True,
        )
        for x_rows, scaled_rows, int_rows, off_rows in views:
            r = x_rows.shape[0]
            s = torch.maximum(x_rows.amax(1), x_rows.amin(1).neg_())
            scales[start : start + r] = s
            # One float step below L 2^16 / s keeps |x| inv <= L 2^16 after rounding, so q stays
            # in [-L, L] (a relative bias below 2^-23, under float32 resolution of x).
            inv = torch.nextafter((self.levels * ONE) / s, torch.zeros_like(s))
            inv = torch.where(s > 0, inv, torch.zeros_like(s))
            torch.mul(x_rows, inv[:, None], out=scaled_rows)
            round_with_offsets(scaled_rows, off_rows, out=int_rows)
            start += r
        if not torch.isfinite(scales).all():
            return  # the caller reports it
        q[:n].copy_(ints)
        dequantize_blocks(q[:n], scales, self.levels, self.block, quantized)

    def decode(
        self,
        meta: Mapping[str, Any],
        frames: tuple[Buffer, ...],
        key_N: Tensor,
        out_N: Tensor,
        state: dict[str, Any],
    ) -> DecodeResult:
        n = out_N.numel()
        meta = versioned_meta(meta, self.name, n)
        get_choice(meta, "bits", self.name, [self.bits])
        block = get_int(meta, "block", self.name, 1, MAX_BLOCK)
        rows = -(-n // block)
        check_frames(frames, [self._values_bytes(n), 4 * rows], self.name)
        dev = out_N.device
        scales = buffer_tensor(frames[1], torch.float32, f"{self.name}.scales").to(dev)
        if rows and not (torch.isfinite(scales).all() and scales.min() >= 0):  # CPU<->GPU sync point
            raise CodecError(f"{self.name}: scales must be finite and >= 0")
        values = buffer_tensor(frames[0], torch.uint8, f"{self.name}.values").to(dev)  # pageable host->device copy
        fused = kernels.usable(out_N)
        if self.bits == 8:
            q = values.view(torch.int8)
        else:
            unpacked = scratch("bw.unpacked", 2 * values.numel(), torch.int8, dev)
            q = (kernels.unpack_nibbles if fused else unpack_nibbles)(values, unpacked)
        dequantize = kernels.blockwise_dequantize if fused else dequantize_blocks
        dequantize(q[:n], scales, self.levels, block, out_N.view(-1))
        return DecodeResult(True, stats={"bits_per_coord": self.bits + 32.0 / block})


class Blockwise8Codec(BlockwiseCodec):
    name = "blockwise8"
    bits = 8


class Blockwise4Codec(BlockwiseCodec):
    name = "blockwise4"
    bits = 4
