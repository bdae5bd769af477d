"""Fused CPU loops of the lossy codecs (lattice, blockwise), compiled with numba.

Legend: R = rows (chunks), C = coordinates per row, P = padded row length (a multiple of 8).

On a CPU every eager torch operation is one pass over the vector, and the lattice codec chains
about a dozen of them per encode and per decode (docs/benchmarks.md, Codecs). Each loop here
reads its inputs once and writes its outputs once, and gives bit for bit what the torch passes
of lattice.py and bitplanes.py give, which stay the path for tensors on an accelerator (a CPU
reader decodes a GPU sender's snapshot and the other way round; tests/unit/test_kernels.py
holds the two paths to each other).

    usable(*tensors) -> bool                       fused loops apply (CPU, numba, not disabled)
    max_abs(x_RC) -> float32 [R]                   max |x| per row, inf where a row is not finite
    quantize(x_RC, e_R, k_RP, q_RC, *, seed=, offsets=, dither=False, planes_RSP=, bits_R=)
                                                   k = floor(x/eps + V/2^16), Q = eps*k
                                                   (eps*(k + theta) with dither), and the
                                                   LSB-first 1-bit planes of k, as
                                                   bitplanes.pack, in one pass
    unpack(planes, bits, out_RP)                   and back (bits planes read, the rest zero)
    nearest(r_RC, key_RC, e_R, keyless_R, bits_R, k_RC, *, theta=None) -> (dmax_R, dmin_R)
                                                   lattice.decode with the window statistics
    dequantize(k_RC, e_R, rows_R, out_RC, *, theta=None)
                                                   Q of row i into out row rows_R[i] (>= 0)
    blockwise_quantize(x_N, block, levels, seed, q, scales, quantized)
    blockwise_dequantize(q_N, scales_R, levels, block, out_N), pack_nibbles, unpack_nibbles
                                                   the blockwise codecs

Stochastic rounding draws its offsets V inside the loop from a counter-based hash of (seed,
chunk, coordinate): private randomness needs no shared stream, and generating 40 MB of offsets
up front cost more than the rounding itself. Subtractive dither passes the shared offsets in.

The loops release the GIL and ``_rows`` splits the rows over ``torch.get_num_threads()``
threads, so the compute thread (encode) and the exchange's workers (decode) run at once.
numba compiles a loop at its first use and caches the machine code on disk (``cache=True``).
Set ``SWARMNET_FUSED=0`` to take the torch passes everywhere (benchmarks compare the two).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

_forced_off = False
HELPER_THREADS = "swarmnet-codec"
"""Name prefix of the threads ``_rows`` adds (a peer's CPU budget charges them)."""
_POOL_LOCK = threading.Lock()
_pool: tuple[ThreadPoolExecutor, int] | None = None  # the helpers and their number


@functools.cache
def _have_numba() -> bool:
    return importlib.util.find_spec("numba") is not None


def usable(*tensors: Tensor) -> bool:
    """True when the fused loops serve these tensors: all on the CPU, numba installed,
    ``SWARMNET_FUSED`` not set to 0 and no :func:`torch_passes` block open."""
    return (
        not _forced_off
        and os.environ.get("SWARMNET_FUSED", "1") != "0"
        and all(t.device.type == "cpu" for t in tensors)
        and _have_numba()
    )


@contextlib.contextmanager
def torch_passes() -> Iterator[None]:
    """Within the block every thread takes the torch passes (benchmarks time both paths)."""
    global _forced_off
    _forced_off = True
    try:
        yield
    finally:
        _forced_off = False


def numba_version() -> str | None:
    """The installed numba's version, None without numba."""
    return importlib.metadata.version("numba") if _have_numba() else None


FUSED_CODECS = ("lattice", "blockwise8", "blockwise4")


def warm_up(codecs: Iterable[str] = FUSED_CODECS) -> None:
    """Compile the loops once (or load them from numba's disk cache) with the argument types a
    CPU peer uses: each of ``codecs``' encode and decode from read-only wire frames. A launcher
    calls it before starting several peers, which would otherwise each compile them, seconds of
    CPU apiece, at their first snapshot; a peer calls it before training, so that loading them
    is not charged to its first interactions."""
    if not usable(torch.empty(0)):
        return
    from swarmnet.codecs import make_codec  # the codecs import this module

    x = torch.linspace(-1.0, 1.0, 200)
    for name, params in (
        ("lattice", {"chunk": 64}),
        ("lattice", {"chunk": 64, "mode": "dither"}),
        ("blockwise8", {}),
        ("blockwise4", {}),
    ):
        if name not in codecs:
            continue
        codec = make_codec(name, seed=0, **params)
        enc = codec.encode(x)
        out, state = torch.empty_like(x), {}
        want = codec.plan(state)
        for _ in range(8):
            meta, frames = codec.select(enc, want)
            res = codec.decode(meta, tuple(bytes(f) for f in frames), x, out, state)
            if res.complete:
                break
            want = res.more


def _loops() -> ModuleType:
    from swarmnet.codecs import loops  # numba: imported on first use

    return loops


def _tell_the_os_its_name() -> None:
    """Pool initializer: Python 3.11 keeps a thread's name to itself; the OS's copy (/proc, top -H)
    is what a peer's CPU budget reads to charge the helpers (budget.named_threads_cpu)."""
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: no prctl (not Linux)
        ctypes.CDLL(None).prctl(15, threading.current_thread().name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def _rows(kernel: Callable[..., Any], rows: int, *args: Any) -> None:
    """Run ``kernel(lo, hi, *args)`` over [0, rows) split into torch.get_num_threads() slices,
    the calling thread taking the first."""
    global _pool
    parts = max(1, min(torch.get_num_threads(), rows))
    if parts == 1:
        kernel(0, rows, *args)
        return
    with _POOL_LOCK:
        if _pool is None or _pool[1] < parts - 1:  # grows with torch.set_num_threads
            _pool = (ThreadPoolExecutor(parts - 1, HELPER_THREADS, initializer=_tell_the_os_its_name), parts - 1)
        pool = _pool[0]
    cuts = [rows * i // parts for i in range(parts + 1)]
    futures = [pool.submit(kernel, cuts[i], cuts[i + 1], *args) for i in range(1, parts)]
    kernel(cuts[0], cuts[1], *args)
    for future in futures:
        future.result()


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _optional(t: Tensor | None, dtype: type) -> tuple[np.ndarray, bool]:
    """(array, present) for an optional 2-D input: numba needs an array of the right type
    either way, so an absent one is a 1x1 placeholder the loop never reads."""
    return (_np(t), True) if t is not None else (np.zeros((1, 1), dtype=dtype), False)


def _pow2(exponents: list[int]) -> np.ndarray:
    """2^e as float32, exactly."""
    return np.ldexp(np.ones(len(exponents), dtype=np.float32), np.asarray(exponents, np.int64))


def max_abs(x_RC: Tensor) -> Tensor:
    """max |x| of every float32 row, inf for a row with an inf or NaN."""
    out = torch.empty(x_RC.shape[0], dtype=torch.int32)
    _rows(_loops().max_abs_rows, x_RC.shape[0], _np(x_RC.view(torch.int32)), _np(out))
    return out.view(torch.float32)


def quantize(
    x_RC: Tensor,
    e_R: list[int],
    k_RP: Tensor,
    q_RC: Tensor,
    *,
    seed: tuple[int, ...] = (0,),
    offsets: Tensor | None = None,
    dither: bool = False,
    planes_RSP: Tensor | None = None,
    bits_R: list[int] | None = None,
) -> None:
    """Lattice coordinates of every row on its own step 2^e into the first C columns of
    ``k_RP`` (int32 or int64; columns C.. are zeroed) and the reconstruction Q into ``q_RC``;
    V from ``offsets`` (int32 [R, C]) or, when None, hashed from ``seed`` (non-negative ints,
    unique per call: a snapshot seed and the first chunk's index) and the row (stochastic
    rounding only). With ``planes_RSP`` (uint8 [R, S, P/8]), also row r's low ``bits_R[r]``
    bits, rounded up to whole bytes, as 1-bit planes laid out as ``bitplanes.pack(k_RP, 1, S/8)``,
    packed while the row is still in cache (planes above those are left as they were)."""
    rows, cols = x_RC.shape
    eps = _pow2(e_R)
    scale = _pow2([16 - e for e in e_R])
    keys = np.random.SeedSequence(list(seed)).generate_state(rows, dtype=np.uint32)
    off, use = _optional(offsets, np.int32)
    if planes_RSP is None:
        nbytes, grid = np.zeros(rows, dtype=np.int64), np.zeros((1, 1, 1), dtype=np.uint8)
    else:
        assert bits_R is not None and k_RP.shape[1] % 8 == 0
        nbytes, grid = np.asarray([-(-b // 8) for b in bits_R], dtype=np.int64), _np(planes_RSP)
        assert int(nbytes.max(initial=0)) * 8 <= grid.shape[1]
    _rows(
        _loops().quantize_rows,
        rows,
        _np(x_RC),
        scale,
        eps,
        keys,
        off,
        use,
        dither,
        _np(k_RP),
        _np(q_RC),
        nbytes,
        grid,
    )


def unpack(planes: Tensor, bits: int, out_RP: Tensor) -> Tensor:
    """Inverse of the packing in :func:`quantize`, reading the first ``bits`` planes (a multiple
    of 8) of each row of ``planes`` (uint8, R rows of at least bits * P/8 bytes); ``out_RP``
    gets their unsigned value."""
    rows, p = out_RP.shape
    grid = planes.view(rows, -1)[:, : bits * (p // 8)].view(rows, bits, p // 8)
    _rows(_loops().unpack_rows, rows, _np(grid), bits, _np(out_RP))
    return out_RP


def nearest(
    r_RC: Tensor,
    key_RC: Tensor,
    e_R: list[int],
    keyless_R: list[bool],
    bits_R: list[int],
    k_RC: Tensor,
    *,
    theta: Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k_hat of ``lattice.decode`` per row (bits_R planes of colour, step 2^e, the key scaled
    to u = key/eps - theta, or u = 0 for keyless rows) into ``k_RC``; returns each row's largest
    and smallest window offset D = k_hat - s (``lattice.nearest``'s statistics)."""
    rows = r_RC.shape[0]
    limit = float(1 << (8 * k_RC.element_size() - 2))
    dmax, dmin = np.empty(rows, dtype=np.int64), np.empty(rows, dtype=np.int64)
    th, use = _optional(theta, np.float32)
    _rows(
        _loops().nearest_rows,
        rows,
        _np(r_RC),
        _np(key_RC),
        _pow2([-e for e in e_R]),
        np.asarray(keyless_R, dtype=np.bool_),
        np.asarray(bits_R, dtype=np.int64),
        np.float32(limit),
        th,
        use,
        _np(k_RC),
        dmax,
        dmin,
        np.int32 if k_RC.dtype == torch.int32 else np.int64,
    )
    return dmax, dmin


def dequantize(
    k_RC: Tensor,
    e_R: list[int],
    rows_R: list[int],
    out_RC: Tensor,
    *,
    theta: Tensor | None = None,
) -> None:
    """Q = 2^e * k (or 2^e * (k + theta)) of row i into ``out_RC[rows_R[i]]``, rows with a
    negative destination skipped (a chunk that failed its digest is never written)."""
    th, use = _optional(theta, np.float32)
    _rows(
        _loops().dequantize_rows,
        k_RC.shape[0],
        _np(k_RC),
        _pow2(e_R),
        np.asarray(rows_R, dtype=np.int64),
        th,
        use,
        _np(out_RC),
    )


def block_spans(n: int, block: int) -> Iterator[tuple[slice, slice, int, int]]:
    """(coordinates, blocks, rows, cols) of the full blocks as one [rows, block] matrix, then of
    the short tail block as a [1, n mod block] one."""
    full, tail = divmod(n, block)
    if full:
        yield slice(0, full * block), slice(0, full), full, block
    if tail:
        yield slice(full * block, n), slice(full, full + 1), 1, tail


def blockwise_quantize(
    x_N: Tensor, block: int, levels: int, seed: int, q: Tensor, scales: Tensor, quantized: Tensor
) -> None:
    """The blockwise codecs' encode (blockwise.py): per block the absmax scale (inf for a
    block that is not finite, which the caller rejects), the int8 values ``q`` with stochastic
    rounding, and Q into ``quantized``; offsets hashed from ``seed``, the block and the
    coordinate."""
    key = int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint32)[0])
    for coords, blocks, rows, cols in block_spans(x_N.numel(), block):
        x_RB = x_N[coords].view(rows, cols)
        s_R = scales[blocks]
        s_R.copy_(max_abs(x_RB))
        _rows(
            _loops().blockwise_quantize_rows,
            rows,
            _np(x_RB),
            _np(s_R),
            levels,
            np.uint64(key),
            blocks.start,
            _np(q[coords].view(rows, cols)),
            _np(quantized[coords].view(rows, cols)),
        )


def pack_nibbles(q_2M: Tensor, out_M: Tensor) -> Tensor:
    """int8 values in [-8, 7] -> bytes, as ``blockwise.pack_nibbles``."""
    _rows(_loops().pack_nibbles, out_M.numel(), _np(q_2M), _np(out_M))
    return out_M


def unpack_nibbles(packed_M: Tensor, out_2M: Tensor) -> Tensor:
    """Inverse of :func:`pack_nibbles`, as ``blockwise.unpack_nibbles``."""
    _rows(_loops().unpack_nibbles, packed_M.numel(), _np(packed_M), _np(out_2M))
    return out_2M


def blockwise_dequantize(
    q_N: Tensor, scales_R: Tensor, levels: int, block: int, out_N: Tensor
) -> Tensor:
    """out = q (s / L) per block of the int8 values ``q_N``, as ``blockwise.dequantize_blocks``."""
    for coords, blocks, rows, cols in block_spans(out_N.numel(), block):
        _rows(
            _loops().blockwise_dequantize_rows,
            rows,
            _np(q_N[coords].view(rows, cols)),
            _np(scales_R[blocks]),
            levels,
            _np(out_N[coords].view(rows, cols)),
        )
    return out_N
