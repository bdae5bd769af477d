"""What `swarmnet up` passes to the peers it launches."""

import logging

import pytest

from swarmnet.config import load_config
from swarmnet.errors import ConfigError
from swarmnet.launch import LaunchPlan
from swarmnet.testing import write_config


def plan(tmp_path, overrides, config_path=None):
    overrides = {"run.dir": str(tmp_path / "run"), **overrides}
    cfg = load_config(config_path, overrides)
    return LaunchPlan.build(cfg, config_path=config_path, overrides=overrides, manifests=None, transport="tcp",
                            fresh=True, log_level="WARNING")


def min_peers_set(p):
    """The network.min_peers the peers get on their command line (None: their config's)."""
    values = [arg.split("=", 1)[1] for arg in p.base_command if arg.startswith("network.min_peers=")]
    return values[-1] if values else None


def test_peers_launched_together_wait_for_each_other_unless_told_otherwise(tmp_path, caplog):
    lsq = {"task.spec": "swarmnet.tasks.lsq:task", "run.peers": 4}
    assert min_peers_set(plan(tmp_path, lsq)) == "3"
    # A count the user gave, with --set or in the config file, is kept (it used to be replaced).
    assert min_peers_set(plan(tmp_path, {**lsq, "network.min_peers": 0})) == "0"
    config = write_config(tmp_path / "two.toml", {"task": {"spec": "swarmnet.tasks.lsq:task"},
                                                    "network": {"min_peers": 2}})
    assert min_peers_set(plan(tmp_path, {"run.peers": 4}, config)) is None
    with caplog.at_level(logging.WARNING, logger="swarmnet.launch"):
        plan(tmp_path, {"run.peers": 2}, config)
    assert "network.min_peers = 2 but only 1 other peers are launched" in caplog.text


def test_ipc_sockets_under_a_run_dir_too_deep_for_them_are_refused_before_any_start(tmp_path):
    deep = tmp_path / ("d" * 110)
    cfg = load_config(None, {"run.dir": str(deep)})
    with pytest.raises(ConfigError, match=r"over the 107 a Unix socket allows; use a shorter --run-dir, or --transport tcp"):
        LaunchPlan.build(cfg, config_path=None, overrides={"run.dir": str(deep)}, manifests=None, transport="ipc",
                         fresh=True, log_level="WARNING")
