"""Snapshot codecs behind one interface (:class:`~swarmnet.codecs.base.Codec`), by name.

``fp32`` (lossless), ``fp16`` / ``bf16`` (16-bit floats), ``blockwise8`` / ``blockwise4``
(absmax-scaled integers per block, stochastic rounding) and ``lattice`` (bit-plane lattice
snapshots decoded relative to the reader's own model, SPEC 3). Wire layouts: docs/codecs.md.
"""

from __future__ import annotations

from typing import Any

from swarmnet.codecs.base import Codec, DecodeResult, Encoded
from swarmnet.codecs.blockwise import Blockwise4Codec, Blockwise8Codec
from swarmnet.codecs.fp32 import Fp32Codec
from swarmnet.codecs.halfprec import Bf16Codec, Fp16Codec
from swarmnet.codecs.lattice_codec import LatticeCodec
from swarmnet.errors import ConfigError

CODECS: dict[str, type[Codec]] = {
    cls.name: cls
    for cls in (Fp32Codec, Fp16Codec, Bf16Codec, Blockwise8Codec, Blockwise4Codec, LatticeCodec)
}


def make_codec(name: str, **params: Any) -> Codec:
    """Build a codec by its wire name; unknown names and parameters are ConfigErrors."""
    try:
        cls = CODECS[name]
    except KeyError:
        raise ConfigError(
            f"unknown codec {name!r}; available: {', '.join(sorted(CODECS))}"
        ) from None
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:  # an unknown parameter, or a value a library refuses (a seed < 0)
        raise ConfigError(f"codec {name!r}: bad parameters {params}: {exc}") from None


__all__ = ["CODECS", "Codec", "DecodeResult", "Encoded", "make_codec"]
