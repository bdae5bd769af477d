"""Validation of codec data that arrived from the network (``meta``, ``want``, frames).

Everything a neighbour sends is untrusted: each helper checks one field's type and range and
raises :class:`~swarmnet.errors.CodecError` naming the codec and the field, so a malformed
message becomes a recorded neighbour failure instead of an IndexError deep in tensor code.
``bool`` is rejected where an ``int`` is expected (msgpack keeps them apart; Python does not).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from swarmnet.codecs.base import Buffer
from swarmnet.errors import CodecError


def as_mapping(value: Any, codec: str, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise CodecError(f"{codec}: {what} must be a map, got {type(value).__name__}")
    return value


def get_int(m: Mapping[str, Any], key: str, codec: str, lo: int, hi: int) -> int:
    """``m[key]`` as an int in ``[lo, hi]``."""
    if key not in m:
        raise CodecError(f"{codec}: missing field {key!r}")
    return check_int(m[key], f"{key!r}", codec, lo, hi)


def check_int(value: Any, what: str, codec: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise CodecError(f"{codec}: field {what} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise CodecError(f"{codec}: field {what} = {value} is outside [{lo}, {hi}]")
    return value


def get_choice(m: Mapping[str, Any], key: str, codec: str, choices: Sequence[Any]) -> Any:
    if key not in m:
        raise CodecError(f"{codec}: missing field {key!r}")
    value = m[key]
    # Of the same type too: 1.0 == 1 (and True == 1) in Python, but a float width breaks slicing.
    if not any(type(value) is type(c) and value == c for c in choices):
        raise CodecError(f"{codec}: field {key!r} = {value!r} is not one of {list(choices)}")
    return value


def get_float(m: Mapping[str, Any], key: str, codec: str, lo: float, hi: float) -> float:
    """``m[key]`` as a finite float in ``[lo, hi]`` (ints are accepted)."""
    if key not in m:
        raise CodecError(f"{codec}: missing field {key!r}")
    value = m[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CodecError(f"{codec}: field {key!r} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise CodecError(f"{codec}: field {key!r} = {value} is not a finite number in [{lo}, {hi}]")
    return value


def get_int_list(
    m: Mapping[str, Any], key: str, codec: str, length: int, lo: int, hi: int
) -> list[int]:
    """``m[key]`` as a list of exactly ``length`` ints in ``[lo, hi]``."""
    if key not in m:
        raise CodecError(f"{codec}: missing field {key!r}")
    return check_int_list(m[key], f"{key!r}", codec, length, lo, hi)


def check_int_list(value: Any, what: str, codec: str, length: int, lo: int, hi: int) -> list[int]:
    if not isinstance(value, list | tuple):
        raise CodecError(f"{codec}: field {what} must be a list, got {type(value).__name__}")
    if len(value) != length:
        raise CodecError(f"{codec}: field {what} has {len(value)} entries, expected {length}")
    # A lattice reply carries several of these per chunk, so the common case is checked in C.
    if not value or ({*map(type, value)} == {int} and lo <= min(value) and max(value) <= hi):
        return list(value)
    for i, v in enumerate(value):
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise CodecError(f"{codec}: field {what}[{i}] = {v!r} is not an int in [{lo}, {hi}]")
    return list(value)


def get_bytes(m: Mapping[str, Any], key: str, codec: str, length: int) -> bytes:
    if key not in m:
        raise CodecError(f"{codec}: missing field {key!r}")
    value = m[key]
    if not isinstance(value, bytes | bytearray | memoryview):
        raise CodecError(f"{codec}: field {key!r} must be bytes, got {type(value).__name__}")
    value = bytes(value)
    if len(value) != length:
        raise CodecError(f"{codec}: field {key!r} has {len(value)} bytes, expected {length}")
    return value


def frame_sizes(frames: Any, codec: str) -> list[int]:
    """Byte sizes of ``frames``, which must be a sequence of buffers."""
    if not isinstance(frames, tuple | list):
        raise CodecError(f"{codec}: frames must be a sequence, got {type(frames).__name__}")
    sizes = []
    for i, f in enumerate(frames):
        try:
            sizes.append(memoryview(f).nbytes)
        except TypeError:
            raise CodecError(f"{codec}: frame {i} is not a buffer ({type(f).__name__})") from None
    return sizes


def check_frames(frames: Any, expected: list[int], codec: str) -> tuple[Buffer, ...]:
    sizes = frame_sizes(frames, codec)
    if sizes != expected:
        raise CodecError(f"{codec}: frame sizes {sizes} do not match the expected {expected}")
    return tuple(frames)


def check_count(m: Mapping[str, Any], codec: str, n: int) -> None:
    """The snapshot's coordinate count ``m['n']`` must equal the reader's model size ``n``."""
    got = get_int(m, "n", codec, 0, 1 << 48)
    if got != n:
        raise CodecError(f"{codec}: snapshot has {got} coordinates, the model has {n}")


def versioned_meta(meta: Any, codec: str, n: int, version: int = 1) -> Mapping[str, Any]:
    """The common head of a received ``meta``: a map, layout ``version``, ``n`` coordinates."""
    m = as_mapping(meta, codec, "meta")
    got = m.get("v")
    if type(got) is not int or got != version:
        raise CodecError(
            f"{codec}: snapshot layout version {got!r}, this swarmnet reads version {version}; "
            "run the same swarmnet release on every peer"
        )
    check_count(m, codec, n)
    return m
