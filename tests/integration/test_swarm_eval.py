"""`swarmnet eval` against a live swarm: pull every (or k) peers' current snapshot, average,
recompute BatchNorm statistics, evaluate."""

import json
import signal
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from swarmnet.cli import app
from swarmnet.config import load_config
from swarmnet.evaluation import evaluate_swarm
from swarmnet.tasks import load_task
from swarmnet.testing import query_status, wait_until

from .conftest import digits_config, write_config
from .test_real_tasks import write_cifar

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def run_eval(*args):
    done = subprocess.run([sys.executable, "-m", "swarmnet", "eval", *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_eval_averages_the_live_models_of_a_resnet_swarm(tmp_path, swarm_factory):
    data = write_cifar(tmp_path / "cifar", n_train=512)
    sections = {
        "run": {"peers": 2, "seed": 0},
        "device": {"threads": 1},
        "task": {"spec": "swarmnet.tasks.cifar:task", "options": {"path": str(data), "blocks": 1, "width": 4}},
        "train": {"batch_size": 32, "lr": 0.05, "momentum": 0.9, "steps": 1_000_000, "metrics_every": 20,
                  "checkpoint_every": 0.0},
        "network": {"linger": 0.5},
    }
    config = write_config(tmp_path / "eval.toml", sections)
    swarm = swarm_factory(sections, name="live")
    cards = [swarm.card(f"peer{i}") for i in range(2)]
    wait_until(lambda: all(query_status(c["addr"])["step"] > 80 for c in cards), 180, interval=1.0,
               what="every peer past step 80")

    everyone = run_eval("--config", str(config), "--run-dir", str(swarm.run_dir), "--json", str(tmp_path / "e.json"),
                        "--save", str(tmp_path / "avg.pt"))
    assert json.loads((tmp_path / "e.json").read_text()) == everyone
    assert everyone["model"] == str(tmp_path / "avg.pt")
    task = load_task("swarmnet.tasks.cifar:task", sections["task"]["options"])
    model = task.build_model()  # the saved average, BatchNorm statistics included, scores what eval said
    model.load_state_dict(torch.load(tmp_path / "avg.pt", weights_only=True))
    model.eval()
    assert task.evaluate(model)["accuracy"] == pytest.approx(everyone["eval"]["accuracy"], abs=1e-6)
    assert everyone["peers_averaged"] == 2 and {p["name"] for p in everyone["peers"]} == {"peer0", "peer1"}
    assert everyone["batchnorm_batches"] == 20 and everyone["metric"] == "accuracy"
    assert everyone["eval"]["accuracy"] > 0.5, everyone  # chance 0.1; ~0.8-1.0 measured
    assert everyone["consensus_distance"] > 0  # two live models, never exactly equal

    one = evaluate_swarm(load_config(config), seeds=[cards[1]["addr"]], peers=1, bn_batches=3)
    assert one["peers_averaged"] == 1 and one["peers"][0]["name"] == "peer0"  # found through peer1's view
    assert one["batchnorm_batches"] == 3 and one["consensus_distance"] == 0
    assert one["eval"]["accuracy"] > 0.3, one

    swarm.signal(signal.SIGTERM)
    assert swarm.wait(60) == 143


def test_eval_reads_a_lattice_swarm_that_merges_every_few_milliseconds(tmp_path, swarm_factory):
    """Digits peers republish every two steps (a few ms): a reader that escalated its lattice
    planes in rounds against one version found it retired ("version ... is gone")."""
    sections = digits_config(steps=1_000_000, metrics_every=50, checkpoint_every=0.0)
    sections["run"]["peers"] = 2
    sections["codec"] = {"name": "lattice", "options": {"eps_scale": 4.0, "chunk": 1024}}
    sections["network"].update(linger=0.5, exchange_cpu=0.0)
    config = write_config(tmp_path / "eval.toml", sections)
    swarm = swarm_factory(sections, name="live")
    cards = [swarm.card(f"peer{i}") for i in range(2)]
    wait_until(lambda: all(query_status(c["addr"])["step"] > 1000 for c in cards), 120, interval=0.5,
               what="every peer past step 1000")
    for _ in range(3):
        result = run_eval("--config", str(config), "--run-dir", str(swarm.run_dir), "--bn-batches", "0")
        assert result["peers_averaged"] == 2 and result["eval"]["accuracy"] > 0.9, result
    # Another swarm's config: a model of another size, which the refusal says how to fix.
    other = subprocess.run([sys.executable, "-m", "swarmnet", "eval", "--config", str(config), "--run-dir",
                            str(swarm.run_dir), "--set", 'task.options={"hidden": 16}'],
                           capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and "pass the swarm's own config (--config" in other.stderr, other.stderr
    # A --json path that cannot be written is refused before the swarm is asked, not after.
    (tmp_path / "a-file").write_text("")
    unwritable = subprocess.run([sys.executable, "-m", "swarmnet", "eval", "--config", str(config), "--run-dir",
                                 str(swarm.run_dir), "--bn-batches", "0", "--json", str(tmp_path / "a-file" / "e.json")],
                                capture_output=True, text=True, timeout=120)
    assert unwritable.returncode == 2 and "which is not a directory; choose a writable path" in unwritable.stderr, \
        unwritable.stderr
    swarm.signal(signal.SIGTERM)
    assert swarm.wait(60) == 143


def test_eval_without_a_swarm_is_a_clear_error(tmp_path):
    runner = CliRunner()
    done = runner.invoke(app, ["eval", "--run-dir", str(tmp_path)])
    assert done.exit_code == 2 and "no peer answered" in done.output
    done = runner.invoke(app, ["eval"])
    assert done.exit_code == 2 and "--seed ADDRESS or --run-dir" in done.output
