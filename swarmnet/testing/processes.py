"""Start real ``swarmnet up`` / ``swarmnet peer`` processes and observe them from outside."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from swarmnet.peer.metrics import read_metrics


def toml_value(value: Any) -> str:
    """``value`` (bool, number, string, list, table) written as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """A swarm config file at ``path`` from {section: {key: value}}."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def training_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training rows of a metrics stream (its evaluation rows left out)."""
    return [r for r in records if "lr" in r]


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:g}s")
        time.sleep(interval)


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with ``extra`` on top, and this checkout first on PYTHONPATH."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, **(extra or {}))
    path = env.get("PYTHONPATH", "")
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=f"{root}{os.pathsep}{path}" if path else root)
    return env


def _stat_fields(stat: str) -> list[str]:
    """The fields of a /proc/PID/stat line after the process's name (which may hold spaces and
    parentheses): the state first, then the parent's pid."""
    return stat.rsplit(")", 1)[1].split()


def parent_of(pid: int) -> int:
    """The parent's pid of running process ``pid`` (Linux /proc)."""
    return int(_stat_fields(Path(f"/proc/{pid}/stat").read_text())[1])


def _descendants(pid: int) -> list[int]:
    """Children of ``pid``, theirs and so on, from /proc (Linux; elsewhere none)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in Path("/proc").iterdir() if e.name.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        children.setdefault(int(_stat_fields(stat)[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie no longer does: an orphan's reaper may not reap it at once)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return _stat_fields(stat)[0] not in ("Z", "X")


class _Process:
    """Owns one child process (its own session, so the whole tree can be killed)."""

    def __init__(self, cmd: Sequence[str], log: Path, prefix: Sequence[str] = (), *,
                 die_with_parent: bool = False, env: Mapping[str, str] | None = None) -> None:
        """``die_with_parent``: the child gets SIGTERM when the thread that started it dies (a
        bench killed mid-run must not leave a daemon training on a core of the next one's);
        ``env``: variables set for the child on top of this process's."""
        self.log_path = log
        log.parent.mkdir(parents=True, exist_ok=True)
        preexec = None
        if die_with_parent:
            from swarmnet.launch import die_with_parent as make_preexec

            preexec = make_preexec()
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen([*prefix, *cmd], stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=_env(env), start_new_session=True,
                                         preexec_fn=preexec)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"process did not exit within {timeout:g}s; log:\n{self.log()}") from None

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill_tree(self) -> None:
        """SIGKILL the process, its group and its descendants (``swarmnet up`` starts each peer
        in a process group of its own)."""
        descendants = _descendants(self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in descendants:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def log(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class LocalSwarm(_Process):
    """``swarmnet up`` in a child process, with helpers to reach its peers."""

    def __init__(self, run_dir: Path, config: Path, *args: str, die_with_parent: bool = False) -> None:
        self.run_dir = run_dir
        self.summary_path = run_dir / "summary.json"
        cmd = [sys.executable, "-m", "swarmnet", "up", "--config", str(config), "--run-dir", str(run_dir),
               "--summary", str(self.summary_path), *args]
        super().__init__(cmd, run_dir / "up.log", die_with_parent=die_with_parent)

    def card(self, name: str, timeout: float = 120) -> dict[str, Any]:
        path = self.run_dir / name / "card.json"
        wait_until(path.exists, timeout, what=f"{name}'s card")
        return json.loads(path.read_text())

    def metrics(self, name: str) -> list[dict[str, Any]]:
        """The peer's training records (one per ``metrics_every`` steps)."""
        return training_records(self._records(name))

    def evaluations(self, name: str) -> list[dict[str, Any]]:
        """The peer's evaluation records: {"time", "step", "eval": {...}}."""
        return [r for r in self._records(name) if "eval" in r]

    def _records(self, name: str) -> list[dict[str, Any]]:
        path = self.run_dir / name / "metrics.jsonl"
        return read_metrics(path) if path.exists() else []

    def summary(self) -> dict[str, Any]:
        return json.loads(self.summary_path.read_text())


class PeerProcessHandle(_Process):
    """One ``swarmnet peer`` daemon; ``prefix`` runs it under e.g. ``ip netns exec NAME``."""

    def __init__(self, run_dir: Path, name: str, config: Path, *args: str, prefix: Sequence[str] = (),
                 log: Path | None = None, die_with_parent: bool = False, env: Mapping[str, str] | None = None) -> None:
        """``log``: where its output goes (default ``run_dir/<name>.log``); ``env``: variables set
        for it on top of this process's."""
        self.run_dir = run_dir
        self.name = name
        cmd = [sys.executable, "-m", "swarmnet", "peer", "--config", str(config), "--name", name,
               "--run-dir", str(run_dir), *args]
        super().__init__(cmd, log or run_dir / f"{name}.log", prefix, die_with_parent=die_with_parent, env=env)

    def card(self, timeout: float = 120) -> dict[str, Any]:
        path = self.run_dir / self.name / "card.json"
        wait_until(lambda: path.exists() or self.proc.poll() is not None, timeout, what=f"{self.name}'s card")
        if not path.exists():
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log:\n{self.log()}")
        return json.loads(path.read_text())

    def summary(self) -> dict[str, Any]:
        return json.loads((self.run_dir / self.name / "summary.json").read_text())

    def metrics(self) -> list[dict[str, Any]]:
        """The peer's training records (one per ``metrics_every`` steps)."""
        path = self.run_dir / self.name / "metrics.jsonl"
        return training_records(read_metrics(path)) if path.exists() else []


class ScriptProcess(_Process):
    """A helper script run in its own process with the project importable (a rogue peer, a proxy)."""

    def __init__(self, script: Path, *args: str, log: Path) -> None:
        super().__init__([sys.executable, str(script), *args], log)


def query_status(address: str, timeout: float = 5.0, key: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Ask a peer for its status over the wire protocol (a real client, as `swarmnet status` is);
    ``key``: a secret key file, for a swarm with [security] enabled."""

    async def ask() -> dict[str, Any]:
        from swarmnet.peer.client import PeerClient
        from swarmnet.peer.stats import PeerStats
        from swarmnet.security import client_keys
        from swarmnet.transport import TransportSet
        from swarmnet.wire import Limits, MsgType, request

        transports = TransportSet(client_keys(key))
        client = PeerClient(sender="status-client", transports=transports, limits=Limits(),
                            timeout=timeout, stats=PeerStats(), max_frame_bytes=2**31 - 1)
        try:
            reply = await client.call(address, request(MsgType.STATUS, client.sender), expect=MsgType.STATUS_REPLY)
            return dict(reply.body["status"])
        finally:
            await client.aclose()
            await transports.aclose()

    return asyncio.run(ask())
