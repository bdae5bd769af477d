"""`swarmnet up`'s CPU peers, forked from a process that has imported torch and swarmnet once.

A fresh interpreter spends about 2.5 s of CPU before a peer binds, most of it importing torch and
its compiler (which the optimizer's first step imports). `up` starting 4 peers on 2 cores paid
that four times over, about 5 s, before the swarm trained. A fork of a process that has them
imported starts in a fraction of a second and shares those pages with its siblings.

The forks come from multiprocessing's fork server: a fresh process (not the launcher, which may
have touched CUDA or started threads) that imports PRELOAD and forks on request, and reports each
child's exit status back. Each child then does what ``subprocess.Popen`` did for an exec'd peer
(process group of its own, death with the launcher, log as stdout and stderr, the launch's
environment, its command line as its process title) and runs the same ``swarmnet peer`` command
line through the same CLI. GPU peers keep being exec'd: a fork can use CUDA only where nothing
before the fork initialized it, and that could not be checked on a GPU here.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from multiprocessing import forkserver
from pathlib import Path

from swarmnet.errors import ConfigError

PRELOAD = ("swarmnet.forked", "swarmnet.cli", "swarmnet.launch", "swarmnet.peer.node", "torch._dynamo")
"""What the fork server imports before its first fork: everything a peer imports before training,
its optimizer's first step included. This module first, so that STOP_SIGNALS are blocked before
any thread starts (numpy's BLAS may start some): a thread that did not block them would take
them for the whole process."""
EXEC_VARIABLE = "SWARMNET_EXEC_PEERS"
"""Set to 1 to start CPU peers as fresh interpreters too, not forked."""
WAY_AROUND = f"set {EXEC_VARIABLE}=1 to start the peers as fresh processes"
SERVER_VARIABLE = "SWARMNET_FORK_SERVER"
"""Set in the fork server's environment when it starts, so that it knows itself (below)."""

STOP_SIGNALS = {signal.SIGTERM, signal.SIGHUP}
"""Held back in the fork server, which ends when the launcher does, as multiprocessing has it: it
runs in the launcher's process group, and a signal sent to the group (a terminal's, a
supervisor's) must reach the peers once, from the launcher, not a second time by their parent's
death. Blocked, not ignored: a fork inherits the mask, and one sent to a peer before it can take
it is delivered once the peer unblocks it, not lost."""

if os.environ.pop(SERVER_VARIABLE, None):
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def forkable(devices: Iterable[str]) -> bool:
    """Whether peers on these devices may be forked: on Linux, every one on the CPU, unless
    EXEC_VARIABLE says no."""
    if os.environ.get(EXEC_VARIABLE, "") not in ("", "0"):
        return False
    # 3.11.0's fork server listened on an abstract socket, which any local user could have asked
    # to run code; later releases use a file only its user may open.
    if not sys.platform.startswith("linux") or sys.version_info < (3, 11, 1):
        return False
    import torch

    return all(d == "cpu" or (d == "auto" and not torch.cuda.is_available()) for d in devices)


class ForkedPeer:
    """What the launcher uses of ``subprocess.Popen``, for a peer the fork server forked."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self._process = process
        self.pid: int = process.pid  # type: ignore[assignment]

    def poll(self) -> int | None:
        """Its exit status once it has ended (-N: killed by signal N), else None.

        The fork server relays it; once the server has died (killed from outside: the peers get
        SIGTERM then), multiprocessing says 255 for every peer at once. A peer still running then
        counts as running, and one that has ended as 255: its status went with the server."""
        code = self._process.exitcode
        if code == 255:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 0)
                return None
        return code

    def wait(self, timeout: float | None = None) -> int:
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        self._process.join(timeout)
        while (code := self.poll()) is None:  # still running; where the server has died, look at the peer itself
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"peer {self.pid}", timeout or 0.0)
            time.sleep(0.05)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    """This process's environment replaced by ``env`` for a while: the fork server starts with the
    launch's (GLIBC_TUNABLES and OMP_NUM_THREADS count when a process starts, not when it forks)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def start_server(env: Mapping[str, str]) -> None:
    """Start the fork server, with environment ``env``, unless it runs: it imports PRELOAD while
    this process goes on, so the sooner the better."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
    try:
        with _environment({**env, SERVER_VARIABLE: "1"}):
            forkserver.ensure_running()
    except OSError as exc:  # its socket's folder on a full or read-only temporary directory, say
        raise ConfigError(f"the fork server for the peers could not start ({exc}); {WAY_AROUND}") from None


def start_peer(name: str, argv: Sequence[str], env: Mapping[str, str], log: Path) -> ForkedPeer:
    """Fork ``swarmnet peer`` daemon ``name``: ``argv``, its command line after ``swarmnet``;
    ``env``, its environment; its stdout and stderr appended to ``log``."""
    start_server(env)
    server = forkserver._forkserver._forkserver_pid  # the peer's parent: it dies with the launcher
    process = multiprocessing.get_context("forkserver").Process(
        target=_run_peer, args=(list(argv), dict(env), str(log), server), name="swarmnet peer", daemon=True)
    try:
        process.start()
    except (OSError, EOFError) as exc:  # EOFError: the fork server ended before it answered
        raise ConfigError(f"peer {name} could not be forked: the fork server failed ({exc or type(exc).__name__}; "
                          f"its error is above); {WAY_AROUND}") from None
    return ForkedPeer(process)


def _run_peer(argv: list[str], env: dict[str, str], log: str, server: int) -> None:
    """In the fork: what Popen(process_group=0, stdin=DEVNULL, stdout=log, stderr=STDOUT,
    preexec_fn=die_with_parent()) did for an exec'd peer, then the peer's command line."""
    from setproctitle import setproctitle

    from swarmnet.cli import main
    from swarmnet.launch import die_with_parent

    # Every fork holds the launcher's end of the pipe whose closing ends the fork server: a peer
    # must not keep its own parent alive once the launcher is gone.
    alive, forkserver._forkserver._forkserver_alive_fd = forkserver._forkserver._forkserver_alive_fd, None
    if alive is not None:
        os.close(alive)
    os.setpgid(0, 0)
    in_child = die_with_parent(parent=server)  # the fork server exits once the launcher has
    if in_child is not None:
        in_child()
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)
    sys.argv = ["swarmnet", *argv]
    setproctitle(shlex.join(sys.argv))  # for ps and pkill -f; before the environment changes, or it fails
    os.environ.clear()
    os.environ.update(env)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # as a fresh process would: one sent already ends it
    main()
