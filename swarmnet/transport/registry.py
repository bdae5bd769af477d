"""Transport by address scheme: built-ins first, then the ``swarmnet.transports`` entry points.

A third-party package registers ``myscheme = "mypkg.transport:MyTransport"`` in that group;
``MyTransport()`` must implement :class:`swarmnet.transport.base.Transport`.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

from swarmnet.errors import ConfigError
from swarmnet.security import CurveKeys
from swarmnet.transport.base import Transport
from swarmnet.transport.ucx import UcxTransport
from swarmnet.transport.zmq import ZmqTransport

BUILTIN: dict[str, type[Transport]] = {
    scheme: cls for cls in (ZmqTransport, UcxTransport) for scheme in cls.schemes
}
"""Shipped transports. UcxTransport imports ucxx only when built, so ucx:// without the
``ucx`` extra fails then, with a ConfigError naming the extra."""


def scheme_of(url: str) -> str:
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ConfigError(f"address {url!r} has no scheme; use e.g. tcp://127.0.0.1:7000")
    return scheme


def transport_class(url: str) -> type[Transport]:
    scheme = scheme_of(url)
    if scheme in BUILTIN:
        return BUILTIN[scheme]
    for ep in entry_points(group="swarmnet.transports"):
        if ep.name == scheme:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Transport)):
                raise ConfigError(f"entry point {ep.value} for {scheme}:// is not a Transport")
            return cls
    raise ConfigError(f"no transport for {scheme}:// addresses; installed: {', '.join(sorted(known_schemes()))}")


@functools.cache
def known_schemes() -> frozenset[str]:
    """Address schemes with a transport: the built-in ones and those of installed plugins."""
    return frozenset(BUILTIN) | {ep.name for ep in entry_points(group="swarmnet.transports")}


class TransportSet:
    """One transport instance per class, created on first use; closes them all together.

    With ``curve`` keys every transport must authenticate: classes that declare
    ``supports_curve = True`` are built as ``cls(curve=curve)``; any other scheme is refused.
    ``slowest_rate`` (network.min_transfer_rate) goes to classes that declare
    ``supports_slowest_rate = True``: a transport that drops silent peers must allow a frame that
    long in transit.
    """

    def __init__(self, curve: CurveKeys | None = None, slowest_rate: float | None = None) -> None:
        self._by_class: dict[type[Transport], Transport] = {}
        self._curve = curve
        self._slowest_rate = slowest_rate

    def for_url(self, url: str) -> Transport:
        cls = transport_class(url)
        if cls not in self._by_class:
            kwargs: dict[str, object] = {}
            if self._curve is not None:
                if not getattr(cls, "supports_curve", False):
                    raise ConfigError(f"{scheme_of(url)}:// addresses cannot authenticate peers; with "
                                      "[security] enabled use tcp:// or ipc:// addresses")
                kwargs["curve"] = self._curve
            if self._slowest_rate is not None and getattr(cls, "supports_slowest_rate", False):
                kwargs["slowest_rate"] = self._slowest_rate
            self._by_class[cls] = cls(**kwargs)
        return self._by_class[cls]

    async def aclose(self) -> None:
        for transport in self._by_class.values():
            await transport.aclose()
        self._by_class.clear()
