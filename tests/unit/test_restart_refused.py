"""A restart whose checkpoint does not fit the model is refused saying which tensors and which
task.options differ, and leaves the earlier run's summary where it was."""

import json
import logging

import pytest

from swarmnet.config import load_config
from swarmnet.peer.node import PeerIdentity, run_event_loop, run_peer

from .test_compute_slowdown import compute_loop

pytestmark = pytest.mark.timeout(60)

SPEC = {"task.spec": "swarmnet.tasks.digits:task", "train.steps": 5, "train.tensorboard": False,
        "train.checkpoint_every": 0.0, "network.listen": "tcp://127.0.0.1:0"}


def test_a_refused_restart_names_the_shapes_and_options_that_changed_and_keeps_the_earlier_summary(tmp_path, caplog):
    run = tmp_path / "run"
    earlier = compute_loop(tmp_path, steps=5, slowdown=1.0)  # the digits task's own width, hidden = 128
    earlier.checkpoint_path = run / "p" / "checkpoint.pt"
    earlier.checkpoint_path.parent.mkdir(parents=True)
    earlier.save_checkpoint()
    summary = run / "p" / "summary.json"
    summary.write_text(json.dumps({"reason": "budget", "steps": 5}))
    (run / "p" / "card.json").write_text(json.dumps({"addr": "tcp://127.0.0.1:1"}))
    cfg = load_config(None, {**SPEC, "run.dir": str(run), "task.options": {"hidden": 16}})
    with caplog.at_level(logging.ERROR):
        assert run_event_loop(run_peer(cfg, PeerIdentity("p", 0), install_signals=False)) == 2
    said = caplog.records[-1].getMessage()
    assert "does not fit this peer's model: 0.weight is (128, 64) in the checkpoint, (16, 64) in this model; " \
           "0.bias is (128,) in the checkpoint, (16,) in this model (and 3 more tensors of other shapes); the " \
           "checkpoint was made with task.options {}, this config has {'hidden': 16}; start with " \
           "--fresh" in said, said
    assert json.loads(summary.read_text()) == {"reason": "budget", "steps": 5}  # the earlier run's result stays
    assert not (run / "p" / "card.json").exists()  # its card would pass for this one's


def test_a_checkpoint_other_than_by_shape_is_named_by_its_tensors(tmp_path):
    from torch import nn

    from swarmnet.peer.compute import model_mismatch, shortened

    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    saved = dict(model.state_dict())
    assert model_mismatch(saved, model) is None
    saved.pop("1.bias")
    saved["2.weight"] = saved["1.weight"]
    assert model_mismatch(saved, model) == ("1.bias is missing from the checkpoint; the checkpoint holds 2.weight, "
                                            "which this model has not")
    assert shortened("word " * 100, 22) == "word word word word ..."
