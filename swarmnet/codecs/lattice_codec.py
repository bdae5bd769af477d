"""The lattice bit-plane snapshot codec (SPEC 3.4): encode once, serve any prefix of planes.

Legend: N = coordinates, R = chunks of C coordinates (the last may be shorter; its planes are
padded to a multiple of 8 coordinates), G = plane width in bits, b = bits read of a chunk.

The owner quantizes each chunk on its own lattice eps_c Z^C (eps_c = 2^e_c, epsilon.py), keeps
the exact Q (``Encoded.quantized``) and stores the integer coordinates k as LSB-first planes
with a 64-bit digest per chunk. A reader asks for the low b_c planes of each chunk, b_c
predicted from its last decodes of that neighbour, decodes with its own model as the key and
checks every chunk's digest; chunks that fail are pulled again with 1, 2, 4, ... more planes
(the new planes only; SPEC 3.4 doubles b itself, which a chunk that just missed pays with b
planes: docs/codecs.md has the measurements), up to b_full, which always decodes without a key. Nothing unverified is ever
written to ``out``. The wire layout is in docs/codecs.md; the math is lattice.py.

Reader state (the per-neighbour ``state`` dict the runtime keeps):
- ``state["dist"]``: per chunk, the distance |k_hat - key/eps| seen at the last complete pull,
  in units of that pull's eps (or, after an abandoned pull, what it learnt: ``_learnt``);
  ``plan`` turns it into the planes of the next first request.
- ``state["pull"]``: progress of the pull in flight (verified chunks, planes already received
  of failing chunks, bytes, rounds). Verified chunks are written to ``out`` as soon as they
  pass, so the runtime must hand the same ``out`` (and ``key``) to every decode of one pull and
  may use ``out`` only once ``complete`` is True.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import statistics
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from swarmnet.codecs import kernels, lattice
from swarmnet.codecs.base import Buffer, Codec, DecodeResult, Encoded
from swarmnet.codecs.bitplanes import WIDTHS
from swarmnet.codecs.epsilon import E_MAX, E_MIN, StepPolicy
from swarmnet.codecs.hostbuf import flat_float32
from swarmnet.codecs.published import copies_done, host_copy, published
from swarmnet.codecs.rounding import RandomBits, seeded_bits16
from swarmnet.codecs.wirecheck import (
    as_mapping,
    check_int,
    check_int_list,
    frame_sizes,
    get_bytes,
    get_choice,
    get_int,
    get_int_list,
    versioned_meta,
)
from swarmnet.codecs.workspace import scratch
from swarmnet.errors import CodecError, ConfigError, NonFiniteInput

MODES = ("stochastic", "dither")
LAYOUT_VERSION = 3
"""Snapshot meta layout; 3: the served planes in one payload frame (2 sent a frame per chunk,
1 used truncated SHA-256 digests)."""
MAX_CHUNK = 1 << 24
MAX_CHUNKS = 1 << 22
AUTO_CHUNK_MIN = 4096
AUTO_CHUNKS = 1024
STAT_SAMPLES = 512
GOLDEN = (math.sqrt(5) - 1) / 2
U63 = (1 << 63) - 1
RECENT_PULLS = 5
"""Complete pulls whose distances set the first request to a neighbour with no history."""
_plan_ids = random.Random()


@dataclass(frozen=True, slots=True)
class _Group:
    """Consecutive chunks of equal length: all full chunks, or the short tail chunk."""

    first: int  # index of the group's first chunk
    rows: int
    cols: int  # coordinates per chunk
    pad: int  # cols rounded up to a multiple of 8; a G-bit plane is pad*G/8 bytes
    start: int  # offset of the group's first coordinate in the flat vector

    def view(self, flat: Tensor) -> Tensor:
        return flat[self.start : self.start + self.rows * self.cols].view(self.rows, self.cols)


def _layout(n: int, chunk: int) -> list[_Group]:
    full, tail = divmod(n, chunk)
    groups = [_Group(0, full, chunk, chunk, 0)] if full else []
    if tail:
        groups.append(_Group(full, 1, tail, -(-tail // 8) * 8, full * chunk))
    return groups


@dataclass(frozen=True, slots=True)
class _Samples:
    """Where each chunk's statistics are read: ``index`` holds the flat coordinates of every
    chunk's samples back to back, chunk i's from ``starts[i]``, ``counts[i]`` of them."""

    index: Tensor
    starts: np.ndarray
    counts: np.ndarray

    def rms(self, values: Tensor) -> np.ndarray:
        """Per chunk, the RMS of ``values`` (gathered at ``index``), float64."""
        if not self.counts.size:
            return np.empty(0)
        v = values.cpu().numpy().astype(np.float64)  # CPU<->GPU sync point (R x 512 values)
        return np.sqrt(np.add.reduceat(v * v, self.starts) / self.counts)


def sample_stride(cols: int) -> int:
    """The stride, modulo a chunk of ``cols``, between its statistics' samples: about ``cols``
    times the golden ratio's fraction, made odd and coprime with ``cols``. Coprime, so no
    sample repeats; the golden ratio, so any number of them spreads over the whole chunk (a
    fixed stride, say a prime above the largest chunk, is a small one modulo a power of two:
    512 samples of a 2^20 chunk would all lie in its first fifth); odd, so that they fall on
    every column of a layer whose rows are a power of two long. An even stride aliases with
    the layers' shapes: every 16th coordinate of a [128, 64] weight is one input column, which
    can be a dead input whose weights never move, and the step size measured there came out
    32x too small."""
    stride = max(1, round(cols * GOLDEN)) | 1
    while math.gcd(stride, cols) != 1:
        stride += 2
    return stride


@functools.lru_cache(maxsize=16)
def _samples(n: int, chunk: int, device: torch.device) -> _Samples:
    """Up to STAT_SAMPLES coordinates per chunk for its statistics (:func:`sample_stride`).
    Cached: every snapshot of a model uses the same layout (read-only, only used to index)."""
    index, counts = [], []
    for g in _layout(n, chunk):
        count = min(g.cols, STAT_SAMPLES)
        offsets = torch.arange(count, dtype=torch.int64) * sample_stride(g.cols) % g.cols
        rows = torch.arange(g.rows, dtype=torch.int64)[:, None] * g.cols + g.start
        index.append((rows + offsets).view(-1))
        counts += [count] * g.rows
    sizes = np.asarray(counts, dtype=np.int64)
    starts = np.cumsum(sizes) - sizes
    flat = torch.cat(index) if index else torch.empty(0, dtype=torch.int64)
    return _Samples(flat.to(device), starts, sizes)


def auto_chunk(n: int) -> int:
    """The chunk length when none is configured: the smallest power of two from AUTO_CHUNK_MIN
    up that cuts ``n`` coordinates into at most AUTO_CHUNKS chunks. Each chunk gets its own step
    size and its own bit count, so short chunks fit the planes to their coordinates (the largest
    distance in a chunk decides its bits); the header carries about 15 bytes per chunk."""
    chunk = AUTO_CHUNK_MIN
    while chunk * AUTO_CHUNKS < n and chunk < MAX_CHUNK:
        chunk *= 2
    return chunk


def _chunk_pads(n: int, chunk: int) -> list[int]:
    return [g.pad for g in _layout(n, chunk) for _ in range(g.rows)]


def _one_frame(parts: tuple[Buffer, ...] | list[Buffer]) -> tuple[Buffer, ...]:
    """The wire form of a reply's per-chunk plane ranges: one frame, none for no chunk."""
    if len(parts) <= 1:
        return tuple(parts)
    return (b"".join(parts),)


def _split(frames: Any, sizes: list[int], codec: str) -> list[memoryview]:
    """The per-chunk plane ranges of a reply's one frame (see :func:`_one_frame`)."""
    got = frame_sizes(frames, codec)
    total = sum(sizes)
    if got != ([total] if sizes else []):
        raise CodecError(
            f"{codec}: the reply's {len(got)} frame(s) of {sum(got)} bytes do not match its header: "
            f"{len(sizes)} chunk range(s) of {total} bytes in one frame"
        )
    if not sizes:
        return []
    try:
        whole = memoryview(frames[0]).cast("B")
    except TypeError:
        raise CodecError(f"{codec}: the reply's frame is not a contiguous buffer") from None
    ends = list(itertools.accumulate(sizes))
    return [whole[end - size : end] for end, size in zip(ends, sizes, strict=True)]


@dataclass(frozen=True, slots=True)
class _Header:
    """A validated reply ``meta`` (see docs/codecs.md for the fields)."""

    n: int
    chunk: int
    g: int
    mode: str
    seed: int
    ib: int
    sb: int
    sid: int
    e: list[int]
    bf: list[int]
    h: bytes
    p: int
    ck: list[int]
    lo: list[int]
    hi: list[int]

    @classmethod
    def parse(cls, meta: Any, n: int, codec: str) -> _Header:
        m = versioned_meta(meta, codec, n, LAYOUT_VERSION)
        chunk = get_int(m, "chunk", codec, 8, MAX_CHUNK)
        if chunk % 8:
            raise CodecError(f"{codec}: chunk size {chunk} is not a multiple of 8")
        nch = -(-n // chunk)
        if nch > MAX_CHUNKS:
            raise CodecError(f"{codec}: {nch} chunks exceed the limit {MAX_CHUNKS}")
        g = get_choice(m, "g", codec, WIDTHS)
        ib = get_choice(m, "ib", codec, (32, 64))
        sb = get_int(m, "sb", codec, 8, ib)
        bf = get_int_list(m, "bf", codec, nch, 1, ib - 1)
        if sb % 8 or (bf and max(bf) > sb):
            raise CodecError(
                f"{codec}: stored bits {sb} must be a multiple of 8 and >= every b_full"
            )
        ck = m.get("ck")
        if not isinstance(ck, list | tuple) or len(ck) > nch:
            raise CodecError(f"{codec}: field 'ck' must be a list of at most {nch} chunk indices")
        ck = check_int_list(ck, "'ck'", codec, len(ck), 0, nch - 1)
        if any(a >= b for a, b in itertools.pairwise(ck)):
            raise CodecError(f"{codec}: field 'ck' must be strictly increasing")
        lo = get_int_list(m, "lo", codec, len(ck), 0, sb)
        hi = get_int_list(m, "hi", codec, len(ck), 1, sb)
        for i, (a, b) in enumerate(zip(lo, hi, strict=True)):
            if a % g or b % g or a >= b:
                raise CodecError(
                    f"{codec}: planes [{a}, {b}) of reply entry {i} are not a "
                    f"non-empty range of whole {g}-bit planes"
                )
        return cls(
            n=n,
            chunk=chunk,
            g=g,
            mode=get_choice(m, "mode", codec, MODES),
            seed=get_int(m, "seed", codec, 0, U63),
            ib=ib,
            sb=sb,
            sid=get_int(m, "sid", codec, 0, U63),
            e=get_int_list(m, "e", codec, nch, E_MIN, E_MAX),
            bf=bf,
            h=get_bytes(m, "h", codec, 8 * nch),
            p=get_int(m, "p", codec, 0, U63),
            ck=ck,
            lo=lo,
            hi=hi,
        )


def _pow2(exponents: list[int], device: torch.device) -> Tensor:
    """2^e as float32 [len, 1] (exact for |e| <= 100)."""
    return torch.ldexp(torch.ones(len(exponents), 1), torch.tensor(exponents)[:, None]).to(device)


def _max_abs(x_RC: Tensor, fused: bool) -> Tensor:
    """max |x| per row, inf or NaN where a row is not finite."""
    if fused:
        return kernels.max_abs(x_RC)
    return torch.maximum(x_RC.amax(1), x_RC.amin(1).neg())


def _dither_rows(seed: int, chunks: list[int], cols: int, device: torch.device) -> Tensor:
    """Dither offsets of the listed chunks: chunk i uses the stream of (seed, i)."""
    host = np.empty((len(chunks), cols), dtype=np.uint16)
    for row, i in enumerate(chunks):
        host[row] = seeded_bits16((seed, i), cols)
    out = scratch("lattice.offsets", host.size, torch.int32, device).view(len(chunks), cols)
    if device.type != "cpu":  # widen on the host: accelerators need not convert uint16
        return out.copy_(torch.from_numpy(host.astype(np.int32)))
    return out.copy_(torch.from_numpy(host))


def _nearest(
    r: Tensor,
    key_rows: Tensor,
    e: list[int],
    keyless: list[bool],
    bits: list[int],
    theta: Tensor | None,
    k_hat: Tensor,
) -> Tensor:
    """The torch passes of :func:`kernels.nearest`: k_hat into ``k_hat``, and per row the
    window statistic max(D_max - h + 1, h - D_min) (float64 [m], h = 2^(b-1))."""
    dev, kdtype = k_hat.device, k_hat.dtype
    m, cols = k_hat.shape
    mask = torch.tensor([(1 << b) - 1 for b in bits], dtype=kdtype)[:, None].to(dev)
    shift = torch.tensor([1 - (1 << (b - 1)) for b in bits], dtype=kdtype)[:, None].to(dev)
    inv = torch.tensor([0.0 if kl else 2.0**-x for x, kl in zip(e, keyless, strict=True)])
    u = scratch("lattice.u", m * cols, torch.float32, dev).view(m, cols)
    torch.mul(key_rows, inv[:, None].to(dev), out=u)
    if any(keyless) and not all(keyless):  # key * 0 is not 0 for a non-finite key
        u.masked_fill_(torch.tensor(keyless, device=dev)[:, None], 0.0)
    elif all(keyless):
        u.zero_()
    if theta is not None:
        u.sub_(theta)
    # Far keys are clamped as in the fused loops (the same rounds and statistics on both paths);
    # the digest rejects what they decode.
    start = lattice.nearest(r, mask, u, k_hat, shift)
    half = torch.tensor([float(1 << (b - 1)) for b in bits], dtype=torch.float64)[:, None]
    half = half.to(dev)
    dist = torch.maximum(k_hat.amax(1, keepdim=True) - half + 1, half - k_hat.amin(1, keepdim=True))
    k_hat.add_(start)
    return dist.view(-1).double()


def _learnt(dist: list[float | None] | None, pull: dict[str, Any]) -> list[float | None] | None:
    """The window statistics of the last pull from a neighbour, updated with an abandoned pull's
    (its neighbour moved on, or it timed out): the chunks it verified give their new statistic;
    a chunk that failed at b planes has D > 2^(b-1), so the next first request asks for at least
    one plane more. Without it, a reader whose escalations keep being cut short asked for the
    same failing planes every time."""
    nch = len(pull["done"])
    if not pull["rounds"] or (dist is not None and len(dist) != nch):  # nothing learnt, or another layout
        return dist
    learnt = list(dist) if dist is not None else [None] * nch
    for i, measured in enumerate(pull["dist"]):
        if measured is not None:
            learnt[i] = measured
    for i, (bits, _) in pull["held"].items():
        learnt[i] = max(learnt[i] or 0.0, float(1 << (bits - 1)))
    return learnt


class LatticeCodec(Codec):
    """Bit-plane lattice snapshots decoded relative to the reader's own model (SPEC 3.4).

    Args:
        chunk: coordinates per chunk (multiple of 64); eps, b_full and the digest are per chunk.
            None (the default) picks it from the vector's size (``auto_chunk``).
        width: plane width G in bits (1, 4 or 8): 1 reads exactly the bits needed, 4 and 8
            round them up to a multiple of G and are cheaper to pack and unpack.
        mode: "stochastic" rounding or seeded subtractive "dither" (SPEC 3.2).
        eps: a fixed step (rounded down to a power of two) instead of the adaptive one.
        eps_scale, eps_ema, eps_init: the adaptive step policy (epsilon.py).
        first_bits: bits per coordinate of the reader's very first pull (no distance seen yet).
        margin: growth allowed for the distance since the last decode (the "R" of SPEC 3.4).
        margin_cpu: the same while the exchange is CPU-bound (``plan``'s ``cpu_bound`` hint):
            a larger margin moves a few more bytes and saves second requests, each of which
            costs both peers a round trip of CPU.
        seed: seeds the private randomness (tests and benchmarks).
    """

    name = "lattice"
    partial_reads = True
    uses_progress = True

    def __init__(
        self,
        *,
        chunk: int | None = None,
        width: int = 1,
        mode: str = "stochastic",
        eps: float | None = None,
        eps_scale: float = 0.5,
        eps_ema: float = 0.9,
        eps_init: float = 2.0**-10,
        first_bits: int = 8,
        margin: float = 1.25,
        margin_cpu: float = 1.6,
        seed: int | None = None,
    ) -> None:
        if chunk is not None and (not isinstance(chunk, int) or not 64 <= chunk <= MAX_CHUNK or chunk % 64):
            raise ConfigError(
                f"lattice: chunk must be a multiple of 64 in [64, {MAX_CHUNK}], got {chunk!r}"
            )
        if width not in WIDTHS:
            raise ConfigError(f"lattice: width must be one of {WIDTHS}, got {width!r}")
        if mode not in MODES:
            raise ConfigError(f"lattice: mode must be one of {MODES}, got {mode!r}")
        if eps is not None and not (math.isfinite(eps) and 2.0**E_MIN <= eps < 2.0 ** (E_MAX + 1)):
            raise ConfigError(
                f"lattice: eps must be a finite number in [2^{E_MIN}, 2^{E_MAX + 1}), got {eps!r}"
            )
        positive = (("eps_scale", eps_scale), ("eps_init", eps_init), ("margin", margin), ("margin_cpu", margin_cpu))
        for label, value in positive:
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"lattice: {label} must be a positive number, got {value!r}")
        if not 0 <= eps_ema < 1:
            raise ConfigError(f"lattice: eps_ema must be in [0, 1), got {eps_ema!r}")
        if not isinstance(first_bits, int) or not 1 <= first_bits <= 64:
            raise ConfigError(f"lattice: first_bits must be an int in [1, 64], got {first_bits!r}")
        self.chunk, self.width, self.mode = chunk, width, mode
        self.first_bits, self.margin, self.margin_cpu = first_bits, float(margin), float(margin_cpu)
        self.policy = StepPolicy(fixed=eps, scale=eps_scale, ema=eps_ema, init=eps_init)
        self._bits = RandomBits(seed)
        self._prev_samples: Tensor | None = None
        self._recent_dists: deque[float] = deque(maxlen=RECENT_PULLS)
        """Largest D of each of the last accepted pulls from any neighbour: their median is the
        prior for a neighbour this reader has no history of (the distances in a swarm are
        alike; the median, so that one far or hostile neighbour does not set it)."""

    def params(self) -> dict[str, Any]:
        return {
            "chunk": self.chunk,
            "width": self.width,
            "mode": self.mode,
            "eps": self.policy.fixed,
            "eps_scale": self.policy.scale,
            "eps_ema": self.policy.ema,
            "eps_init": self.policy.init,
            "first_bits": self.first_bits,
            "margin": self.margin,
            "margin_cpu": self.margin_cpu,
        }

    # ----------------------------------------------------------------------------- sender

    def encode(self, flat_N: Tensor, hints: Mapping[str, Any] | None = None) -> Encoded:
        x = flat_float32(flat_N, self.name)
        n, dev = x.numel(), x.device
        chunk = self.chunk or auto_chunk(n)
        groups = _layout(n, chunk)
        fused = kernels.usable(x)
        max_abs = (
            torch.cat([_max_abs(g.view(x), fused) for g in groups]) if groups else torch.empty(0)
        )
        # CPU<->GPU sync point: the header needs the values.
        max_abs_R = max_abs.cpu().numpy().astype(np.float64)
        if not np.isfinite(max_abs_R).all():
            raise NonFiniteInput("lattice: the vector has non-finite values")
        progress = hints.get("progress") if hints else None
        e_R = self.policy.exponents(*self._chunk_rms(x, chunk, progress), max_abs_R, hints)
        bound_R = np.ldexp(max_abs_R, -e_R)
        bound = float(bound_R.max()) if groups else 0.0
        if not bound < lattice.INT64_SAFE:
            raise CodecError(
                f"lattice: eps is too small for these values (|x|/eps up to {bound:.3g} >= 2^46)"
            )
        ib = 32 if bound < lattice.INT32_SAFE else 64
        kdtype = torch.int32 if ib == 32 else torch.int64
        bf = lattice.bits_for_bound(torch.from_numpy(np.floor(bound_R) + 1)).tolist()
        sb = 8 * -(-max(bf, default=1) // 8)
        seed = self._bits.next_seed() if self.mode == "dither" else 0
        quantized = published(n, torch.float32, dev)
        digests, frames = [], []
        for g in groups:
            e_rows = e_R[g.first : g.first + g.rows].tolist()
            offsets = (
                _dither_rows(seed, list(range(g.first, g.first + g.rows)), g.cols, dev)
                if self.mode == "dither"
                else None
            )
            k = scratch("lattice.k", g.rows * g.pad, kdtype, dev).view(g.rows, g.pad)
            # The planes are published where they are made on a CPU; on a GPU their host copy
            # is, and the device buffer is freed once that copy has read it.
            size = g.rows * sb * g.pad // 8
            out = published(size, torch.uint8, dev)
            bf_rows = bf[g.first : g.first + g.rows]
            packed = fused and self.width == 1  # the loop packs each row while it is in cache
            if fused:
                kernels.quantize(
                    g.view(x),
                    e_rows,
                    k,
                    g.view(quantized),
                    seed=(self._bits.next_seed(), g.first),
                    offsets=offsets,
                    dither=offsets is not None,
                    planes_RSP=out.view(g.rows, sb, g.pad // 8) if packed else None,
                    bits_R=bf_rows,
                )
            else:
                k[:, g.cols :].zero_()
                self._quantize(g, x, e_rows, offsets, bound, k, quantized)
            planes = out if packed else lattice.to_planes(k, self.width, sb // 8, out=out)
            if dev.type != "cpu":
                planes = host_copy(planes)  # only the wire bytes go to host (queued, see ready)
            # A chunk's frame stops at b_full: the planes above it are sign extension.
            planes = planes.reshape(g.rows, -1)
            row_bytes, plane_bytes = planes.shape[1], g.pad * self.width // 8
            flat = memoryview(planes.view(-1).numpy())
            frames.extend(
                flat[i * row_bytes : i * row_bytes + -(-b // self.width) * plane_bytes]
                for i, b in enumerate(bf_rows)
            )
            digests.append(lattice.chunk_hashes(k[:, : g.cols]))
        nch = len(bf)
        meta = {
            "v": LAYOUT_VERSION,
            "n": n,
            "chunk": chunk,
            "g": self.width,
            "mode": self.mode,
            "seed": seed,
            "ib": ib,
            "sb": sb,
            "sid": self._bits.next_seed(),
            "e": e_R.tolist(),
            "bf": bf,
            "h": b"".join(digests),
            "p": 0,
            "ck": list(range(nch)),
            "lo": [0] * nch,
            "hi": [-(-b // self.width) * self.width for b in bf],
        }
        return Encoded(self.name, meta, tuple(frames), quantized, copies_done(dev))

    def _quantize(
        self,
        g: _Group,
        x: Tensor,
        e_rows: list[int],
        offsets: Tensor | None,
        bound: float,
        k: Tensor,
        quantized: Tensor,
    ) -> None:
        """The torch passes of :func:`kernels.quantize` (accelerators, or fused loops off)."""
        eps = _pow2(e_rows, x.device)
        if offsets is None:
            offsets = self._bits.fill(
                scratch("lattice.offsets", g.rows * g.cols, torch.int32, x.device)
            ).view(g.rows, g.cols)
        work = scratch("lattice.work", g.rows * g.cols, torch.float32, x.device)
        work = work.view(g.rows, g.cols)
        lattice.quantize(g.view(x), eps, offsets, bound=bound, out=k[:, : g.cols], work=work)
        theta = lattice.dither(offsets, out=work) if self.mode == "dither" else None
        lattice.dequantize(k[:, : g.cols], eps, theta, out=g.view(quantized))

    def _chunk_rms(
        self, x: Tensor, chunk: int, progress: Tensor | None = None
    ) -> tuple[Callable[[], np.ndarray], np.ndarray | None]:
        """Per-chunk RMS of x (lazily) and of the training progress since the previous snapshot
        (``progress``, when the owner tracks it) or else of x minus the previous snapshot's x,
        float64.

        Both are estimated on 512 scattered coordinates per chunk (``_samples``), which pins an
        RMS to a few percent, plenty to pick a power of two. Keeping those samples of the exact
        previous input (not of its Q) matters: against Q the quantization noise itself would
        read as an update, and the step of a chunk that stopped changing would shrink by half
        an octave per snapshot.
        """
        where = _samples(x.numel(), chunk, x.device)
        samples = x.index_select(0, where.index)
        prev, self._prev_samples = self._prev_samples, samples
        if self.policy.fixed is not None:
            return lambda: where.rms(samples), None
        if prev is None or prev.shape != samples.shape or prev.device != x.device:
            self.policy.reset()
            return lambda: where.rms(samples), None
        if progress is not None:
            moved = flat_float32(progress, self.name).index_select(0, where.index)
            return lambda: where.rms(samples), where.rms(moved)
        return lambda: where.rms(samples), where.rms(samples - prev)

    def select(self, encoded: Encoded, want: Any) -> tuple[dict[str, Any], tuple[Buffer, ...]]:
        """Planes ``want["from"]``..``want["to"]`` (bits, per chunk or one int for all) of every
        chunk, capped at b_full and rounded out to whole G-bit planes, back to back in one frame.

        ``Encoded.frames`` holds one buffer per chunk; the wire gets a single frame because a
        frame costs more than its bytes: 610 frames of 12 KB (a 10M model) took 19.5 ms per
        ZeroMQ round trip on loopback, copied into one 4.5 ms (pyzmq copies frames under 64 KB
        anyway), and 30 frames of 2 KB 0.38 ms against 0.24."""
        meta = encoded.meta
        if want is None:
            return meta, _one_frame(encoded.frames)
        w = as_mapping(want, self.name, "want")
        get_int(w, "v", self.name, 1, 1)
        nch, g = len(meta["bf"]), meta["g"]
        p = get_int(w, "p", self.name, 0, U63) if "p" in w else 0
        lo_bits, hi_bits = (self._per_chunk(w, key, nch) for key in ("from", "to"))
        pads = _chunk_pads(meta["n"], meta["chunk"])
        ck, lo, hi, frames = [], [], [], []
        for i in range(nch):
            start = lo_bits[i] // g * g
            stop = -(-min(hi_bits[i], meta["bf"][i]) // g) * g
            if stop <= start:
                continue
            plane_bytes = pads[i] * g // 8
            ck.append(i)
            lo.append(start)
            hi.append(stop)
            frames.append(encoded.frames[i][start // g * plane_bytes : stop // g * plane_bytes])
        return {**meta, "p": p, "ck": ck, "lo": lo, "hi": hi}, _one_frame(frames)

    def _per_chunk(self, want: Mapping[str, Any], key: str, nch: int) -> list[int]:
        if key not in want:
            raise CodecError(f"{self.name}: want is missing {key!r}")
        value = want[key]
        if isinstance(value, int) and not isinstance(value, bool):
            return [check_int(value, repr(key), self.name, 0, 64)] * nch
        if not isinstance(value, list | tuple):
            raise CodecError(f"{self.name}: want field {key!r} must be an int (every chunk) or a list of "
                             f"{nch} ints (one per chunk), got {type(value).__name__}")
        return check_int_list(value, repr(key), self.name, nch, 0, 64)

    # ----------------------------------------------------------------------------- reader

    def plan(self, state: dict[str, Any], hints: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """First request of a pull: per chunk b = 1 + ceil(log2(margin * D)) bits, D the window
        statistic of that chunk at the last pull from this neighbour (SPEC 3.4 reader step 1;
        the decode is exact iff D <= 2^(b-1)). A neighbour with no history gets the bits the
        last few accepted pulls from any neighbour needed (their median); the very first pull, ``first_bits``. The margin is
        ``margin_cpu`` while ``hints["cpu_bound"]``: then CPU, not bytes, limits the merges."""
        # An abandoned pull's progress must not be resumed: its verified chunks are no longer in
        # the decode buffer, which other pulls have used since. What it learnt stays.
        abandoned = state.pop("pull", None)
        if abandoned is not None:
            state["dist"] = _learnt(state.get("dist"), abandoned)
        margin = self.margin_cpu if hints and hints.get("cpu_bound") else self.margin
        dist = state.get("dist")
        to: int | list[int] = (
            self._prior(None, 0, margin)
            if dist is None
            else [self._prior(dist, i, margin) for i in range(len(dist))]
        )
        return {"v": 1, "p": _plan_ids.getrandbits(62) + 1, "from": 0, "to": to}

    def accepted(self, stats: Mapping[str, float]) -> None:
        if "dist_max" in stats:
            self._recent_dists.append(stats["dist_max"])

    def _prior(self, dist: list[float | None] | None, i: int, margin: float) -> int:
        """Bits a first request asks for chunk ``i``: from its window statistic at the last pull
        from this neighbour (``dist``, None when there is none), else from the last few accepted pulls."""
        if dist is None or dist[i] is None:
            return self._predict(statistics.median(self._recent_dists) if self._recent_dists else None, margin)
        return self._predict(dist[i], margin)

    def _predict(self, dist: float | None, margin: float) -> int:
        if dist is None or not math.isfinite(dist):
            return self.first_bits
        return min(64, 1 + math.ceil(math.log2(max(margin * dist, 1.0))))

    def decode(
        self,
        meta: Mapping[str, Any],
        frames: tuple[Buffer, ...],
        key_N: Tensor,
        out_N: Tensor,
        state: dict[str, Any],
    ) -> DecodeResult:
        n = out_N.numel()
        h = _Header.parse(meta, n, self.name)
        pads = _chunk_pads(n, h.chunk)
        expected = [
            (b - a) // h.g * pads[i] * h.g // 8 for i, a, b in zip(h.ck, h.lo, h.hi, strict=True)
        ]
        parts = _split(frames, expected, self.name)
        pull = self._pull(state, h)
        pull["rounds"] += 1
        pull["bytes"] += sum(expected)
        key, out = key_N.view(-1), out_N.view(-1)
        entries = {i: j for j, i in enumerate(h.ck) if not pull["done"][i]}
        for g in _layout(n, h.chunk):
            mine = [(i, entries[i]) for i in range(g.first, g.first + g.rows) if i in entries]
            if mine:
                self._decode_group(h, g, mine, parts, key, out, pull)
        return self._finish(h, state, pull, n)

    def _pull(self, state: dict[str, Any], h: _Header) -> dict[str, Any]:
        """The progress record of this reply's pull; a new pull starts when the pull id changes
        or the reply carries a chunk this pull already verified."""
        nch = len(h.bf)
        pull = state.get("pull")
        fresh = (
            pull is None
            or pull["p"] != h.p
            or len(pull["done"]) != nch
            or any(pull["done"][i] for i in h.ck)
        )
        layout = (h.sid, h.chunk, h.g, h.mode, h.seed, h.ib, h.sb, h.e, h.bf, h.h)
        if not fresh and pull is not None and pull["layout"] != layout:
            raise CodecError(f"{self.name}: the snapshot or its layout changed between rounds of one pull")
        if fresh:
            pull = state["pull"] = {
                "p": h.p,
                "layout": layout,
                "done": [False] * nch,
                "held": {},
                "misses": {},
                "dist": [None] * nch,
                "bytes": 0,
                "rounds": 0,
                "failed": 0,
            }
        assert pull is not None
        return pull

    def _decode_group(
        self,
        h: _Header,
        g: _Group,
        mine: list[tuple[int, int]],
        frames: list[memoryview],
        key: Tensor,
        out: Tensor,
        pull: dict[str, Any],
    ) -> None:
        """Decode and verify the received chunks of one group; write the verified ones."""
        dev, m = out.device, len(mine)
        chunks = [i for i, _ in mine]
        his = [h.hi[j] for _, j in mine]
        nbytes = -(-max(his) // 8)
        plane_bytes = g.pad * h.g // 8
        kdtype = torch.int32 if h.ib == 32 else torch.int64
        buf = scratch("lattice.planes", m * nbytes * g.pad, torch.uint8, dev).view(m, -1)
        # Frames are small: copy them with numpy on the host (one memcpy each, no thread pool
        # fork/join per copy), then move the whole buffer to the device at once.
        host = buf.numpy() if dev.type == "cpu" else np.empty(tuple(buf.shape), dtype=np.uint8)
        host.fill(0)
        for row, (i, j) in enumerate(mine):
            start = h.lo[j] // h.g * plane_bytes
            if start:
                held = pull["held"].get(i)
                if held is None or held[0] < h.lo[j] or len(held[1]) < start:
                    raise CodecError(
                        f"{self.name}: chunk {i} starts at bit {h.lo[j]} but only "
                        f"{0 if held is None else held[0]} bits were received before"
                    )
                host[row, :start] = np.frombuffer(held[1], dtype=np.uint8, count=start)
            stop = h.hi[j] // h.g * plane_bytes
            host[row, start:stop] = np.frombuffer(frames[j], dtype=np.uint8)
        if dev.type != "cpu":
            buf.copy_(torch.from_numpy(host))  # host->device: the received planes only
        fused = kernels.usable(out, key) and key.dtype == torch.float32
        r = scratch("lattice.r", m * g.pad, kdtype, dev).view(m, g.pad)
        if fused and h.g == 1:
            kernels.unpack(buf, 8 * nbytes, r)
        else:
            lattice.from_planes(buf, h.g, nbytes, r)

        e = [h.e[i] for i in chunks]
        bf = [h.bf[i] for i in chunks]
        # A keyless chunk (all b_full planes) decodes by plain sign extension: u = 0.
        keyless = [b >= f for b, f in zip(his, bf, strict=True)]
        bits = [min(b, f) for b, f in zip(his, bf, strict=True)]
        key_rows = g.view(key)
        if m < g.rows:
            index = torch.tensor(chunks, device=dev) - g.first
            sel = scratch("lattice.key", m * g.cols, key.dtype, dev).view(m, g.cols)
            key_rows = torch.index_select(key_rows, 0, index, out=sel)
        theta = None
        if h.mode == "dither":
            theta = scratch("lattice.theta", m * g.cols, torch.float32, dev).view(m, g.cols)
            lattice.dither(_dither_rows(h.seed, chunks, g.cols, dev), out=theta)
        k_hat = scratch("lattice.khat", m * g.cols, kdtype, dev).view(m, g.cols)
        half = [1 << (b - 1) for b in bits]
        if fused:
            dmax, dmin = kernels.nearest(
                r[:, : g.cols], key_rows, e, keyless, bits, k_hat, theta=theta
            )
            window = np.maximum(dmax - np.asarray(half) + 1, np.asarray(half) - dmin)
            dist = torch.from_numpy(window.astype(np.float64))
        else:
            dist = _nearest(r[:, : g.cols], key_rows, e, keyless, bits, theta, k_hat)
        if any(keyless):
            rows = torch.tensor(keyless, device=dev)
            exact_u = key_rows[rows] * _pow2(
                [-x for x, kl in zip(e, keyless, strict=True) if kl], dev
            )
            if theta is not None:
                exact_u -= theta[rows]
            dist[rows] = (k_hat[rows] - exact_u).abs().amax(1).double()
        digests = lattice.chunk_hashes(k_hat)
        good = [
            digests[8 * row : 8 * row + 8] == h.h[8 * i : 8 * i + 8] for row, i in enumerate(chunks)
        ]
        self._write(g, chunks, good, k_hat, e, theta, out, fused)
        dist_list = dist.tolist()  # CPU<->GPU sync point (one value per chunk)
        for row, (i, j) in enumerate(mine):
            if good[row]:
                pull["done"][i] = True
                pull["dist"][i] = dist_list[row]
                pull["held"].pop(i, None)
                continue
            if keyless[row]:
                raise CodecError(
                    f"{self.name}: chunk {i} fails its digest with all b_full planes "
                    "(corrupted snapshot)"
                )
            pull["failed"] += 1
            pull["misses"][i] = pull["misses"].get(i, 0) + 1
            held = pull["held"].get(i)
            prefix = held[1][: h.lo[j] // h.g * plane_bytes] if h.lo[j] else b""
            pull["held"][i] = (h.hi[j], bytearray(prefix) + memoryview(frames[j]).cast("B"))

    def _write(
        self,
        g: _Group,
        chunks: list[int],
        good: list[bool],
        k_hat: Tensor,
        e: list[int],
        theta: Tensor | None,
        out: Tensor,
        fused: bool,
    ) -> None:
        if not any(good):
            return
        out_rows = g.view(out)
        if fused:
            rows = [i - g.first if ok else -1 for i, ok in zip(chunks, good, strict=True)]
            kernels.dequantize(k_hat, e, rows, out_rows, theta=theta)
            return
        eps = _pow2(e, out.device)
        if all(good) and len(chunks) == g.rows:
            lattice.dequantize(k_hat, eps, theta, out=out_rows)
            return
        rows = torch.tensor(good, device=out.device)
        values = lattice.dequantize(k_hat[rows], eps[rows], None if theta is None else theta[rows])
        index = torch.tensor(
            [i - g.first for i, ok in zip(chunks, good, strict=True) if ok], device=out.device
        )
        out_rows.index_copy_(0, index, values)

    def _finish(
        self, h: _Header, state: dict[str, Any], pull: dict[str, Any], n: int
    ) -> DecodeResult:
        nch = len(h.bf)
        stats = {
            "bits_per_coord": 8.0 * pull["bytes"] / max(n, 1),
            "rounds": float(pull["rounds"]),
            "failed_chunks": float(pull["failed"]),
        }
        waiting = [i for i in range(nch) if not pull["done"][i]]
        if not waiting:
            dist = pull["dist"]
            state["dist"] = dist
            state.pop("pull", None)
            stats["dist_max"] = max((d for d in dist if d is not None), default=0.0)
            return DecodeResult(True, stats=stats)
        old = state.get("dist")
        lo, hi = [0] * nch, [0] * nch
        for i in waiting:
            held = pull["held"].get(i)
            if held is None:  # never received in this pull: ask as a first request would
                hi[i] = self._prior(old if old is not None and len(old) == nch else None, i, self.margin)
            else:  # failed: the next 1, 2, 4, ... planes (SPEC 3.4 reader step 2 doubles b; see the module doc)
                lo[i] = held[0]
                hi[i] = min(h.bf[i], held[0] + (1 << min(pull["misses"][i] - 1, 6)))
        return DecodeResult(False, more={"v": 1, "p": h.p, "from": lo, "to": hi}, stats=stats)
