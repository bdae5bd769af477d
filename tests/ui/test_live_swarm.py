"""``swarmnet status`` against a real local swarm: as a program in a terminal, and as JSON."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarmnet.testing import LocalSwarm, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(170)]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """
[run]
peers = 3
[task]
spec = "swarmnet.tasks.digits:task"
[train]
steps = 10000000
lr = 0.05
[network]
request_timeout = 1.0
dead_after = 2.0
pull_interval = 0.1
"""


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    root = tmp_path_factory.mktemp("status-swarm")
    (root / "swarm.toml").write_text(CONFIG)
    local = LocalSwarm(root / "run", root / "swarm.toml")
    try:
        for name in ("peer0", "peer1", "peer2"):
            local.card(name, timeout=90)
        yield local
    finally:
        local.kill_tree()


def status_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "swarmnet", "status", *args]


def test_json_lists_every_peer_training(swarm: LocalSwarm) -> None:
    seed = f"file://{swarm.run_dir / 'peer1' / 'card.json'}"

    def training() -> dict | None:
        out = subprocess.run(status_cli("--seed", seed, "--json", "--timeout", "1"), capture_output=True, text=True,
                             cwd=ROOT, timeout=60, check=True).stdout
        doc = json.loads(out)
        states = {p["name"]: p["state"] for p in doc["peers"]}
        return doc if states == {f"peer{i}": "training" for i in range(3)} else None

    doc = wait_until(training, 120, interval=0.5, what="three training peers in --json")
    print(f"status query of 3 real peers: {doc['query_s'] * 1000:.1f} ms")
    assert doc["swarm"]["alive"] == 3
    assert all(p["step"] > 0 and p["host"] and p["device"] == "cpu" for p in doc["peers"])
    assert doc["swarm"]["throughput"] is not None


class Tmux:
    """A private tmux server (its own socket) with one 200x50 window running a command."""

    def __init__(self, command: str) -> None:
        self.socket = f"swarmnet-ui-test-{os.getpid()}"
        self.tmux(["new-session", "-d", "-x", "200", "-y", "50", "-s", "status", command])

    def tmux(self, args: list[str]) -> str:
        # An explicit environment: something in the test process sets COLUMNS=80 below os.environ,
        # and the view would then size itself to that instead of the window.
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True,
                              timeout=10, env=env).stdout

    def screen(self) -> str:
        return self.tmux(["capture-pane", "-p", "-t", "status"])

    def rows(self) -> dict[str, str]:
        return {m.group(1): line for line in self.screen().splitlines() if (m := re.match(r"(peer\d+) ", line))}

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_live_view_in_a_terminal_shows_a_killed_peer_stale(swarm: LocalSwarm) -> None:
    command = " ".join(shlex.quote(a) for a in status_cli("--run-dir", str(swarm.run_dir), "--interval", "0.5"))
    term = Tmux(f"cd {shlex.quote(str(ROOT))} && exec {command}")
    try:
        def all_training() -> dict[str, str] | None:
            rows = term.rows()
            return rows if len(rows) == 3 and all("training" in v for v in rows.values()) else None

        def victim_stale() -> dict[str, str] | None:
            rows = term.rows()
            return rows if "stale" in rows.get("peer2", "") else None

        rows = wait_until(all_training, 90, interval=0.5, what="three training rows on screen")
        assert set(rows) == {"peer0", "peer1", "peer2"}
        assert "peers alive 3/3" in term.screen()

        victim = json.loads((swarm.run_dir / "peer2" / "card.json").read_text())["pid"]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        rows = wait_until(victim_stale, 30, interval=0.25, what="peer2 shown stale")
        print(f"peer2 shown stale {time.monotonic() - killed_at:.1f}s after SIGKILL\n{term.screen()}")
        assert "training" in rows["peer0"] and "training" in rows["peer1"]
        size = term.tmux(["display", "-p", "-t", "status", "#{window_width}x#{window_height}"])
        assert re.search(r"\d+\.\ds$", rows["peer2"].rstrip()), f"{size}\n{term.screen()}"  # last-seen age
        wait_until(lambda: "peers alive 2/3" in term.screen() and "peer2 not answering" in term.screen(), 10,
                   interval=0.25, what="header and event for the dead peer")
    finally:
        term.close()
