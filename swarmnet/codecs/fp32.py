"""Identity codec: the float32 bytes of the vector, one frame."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from swarmnet.codecs.base import Buffer, Codec, DecodeResult, Encoded
from swarmnet.errors import CodecError


def host_bytes(flat_N: Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (a copy to host first for GPU tensors)."""
    if flat_N.device.type != "cpu":
        flat_N = flat_N.to("cpu")  # CPU<->GPU sync point: the wire needs host memory
    return memoryview(flat_N.contiguous().numpy()).cast("B")


def check_frames(frames: tuple[Buffer, ...], expected: list[int], codec: str) -> None:
    sizes = [memoryview(f).nbytes for f in frames]
    if sizes != expected:
        raise CodecError(f"{codec}: frame sizes {sizes} do not match the expected {expected}")


class Fp32Codec(Codec):
    name = "fp32"
    lossless = True

    def encode(self, flat_N: Tensor, hints: Mapping[str, float] | None = None) -> Encoded:
        values = flat_N.detach().to(torch.float32).clone()
        return Encoded(self.name, {"n": values.numel()}, (host_bytes(values),), values)

    def decode(
        self,
        meta: Mapping[str, Any],
        frames: tuple[Buffer, ...],
        key_N: Tensor,
        out_N: Tensor,
        state: dict[str, Any],
    ) -> DecodeResult:
        n = out_N.numel()
        if meta.get("n") != n:
            raise CodecError(f"fp32: snapshot has {meta.get('n')} coordinates, model has {n}")
        check_frames(frames, [4 * n], self.name)
        received = torch.frombuffer(frames[0], dtype=torch.float32)
        out_N.copy_(received)  # host->device copy when the model lives on a GPU
        return DecodeResult(True, stats={"bits_per_coord": 32.0})
