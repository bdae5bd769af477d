"""Quantized registers for simulated SwarmSGD (SPEC 2.4, 2.5, 3.2, 3.4), batched over pairs.

Legend: B interactions, d coordinates.

In a quantized interaction both buffers are put on the cubic lattice eps Z^d with unbiased
rounding, each side keeps its own Q exactly, and each side reads the other's Q as a colour (the
low b bit-planes of the lattice coordinates) decoded with **its own current model as the key**
(the setting of the SPEC 3.4 reference numbers):

- initiator i: Q(X_i) and Q(X_j) read with key X_i -> X_i <- Q(X_i)/2 + Q(X_j)/2 - Delta_i;
- neighbour j: Q(X_i) read with key X_j -> X_j <- Q(X_i)/2 + Q(X_j)/2.

b per read is the SPEC 3.2 bound for the actual distance, b = 2 + floor(log2(D + 1)) with
D = ||X_i - X_j||_inf / eps, which always decodes exactly (a real reader predicts D and
verifies; SPEC 3.4). Both reads of an interaction see the same distance, so they cost the same
b bits per coordinate; the statistics count each read.

All lattice arithmetic is :mod:`swarmnet.codecs.lattice` (quantize, colour, decode,
dequantize, bits_needed); this module only wires it to the simulator's batches. The random
offsets are drawn per interaction with the rest of its randomness (:mod:`.draws`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from swarmnet.codecs import lattice
from swarmnet.sim.errors import SettingError

ROUNDINGS = ("stochastic", "dither")
OFFSET_RANGE = 1 << 16
"""Offsets V are uniform 16-bit integers (the codec's rounding formula, SPEC 3.2)."""


@dataclass(frozen=True, slots=True)
class Reads:
    """One batch of quantized exchanges."""

    own_i: Tensor
    """Q(X_i), as the initiator holds it [B, d]."""
    read_by_i: Tensor
    """Q(X_j) as decoded by the initiator with key X_i."""
    read_by_j: Tensor
    """Q(X_i) as decoded by the neighbour with key X_j."""
    own_j: Tensor
    """Q(X_j)."""
    bits: Tensor
    """Planes read per coordinate by each side, int64 [B]."""


class LatticeRegisters:
    """The lattice exchange with a fixed step ``eps`` (SPEC 3.4 reference setting:
    eps = eta * H * 6 / 11) and ``rounding`` stochastic or dither."""

    def __init__(self, eps: float, rounding: str = "stochastic") -> None:
        if not (math.isfinite(eps) and eps > 0):
            raise SettingError("lattice_eps", "lattice step eps", f"must be a finite number > 0, got {eps}")
        if rounding not in ROUNDINGS:
            raise SettingError("rounding", "rounding", f"must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
        self.eps = float(eps)
        self.rounding = rounding

    def draw_offsets(
        self, count: int, dim: int, generator: torch.Generator, out: Tensor | None = None
    ) -> Tensor:
        """The offsets V of ``count`` interactions, [count, 2, d] int32 (row 0: X_i, 1: X_j),
        filling ``out`` when it has that shape."""
        if out is None or out.shape != (count, 2, dim):
            out = torch.empty(count, 2, dim, dtype=torch.int32, device=generator.device)
        return out.random_(0, OFFSET_RANGE, generator=generator)

    def exchange(self, x_i: Tensor, x_j: Tensor, offsets: Tensor) -> Reads:
        """Quantize both sides of B interactions and read each with the other's key."""
        b, d = x_i.shape
        # x / eps and u = key / eps in float64 (SPEC 3.4): in float32 a far coordinate
        # (|x / eps| ~ 1e9) is quantized and read with errors larger than the read's window.
        both = torch.cat((x_i, x_j)).to(torch.float64)
        v = offsets.transpose(0, 1).reshape(2 * b, d)
        if both.device.type == "cpu":
            k = lattice.quantize(both, self.eps, v)
        else:  # int64 coordinates and a stated bound: no device->host read to size them
            out = torch.empty(both.shape, dtype=torch.int64, device=both.device)
            k = lattice.quantize(both, self.eps, v, bound=float(1 << 45), out=out)
        # Stochastic: Q = eps k. Dither: the same k = floor(x/eps + V/2^16) is round(x/eps - theta)
        # with theta from V, and Q = eps (k + theta) (SPEC 3.2).
        theta = lattice.dither(v).to(x_i.dtype) if self.rounding == "dither" else None
        q = lattice.dequantize(k, self.eps, theta, out=torch.empty_like(both, dtype=x_i.dtype))
        distance = (both[:b] - both[b:]).abs().amax(dim=1) / self.eps
        bits = lattice.bits_needed(distance)
        assert isinstance(bits, Tensor)
        planes = torch.cat((bits, bits)).unsqueeze(1)
        keys = both.roll(b, dims=0)  # row r of k is read by the other side of its pair
        k_read = lattice.decode(lattice.colour(k, planes), planes, keys, self.eps,
                                None if theta is None else theta.double())
        q_read = lattice.dequantize(k_read, self.eps, theta, out=torch.empty_like(q))
        return Reads(
            own_i=q[:b], read_by_i=q_read[b:], read_by_j=q_read[:b], own_j=q[b:], bits=bits
        )
