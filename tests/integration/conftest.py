import pytest

from swarmnet.testing import LocalSwarm, PeerProcessHandle, write_config
from swarmnet.testing.netns import HostPair, HostsRefused


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


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: hosts 10.200.1.1 and 10.200.1.2."""
    try:
        hosts = HostPair()
    except HostsRefused as exc:
        pytest.skip(str(exc))
    with hosts:
        yield hosts
