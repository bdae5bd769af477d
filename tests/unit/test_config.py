import pytest

from swarmnet.config import load_config, load_manifest
from swarmnet.errors import ConfigError


def write(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_bundled_configs_load():
    assert load_config(None).algorithm.name == "swarmsgd"
    cfg = load_config("configs/quickstart.toml")
    assert cfg.run.peers == 4 and cfg.train.epochs > 0


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("[train]\nstepz = 3", "unknown key 'train.stepz' in [train]; did you mean 'train.steps'?"),
        ("[trian]\nsteps = 3", "unknown key 'trian'"),
        ("[train]\nlr = 'fast'", "train.lr must be float"),
        ("[train]\nmomentum = 1.5", "train.momentum: must be in [0, 1)"),
        ("[train]\nsteps = 10\nepochs = 2", "set only one of steps"),
        ("[algorithm]\nname = 'adam'", "algorithm.name"),
        ("[algorithm]\nlocal_steps = 2.5", "must be an integer unless geometric"),
        ("[network]\nseeds = ['localhost:7000']", "must be a URL"),
        ("[network]\nrequest_timeout = 0", "network.request_timeout: must be > 0"),
        ("[train]\nbatch_size = true", "train.batch_size must be int"),
        ("[train]\nslowdown = 0.5", "train.slowdown: must be a finite number >= 1"),
        ("train = 3", "[train] must be a table"),
        ("[train\n", "not valid TOML"),
    ],
)
def test_bad_configs_name_file_key_and_fix(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml")


def test_overrides_win_and_are_validated(tmp_path):
    path = write(tmp_path, "[train]\nsteps = 10\n")
    assert load_config(path, {"train.steps": 99}).train.steps == 99
    with pytest.raises(ConfigError, match="train.steps must be int"):
        load_config(path, {"train.steps": "many"})


def test_manifest_name_defaults_to_file_stem(tmp_path):
    path = write(tmp_path, "listen = 'tcp://127.0.0.1:7000'\nseeds = ['tcp://10.0.0.1:7000']\n", "gpu3.toml")
    manifest = load_manifest(path)
    assert manifest.name == "gpu3" and manifest.seeds == ["tcp://10.0.0.1:7000"]


def test_training_plan_from_epochs_and_the_multiplier():
    from swarmnet.config import TrainConfig
    from swarmnet.peer.compute import plan_training

    # 1,000 samples, batch 10: 100 steps per epoch.
    plan = plan_training(TrainConfig(batch_size=10, epochs=3, milestones=[1, 2], schedule="multistep"), 4, 1000)
    assert plan.total_steps == 300 and plan.schedule.milestones == (100, 200)
    # Sequential recipe of 90 epochs (drops at 30, 60) on 32 peers with multiplier 2 (SPEC 2.7).
    recipe = TrainConfig(batch_size=10, sequential_epochs=90, multiplier=2, milestones=[30, 60], schedule="multistep")
    plan = plan_training(recipe, 32, 1000)
    assert plan.total_steps == 563 and plan.schedule.milestones == (188, 375)


def test_cli_reports_config_errors_with_exit_status_2(tmp_path):
    from typer.testing import CliRunner

    from swarmnet.cli import app

    bad = write(tmp_path, "[train]\nlr = -1\n")
    result = CliRunner().invoke(app, ["peer", "--config", str(bad)])
    assert result.exit_code == 2
    assert "train.lr: must be a finite number >= 0" in result.output
    result = CliRunner().invoke(app, ["peer", "--set", "train.lr"])
    assert result.exit_code == 2 and "expected section.key=VALUE" in result.output


def test_advertised_address_from_an_interface():
    from swarmnet.peer.node import interface_ipv4, with_interface_host

    assert interface_ipv4("lo") == "127.0.0.1"
    assert with_interface_host("tcp://0.0.0.0:7000", "lo") == "tcp://127.0.0.1:7000"
    with pytest.raises(ConfigError, match="interfaces here: .*lo"):
        interface_ipv4("no-such-if0")
    with pytest.raises(ConfigError, match="host:port"):
        with_interface_host("ipc:///tmp/peer.sock", "lo")
