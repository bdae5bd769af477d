"""LSB-first bit-planes of integer vectors (SPEC 3.4), packed 1, 4 or 8 bits per plane.

Legend: R = rows (chunks, or models in a batch), C = coordinates per row (a multiple of 8),
NB = byte planes (ceil(bits / 8)), G = plane width in bits (1, 4 or 8).

Layout of one row, G-bit planes, each of C*G/8 bytes, plane p holding bits [pG, pG+G) of every
coordinate in two's complement (plane 0 = least significant):

- G = 8: byte j of plane p is byte p of coordinate j;
- G = 4: byte j of plane p holds coordinate j in its low nibble and coordinate j + C/2 in its
  high nibble;
- G = 1: bit i of byte j of plane p is bit p of coordinate j + i*C/8.

The planes of a row are stored one after the other, so the first b bits of every coordinate (the
colour mod 2^b, Davies' message for q = 2^b) are one contiguous prefix of the row: a server
answers "planes lo..hi of chunk c" with a zero-copy slice.

Why this order: each step from 8- to 4- to 2- to 1-bit planes splits every plane in two halves
and swaps bit groups between the halves in place (a "delta swap", three word operations on
64-bit views), and the same swap undoes itself. Packing is a transposed byte copy plus 0, 1 or 3
in-place passes; unpacking is the reverse.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from swarmnet.codecs.workspace import scratch

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("swarmnet.codecs.bitplanes assumes a little-endian host")

WIDTHS = (1, 4, 8)
# (shift, mask) of the swaps taking 8-bit planes to 4-, 2- and 1-bit planes; masks select the low
# half of every field and, as positive numbers, are valid in every signed word type.
_SWAPS = ((4, 0x0F), (2, 0x33), (1, 0x55))
_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


def _levels(width: int) -> tuple[tuple[int, int], ...]:
    return {8: (), 4: _SWAPS[:1], 1: _SWAPS}[width]


def _mask(pattern: int, itemsize: int) -> int:
    return int.from_bytes(bytes([pattern]) * itemsize, "little")


def _delta_swap(buf: Tensor, halves: int, shift: int, pattern: int) -> None:
    """In place on ``buf`` [R, M] uint8: split each row into ``halves`` segments pairwise
    (lo, hi) and exchange the high bit group of every field of lo with the low group of hi."""
    rows, m = buf.shape
    seg = m // halves
    for nbytes, dtype in _WORDS:  # noqa: B007 - the break keeps the match
        if seg % nbytes == 0 and buf.storage_offset() % nbytes == 0:
            break
    words = buf.view(dtype).view(rows, halves // 2, 2, seg // nbytes)
    lo, hi = words[:, :, 0], words[:, :, 1]
    mask = _mask(pattern, nbytes)
    tmp = scratch("bitplanes.swap", lo.numel(), dtype, buf.device).view(lo.shape)
    torch.bitwise_right_shift(lo, shift, out=tmp)
    tmp.bitwise_xor_(hi).bitwise_and_(mask)
    hi.bitwise_xor_(tmp)
    lo.bitwise_xor_(tmp.bitwise_left_shift_(shift))


def pack(k_RC: Tensor, width: int, nbytes: int, out: Tensor | None = None) -> Tensor:
    """Bit-planes of the low ``8 * nbytes`` bits of the integers ``k_RC``.

    Returns ``out`` as uint8 [R, 8*nbytes/width, C*width/8] (allocated when None; a given
    ``out`` must be contiguous with R * nbytes * C elements). ``k_RC`` must be contiguous.
    """
    rows, c = k_RC.shape
    if width not in WIDTHS or c % 8 or not 1 <= nbytes <= k_RC.element_size():
        raise ValueError(f"bad plane request: width={width}, C={c}, nbytes={nbytes}")
    if out is None:
        out = torch.empty(rows * nbytes * c, dtype=torch.uint8, device=k_RC.device)
    planes = out.view(rows, nbytes, c)
    planes[:, 0].copy_(k_RC)  # narrowing keeps the low byte; contiguous, the fast case
    if nbytes > 1:
        by_byte = k_RC.view(torch.uint8).view(rows, c, k_RC.element_size())
        planes[:, 1:].copy_(by_byte[:, :, 1:nbytes].transpose(1, 2))
    flat = out.view(rows, nbytes * c)
    for step, (shift, pattern) in enumerate(_levels(width)):
        _delta_swap(flat, 2 * nbytes << step, shift, pattern)
    return out.view(rows, 8 * nbytes // width, c * width // 8)


def unpack(planes: Tensor, width: int, nbytes: int, out_RC: Tensor) -> Tensor:
    """Inverse of :func:`pack`, in place on ``planes`` (contents destroyed).

    ``planes`` holds R rows of ``8 * nbytes`` bits per coordinate, any shape with R * nbytes * C
    contiguous bytes; ``out_RC`` (int32 or int64, [R, C]) receives the unsigned value of those
    bits. Planes the sender did not send must be zero.
    """
    rows, c = out_RC.shape
    flat = planes.reshape(rows, nbytes * c)
    for step, (shift, pattern) in reversed(list(enumerate(_levels(width)))):
        _delta_swap(flat, 2 * nbytes << step, shift, pattern)
    bytes_ = flat.view(rows, nbytes, c)
    out_RC.copy_(bytes_[:, 0])  # widening zero-extends: the upper bytes start at zero
    if nbytes > 1:
        by_byte = out_RC.view(torch.uint8).view(rows, c, out_RC.element_size())
        by_byte[:, :, 1:nbytes].copy_(bytes_[:, 1:].transpose(1, 2))
    return out_RC
