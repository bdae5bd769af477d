import secrets
import subprocess

import pytest

from swarmnet.testing import LocalSwarm, PeerProcessHandle, write_config


@pytest.fixture
def daemons():
    """`swarmnet peer` handles a test starts; every process tree is killed at teardown."""
    started = []
    yield started
    for d in started:
        d.kill_tree()


@pytest.fixture
def swarm_factory(tmp_path):
    """Start `swarmnet up` swarms; every process tree is killed at teardown."""
    started = []

    def start(sections: dict, *args: str, name: str = "run") -> LocalSwarm:
        config = write_config(tmp_path / f"{name}.toml", sections)
        swarm = LocalSwarm(tmp_path / name, config, *args)
        started.append(swarm)
        return swarm

    yield start
    for swarm in started:
        swarm.kill_tree()


def start_control_peer(tmp_path, config: dict, daemons: list) -> PeerProcessHandle:
    """A peer alone with ``config``, under ``tmp_path/control``: nothing to wait on, so its pace
    shows how fast the machine runs in a window. A shared machine's pace moves by a fifth or
    more between windows a few seconds apart, so tests compare a peer's pace across windows
    against the control's."""
    control = PeerProcessHandle(tmp_path / "control", "control", write_config(tmp_path / "control.toml", config))
    daemons.append(control)
    control.card()
    return control


def digits_config(**train):
    config = {
        "run": {"peers": 4, "seed": 0},
        "task": {"spec": "swarmnet.tasks.digits:task"},
        "train": {"batch_size": 32, "lr": 0.05, "momentum": 0.9, "steps": 100_000, "metrics_every": 10,
                  "checkpoint_every": 2.0},
        "algorithm": {"name": "swarmsgd", "local_steps": 2},
        "network": {"request_timeout": 1.0, "dead_after": 2.0, "failure_backoff": 0.5},
    }
    config["train"].update(train)
    return config


def lsq_config(**train):
    base = {
        "run": {"peers": 4, "seed": 0},
        "task": {"spec": "swarmnet.tasks.lsq:task"},
        "train": {"batch_size": 1, "lr": 0.01, "steps": 8000, "metrics_every": 100, "checkpoint_every": 0.0},
        "algorithm": {"name": "swarmsgd", "local_steps": 1},
        "network": {"linger": 2.0, "exchange_cpu": 0.0},  # dense interactions, as SPEC 1.5 assumes
    }
    base["train"].update(train)
    return base


class TwoHosts(list):
    """The two namespace names (``hosts[0]``, ``hosts[1]``), and the veth between them to cut."""

    def __init__(self, ns, links):
        super().__init__(ns)
        self.links = links

    def set_link(self, up: bool) -> None:
        """Cut (both ends down: packets vanish, no reset) or heal the link between the hosts."""
        for ns, link in zip(self, self.links):
            result = _ip("-n", ns, "link", "set", link, "up" if up else "down")
            assert result.returncode == 0, result.stderr


def _ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: hosts 10.200.1.1 and 10.200.1.2."""
    tag = secrets.token_hex(3)
    ns = [f"swn-a-{tag}", f"swn-b-{tag}"]
    try:
        made = _ip("netns", "add", ns[0])
    except (FileNotFoundError, subprocess.TimeoutExpired):
        pytest.skip("iproute2 is not installed: cannot create network namespaces")
    if made.returncode != 0:
        pytest.skip(f"this machine does not allow network namespaces: {made.stderr.strip()}")
    try:
        steps = [
            ("netns", "add", ns[1]),
            ("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}"),
            ("link", "set", f"va{tag}", "netns", ns[0]),
            ("link", "set", f"vb{tag}", "netns", ns[1]),
            ("-n", ns[0], "addr", "add", "10.200.1.1/24", "dev", f"va{tag}"),
            ("-n", ns[1], "addr", "add", "10.200.1.2/24", "dev", f"vb{tag}"),
            ("-n", ns[0], "link", "set", f"va{tag}", "up"),
            ("-n", ns[1], "link", "set", f"vb{tag}", "up"),
            ("-n", ns[0], "link", "set", "lo", "up"),
            ("-n", ns[1], "link", "set", "lo", "up"),
        ]
        for step in steps:
            result = _ip(*step)
            if result.returncode != 0:
                pytest.skip(f"could not set up namespaces (ip {' '.join(step)}): {result.stderr.strip()}")
        yield TwoHosts(ns, [f"va{tag}", f"vb{tag}"])
    finally:
        for name in ns:
            _ip("netns", "del", name)
