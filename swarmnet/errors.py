"""The exception hierarchy: errors about a neighbour are data, errors about ourselves are loud."""

from __future__ import annotations

import errno


class SwarmError(Exception):
    """Base class of every error swarmnet raises on purpose."""


class ConfigError(SwarmError):
    """A config file, manifest or flag is wrong; the message names the source, key and fix."""


class BenchFailed(SwarmError):
    """A benchmark's own run failed (a swarm or worker it started); the message carries its log."""


class TransportError(SwarmError):
    """Moving frames failed: the far end is unreachable, too slow, or the endpoint is closed."""


class EndpointClosed(TransportError):
    """The listener or connection was closed by us; using it again is a programming error."""


class RequestTimeout(TransportError):
    """A request got no reply within its deadline."""


class HandshakeFailed(TransportError):
    """The far end answered the connection but the two could not agree on security (keys,
    or one side without CURVE); the message says which side to look at."""


class ProtocolError(SwarmError):
    """A message broke the wire protocol (bad header, sizes, version, type, values).

    ``code`` is a short stable token used in Reject replies and status counters.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.reason = message
        self.mid = 0
        """The offending message's id, when its header could be read (0 otherwise)."""
        self.sender: str | None = None
        """The sender id the offending message claims, when its header could be read."""


def disk_full(exc: OSError) -> bool:
    """A write failed for want of room (the disk, or the user's quota): the fix is to free space,
    where another failure's is another path."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def unwritable_run_dir(path: object, exc: OSError) -> ConfigError:
    """A run directory, or a file in it, that cannot be written: what failed and the fix."""
    if disk_full(exc):
        return ConfigError(f"cannot write {path}: {exc.strerror}; free space on its disk, or choose another --run-dir "
                           "(run.dir)")
    return ConfigError(f"cannot write {path}: {exc.strerror or exc}; choose a writable --run-dir (run.dir)")


class CodecError(SwarmError):
    """A snapshot could not be encoded or decoded (bad parameters, failed verification)."""


class NonFiniteInput(CodecError):
    """A lossy codec was asked to encode a vector holding NaN or infinity (or, for fp16, values
    beyond its range)."""


class ModelDiverged(SwarmError):
    """Our own model holds non-finite values: a lossy codec refuses to encode it, or a pull
    found the snapshot a lossless one published non-finite. Training diverged."""

    def __init__(self, step: int, why: str = "the model holds non-finite values") -> None:
        super().__init__(f"{why} at step {step}: training diverged; lower train.lr or check the data")
