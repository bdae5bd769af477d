"""Zero-copy passage between tensors and the host byte buffers that travel as frames."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from swarmnet.codecs.base import Buffer
from swarmnet.codecs.published import host_copy
from swarmnet.codecs.workspace import scratch

_CPU = torch.device("cpu")


def host_bytes(t: Tensor) -> memoryview:
    """A byte view of a contiguous tensor's memory. A GPU tensor's host copy is only queued: its
    bytes are there once ``published.copies_done(t.device)``, asked for afterwards, completes."""
    if t.device.type != "cpu":
        t = host_copy(t)
    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())


def buffer_tensor(buf: Buffer, dtype: torch.dtype, name: str) -> Tensor:
    """A flat CPU tensor over a received frame.

    Writable buffers (zmq frames) are viewed without a copy. Read-only ones (``bytes``) are
    copied into the scratch tensor ``name``, because torch cannot hold read-only memory; the
    result must not outlive the calling decode.
    """
    mv = memoryview(buf).cast("B")
    if not mv.readonly:
        return torch.frombuffer(mv, dtype=dtype) if mv.nbytes else torch.empty(0, dtype=dtype)
    out = scratch(name, mv.nbytes // dtype.itemsize, dtype, _CPU)
    out.view(torch.uint8).numpy()[:] = np.frombuffer(mv, dtype=np.uint8)
    return out


def flat_float32(flat_N: Tensor, codec: str) -> Tensor:
    """The encoder's input as a contiguous 1-D float32 tensor (no copy when it already is)."""
    from swarmnet.errors import CodecError

    if not flat_N.is_floating_point():
        raise CodecError(
            f"{codec}: only floating-point parameters can be encoded, got {flat_N.dtype}"
        )
    if flat_N.dim() != 1:
        raise CodecError(f"{codec}: expected a flat vector, got shape {tuple(flat_N.shape)}")
    return flat_N.detach().to(torch.float32).contiguous()
