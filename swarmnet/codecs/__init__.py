"""Snapshot codecs behind one interface (:class:`~swarmnet.codecs.base.Codec`), by name."""

from __future__ import annotations

from typing import Any

from swarmnet.codecs.base import Codec, DecodeResult, Encoded
from swarmnet.codecs.fp32 import Fp32Codec
from swarmnet.errors import ConfigError

CODECS: dict[str, type[Codec]] = {cls.name: cls for cls in (Fp32Codec,)}


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
    except TypeError as exc:
        raise ConfigError(f"codec {name!r}: bad parameters {params}: {exc}") from None


__all__ = ["CODECS", "Codec", "DecodeResult", "Encoded", "make_codec"]
