"""What a user's task must give, refused where it is made or first used with a message naming
the field and the fix: never a traceback from deep inside torch or a peer that did not come up."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from swarmnet.errors import ConfigError
from swarmnet.evaluation import evaluate_averaged
from swarmnet.tasks import Task, load_task

from .test_compute_slowdown import compute_loop

pytestmark = pytest.mark.timeout(60)


def tensors(n=64):
    return torch.randn(n, 4), torch.randint(0, 2, (n,))


def fields(**changed):
    x, y = tensors()
    base = dict(name="mine", build_model=lambda: nn.Linear(4, 2), train=(x, y),
                loss=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]))
    return {**base, **changed}


@pytest.mark.parametrize("changed,message", [
    ({"build_model": nn.Linear(4, 2)}, r"build_model is a model \(an nn.Module instance\); it must be a function that "
                                       r"builds the model, e.g. build_model=lambda: MyNet\(\)"),
    ({"build_model": "MyNet"}, r"build_model is str; it must be a function that builds the model"),
    ({"train": torch.randn(64, 4)}, r"train is Tensor; it must be a tuple of tensors .* e.g. train=\(x,\)"),
    ({"train": (torch.randn(64, 4), np.zeros(64))}, r"train\[1\] is numpy.ndarray, not a torch.Tensor; convert it "
                                                    r"with torch.as_tensor\(a\) or torch.from_numpy\(a\)"),
    ({"train": (torch.randn(64, 4), [0] * 64)}, r"train\[1\] is builtins.list, not a torch.Tensor"),
])
def test_a_task_of_the_wrong_parts_is_refused_naming_the_field_and_the_fix(changed, message):
    with pytest.raises(ConfigError, match=rf"task mine: {message}"):
        Task(**fields(**changed))


def test_a_list_of_training_tensors_is_taken_as_a_tuple():
    x, y = tensors()
    train = Task(**fields(train=[x, y])).train
    assert isinstance(train, tuple) and train[0] is x and train[1] is y


def test_a_build_model_that_returns_no_module_is_refused_where_it_is_called(tmp_path, monkeypatch):
    (tmp_path / "unbuilt_task.py").write_text(textwrap.dedent("""\
        import torch
        from torch import nn
        from swarmnet.tasks.lsq import task as lsq

        class MyNet(nn.Linear):
            def __init__(self):
                super().__init__(32, 1)

        def task():
            base = lsq(samples=64)
            return type(base)(name="mine", build_model=lambda: MyNet, train=base.train, loss=base.loss)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"task 'unbuilt_task:task': build_model returned type, expected a "
                                          r"torch.nn.Module; fix the task's build_model"):
        load_task("unbuilt_task:task").build_model()


# -- the loss -----------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [0.0, 1.0], ids=["plain", "clipped"])
@pytest.mark.parametrize("loss,said", [
    (lambda model, batch: F.cross_entropy(model(batch[0]), batch[1], reduction="none"), "a tensor of shape (32,)"),
    (lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]).item(), "float"),
    (lambda model, batch: {"loss": F.cross_entropy(model(batch[0]), batch[1])}, "dict"),
    (lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]).detach(),
     "a tensor that does not require grad (computed under no_grad, or detached)"),
], ids=["per-sample", "float", "dict", "detached"])
def test_a_loss_that_is_not_the_batch_mean_as_a_tensor_stops_the_peer_saying_what_it_must_return(
        tmp_path, loss, said, clip):
    compute = compute_loop(tmp_path, steps=3, slowdown=1.0, **{"train.batch_size": 32, "train.clip_grad_norm": clip})
    compute.task = Task(name="mine", build_model=compute.task.build_model, train=compute.task.train, loss=loss)
    before = compute.live_N.clone()
    reason = compute.run()
    assert reason.startswith("error: step 1 failed: TypeError: the task's loss (") and __file__ in reason, reason
    assert reason.endswith(f"returned {said}: it must return the batch's mean loss as a "
                           "one-element torch tensor that requires grad (not .item(), float() or per-sample losses)"), \
        reason
    assert "compute.py" not in reason  # where swarmnet checked it says nothing to the task's author
    assert compute.torn_by is None and torch.equal(compute.live_N, before)  # nothing was written: it checkpoints


# -- the evaluation -----------------------------------------------------------------------------


@pytest.mark.parametrize("evaluate,said", [
    (lambda model: 0.9, r"returned float; it must return a dict of numbers, e.g. \{'accuracy': 0.9\}"),
    (lambda model: {"accuracy": 0.9, "grade": "high"}, r"returned str 'high' for 'grade'; it must return a dict of "
                                                        r"numbers"),
    (lambda model: {"loss": torch.ones(3)}, r"returned a tensor of shape \(3,\) for 'loss'"),
])
def test_an_evaluation_that_is_not_a_dict_of_numbers_is_named_by_the_peer_and_by_the_average(
        tmp_path, evaluate, said):
    compute = compute_loop(tmp_path, steps=3, slowdown=1.0)
    task = Task(name="mine", build_model=compute.task.build_model, train=compute.task.train, loss=compute.task.loss,
                evaluate=evaluate)
    compute.task = task
    with pytest.raises(TypeError, match=rf"the task's evaluate \(.*test_task_contract.py:\d+\) {said}"):
        compute.evaluate()
    assert compute.model.training  # put back in training mode all the same
    with pytest.raises(TypeError, match=rf"the task's evaluate \(.*\) {said}"):
        evaluate_averaged(task.build_model(), task, batch_size=32, seed=0)


def test_an_evaluation_of_tensors_and_numpy_numbers_reads_as_floats(tmp_path):
    x, y = tensors()
    task = Task(**fields(evaluate=lambda model: {"loss": torch.tensor(0.5), "accuracy": np.float32(0.25), "n": 3,
                                                 "f1": np.array(0.75)}))
    assert evaluate_averaged(task.build_model(), task, batch_size=32, seed=0)["eval"] == {
        "loss": 0.5, "accuracy": 0.25, "n": 3.0, "f1": 0.75}


# -- the initial model --------------------------------------------------------------------------


NUMPY_TASK = """\
import random

import numpy as np
import torch
from torch import nn

from swarmnet.tasks.lsq import task as lsq


def task():
    base = lsq(samples=64, dim=8)

    def build_model():
        model = nn.Linear(8, 1)
        with torch.no_grad():  # an initialization of its own, drawn from numpy and random
            model.weight.copy_(torch.from_numpy(np.random.randn(1, 8)).float())
            model.bias.fill_(random.random())
        return model

    return type(base)(name="numpy-init", build_model=build_model, train=base.train, loss=base.loss)
"""

PEER = """\
import asyncio, json, sys
import torch
from swarmnet.algorithms import PhaseClock
from swarmnet.codecs import make_codec
from swarmnet.config import load_config
from swarmnet.log import PeerLogAdapter, get_logger
from swarmnet.peer.compute import ComputeLoop
from swarmnet.peer.state import Mailbox, SnapshotStore
from swarmnet.peer.stats import PeerStats
from swarmnet.tasks import load_task

cfg = load_config(None, {"task.spec": "numpy_init_task:task", "train.steps": 1, "train.tensorboard": False})
loop = asyncio.new_event_loop()
compute = ComputeLoop(cfg=cfg, task=load_task(cfg.task.spec), device=torch.device("cpu"), codec=make_codec("fp32"),
                      store=SnapshotStore(), mailbox=Mailbox(loop), clock=PhaseClock(), stats=PeerStats(),
                      peer_dir=__import__("pathlib").Path(sys.argv[1]), rank=0, peer_seed=int(sys.argv[2]),
                      log=PeerLogAdapter(get_logger("peer"), {"peer": "p"}))
print(json.dumps(compute.live_N.tolist()))
"""


def test_peers_started_apart_build_the_same_model_when_it_draws_from_numpy_and_random(tmp_path):
    """Every peer is a process of its own, maybe on another host: seeding torch alone left a
    build_model drawing from numpy.random or random with another model in each."""
    (tmp_path / "numpy_init_task.py").write_text(NUMPY_TASK)
    (tmp_path / "peer_model.py").write_text(PEER)
    models = []
    for name, peer_seed in (("a", 11), ("b", 22)):
        done = subprocess.run([sys.executable, "peer_model.py", str(tmp_path / name), str(peer_seed)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        models.append(json.loads(done.stdout))
    assert models[0] == models[1] and len(models[0]) == 9
