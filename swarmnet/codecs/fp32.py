"""Identity codec: the float32 bytes of the vector, one frame."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from swarmnet.codecs.base import Buffer, Codec, DecodeResult, Encoded
from swarmnet.codecs.hostbuf import buffer_tensor, flat_float32, host_bytes
from swarmnet.codecs.published import copies_done, published
from swarmnet.codecs.wirecheck import as_mapping, check_count, check_frames

__all__ = ["Fp32Codec", "host_bytes"]


class Fp32Codec(Codec):
    name = "fp32"
    lossless = True

    def encode(self, flat_N: Tensor, hints: Mapping[str, float] | None = None) -> Encoded:
        x = flat_float32(flat_N, self.name)
        values = published(x.numel(), torch.float32, x.device).copy_(x)
        return Encoded(self.name, {"n": values.numel()}, (host_bytes(values),), values, copies_done(x.device))

    def decode(
        self,
        meta: Mapping[str, Any],
        frames: tuple[Buffer, ...],
        key_N: Tensor,
        out_N: Tensor,
        state: dict[str, Any],
    ) -> DecodeResult:
        received = self._received(meta, frames, out_N.numel())
        out_N.copy_(received.view_as(out_N))  # host->device on a GPU: CPU<->GPU sync point (exchange worker)
        return DecodeResult(True, stats={"bits_per_coord": 32.0})

    def view(self, meta: Mapping[str, Any], frames: tuple[Buffer, ...], key_N: Tensor) -> Tensor | None:
        if key_N.device.type != "cpu":
            return None  # a model on a GPU needs the vector there: decode copies it over
        received = self._received(meta, frames, key_N.numel())
        if memoryview(frames[0]).readonly:
            return None  # ``received`` is a scratch copy (torch cannot hold read-only memory)
        return received.view_as(key_N)

    def _received(self, meta: Mapping[str, Any], frames: tuple[Buffer, ...], n: int) -> Tensor:
        check_count(as_mapping(meta, self.name, "meta"), self.name, n)
        check_frames(frames, [4 * n], self.name)
        return buffer_tensor(frames[0], torch.float32, "fp32.recv")
