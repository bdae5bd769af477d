"""A fresh start never deletes an earlier run: its peers' files go to ``<run dir>/.earlier/``.

A checkpoint there may be all an interrupted run has, and the cards and metrics of an earlier
run would pass for the new one's in `swarmnet status` and `swarmnet plot`, or mix with its
rows. One generation is kept: what a later fresh start sets aside replaces it, and says so.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from swarmnet.errors import ConfigError, unwritable_run_dir
from swarmnet.peer.claim import check_free

EARLIER = ".earlier"
"""The folder of a run directory where a fresh run puts an earlier run's peer files."""

RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "summary.json", "tensorboard")
"""What a peer's run leaves in its folder (its card is removed at every start)."""
AVERAGE_FILE = "average.pt"
"""What `swarmnet up` leaves in the run directory: the average of the peers' final models."""


def set_aside_earlier_peers(run_dir: Path, log: logging.Logger) -> None:
    """`swarmnet up`, fresh: move the folders of an earlier run's peers whole, and its average
    model. A folder a running peer holds, or whose lock cannot be asked, stays where it is."""
    moved: list[str] = []
    replaced = False
    for folder in sorted({f.parent for pattern in ("*/card.json", "*/metrics.jsonl", "*/checkpoint.pt")
                          for f in run_dir.glob(pattern)}):
        if folder.name == EARLIER:
            continue
        try:
            check_free(folder, unknown_is_free=False)  # a peer on another host of a shared file system
        except ConfigError as exc:
            log.warning("%s is from an earlier run and may be in use: left where it is (%s)", folder, exc)
            continue
        replaced |= _move(folder, run_dir / EARLIER / folder.name)
        moved.append(folder.name)
    if (aside := set_aside_average(run_dir)) is not None:
        replaced |= aside
        moved.append(AVERAGE_FILE)
    if moved:
        _say_moved(log, ", ".join(moved), run_dir / EARLIER, replaced, resume="move them back and add --no-fresh")


def set_aside_average(run_dir: Path) -> bool | None:
    """Move an earlier run's ``average.pt`` to ``.earlier/``: None where there was none, else
    whether it replaced a copy kept there. Where this run writes no average of its own, the
    earlier one would pass for its result."""
    if not (run_dir / AVERAGE_FILE).exists():
        return None
    return _move(run_dir / AVERAGE_FILE, run_dir / EARLIER / AVERAGE_FILE)


def set_aside_earlier_files(peer_dir: Path, log: logging.Logger | logging.LoggerAdapter[logging.Logger]) -> None:
    """`swarmnet peer --fresh`: move this peer's earlier run files (its folder stays: the peer
    holds it, and a launcher may have opened its log there)."""
    found = [peer_dir / name for name in RUN_FILES if (peer_dir / name).exists()]
    if not found:
        return
    target = peer_dir.parent / EARLIER / peer_dir.name
    replaced = target.exists()
    try:
        if replaced:
            shutil.rmtree(target)
        target.mkdir(parents=True)
    except OSError as exc:
        raise unwritable_run_dir(target, exc) from None
    for path in found:
        _move(path, target / path.name)
    _say_moved(log, ", ".join(p.name for p in found), target, replaced,
               resume="move them back and start the peer without --fresh")


def _move(path: Path, target: Path) -> bool:
    """Move ``path`` to ``target``, replacing what is there; whether something was."""
    try:
        target.parent.mkdir(exist_ok=True)
        replaced = target.exists()
        if replaced:
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        path.rename(target)
    except OSError as exc:
        raise unwritable_run_dir(path, exc) from None
    return replaced


def _say_moved(log: logging.Logger | logging.LoggerAdapter[logging.Logger], what: str, where: Path,
               replaced: bool, *, resume: str) -> None:
    log.warning("the earlier run's %s moved to %s%s; to resume it instead, %s", what, where,
                " (replacing the copy kept from the run before it)" if replaced else "", resume)
