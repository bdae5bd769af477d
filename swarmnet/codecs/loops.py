"""The numba loops behind kernels.py (imported on first use: numba costs a fraction of a second
to import and each loop a second to compile, cached on disk afterwards).

Every loop takes a row range [lo, hi) first so that kernels.py can split the rows over threads;
integer arithmetic is widened to int64 by numba, hence the explicit masks and casts.
"""

from __future__ import annotations

import numba
import numpy as np

jit = numba.njit(nogil=True, cache=True, boundscheck=False)


@jit
def hash32(x):
    """A bijective 32-bit integer hash (two multiply-xorshift rounds on the low 32 bits;
    numba widens integer arithmetic, hence the masks)."""
    low = np.uint64(0xFFFFFFFF)
    x = np.uint64(x) & low
    for _ in range(2):
        x ^= x >> np.uint64(16)
        x = (x * np.uint64(0x7FEB352D)) & low
        x ^= x >> np.uint64(15)
        x = (x * np.uint64(0x846CA68B)) & low
        x ^= x >> np.uint64(16)
    return x


@jit
def hash16(j, key):
    """16 uniform bits from the hash of j ^ key."""
    return np.int64(hash32(np.uint64(j) ^ key) >> np.uint64(16))


@jit
def max_abs_rows(lo, hi, bits, out):
    # On the bit patterns: |x| is x & 0x7FFFFFFF, whose integer order is the order of the
    # finite magnitudes, and inf and NaN are exactly the patterns >= 0x7F800000.
    for r in range(lo, hi):
        top = np.int32(0)
        for j in range(bits.shape[1]):
            a = bits[r, j] & np.int32(0x7FFFFFFF)
            top = a if a > top else top
        out[r] = top if top < np.int32(0x7F800000) else np.int32(0x7F800000)


@jit
def quantize_rows(lo, hi, x, scale, eps, keys, offsets, use_offsets, dither, k, q):
    half = np.float32(32767.5)
    inv_one = np.float32(1.0 / 65536.0)
    for r in range(lo, hi):
        s, e, key = scale[r], eps[r], np.uint64(keys[r])
        for j in range(x.shape[1]):
            if use_offsets:
                v = np.int64(offsets[r, j])
            else:
                v = hash16(j, key)
            kk = (np.int64(np.rint(x[r, j] * s)) + v) >> 16
            k[r, j] = kk
            if dither:
                q[r, j] = (np.float32(kk) + (half - np.float32(v)) * inv_one) * e
            else:
                q[r, j] = np.float32(kk) * e


@numba.njit(inline="always")
def bit_byte(a0, a1, a2, a3, a4, a5, a6, a7, i):
    """The byte whose bit t is bit i of a_t (integers; numba widens them to int64)."""
    return (
        ((a0 >> i) & 1)
        | (((a1 >> i) & 1) << 1)
        | (((a2 >> i) & 1) << 2)
        | (((a3 >> i) & 1) << 3)
        | (((a4 >> i) & 1) << 4)
        | (((a5 >> i) & 1) << 5)
        | (((a6 >> i) & 1) << 6)
        | (((a7 >> i) & 1) << 7)
    )


# Both loops move 8 planes at a time, j innermost but one, so that the compiler vectorizes
# over j: byte j of plane p gathers bit p of the coordinates j + t*P/8, t = 0..7.


@jit
def pack_rows(lo, hi, k, bits, out):
    m = k.shape[1] // 8
    for r in range(lo, hi):
        for b in range(0, bits, 8):
            for j in range(m):
                a0, a1, a2, a3 = k[r, j], k[r, m + j], k[r, 2 * m + j], k[r, 3 * m + j]
                a4, a5, a6, a7 = (
                    k[r, 4 * m + j],
                    k[r, 5 * m + j],
                    k[r, 6 * m + j],
                    k[r, 7 * m + j],
                )
                for p in range(b, b + 8):
                    out[r, p, j] = np.uint8(bit_byte(a0, a1, a2, a3, a4, a5, a6, a7, p))


@jit
def unpack_rows(lo, hi, planes, bits, out):
    m = out.shape[1] // 8
    for r in range(lo, hi):
        for b in range(0, bits, 8):
            for j in range(m):
                a0, a1, a2, a3 = (
                    planes[r, b, j],
                    planes[r, b + 1, j],
                    planes[r, b + 2, j],
                    planes[r, b + 3, j],
                )
                a4, a5, a6, a7 = (
                    planes[r, b + 4, j],
                    planes[r, b + 5, j],
                    planes[r, b + 6, j],
                    planes[r, b + 7, j],
                )
                for t in range(8):
                    byte = bit_byte(a0, a1, a2, a3, a4, a5, a6, a7, t)
                    if b == 0:
                        out[r, t * m + j] = byte
                    else:
                        out[r, t * m + j] |= byte << b


@jit
def nearest_rows(lo, hi, rr, key, inv, keyless, bits, limit, theta, use_theta, k, dmax, dmin):
    for row in range(lo, hi):
        mask = (np.int64(1) << bits[row]) - 1
        shift = 1 - (np.int64(1) << (bits[row] - 1))
        w = inv[row]
        top, bottom = np.int64(0), mask
        for j in range(rr.shape[1]):
            u = np.float32(0.0)
            if not keyless[row]:
                u = key[row, j] * w
                if use_theta:
                    u -= theta[row, j]
            f = np.floor(u)
            if not f >= -limit:  # also NaN: a far key decodes garbage the digest rejects
                f = -limit
            elif f > limit:
                f = limit
            s = np.int64(f) + shift
            d = (np.int64(rr[row, j]) - s) & mask
            k[row, j] = s + d
            top = d if d > top else top
            bottom = d if d < bottom else bottom
        dmax[row] = top
        dmin[row] = bottom


@jit
def dequantize_rows(lo, hi, k, eps, rows, theta, use_theta, out):
    for r in range(lo, hi):
        dest, e = rows[r], eps[r]
        if dest < 0:
            continue
        for j in range(k.shape[1]):
            if use_theta:
                out[dest, j] = (np.float32(k[r, j]) + theta[r, j]) * e
            else:
                out[dest, j] = np.float32(k[r, j]) * e


@jit
def blockwise_quantize_rows(lo, hi, x, scales, levels, seed, first, q, quantized):
    """Blocks (rows) [lo, hi) of x with their scales s = max |x| (rows whose s is not finite
    are skipped): q = floor(x L 2^16 / s + V) >> 16 with V hashed from (seed, first + row,
    column), and Q = q (s / L)."""
    lv = np.float32(levels)
    big = np.float32(levels * 65536)
    for r in range(lo, hi):
        s = scales[r]
        if not s < np.float32(np.inf):
            continue
        inv = np.nextafter(big / s, np.float32(0.0)) if s > 0 else np.float32(0.0)
        step = s / lv
        key = hash32(np.uint64(first + r) ^ seed)
        for j in range(x.shape[1]):
            k = (np.int64(np.rint(x[r, j] * inv)) + hash16(j, key)) >> 16
            q[r, j] = k
            quantized[r, j] = np.float32(k) * step


@jit
def pack_nibbles(lo, hi, q, out):
    """Bytes [lo, hi): value 2j in the low nibble, 2j+1 in the high nibble."""
    for j in range(lo, hi):
        out[j] = np.uint8((q[2 * j] & 0x0F) | ((q[2 * j + 1] & 0x0F) << 4))


@jit
def unpack_nibbles(lo, hi, packed, out):
    """Bytes [lo, hi) to values 2j and 2j+1, sign-extended from 4 bits."""
    for j in range(lo, hi):
        b = np.int64(packed[j])
        low, high = b & 0xF, b >> 4
        out[2 * j] = low - 16 if low >= 8 else low
        out[2 * j + 1] = high - 16 if high >= 8 else high


@jit
def blockwise_dequantize_rows(lo, hi, q, scales, levels, out):
    """Blocks (rows) [lo, hi): out = q (s / L)."""
    lv = np.float32(levels)
    for r in range(lo, hi):
        step = scales[r] / lv
        for j in range(q.shape[1]):
            out[r, j] = np.float32(q[r, j]) * step
