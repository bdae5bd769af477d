"""Pluggable transports chosen by address scheme (tcp://, ipc://, inproc://, third-party)."""

from swarmnet.transport.base import Connection, Listener, Transport
from swarmnet.transport.registry import TransportSet, scheme_of, transport_class

__all__ = ["Connection", "Listener", "Transport", "TransportSet", "scheme_of", "transport_class"]
