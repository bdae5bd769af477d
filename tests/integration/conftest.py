import json
from pathlib import Path

import pytest

from swarmnet.testing import LocalSwarm


def toml_value(value):
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


def write_config(path: Path, sections: dict) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


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
