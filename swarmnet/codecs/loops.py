"""The numba loops behind kernels.py (imported on first use: numba costs a fraction of a second
to import and each loop a second to compile, cached on disk afterwards).

Every loop takes a row range [lo, hi) first so that kernels.py can split the rows over threads;
integer arithmetic is widened to int64 by numba, hence the explicit masks and casts.
"""

from __future__ import annotations

import numba
import numpy as np

jit = numba.njit(nogil=True, cache=True, boundscheck=False)


@numba.njit(inline="always")
def hash32(x):
    """A bijective hash of the low 32 bits of x (two multiply-xorshift rounds). Every step is
    cast back to uint32: numba widens integer arithmetic to 64 bits, and 32-bit lanes are what
    lets the compiler vectorize a row of hashes."""
    x = np.uint32(x)
    for _ in range(2):
        x = np.uint32(x ^ (x >> np.uint32(16)))
        x = np.uint32(x * np.uint32(0x7FEB352D))
        x = np.uint32(x ^ (x >> np.uint32(15)))
        x = np.uint32(x * np.uint32(0x846CA68B))
        x = np.uint32(x ^ (x >> np.uint32(16)))
    return x


@numba.njit(inline="always")
def hashed_offsets(key, v):
    """v[j] = 16 uniform bits from the hash of j ^ key (the private offsets of one row)."""
    key = np.uint32(key)
    for j in range(v.shape[0]):
        v[j] = np.int32(hash32(np.uint32(j) ^ key) >> np.uint32(16))


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


@numba.njit(inline="always")
def floor_offset(a, v):
    """(rint(a) + v) >> 16 for a float32 a and an offset v in [0, 2^16), as an integer-valued
    float64: the high part floor(rint(a) / 2^16) and the low 16 bits plus v are both exact in
    float64 for any |a| < 2^63, and unlike the int64 form the float arithmetic vectorizes."""
    s = np.float64(np.rint(a))
    high = np.floor(s * (1.0 / 65536.0))
    return high + np.floor((s - high * 65536.0 + np.float64(v)) * (1.0 / 65536.0))


@numba.njit(inline="always")
def transpose8(x):
    """The 8x8 bit matrix in x (byte t = row t, bit i = column i) transposed: byte i of the
    result holds bit i of every input byte. Its own inverse (three delta swaps)."""
    t = (x ^ (x >> np.uint64(7))) & np.uint64(0x00AA00AA00AA00AA)
    x = x ^ t ^ (t << np.uint64(7))
    t = (x ^ (x >> np.uint64(14))) & np.uint64(0x0000CCCC0000CCCC)
    x = x ^ t ^ (t << np.uint64(14))
    t = (x ^ (x >> np.uint64(28))) & np.uint64(0x00000000F0F0F0F0)
    return x ^ t ^ (t << np.uint64(28))


@numba.njit(inline="always")
def byte_at(a, shift):
    """Byte ``shift / 8`` of the integer a, as uint64."""
    return np.uint64(a >> shift) & np.uint64(0xFF)


# The 1-bit plane layout (bitplanes.pack with g = 1): byte j of plane p holds bit p of the
# coordinates j + t*P/8, t = 0..7. So for each j the 8 bytes of 8 consecutive planes are the
# transpose of one byte of those 8 coordinates: one 8x8 bit transpose per j and group of 8
# planes, vectorized over j.


@numba.njit(inline="always")
def pack_row(k, nbytes, out):
    """Planes 0 .. 8 nbytes - 1 of the integers k (length P) into out [planes, P/8]."""
    m = k.shape[0] // 8
    for b in range(0, 8 * nbytes, 8):
        for j in range(m):
            x = np.uint64(0)
            for t in range(8):
                x |= byte_at(k[t * m + j], b) << np.uint64(8 * t)
            x = transpose8(x)
            for p in range(8):
                out[b + p, j] = np.uint8(x >> np.uint64(8 * p))


@jit
def quantize_rows(lo, hi, x, scale, eps, keys, offsets, use_offsets, dither, k, q, nbytes, planes):
    """Rows [lo, hi): k = (rint(x * scale) + V) >> 16 into the first C columns of k (the rest
    zeroed) and Q into q, V from offsets or hashed from keys; then, while the row is in cache,
    its first 8 nbytes[r] planes into planes[r] (none where nbytes[r] = 0)."""
    half = np.float32(32767.5)
    inv_one = np.float32(1.0 / 65536.0)
    cols = x.shape[1]
    hashed = np.empty(0 if use_offsets else cols, dtype=np.int32)
    for r in range(lo, hi):
        s, e = scale[r], eps[r]
        if use_offsets:
            v = offsets[r]
        else:
            hashed_offsets(keys[r], hashed)
            v = hashed
        if dither:
            for j in range(cols):
                kk = floor_offset(x[r, j] * s, v[j])
                k[r, j] = kk
                q[r, j] = (np.float32(kk) + (half - np.float32(v[j])) * inv_one) * e
        else:
            for j in range(cols):
                kk = floor_offset(x[r, j] * s, v[j])
                k[r, j] = kk
                q[r, j] = np.float32(kk) * e
        k[r, cols:] = 0
        if nbytes[r]:
            pack_row(k[r], nbytes[r], planes[r])


@jit
def unpack_rows(lo, hi, planes, bits, out):
    """Rows [lo, hi): the unsigned value of the first ``bits`` (a multiple of 8) planes."""
    m = out.shape[1] // 8
    for r in range(lo, hi):
        for b in range(0, bits, 8):
            for j in range(m):
                x = np.uint64(0)
                for p in range(8):
                    x |= np.uint64(planes[r, b + p, j]) << np.uint64(8 * p)
                x = transpose8(x)
                for t in range(8):
                    byte = (x >> np.uint64(8 * t)) & np.uint64(0xFF)
                    if b == 0:
                        out[r, t * m + j] = byte
                    else:
                        out[r, t * m + j] |= byte << np.uint64(b)


@numba.njit(inline="always")
def nearest_one(r, u, limit, mask, shift, T):
    """The integer congruent to r mod 2^b nearest to u (mask = 2^b - 1, shift = 1 - 2^(b-1)),
    and its window offset d in [0, 2^b), all in the integer type T of k; floor(u) is clamped to
    +-limit, which also sends a NaN key to -limit: a far key decodes garbage the digest rejects.
    T(...) around every step keeps the arithmetic in T's width (numba would widen it to 64 bits
    and the loops would not vectorize); the differences wrap, which is right modulo 2^b."""
    f = np.floor(u)
    if not f >= -limit:
        f = -limit
    elif f > limit:
        f = limit
    s = T(T(f) + shift)
    d = T(T(r - s) & mask)
    return T(s + d), d


@jit
def nearest_rows(lo, hi, rr, key, inv, keyless, bits, limit, theta, use_theta, k, dmax, dmin, T):
    """Rows [lo, hi): k_hat from the b = bits[row] low bits rr and u = key * inv - theta (u = 0
    for keyless rows), with the largest and smallest window offset of each row. The per-row
    cases are separate loops so that each vectorizes."""
    cols = rr.shape[1]
    for row in range(lo, hi):
        mask = T((np.int64(1) << bits[row]) - 1)
        shift = T(1 - (np.int64(1) << (bits[row] - 1)))
        w = inv[row]
        top, bottom = T(0), mask
        if keyless[row]:
            for j in range(cols):
                k[row, j], d = nearest_one(rr[row, j], np.float32(0.0), limit, mask, shift, T)
                top, bottom = max(top, d), min(bottom, d)
        elif use_theta:
            for j in range(cols):
                u = key[row, j] * w - theta[row, j]
                k[row, j], d = nearest_one(rr[row, j], u, limit, mask, shift, T)
                top, bottom = max(top, d), min(bottom, d)
        else:
            for j in range(cols):
                u = key[row, j] * w
                k[row, j], d = nearest_one(rr[row, j], u, limit, mask, shift, T)
                top, bottom = max(top, d), min(bottom, d)
        dmax[row] = top
        dmin[row] = bottom


@jit
def dequantize_rows(lo, hi, k, eps, rows, theta, use_theta, out):
    for r in range(lo, hi):
        dest, e = rows[r], eps[r]
        if dest < 0:
            continue
        if use_theta:
            for j in range(k.shape[1]):
                out[dest, j] = (np.float32(k[r, j]) + theta[r, j]) * e
        else:
            for j in range(k.shape[1]):
                out[dest, j] = np.float32(k[r, j]) * e


@jit
def blockwise_quantize_rows(lo, hi, x, scales, levels, seed, first, q, quantized):
    """Blocks (rows) [lo, hi) of x with their scales s = max |x| (rows whose s is not finite
    are skipped): q = (rint(x L 2^16 / s) + V) >> 16 with V hashed from (seed, first + row,
    column), and Q = q (s / L)."""
    lv = np.float32(levels)
    big = np.float32(levels * 65536)
    v = np.empty(x.shape[1], dtype=np.int32)
    for r in range(lo, hi):
        s = scales[r]
        if not s < np.float32(np.inf):
            continue
        inv = np.nextafter(big / s, np.float32(0.0)) if s > 0 else np.float32(0.0)
        step = s / lv
        hashed_offsets(hash32(np.uint64(first + r) ^ seed), v)
        for j in range(x.shape[1]):
            k = floor_offset(x[r, j] * inv, v[j])
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
