import pytest

from swarmnet.config import NetworkConfig, load_config, load_manifest
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
        ("[train]\noptimizer = 'adam'", "train.optimizer: must be one of sgd, adamw"),
        ("[train]\noptimizer = 'adamw'\nmomentum = 0.9", "train.momentum: applies to optimizer = 'sgd'; adamw's "
                                                         "momentum is train.betas"),
        ("[train]\nbetas = [0.9]", "train.betas: must be two numbers in [0, 1)"),
        ("[train]\nprecision = 'fp8'", "train.precision: must be one of fp32, bf16, fp16"),
        ("[train]\nclip_grad_norm = -1.0", "train.clip_grad_norm: must be a finite number >= 0 (0: no clipping)"),
        ("[run]\nstopped_exit_code = 256", "run.stopped_exit_code: must be an exit status in 0..255"),
        ("[train]\nsteps = 10\nepochs = 2", "set only one of steps, epochs, sequential_epochs; here steps and epochs"),
        ("[device]\ndevice = 'cuda:abc'", "device.device: must be auto, cpu, cuda or cuda:N"),
        ("[device]\nthreads = 100000", "device.threads: must be between 1 and 1024"),
        ("[codec]\nname = 'fp33'", "codec.name: unknown codec 'fp33'"),
        ("[codec]\nname = 'lattice'\noptions = {chunk = 100}", "codec.options: lattice: chunk must be a multiple of 64"),
        ("[algorithm]\nname = 'adam'", "algorithm.name"),
        ("[algorithm]\nlocal_steps = 2.5", "must be an integer unless geometric"),
        ("[algorithm]\nsymmetric = true\n[screening]\nclip_ratio = 3.0",
         "screening.clip_ratio: cannot be combined with algorithm.symmetric"),
        ("[network]\nseeds = ['localhost:7000']", "must be a URL"),
        ("[network]\nrequest_timeout = 0", "network.request_timeout: must be a finite number of seconds > 0"),
        ("[train]\nbatch_size = true", "train.batch_size must be int"),
        ("[run]\nseed = 18446744073709551616", "run.seed: must be in 0..4294967295"),
        ("[run]\nseed = -1", "run.seed: must be in 0..4294967295"),
        ("[codec]\nname = 'blockwise8'\noptions = {seed = -1}", "codec.options: codec 'blockwise8': bad parameters"),
        ("[train]\nslowdown = 0.5", "train.slowdown: must be a finite number >= 1"),
        ("[train]\nstep_pad_s = -0.1", "train.step_pad_s: must be a finite number of seconds >= 0"),
        ("[train]\nslowdown = 3.0\nstep_pad_s = 0.01", "train.step_pad_s: and train.slowdown both make a straggler"),
        ("train = 3", "[train] must be a table"),
        ("[train\n", "not valid TOML"),
        ("[train]\nsteps = 0", "train.steps: leaves no budget"),
        ("[train]\nepochs = -1", "train.epochs: must be a finite number >= 0"),
        ("[train]\nsequential_epochs = -3", "train.sequential_epochs: must be a finite number >= 0"),
        ("[train]\nepochs = inf", "train.epochs: must be a finite number"),
        ("[train]\ngamma = -0.1", "train.gamma: must be a finite number >= 0"),
        ("[train]\nfinal_lr_ratio = -1.0", "train.final_lr_ratio: must be a finite number >= 0"),
        ("[train]\nwarmup_epochs = -1.0", "train.warmup_epochs: must be a finite number >= 0"),
        ("[train]\neval_every = -5", "train.eval_every: must be >= 0 (0: evaluate only at the end)"),
        ("[train]\ncheckpoint_every = -1.0", "train.checkpoint_every: must be a finite number of seconds >= 0"),
        ("[train]\nmilestones = [-1.0]", "train.milestones: must be finite epochs >= 0"),
        ("[algorithm]\nlocal_steps = inf", "algorithm.local_steps: must be a finite number >= 1"),
        ('[algorithm]\nname = "popsgd"\nlocal_steps = 2', "algorithm.local_steps: is SwarmSGD's: popsgd takes one"),
        ('[algorithm]\nname = "popsgd"\ngeometric = true', "algorithm.geometric: is SwarmSGD's"),
        ("[network]\npull_interval = -1.0", "network.pull_interval: must be a finite number of seconds >= 0"),
        ("[network]\njoin_timeout = -1.0", "network.join_timeout: must be a finite number of seconds >= 0"),
        ("[network]\nlinger = nan", "network.linger: must be a finite number of seconds >= 0"),
        ("[network]\nmax_concurrent_requests = 0", "network.max_concurrent_requests: must be >= 1"),
        ("[network]\nmax_message_bytes = 100", "network.max_message_bytes: must be 0 (auto"),
        ("[network]\nmin_transfer_rate = 0.0", "network.min_transfer_rate: must be a finite number of bytes"),
        ("[network]\nadvertise = 'foo'", "network.advertise: 'foo' must be a URL"),
        ("[network]\nlisten = 'tcp://127.0.0.1:99999'", "network.listen: 'tcp://127.0.0.1:99999' needs a port in 0..65535"),
        ("[network]\nadvertise = 'tcp://10.0.0.1:0'", "network.advertise: 'tcp://10.0.0.1:0' needs a port in 1..65535"),
        ("[network]\nadvertise = 'tcp://0.0.0.0:7000'", "network.advertise: 'tcp://0.0.0.0:7000' is a wildcard, not an"),
        ("[network]\nadvertise = 'tcp://[::]:7000'", "network.advertise: 'tcp://[::]:7000' is a wildcard, not an"),
        ("[train]\nsteps = 99999999999999999999", "train.steps: must be in 1..9007199254740992"),
        ("[train]\nepochs = 1e308", "train.epochs: must be a finite number >= 0 and <= 9007199254740992"),
        ("[run]\ndir = ''", "run.dir: must name a directory"),
        ("[network]\nlisten = 'ipc:///tmp/" + "s" * 110 + "'", "network.listen: the socket path /tmp/sss"),
        ("[network]\nseeds = ['tcp://10.0.0.1']", "network.seeds: 'tcp://10.0.0.1' needs a port in 1..65535"),
        ("[network]\nseeds = ['tpc://10.0.0.1:7000']", "network.seeds: 'tpc://10.0.0.1:7000': no transport for tpc://"),
        ("[network]\nseeds = ['http://10.0.0.1:7000']", "use one of file://, inproc://, ipc://, tcp://"),
        ("[network]\nlisten = 'file:///tmp/x'", "network.listen: 'file:///tmp/x': no transport for file://"),
        ("[network]\nlisten = 'tcp://[::1:7000'", "network.listen: 'tcp://[::1:7000' is not a valid address"),
        ("[network]\nseeds = ['tcp://[::1:7000']", "network.seeds: 'tcp://[::1:7000' is not a valid address"),
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
    with pytest.raises(ConfigError, match=r"no such peer manifest; .* checkout's peers/"):
        load_manifest(tmp_path / "nope.toml")


def test_a_directory_or_a_binary_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; pass a config file"):
        load_config(tmp_path)
    binary = tmp_path / "c.toml"
    binary.write_bytes(b"\xff\xfe[train]\n")
    with pytest.raises(ConfigError, match="c.toml: not UTF-8 text .*save it as UTF-8"):
        load_config(binary)


def test_good_addresses_and_zero_budgets_beside_a_budget_load(tmp_path):
    path = write(tmp_path, "[train]\nsteps = 0\nepochs = 2.5\n[network]\nlisten = 'tcp://0.0.0.0:65535'\n"
                           "advertise = 'tcp://[::1]:7000'\nseeds = ['ipc:///tmp/p.sock', 'file:///r/card.json']\n")
    cfg = load_config(path)
    assert cfg.train.epochs == 2.5 and cfg.network.listen == "tcp://0.0.0.0:65535"
    # A host whose address holds 0.0.0.0 as text is no wildcard.
    assert load_config(path, {"network.advertise": "tcp://10.0.0.0:7000"}).network.advertise == "tcp://10.0.0.0:7000"


def test_no_budget_means_the_default_steps_and_survives_a_round_trip(tmp_path):
    from swarmnet.config import build_config, to_dict

    cfg = load_config(write(tmp_path, "[train]\nlr = 0.01\n"))
    assert cfg.train.steps == 1000
    assert build_config(to_dict(cfg), "<SwarmConfig>").train.steps == 1000


def test_overrides_win_and_are_validated(tmp_path):
    path = write(tmp_path, "[train]\nsteps = 10\n")
    assert load_config(path, {"train.steps": 99}).train.steps == 99
    with pytest.raises(ConfigError, match="train.steps must be int"):
        load_config(path, {"train.steps": "many"})


def test_an_override_may_set_one_entry_of_a_table_of_options(tmp_path):
    path = write(tmp_path, "[task]\nspec = 'swarmnet.tasks.digits:task'\noptions = {hidden = 64, seed = 3}\n"
                           "[codec]\nname = 'blockwise8'\n")
    cfg = load_config(path, {"task.options.hidden": 128, "codec.options.block": 32})
    assert cfg.task.options == {"hidden": 128, "seed": 3} and cfg.codec.options == {"block": 32}
    with pytest.raises(ConfigError, match="^--set: codec.options: .*block must be an int"):
        load_config(path, {"codec.options.block": "big"}, {"codec.options.block": "--set"})
    with pytest.raises(ConfigError, match="^--set: train.lr must be float"):
        load_config(path, {"train.lr.x": 1}, {"train.lr.x": "--set"})


def test_errors_in_overrides_name_the_override_not_the_file(tmp_path):
    path = write(tmp_path, "[train]\nsteps = 10\n")
    cases = [({"run.dir": 2024}, "--set: run.dir must be str, got 2024"),
             ({"network.pull_interval": -1}, "--set: network.pull_interval: must be"),
             ({"train.stepz": 3}, "--set: unknown key 'train.stepz'"),
             ({"trian.steps": 3}, "--set: unknown key 'trian'")]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as info:
            load_config(path, overrides, dict.fromkeys(overrides, "--set"))
        assert str(info.value).startswith(message) and str(path) not in str(info.value)
    with pytest.raises(ConfigError, match="^override train.lr: train.lr: must be"):
        load_config(path, {"train.lr": -1.0})


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


def test_milestones_past_the_budget_are_named_with_the_fix(tmp_path, caplog):
    """A recipe's milestones in sequential epochs, read as the peer's own epochs once --epochs
    replaced the file's budget, lie past it: the rate would never decay, and the launcher says so."""
    from swarmnet.config import TrainConfig, load_config
    from swarmnet.launch import LaunchPlan
    from swarmnet.peer.compute import plan_training, unreached_milestones

    recipe = TrainConfig(batch_size=10, sequential_epochs=90, multiplier=2, milestones=[30, 60], schedule="multistep")
    assert unreached_milestones(recipe, plan_training(recipe, 32, 1000)) is None  # compressed with the budget
    replaced = TrainConfig(batch_size=10, epochs=40, milestones=[30, 60], schedule="multistep")
    message = unreached_milestones(replaced, plan_training(replaced, 32, 1000))
    assert message is not None and "[60] (this peer's own epochs) fall at or past the budget of 4000 steps" in message
    assert "set train.milestones" in message
    constant = TrainConfig(batch_size=10, epochs=40, milestones=[60])  # no multistep schedule: nothing decays anyway
    assert unreached_milestones(constant, plan_training(constant, 32, 1000)) is None

    config = write(tmp_path, '[task]\nspec = "swarmnet.tasks.lsq:task"\noptions = { samples = 1000 }\n'
                             '[train]\nbatch_size = 10\nsequential_epochs = 90\nmultiplier = 2\nmilestones = [30, 60]\n'
                             'schedule = "multistep"\n')
    overrides = {"train.steps": 0, "train.epochs": 40.0, "train.sequential_epochs": 0.0}  # swarmnet up --epochs 40
    cfg = load_config(config, overrides)
    with caplog.at_level("WARNING", logger="swarmnet"):
        LaunchPlan.build(cfg, config_path=config, overrides=overrides, manifests=None, transport="tcp", fresh=True,
                         log_level="INFO")
    assert "train.milestones [60] (this peer's own epochs)" in caplog.text


def test_cli_reports_config_errors_with_exit_status_2(tmp_path):
    from typer.testing import CliRunner

    from swarmnet.cli import app

    bad = write(tmp_path, "[train]\nlr = -1\n")
    result = CliRunner().invoke(app, ["peer", "--config", str(bad)])
    assert result.exit_code == 2
    assert "train.lr: must be a finite number >= 0" in result.output
    result = CliRunner().invoke(app, ["peer", "--set", "train.lr"])
    assert result.exit_code == 2 and "expected section.key=VALUE" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["peer", "--steps", "0"], "'--steps'"),
        (["up", "--steps", "0"], "'--steps'"),
        (["up", "--steps", "100", "--epochs", "2"], "--steps 100 and --epochs 2 both set the budget"),
        (["up", "--epochs", "0"], "--epochs 0: must be a finite number > 0"),
        (["up", "--epochs", "inf"], "--epochs inf: must be a finite number > 0"),
        (["up", "--set", "run.dir=2024"], "--set: run.dir must be str, got 2024"),
        (["up", "--set", "train.epochs=-1"], "--set: train.epochs: must be"),
        (["up", "--set", "train.sequential_epochs=-3"], "--set: train.sequential_epochs: must be"),
        (["peer", "--listen", "tcp://127.0.0.1:99999"], "--listen: network.listen: 'tcp://127.0.0.1:99999' needs a port"),
        (["peer", "--seed", "tcp://127.0.0.1"], "--seed: network.seeds:"),
        (["peer", "--advertise", "foo"], "--advertise: network.advertise: 'foo' must be a URL"),
        (["peer", "--listen", "tcp://:7000"], "--listen: network.listen: 'tcp://:7000' names no host"),
        (["peer", "--key", "/x"], "--key: security.key: is set but security.mode is 'none'"),
        (["peer", "--set", "network.max_message_bytes=99999999999999999999"], "network.max_message_bytes: must be 0"),
        (["eval", "--seed", "tcp://127.0.0.1:1", "--timeout", "0"], "--timeout must be a number of seconds > 0"),
    ],
)
def test_cli_refuses_bad_flags_and_names_them(args, message):
    from typer.testing import CliRunner

    from swarmnet.cli import app

    result = CliRunner().invoke(app, [*args, "--config", "configs/quickstart.toml"] if args[0] == "up" else args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "quickstart.toml" not in result.output


def test_manifest_values_are_named_by_the_manifest(tmp_path):
    from typer.testing import CliRunner

    from swarmnet.cli import app

    manifest = write(tmp_path, "listen = 'tcp://127.0.0.1:70000'\n", "gpu0.toml")
    result = CliRunner().invoke(app, ["peer", "--peer", str(manifest)])
    assert result.exit_code == 2 and f"{manifest} (listen): network.listen:" in result.output  # the manifest's key too
    negative = write(tmp_path, "rank = -5\n", "gpu1.toml")  # once taken for -1: the rank from the environment
    result = CliRunner().invoke(app, ["peer", "--peer", str(negative)])
    assert result.exit_code == 2 and f"{negative}: rank: must be >= 0, or -1" in result.output, result.output


def test_advertised_address_from_an_interface():
    from swarmnet.peer.node import interface_ipv4, with_interface_host

    assert interface_ipv4("lo") == "127.0.0.1"
    assert with_interface_host("tcp://0.0.0.0:7000", "lo") == "tcp://127.0.0.1:7000"
    with pytest.raises(ConfigError, match="interfaces here: .*lo"):
        interface_ipv4("no-such-if0")
    with pytest.raises(ConfigError, match="host:port"):
        with_interface_host("ipc:///tmp/peer.sock", "lo")


def test_an_interface_without_an_ipv4_address_is_named_as_such():
    """It read 'Cannot assign requested address'. In a new network namespace, lo is down and
    holds no address."""
    import subprocess
    import sys

    probe = ("from swarmnet.peer.node import interface_ipv4\n"
             "try:\n    interface_ipv4('lo')\nexcept Exception as exc:\n    print(exc)")
    try:
        done = subprocess.run(["unshare", "--net", sys.executable, "-c", probe], capture_output=True, text=True,
                              timeout=60)
    except FileNotFoundError:
        pytest.skip("no unshare here")
    if done.returncode != 0:
        pytest.skip(f"cannot make a network namespace here: {done.stderr.strip()}")
    assert "network.interface 'lo' has no IPv4 address" in done.stdout and "--advertise" in done.stdout, done.stdout


def test_advertised_loopback_with_another_hosts_seed_is_warned_of():
    from swarmnet.peer.node import loopback_warning

    said = loopback_warning("tcp://127.0.0.1:7000", ["tcp://10.0.0.2:7000"])
    assert said is not None and "advertises tcp://127.0.0.1:7000, a loopback address" in said
    assert "seed tcp://10.0.0.2:7000" in said and "--listen tcp://0.0.0.0:PORT" in said
    assert loopback_warning("tcp://127.0.0.1:7000", ["tcp://localhost:7001", "file:///run/p/card.json"]) is None
    assert loopback_warning("tcp://10.0.0.1:7000", ["tcp://10.0.0.2:7000"]) is None
    assert loopback_warning("tcp://[::1]:7000", ["tcp://hostb:7000"]) is not None
    assert loopback_warning("ipc:///tmp/a.sock", ["tcp://10.0.0.2:7000"]) is None


def test_network_limits_follow_the_models_size():
    net = NetworkConfig(request_timeout=10.0, min_transfer_rate=50e6)
    assert net.frame_limit(26_122) == 8 * 26_122 + (1 << 20)  # auto: any snapshot of the model fits
    assert net.frame_limit(600_000_000) > 2**31  # models past 2 GiB of fp32 are pulled too
    assert NetworkConfig(max_message_bytes=4096).frame_limit(10**9) == 4096  # set by hand: as set
    assert net.transfer_timeout(100_000_000) == pytest.approx(10.0 + 8.0)  # 400 MB at 50 MB/s


def test_one_section_is_validated_alone_without_importing_torch(tmp_path):
    import subprocess
    import sys

    from swarmnet.config import SecurityConfig, load_section

    path = write(tmp_path, "[security]\nmode = 'none'\n[codec]\nname = 'fp33'\n")
    assert load_section(path, "security") == SecurityConfig()
    with pytest.raises(ConfigError, match="unknown codec 'fp33'"):
        load_config(path)  # the whole config still refuses what the section alone ignores
    with pytest.raises(ConfigError, match="unknown key 'security.mod' in \\[security\\]; did you mean 'security.mode'"):
        load_section(write(tmp_path, "[security]\nmod = 'none'\n", "bad.toml"), "security")
    probe = ("import sys; from swarmnet.config import load_section; "
             f"load_section({str(path)!r}, 'security'); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_a_bad_interface_is_refused_before_an_earlier_run_is_set_aside(tmp_path):
    """It was found only once the peer had bound, after --fresh had moved the earlier run's files."""
    from typer.testing import CliRunner

    from swarmnet.cli import app

    earlier = tmp_path / "run" / "p" / "metrics.jsonl"
    earlier.parent.mkdir(parents=True)
    earlier.write_text('{"step": 1}\n')
    result = CliRunner().invoke(app, ["peer", "--name", "p", "--run-dir", str(tmp_path / "run"), "--fresh",
                                      "--listen", "tcp://0.0.0.0:0", "--interface", "no-such-if0",
                                      "--set", "task.spec=swarmnet.tasks.lsq:task"])
    assert result.exit_code == 2 and "network.interface 'no-such-if0'" in result.output, result.output
    assert earlier.read_text() == '{"step": 1}\n' and not (earlier.parent / ".earlier").exists()
