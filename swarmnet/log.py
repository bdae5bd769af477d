"""Logging: one logger per area (only the CLI installs handlers), and counts as messages word them."""

from __future__ import annotations

import logging
import sys
import time


def get_logger(area: str) -> logging.Logger:
    return logging.getLogger(f"swarmnet.{area}")


class PeerLogAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every record with the peer name so interleaved swarm logs can be told apart."""

    def process(self, msg, kwargs):  # type: ignore[no-untyped-def]
        return f"[{self.extra['peer']}] {msg}", kwargs


class Throttle:
    """For a failure that can recur many times a second (a full disk, a stranger's garbage): log
    each kind at its first occurrence, then at most every ``every_s`` seconds."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._kinds: dict[str, tuple[float, int]] = {}

    def due(self, kind: str = "") -> int | None:
        """None when ``kind`` was logged less than ``every_s`` ago (this one is counted); else how
        many were left out since its last line."""
        now = time.monotonic()
        logged_at, held = self._kinds.get(kind, (-float("inf"), 0))
        if now - logged_at < self.every_s:
            self._kinds[kind] = (logged_at, held + 1)
            return None
        self._kinds[kind] = (now, 0)
        return held


def setup_logging(level: str = "INFO", *, rich: bool | None = None) -> None:
    """Configure the root swarmnet logger; called by CLI entry points only."""
    root = logging.getLogger("swarmnet")
    root.handlers.clear()
    root.setLevel(level.upper())
    use_rich = sys.stderr.isatty() if rich is None else rich
    if use_rich:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=True)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%H:%M:%S")
        )
    root.addHandler(handler)
    root.propagate = False


def counted(n: int, noun: str) -> str:
    """``1 peer``, ``2 peers``: a count as messages and tables print it."""
    return f"{n} {noun}{'s' * (n != 1)}"
