"""The cubic lattice quantizer of SPEC 3.2 as batched tensor functions.

Legend: [..., D] any leading shape: B models of D coordinates (the simulator), R chunks of C
coordinates (the codec); a "row" is one vector along the last dimension. ``eps`` and ``bits``
broadcast against x ([B, 1] per model, [R, 1] per chunk, or Python scalars).

    random_offsets(shape, device, source: RandomBits) -> V   int32 [...], uniform in [0, 2^16)
    dither_offsets(seed, shape, device="cpu") -> V           int32 [...], the same everywhere
    dither(V, out=None) -> theta                             float32 [...] in (-1/2, 1/2)
    quantize(x, eps, V, *, bound=None, out=None, work=None) -> k
                                                  k = floor(x/eps + V/2^16): int32, or int64
                                                  once max|x/eps| >= 2^30 - 2
    dequantize(k, eps, theta=None, *, out=None) -> Q         eps*k, or eps*(k + theta)
    colour(k, bits) -> r                                     k mod 2^bits: the low planes
    decode(r, bits, key, eps, theta=None) -> k_hat           colour-r point nearest to key
    nearest(r, mask, u, out, shift) -> s                     decode's core on prepared pieces
    full_bits(k) -> b_full [...]                             planes that decode keyless
    bits_for_bound(max_abs) -> b_full                        the same from a bound on |k|
    bits_needed(distance) -> b_min                           planes for a distance (in eps)
    chunk_hashes(k_RC) -> bytes                              8-byte digest per row
    to_planes(k_RC, width, nbytes, out=None) -> planes       LSB-first bit-planes (bitplanes.py)
    from_planes(planes, width, nbytes, out_RC) -> r          and back

A simulator step quantizing B models against B keys with b planes each is
``k = quantize(x, eps, random_offsets(x.shape, x.device, bits_source))`` then
``k_hat = decode(colour(k, b), b, key, eps)``; ``k_hat == k`` tells which coordinates decoded
exactly and ``dequantize(k, eps)`` is Q(x), all in one call each.

One offset tensor serves both rounding modes of SPEC 3.2. Stochastic rounding draws V fresh and
privately: Q = eps*k, |Q - x| < eps. Subtractive dither draws V from a seed in the header and
reconstructs Q = eps*(k + theta) with theta = 1/2 - (V + 1/2)/2^16, so k = round(x/eps - theta)
and the error eps*(k + theta) - x is uniform on a 2^-16 grid over [-eps/2, eps/2], whatever x.
Both are unbiased to 2^-17 eps (exactly when x/eps has at most 16 fractional bits; see
rounding.py), at any |x|/eps thanks to integer arithmetic; with eps a power of two (the codec's
choice) x/eps is exact in float32 too.

``decode`` returns the unique integer k_hat congruent to r mod 2^b with u - k_hat in
[-2^(b-1), 2^(b-1)), u = key/eps - theta: it equals k iff u - k is in that half-open range
(SPEC 3.2). With h = 2^(b-1) and s = floor(u) + 1 - h, the smallest integer of the window, it
is ``s + ((r - s) & (2^b - 1))`` in two's complement integers; only floor(u) is taken in
floating point. The simulator may pass float64 ``x`` and ``key`` for far ranges.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import xxhash
from torch import Tensor

from swarmnet.codecs.bitplanes import pack as to_planes
from swarmnet.codecs.bitplanes import unpack as from_planes
from swarmnet.codecs.rounding import ONE, RandomBits, round_with_offsets, seeded_bits16
from swarmnet.codecs.workspace import scratch

__all__ = [
    "OutOfRange",
    "bits_for_bound",
    "bits_needed",
    "chunk_hashes",
    "colour",
    "decode",
    "dequantize",
    "dither",
    "dither_offsets",
    "from_planes",
    "full_bits",
    "nearest",
    "quantize",
    "random_offsets",
    "to_planes",
]



class OutOfRange(ValueError):
    """Values too large for the lattice's integer coordinates at this step, or not finite (a
    diverged model)."""


INT32_SAFE = (1 << 30) - 2
"""Largest |x/eps| whose coordinates k stay int32 with b_full <= 31 (SPEC 4 item 10)."""
COMPUTE32_SAFE = 1 << 14
"""Largest |x/eps| for which (x/eps) * 2^16 plus an offset fits int32 arithmetic."""
INT64_SAFE = 1 << 46
"""Largest |x/eps| the int64 path handles ((x/eps) * 2^16 < 2^62)."""


def _as_scale(eps: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(eps, Tensor):
        return eps.to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(eps), dtype=like.dtype, device=like.device)


def random_offsets(
    shape: tuple[int, ...] | torch.Size, device: torch.device | str, source: RandomBits
) -> Tensor:
    """Fresh private offsets V for stochastic rounding."""
    return source.fill(torch.empty(shape, dtype=torch.int32, device=device))


def dither_offsets(
    seed: int | tuple[int, ...],
    shape: tuple[int, ...] | torch.Size,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The dither offsets V of ``seed`` (row-major over ``shape``), identical on every machine."""
    n = math.prod(shape)
    bits = torch.from_numpy(seeded_bits16(seed, n).astype(np.int32))
    return bits.to(device).view(shape)


def dither(offsets: Tensor, out: Tensor | None = None) -> Tensor:
    """theta = 1/2 - (V + 1/2) / 2^16 in float32, exactly (17 significant bits)."""
    out = (
        torch.empty(offsets.shape, dtype=torch.float32, device=offsets.device)
        if out is None
        else out
    )
    out.copy_(offsets)
    return out.neg_().add_(ONE / 2 - 0.5).mul_(1.0 / ONE)


def quantize(
    x: Tensor,
    eps: Tensor | float,
    offsets: Tensor,
    *,
    bound: float | None = None,
    out: Tensor | None = None,
    work: Tensor | None = None,
) -> Tensor:
    """Lattice coordinates k = floor(x/eps + V/2^16) (SPEC 3.2), as int32 or int64.

    Args:
        x: values, float32 or float64, any shape.
        eps: positive step, broadcastable to x (a power of two keeps x/eps exact).
        offsets: int32 V in [0, 2^16) of x's shape (``random_offsets`` or ``dither_offsets``).
        bound: an upper bound of max |x/eps| if the caller knows one (saves two passes).
        out: receives k; its dtype is the result's (int64 needed once max|x/eps| >= 2^30 - 2).
        work: float scratch of x's shape and dtype (x/eps * 2^16 lands there).

    Returns:
        k (``out`` if given), int32 when max|x/eps| < 2^30 - 2, else int64.
        Raises OutOfRange (a ValueError) when max|x/eps| is not below 2^46 or not finite.
    """
    scale = _as_scale(eps, x).reciprocal().mul_(ONE)
    scaled = torch.mul(x, scale, out=work)
    if bound is None:
        bound = float(torch.maximum(scaled.amax(), scaled.amin().neg())) / ONE if x.numel() else 0.0  # CPU<->GPU sync point
    if not bound < INT64_SAFE:  # also catches NaN
        raise OutOfRange(f"|x/eps| = {bound} is not below 2^46 (or not finite)")
    dtype = out.dtype if out is not None else torch.int32 if bound < INT32_SAFE else torch.int64
    if dtype == torch.int32 and not bound < INT32_SAFE:
        raise ValueError(f"|x/eps| = {bound} needs int64 coordinates")
    if out is None:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    if dtype == torch.int32 and bound >= COMPUTE32_SAFE:
        # x/eps * 2^16 needs int64 even though k fits int32.
        wide = scratch("lattice.wide", x.numel(), torch.int64, x.device).view(x.shape)
        wide_offsets = scratch("lattice.wide_offsets", x.numel(), torch.int64, x.device).view(
            x.shape
        )
        round_with_offsets(scaled, wide_offsets.copy_(offsets), out=wide)
        return out.copy_(wide)
    if offsets.dtype != dtype:
        offsets = (
            scratch("lattice.wide_offsets", x.numel(), dtype, x.device).view(x.shape).copy_(offsets)
        )
    return round_with_offsets(scaled, offsets, out=out)


def dequantize(
    k: Tensor, eps: Tensor | float, theta: Tensor | None = None, *, out: Tensor | None = None
) -> Tensor:
    """Q = eps * k (stochastic) or eps * (k + theta) (dither), in ``out``'s dtype (float32 by
    default). The owner and every reader run these same float operations, so Q is bit-identical
    on both sides."""
    out = torch.empty(k.shape, dtype=torch.float32, device=k.device) if out is None else out
    out.copy_(k)
    if theta is not None:
        out.add_(theta)
    return out.mul_(_as_scale(eps, out))


def _masks(bits: Tensor | int, like: Tensor) -> tuple[Tensor | int, Tensor | int]:
    """(2^b - 1, 2^(b-1)) for ``bits`` in [1, 63], as ints or integer tensors of like's dtype."""
    if isinstance(bits, Tensor):
        b = bits.to(device=like.device, dtype=like.dtype)
        one = torch.ones((), dtype=like.dtype, device=like.device)
        half = one.bitwise_left_shift(b - 1)
        return half * 2 - 1, half
    return (1 << bits) - 1, 1 << (bits - 1)


def colour(k: Tensor, bits: Tensor | int) -> Tensor:
    """r = k mod 2^bits in [0, 2^bits): the first ``bits`` planes of k."""
    mask, _ = _masks(bits, k)
    return k & mask


def nearest(
    r: Tensor,
    mask: Tensor | int,
    u: Tensor,
    out: Tensor,
    shift: Tensor | int,
) -> Tensor:
    """Core of :func:`decode` on prepared pieces.

    ``u`` (float, consumed) holds key/eps - theta, ``mask`` is 2^b - 1 and ``shift`` is
    1 - 2^(b-1) (ints or integer tensors of out's dtype, broadcast). With s = floor(u) + shift,
    the smallest integer of the window, ``out`` receives D = (r - s) & mask in [0, 2^b) and the
    function returns s (integers of out's dtype), so that k_hat = s + D and
    max |k_hat - u| <= max(D - h + 1, h - D) over a row. Only floor(u) is taken in floating
    point; the window arithmetic is exact integer arithmetic. floor(u) is clamped to +-2^(w-2)
    for w-bit integers, as the fused loops clamp it: a key farther away decodes a value (and a
    window statistic) that only a caller that verifies (the codec's digest) may accept.
    """
    floor_u = u.floor_()
    limit = float(1 << (8 * out.element_size() - 2))
    floor_u.clamp_(-limit, limit)
    s = scratch("lattice.window", out.numel(), out.dtype, out.device).view(out.shape)
    s.copy_(floor_u).add_(shift)
    torch.sub(r, s, out=out)
    out.bitwise_and_(mask)
    return s


def decode(
    r: Tensor, bits: Tensor | int, key: Tensor, eps: Tensor | float, theta: Tensor | None = None
) -> Tensor:
    """The integer k_hat = r (mod 2^bits) nearest to u = key/eps - theta, ties to the high side
    (SPEC 3.2): k_hat = k exactly iff u - k lies in [-2^(bits-1), 2^(bits-1)).

    ``r`` int32/int64 colours, ``bits`` in [1, 63] (int or tensor broadcastable to r), ``key``
    float of r's shape; u is computed in key's dtype (float64 keys for far ranges). Returns
    k_hat in r's dtype.
    """
    mask, half = _masks(bits, r)
    u = key / _as_scale(eps, key)
    if theta is not None:
        u = u - theta
    k_hat = torch.empty_like(r)
    s = nearest(r, mask, u, k_hat, 1 - half)
    return k_hat.add_(s)


def full_bits(k: Tensor) -> Tensor:
    """b_full = 1 + ceil(log2(max|k| + 1)) per row (SPEC 3.4), as int64 [...]: with that many
    planes the colour sign-extends to k without any key."""
    top = torch.maximum(k.amax(-1), k.amin(-1).neg()).to(torch.float64)
    return bits_for_bound(top)


def bits_for_bound(max_abs: Tensor) -> Tensor:
    """b_full for rows whose |k| is at most ``max_abs`` (a float tensor)."""
    return torch.ceil(torch.log2(max_abs.to(torch.float64) + 1)).to(torch.int64) + 1


def bits_needed(distance: Tensor | float) -> Tensor | int:
    """b_min = 2 + floor(log2(D + 1)) planes make every key within D*eps (sup norm) of x decode
    exactly (SPEC 3.2; D in units of eps)."""
    if isinstance(distance, Tensor):
        return torch.floor(torch.log2(distance.to(torch.float64) + 1)).to(torch.int64) + 2
    return 2 + math.floor(math.log2(float(distance) + 1))


def chunk_hashes(k_RC: Tensor) -> bytes:
    """The 64-bit XXH3 digest of every row's integers, joined (8 bytes per row, big-endian).

    Rows are hashed as little-endian integers of k's own width (int32, or int64): a wrong decode
    changes some coordinate by a multiple of 2^b, so the digest catches it with probability
    about 1 - 2^-64. (A narrower width would not do: a far key could decode k + 2^16 m, which
    narrowing would fold back onto k.) The digest guards against decoding with too few planes,
    not against forgery (CURVE authentication does that), so a fast non-cryptographic hash
    fits: XXH3 runs several GB/s on one core, about 7x SHA-256.
    """
    k = k_RC
    if k.device.type != "cpu":
        k = k.to("cpu")  # CPU<->GPU sync point
    rows = k.contiguous().view(torch.uint8).numpy()
    return b"".join(map(xxhash.xxh3_64_digest, rows))
