"""One live peer per peer directory (run_dir/<name>/).

Two peers started with the same name and run directory (a requeued job whose first instance
still runs, a command pasted twice) would interleave their metrics, overwrite each other's card
and let whichever stops last replace the other's checkpoint. A peer therefore holds an exclusive
``flock`` on ``<peer dir>/.lock`` for as long as it runs; the kernel drops it when the process
ends, however it ends, so a crashed peer never leaves a stale claim. Holding the claim also
makes it safe to remove the temporary files an earlier peer left when it was killed mid-write.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from pathlib import Path

from swarmnet.errors import ConfigError, unwritable_run_dir

LOCK_NAME = ".lock"
LEFTOVERS = ".*.tmp"
"""Temporary files of atomic writes (checkpoint.py) that a killed peer left behind."""


class DirectoryClaim:
    """The exclusive claim on a peer directory; :meth:`release` (or process exit) gives it up."""

    def __init__(self, peer_dir: Path, log: logging.Logger | logging.LoggerAdapter[logging.Logger]) -> None:
        path = peer_dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise unwritable_run_dir(path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = in_use_error(peer_dir, fd)
            os.close(fd)
            raise error from None
        except OSError as exc:  # a file system without locks (some network mounts): run unguarded
            log.warning("cannot lock %s (%s): nothing stops a second peer with this name and run directory",
                        path, exc.strerror or exc)
        with contextlib.suppress(OSError):  # for the message above; a full disk must not stop a start
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)  # a shared file system's other hosts
        self._fd: int | None = fd
        self._sweep(peer_dir, log)

    @staticmethod
    def _sweep(peer_dir: Path, log: logging.Logger | logging.LoggerAdapter[logging.Logger]) -> None:
        removed = 0
        for leftover in peer_dir.glob(LEFTOVERS):
            with contextlib.suppress(OSError):
                leftover.unlink()
                removed += 1
        if removed:
            log.info("removed %d temporary file(s) in %s that an earlier run left when it stopped mid-write",
                     removed, peer_dir)

    def release(self) -> None:
        if self._fd is not None:
            # Unlocked explicitly: a child process forked meanwhile (a DataLoader worker) shares
            # the open file and would otherwise hold the lock after we close our descriptor.
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def in_use_error(peer_dir: Path, lock_fd: int) -> ConfigError:
    """What to say when another process holds the lock ``lock_fd`` is open on (it wrote its pid
    and host there: over a shared file system it may run on another machine)."""
    holder = os.pread(lock_fd, 300, 0).decode(errors="replace").strip() or "unknown"
    return ConfigError(f"{peer_dir} belongs to a peer that is still running (pid {holder}): two peers with one "
                       "name and run directory would overwrite each other's checkpoint and metrics; stop "
                       "that peer first, or give this one another run directory (--run-dir, SwarmOptimizer's run_dir=) or "
                       "name (swarmnet peer --name, a manifest's name, SwarmOptimizer's name=)")


def check_free(peer_dir: Path, *, unknown_is_free: bool = True) -> None:
    """Raise :func:`in_use_error` if a running peer holds ``peer_dir``; take nothing (for a
    launcher about to clear the directory for the peer it starts). Where the file system has no
    locks to ask, the directory counts as free unless ``unknown_is_free`` is False."""
    try:
        fd = os.open(peer_dir / LOCK_NAME, os.O_RDWR)
    except OSError:  # no lock file, or none we can open: no peer has run there
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise in_use_error(peer_dir, fd) from None
    except OSError as exc:
        if not unknown_is_free:
            raise ConfigError(f"{peer_dir}: cannot tell whether a peer holds it ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
