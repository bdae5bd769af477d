"""Benchmarks: each measures swarmnet against a baseline side by side in one run and reports the
ratio (``swarmnet bench ...``); results are recorded in docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from swarmnet import jsonsafe
from swarmnet.errors import BenchFailed, disk_full


def write_json(path: str | Path, result: Any) -> None:
    """A bench's ``--json`` file, written whole or not at all, its folder made if need be (the
    documented ``runs/...`` is not in a fresh clone); strict JSON (what was not measured is null)."""
    from swarmnet.peer.checkpoint import write_atomic

    try:
        write_atomic(Path(path), (jsonsafe.dumps(result, indent=2, default=str) + "\n").encode(), private=False)
    except OSError as exc:  # after the measuring: say where the figures still are
        fix = "free space" if disk_full(exc) else "pass a writable path"
        raise BenchFailed(f"--json {path}: cannot write {exc.filename or path} ({exc.strerror or exc}); the figures "
                          f"measured are printed above; {fix} to keep them as JSON") from None
