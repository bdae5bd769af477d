"""The one type every layer agrees on for raw bytes on the wire (no heavy imports here)."""

from __future__ import annotations

Buffer = bytes | bytearray | memoryview
"""A payload frame: anything exposing the buffer protocol as contiguous bytes."""
