"""swarmnet.SwarmOptimizer: users' own torch loops in separate processes form a swarm."""

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import swarmnet
import swarmnet.peer.exchange
from swarmnet.errors import ConfigError, SwarmError, TransportError
from swarmnet.evaluation import evaluate_swarm
from swarmnet.tasks import datasets
from swarmnet.testing import wait_until
from swarmnet.testing.ports import port_is_free, unused_port
from swarmnet.transport.zmq import REBIND_WAIT_S

EXAMPLE = "examples/own_training_loop.py"
SPLIT = ["0,1,2", "3,4,5", "6,7,8,9"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_three_processes_with_disjoint_classes_learn_all_classes_through_the_swarm(tmp_path):
    """Each process runs a plain torch loop on a third of the classes only: alone, its model
    could score at most the share of the test set in its classes (<= 0.4); through the swarm's
    merges every model learns all ten."""
    _, _, _, y_test = datasets.digits()
    alone_best = max(float(torch.isin(y_test, torch.tensor([int(c) for c in s.split(",")])).float().mean())
                     for s in SPLIT)
    run_dir = tmp_path / "run"
    card = run_dir / "p0" / "card.json"
    procs = []
    try:
        # All start at once (as `swarmnet up` starts its peers): the others' seed is p0's card,
        # which they retry until it appears; each waits (bounded) to know the other two.
        for i, classes in enumerate(SPLIT):
            seeds = ["--seed", f"file://{card}"] if i else []
            cmd = [sys.executable, EXAMPLE, "--name", f"p{i}", "--classes", classes, "--steps", "1500",
                   "--run-dir", str(run_dir), "--min-peers", "2", "--join-timeout", "150", *seeds]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=dict(os.environ, PYTHONPATH=str(Path.cwd()))))
        results = []
        for p in procs:
            out, err = p.communicate(timeout=240)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            p.kill()
    print(f"user loops: {results}; best possible alone {alone_best:.3f}")
    for r in results:
        assert r["steps"] == 1500 and r["merges"] > 50, r
        # 0.83-0.93 measured (the learning rate decays to zero); alone each is capped near 0.3-0.4.
        assert r["accuracy"] > max(0.75, alone_best + 0.3), r
    accuracies = [r["accuracy"] for r in results]
    assert max(accuracies) - min(accuracies) < 0.1, results  # the final merges settle them together


def _model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("gap_on", ["event loop", "worker thread"])
def test_two_in_process_peers_merge_while_buffers_and_momentum_stay_local(tmp_path, monkeypatch, gap_on):
    if gap_on == "worker thread":  # as for a model over INLINE_GAP_MAX coordinates, or on a GPU
        monkeypatch.setattr(swarmnet.peer.exchange, "INLINE_GAP_MAX", 0)
    a_model, a_opt = _model_and_optimizer()
    b_model, b_opt = _model_and_optimizer()
    with torch.no_grad():
        b_model[0].weight.add_(1.0)  # b starts elsewhere: a's merges must pull a toward it
    settings = {"network.linger": 0.0, "train.metrics_every": 5}
    x = torch.randn(16, 4)
    with swarmnet.SwarmOptimizer(a_opt, a_model, name="a", run_dir=tmp_path, settings=settings) as a, \
         swarmnet.SwarmOptimizer(b_opt, b_model, name="b", run_dir=tmp_path, seeds=[a.address],
                                 settings=settings) as b:
        assert a.address.startswith("tcp://127.0.0.1:")
        assert a.peer.exchange._inline_gap is (gap_on == "event loop")
        b_running_mean = b_model[1].running_mean.clone()
        start_gap = float((a_model[0].weight - b_model[0].weight).detach().norm())

        def zero_loss():
            a.zero_grad()
            loss = a_model(x).pow(2).mean().mul(0.0)  # zero gradient: only merges move a
            loss.backward()
            return loss

        def a_step():
            a.step(zero_loss)
            return a.status()["interactions"] >= 3 and a.replica.step >= 10

        wait_until(a_step, 30, interval=0.01, what="three merges into a")
        momentum = a_opt.state[a_model[0].weight]["momentum_buffer"]
        assert torch.count_nonzero(momentum) == 0  # merges never enter the optimizer's state
        assert float((a_model[0].weight - b_model[0].weight).detach().norm()) < 0.5 * start_gap
        assert torch.equal(b_model[1].running_mean, b_running_mean)  # b's BatchNorm stats untouched
        assert b.status()["name"] == "b"
    with pytest.raises(SwarmError, match="after close"):
        a.step()
    a.close()  # a second close is a no-op
    # Like a daemon: a metrics stream while training and a summary on close.
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert summary["reason"] == "closed" and summary["steps"] >= 10 and summary["interactions"] >= 3, summary
    assert [r["step"] for r in rows[:2]] == [5, 10] and all(r["loss"] == 0.0 for r in rows), rows
    assert rows[-1]["step"] == summary["steps"] and 3 <= rows[-1]["interactions"] <= summary["interactions"]
    b_summary = json.loads((tmp_path / "b" / "summary.json").read_text(), parse_constant=_not_json)
    assert b_summary["steps"] == 0 and b_summary["final_loss"] is None  # never reported: null, not NaN


def _not_json(constant: str) -> None:
    raise AssertionError(f"{constant} is not JSON: strict readers (jq, JavaScript) refuse the file")


@pytest.mark.timeout(60)
def test_popsgd_rates_follow_the_phase_clock(tmp_path):
    """With algorithm popsgd and its schedule, each group's rate is its own rate / (1 + V / V0)."""
    settings = {"network.linger": 0.0, "algorithm.name": "popsgd", "train.schedule": "popsgd",
                "train.clock_scale": 4.0}
    a_model, _ = _model_and_optimizer()
    b_model, b_opt = _model_and_optimizer()
    a_opt = torch.optim.SGD([{"params": a_model[0].parameters(), "lr": 0.4},
                             {"params": [p for m in list(a_model)[1:] for p in m.parameters()], "lr": 0.1}])
    x = torch.randn(16, 4)
    with swarmnet.SwarmOptimizer(a_opt, a_model, name="a", run_dir=tmp_path, settings=settings) as a, \
         swarmnet.SwarmOptimizer(b_opt, b_model, name="b", run_dir=tmp_path, seeds=[a.address],
                                 settings=settings) as b:
        def steps():
            for opt, model in ((a, a_model), (b, b_model)):
                opt.zero_grad()
                model(x).pow(2).mean().backward()
                opt.step()
            return a.clock >= 8
        wait_until(steps, 30, interval=0.005, what="eight clock ticks at a")
        steps()  # the status reports the clock as of the last step
        assert a.status()["clock"] >= 8
        # The rates the last step used: set from the clock as it was then (it may have moved since).
        lrs = [g["lr"] for g in a_opt.param_groups]
        used = round(4.0 * (0.4 / lrs[0] - 1.0))
        assert 0 < used <= a.clock and lrs == pytest.approx([0.4 / (1 + used / 4), 0.1 / (1 + used / 4)])
        saved = a.state_dict()
    # Restored through a new wrapper: the clock goes on where it was, from the original base rates.
    c_opt = torch.optim.SGD([{"params": a_model[0].parameters(), "lr": 0.4},
                             {"params": [p for m in list(a_model)[1:] for p in m.parameters()], "lr": 0.1}])
    with swarmnet.SwarmOptimizer(c_opt, a_model, name="c", run_dir=tmp_path, settings=settings) as c:
        c.load_state_dict(saved)
        assert c.clock == saved["swarmnet"]["clock"] >= 8
        assert c.status()["step"] == saved["swarmnet"]["step"] > 0  # before its next step() too
        c.zero_grad()
        a_model(x).pow(2).mean().backward()
        c.step()
        v = saved["swarmnet"]["clock"]
        assert [g["lr"] for g in c_opt.param_groups] == pytest.approx([0.4 / (1 + v / 4), 0.1 / (1 + v / 4)])


@pytest.mark.timeout(60)
def test_bad_use_is_a_clear_error(tmp_path):
    model, opt = _model_and_optimizer()
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="does not step any parameter"):
        swarmnet.SwarmOptimizer(other, model, run_dir=tmp_path)
    with pytest.raises(ConfigError, match="expected section.key"):
        swarmnet.SwarmOptimizer(opt, model, run_dir=tmp_path, settings={"pull_interval": 1})
    with pytest.raises(ConfigError, match="network.listen"):
        swarmnet.SwarmOptimizer(opt, model, run_dir=tmp_path, listen="127.0.0.1:7000")
    with pytest.warns(UserWarning, match=r"setting 'train.lr' does not apply to SwarmOptimizer: your own loop") as said:
        swarmnet.SwarmOptimizer(opt, model, run_dir=tmp_path, settings={"train.lr": 5.0, "train.metrics_every": 5,
                                                                        "network.linger": 0.0}).close()
    assert len(said) == 1 and said[0].filename == __file__  # the user's line, and only the key ignored
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="steps no parameter of the model that requires grad"):
        swarmnet.SwarmOptimizer(torch.optim.SGD(frozen.parameters(), lr=0.1), frozen, run_dir=tmp_path)
    with torch.device("meta"):
        unmade = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="on the meta device and hold no values: materialize"):
        swarmnet.SwarmOptimizer(torch.optim.SGD(unmade.parameters(), lr=0.1), unmade, run_dir=tmp_path)
    with swarmnet.SwarmOptimizer(opt, model, run_dir=tmp_path, settings={"network.linger": 0.0}) as first:
        with pytest.raises(ValueError, match="already in a swarm"):
            swarmnet.SwarmOptimizer(opt, model, run_dir=tmp_path)
        sharing = nn.Sequential(model[0], nn.Linear(8, 2))  # a head on the same body
        with pytest.raises(ValueError, match="shares 2 parameters with a model already in a swarm"):
            swarmnet.SwarmOptimizer(torch.optim.SGD(sharing.parameters(), lr=0.1), sharing, run_dir=tmp_path)
        other_model, other_opt = _model_and_optimizer()
        started = time.monotonic()
        with pytest.raises(TransportError):
            swarmnet.SwarmOptimizer(other_opt, other_model, run_dir=tmp_path, listen=first.address)
        assert time.monotonic() - started < 30
        # One seed given as a string, not a list of them: taken as that one address.
        swarmnet.SwarmOptimizer(other_opt, other_model, run_dir=tmp_path, seeds=first.address,
                                settings={"network.linger": 0.0}).close()
    # A frozen backbone shared by two peers is fine: merges write only what each optimizer trains.
    backbone = nn.Linear(4, 8).requires_grad_(False)
    heads = [nn.Sequential(backbone, nn.Linear(8, 2)) for _ in range(2)]
    with swarmnet.SwarmOptimizer(torch.optim.SGD(heads[0][1].parameters(), lr=0.1), heads[0], name="h0",
                                 run_dir=tmp_path, settings={"network.linger": 0.0}), \
         swarmnet.SwarmOptimizer(torch.optim.SGD(heads[1][1].parameters(), lr=0.1), heads[1], name="h1",
                                 run_dir=tmp_path, settings={"network.linger": 0.0}):
        pass
    closed = swarmnet.SwarmOptimizer(opt, model, run_dir=tmp_path, settings={"network.linger": 0.0})
    closed.close()
    with pytest.raises(SwarmError, match=r"status\(\) after close\(\)"):
        closed.status()
    # close() writes the model in its final merge: not from another thread, nor in the middle of a
    # step (a signal handler), where it raced the optimizer's update of the same floats.
    import threading

    stepped = swarmnet.SwarmOptimizer(opt, model, run_dir=tmp_path, settings={"network.linger": 0.0})

    def loss():
        opt.zero_grad()
        out = model(torch.randn(8, 4)).pow(2).mean()
        out.backward()
        return out

    stepped.step(loss)
    refused = []
    elsewhere = threading.Thread(target=lambda: refused.append(pytest.raises(SwarmError, stepped.close)))
    elsewhere.start()
    elsewhere.join(30)
    assert "from another thread than the one calling step()" in str(refused[0].value)

    def closing_mid_step():
        stepped.close()
        return loss()

    with pytest.raises(SwarmError, match=r"close\(\) during step\(\)"):
        stepped.step(closing_mid_step)
    stepped.close()  # from the training loop, between steps
    with pytest.raises(SwarmError, match=r"step\(\) after close\(\)"):
        stepped.step(loss)
    # Once the thread that stepped has ended, nothing can race the final merge: close() from
    # another thread is fine (it used to be refused for good, leaving the peer half open).
    in_thread = swarmnet.SwarmOptimizer(opt, model, name="threaded", run_dir=tmp_path, settings={"network.linger": 0.0})
    trainer = threading.Thread(target=lambda: [in_thread.step(loss) for _ in range(3)])
    trainer.start()
    trainer.join(30)
    later, done = threading.Event(), threading.Event()  # a thread started since may reuse the ended one's ident
    bystander = threading.Thread(target=lambda: (later.set(), done.wait(30)))
    bystander.start()
    later.wait(30)
    in_thread.close()
    done.set()
    bystander.join(30)
    assert json.loads((tmp_path / "threaded" / "summary.json").read_text())["steps"] == 3
    # A loss with one value per sample (a forgotten .mean()) is refused where it is reported,
    # not at a later step, nor again at close().
    per_sample = swarmnet.SwarmOptimizer(opt, model, name="per-sample", run_dir=tmp_path,
                                         settings={"network.linger": 0.0})
    with pytest.raises(ValueError, match=r"report_loss\(\) takes one value, .* shape \(8,\): reduce it first"):
        per_sample.report_loss(torch.ones(8))
    per_sample.report_loss(torch.ones(1))  # one value, whatever its shape
    per_sample.close()
    assert json.loads((tmp_path / "per-sample" / "summary.json").read_text())["reason"] == "closed"


@pytest.mark.timeout(120, method="thread")  # the test takes SIGALRM, which the signal method uses
def test_a_daemons_data_rank_exit_code_and_device_are_ignored_with_a_warning(tmp_path, monkeypatch):
    """A daemon refuses a partition rank beyond run.peers and a CUDA device this machine lacks;
    the API's user loop holds the data and the model, so torchrun's RANK, a shared config's
    device and these keys must not stop it."""
    monkeypatch.setenv("RANK", "9")
    model, opt = _model_and_optimizer()
    settings = {"train.shard": "partition", "run.peers": 2, "run.stopped_exit_code": 3,
                "device.device": "cuda:7", "network.linger": 0.0}
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with swarmnet.SwarmOptimizer(opt, model, run_dir=tmp_path, settings=settings) as peer:
            assert peer.peer.device == torch.device("cpu")  # the model's, also on the peer's card
    told = sorted(str(w.message).split(":")[0] for w in said if str(w.message).startswith("setting "))
    assert told == [f"setting {k!r} does not apply to SwarmOptimizer" for k in sorted(settings) if "linger" not in k], told
    assert "the model's device is the peer's" in " ".join(str(w.message) for w in said)


def test_ctrl_c_while_waiting_for_the_swarm_leaves_nothing_running(tmp_path):
    """Interrupted while it waits for the peers it was told to expect, the constructor stops its
    background peer: the port is free again and no thread of it is left."""
    import signal
    import threading

    port = unused_port()
    model, opt = _model_and_optimizer()
    before = set(threading.enumerate())  # e.g. the fused codec loops' pool, if an earlier test started it

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            swarmnet.SwarmOptimizer(opt, model, run_dir=tmp_path, listen=f"tcp://127.0.0.1:{port}",
                                    settings={"network.min_peers": 1, "network.join_timeout": 60.0})
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not [t for t in threading.enumerate() if t.name.startswith("swarmnet-") and t not in before]
    # libzmq releases the port from its I/O thread a moment after the socket is closed (under
    # load, 39% of immediate rebinds found it still held); a socket left open holds it for good.
    wait_until(lambda: port_is_free(port), REBIND_WAIT_S, what="the port released")


@pytest.mark.timeout(120, method="thread")  # the test takes SIGALRM, which the signal method uses
def test_an_error_in_the_block_leaves_at_once_and_a_second_ctrl_c_while_leaving_frees_the_port(tmp_path):
    """b's loop raises while a still trains: b must not linger for a (network.linger), and its
    summary says why it ended. c's close, lingering, is interrupted by Ctrl-C: it leaves at once,
    with its port free and no thread or task of it left behind."""
    import signal
    import threading

    settings = {"network.linger": 60.0}
    a_model, a_opt = _model_and_optimizer()
    b_model, b_opt = _model_and_optimizer()
    c_model, c_opt = _model_and_optimizer()
    before = set(threading.enumerate())
    with swarmnet.SwarmOptimizer(a_opt, a_model, name="a", run_dir=tmp_path, settings={"network.linger": 0.0}) as a:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="boom"):
            with swarmnet.SwarmOptimizer(b_opt, b_model, name="b", run_dir=tmp_path, seeds=[a.address],
                                         settings=settings):
                raise RuntimeError("boom")
        assert time.monotonic() - started < 30
        summary = json.loads((tmp_path / "b" / "summary.json").read_text())
        assert summary["reason"] == "error: RuntimeError: boom", summary

        port = unused_port()
        c = swarmnet.SwarmOptimizer(c_opt, c_model, name="c", run_dir=tmp_path, seeds=[a.address],
                                    listen=f"tcp://127.0.0.1:{port}",
                                    settings={**settings, "network.min_peers": 1})  # it knows a: it will linger

        def interrupt(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, 1.0)  # while c lingers for a, which still trains
        try:
            started = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                c.close()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        assert time.monotonic() - started < 30
        # The alarm lands while c lingers or, on a loaded machine, still in its final merge.
        assert json.loads((tmp_path / "c" / "summary.json").read_text())["reason"] in ("closed",
                                                                                       "interrupted while leaving")
        # Wrapped again on the same port (a notebook's next cell): its listener was closed.
        c_again = swarmnet.SwarmOptimizer(c_opt, c_model, name="c", run_dir=tmp_path, seeds=[a.address],
                                          listen=f"tcp://127.0.0.1:{port}", settings={"network.linger": 0.0})
        c_again.close()
    assert not [t for t in threading.enumerate() if t.name in ("swarmnet-b", "swarmnet-c") and t not in before]


@pytest.mark.parametrize("codec", ["blockwise8", "fp32"])
def test_a_model_gone_non_finite_fails_its_step_and_still_leaves_cleanly(tmp_path, codec):
    """b's model turns NaN; its next merge republishes it. A quantizing codec refuses to encode
    it; fp32 publishes it, and b's next pull finds its own snapshot non-finite (it used to blame
    its healthy neighbour, put a on back-off and step a NaN model on, raising nothing). Either
    way step() raises, and leaving the with-block still ends the peer with a summary saying why."""
    a_model, a_opt = _model_and_optimizer()
    b_model, b_opt = _model_and_optimizer()
    settings = {"network.linger": 0.0, "codec.name": codec}
    x = torch.randn(16, 4)
    with swarmnet.SwarmOptimizer(a_opt, a_model, name="a", run_dir=tmp_path, settings=settings) as a:
        with pytest.raises(SwarmError, match="non-finite"):
            with swarmnet.SwarmOptimizer(b_opt, b_model, name="b", run_dir=tmp_path, seeds=[a.address],
                                         settings=settings) as b:
                with torch.no_grad():
                    b_model[0].weight.fill_(float("nan"))
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    for opt, model in ((a, a_model), (b, b_model)):
                        opt.zero_grad()
                        model(x).pow(2).mean().backward()
                        opt.step()
                    time.sleep(0.002)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["reason"].startswith("error:") and "non-finite" in summary["reason"], summary
    assert "non_finite" not in summary["rejected"], summary  # a was not blamed for b's model


@pytest.mark.timeout(60)
def test_weights_restored_after_a_non_finite_snapshot_train_and_merge_on(tmp_path):
    """fp32 publishes a NaN model, and b's pull finds it; once the user loads good weights and
    resyncs, b steps and merges again (its exchange waited for the new snapshot)."""
    a_model, a_opt = _model_and_optimizer()
    b_model, b_opt = _model_and_optimizer()
    settings = {"network.linger": 0.0, "codec.name": "fp32"}
    x = torch.randn(16, 4)

    def step(opt, model):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()

    with swarmnet.SwarmOptimizer(a_opt, a_model, name="a", run_dir=tmp_path, settings=settings) as a, \
         swarmnet.SwarmOptimizer(b_opt, b_model, name="b", run_dir=tmp_path, seeds=[a.address], settings=settings) as b:
        good = {k: v.clone() for k, v in b_model.state_dict().items()}
        with torch.no_grad():
            b_model[0].weight.fill_(float("nan"))

        def diverged():
            step(a, a_model)
            try:
                step(b, b_model)
            except swarmnet.ModelDiverged:
                return True
            return False

        wait_until(diverged, 30, interval=0.002, what="b's step to raise ModelDiverged")
        b_model.load_state_dict(good)
        b_opt.state.clear()  # its momentum went NaN with the gradients
        b.resync()
        merged = b.peer.stats.pulls_ok

        def merging_again():
            step(a, a_model)
            step(b, b_model)
            return b.peer.stats.pulls_ok >= merged + 3

        wait_until(merging_again, 30, interval=0.002, what="b merging again")
        assert all(bool(p.isfinite().all()) for p in b_model.parameters())


def test_an_optimizer_that_fails_midway_through_its_update_leaves_without_publishing_it(tmp_path, caplog):
    """The update is applied, then the optimizer raises: leaving the block once published the
    model holding that uncounted step, as its last snapshot for neighbours to merge."""
    model, optimizer = _model_and_optimizer()
    x = torch.randn(16, 4)

    def broken(*_):
        raise RuntimeError("the optimizer broke after its update")

    with pytest.raises(RuntimeError, match="broke after its update"):
        with swarmnet.SwarmOptimizer(optimizer, model, name="a", run_dir=tmp_path,
                                     settings={"network.linger": 0.0}) as opt:
            whole = [opt.replica.store.latest().values_N.clone()]  # the states it may publish
            for step in range(2):
                if step == 1:
                    whole.append(opt.replica.live_N.clone())
                    optimizer.register_step_post_hook(broken)
                opt.zero_grad()
                model(x).pow(2).mean().backward()
                opt.step()
    assert opt.replica.step == 1 and not any(torch.equal(opt.replica.live_N, w) for w in whole)
    assert any(torch.equal(opt.replica.store.latest().values_N, w) for w in whole)
    assert "leaving without publishing the model: it may hold part of the optimizer's update" in caplog.text
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["reason"] == "error: RuntimeError: the optimizer broke after its update", summary


def test_a_closure_that_fails_before_any_update_leaves_the_model_published_as_usual(tmp_path, caplog):
    """The optimizer calls the closure (forward and backward) before it writes anything: the
    user's data or loss error there leaves a whole model, published as the peer leaves."""
    model, optimizer = _model_and_optimizer()
    x = torch.randn(16, 4)

    def broken_loss():
        raise RuntimeError("the data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        with swarmnet.SwarmOptimizer(optimizer, model, name="a", run_dir=tmp_path,
                                     settings={"network.linger": 0.0, "algorithm.local_steps": 4}) as opt:
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()  # one of 4 local steps: not published yet
            assert not torch.equal(opt.replica.store.latest().values_N, opt.replica.live_N)
            opt.step(broken_loss)
    assert torch.equal(opt.replica.store.latest().values_N, opt.replica.live_N)
    assert "leaving without publishing" not in caplog.text


@pytest.mark.timeout(60)
def test_weights_loaded_moved_or_unfrozen_after_wrapping_are_handled_or_refused(tmp_path, caplog):
    """Loaded through load_state_dict: published as they are. Moved or converted: a clear error,
    not an optimizer stepping tensors merges never see. Unfrozen later: said once."""
    model, opt = _model_and_optimizer()
    model[0].requires_grad_(False)
    saved = {k: v + 1.0 for k, v in model.state_dict().items()}
    x = torch.randn(16, 4)
    with swarmnet.SwarmOptimizer(opt, model, run_dir=tmp_path, settings={"network.linger": 0.0,
                                                                          "train.metrics_every": 2}) as swarm:
        model.load_state_dict(saved)
        swarm.load_state_dict(swarm.state_dict())
        assert torch.equal(swarm.replica.store.latest().values_N, swarm.replica.live_N)
        model[0].requires_grad_(True)
        for _ in range(4):
            swarm.zero_grad()
            model(x).pow(2).mean().backward()
            swarm.step()
        assert caplog.text.count("train alone on each peer") == 1
        model.double()
        with pytest.raises(SwarmError, match="moved or converted after it joined the swarm"):
            swarm.step()


def test_a_frozen_backbone_is_neither_averaged_nor_sent(tmp_path):
    """Fine-tuning: only the head is trained. Merges move the head towards the other peer's and
    leave each peer's frozen layer exactly as it was (a lossy codec would otherwise drift it)."""
    def fine_tuning(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        model[0].requires_grad_(False)
        return model, torch.optim.SGD(model[2].parameters(), lr=0.05)

    (a_model, a_opt), (b_model, b_opt) = fine_tuning(0), fine_tuning(1)
    frozen = [m[0].weight.detach().clone() for m in (a_model, b_model)]
    settings = {"network.linger": 0.0, "codec.name": "blockwise4"}
    x = torch.randn(16, 4)
    with swarmnet.SwarmOptimizer(a_opt, a_model, name="a", run_dir=tmp_path, settings=settings) as a, \
         swarmnet.SwarmOptimizer(b_opt, b_model, name="b", run_dir=tmp_path, seeds=[a.address],
                                 settings=settings) as b:
        assert a.replica.flat.numel == 8 * 2 + 2  # the head only

        def steps():
            for opt, model in ((a, a_model), (b, b_model)):
                opt.zero_grad()
                model(x).pow(2).mean().backward()
                opt.step()
            return a.replica.stats.interactions >= 5 and b.replica.stats.interactions >= 5
        wait_until(steps, 30, interval=0.005, what="five merges each")
        # `swarmnet eval` with a task that builds the same model: it averages what the swarm
        # averages, the head, and evaluates it on the task's frozen layer.
        cfg = swarmnet.config.load_config(None, {"task.spec": "tests.integration.test_user_api:fine_tuning_task",
                                                 "codec.name": "blockwise4"})
        result = evaluate_swarm(cfg, seeds=[a.address])
        assert result["peers_averaged"] == 2 and result["eval"]["loss"] < float("inf"), result
    for model, weight in zip((a_model, b_model), frozen, strict=True):
        assert torch.equal(model[0].weight, weight)


def fine_tuning_task():
    """The model above, its first layer frozen, as a task for `swarmnet eval`."""
    from swarmnet.tasks import Task

    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))

    def build_model():
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        model[0].requires_grad_(False)
        return model

    def loss(model, batch):
        return model(batch[0]).pow(2).mean()

    return Task(name="fine-tuning", build_model=build_model, train=(x,), loss=loss,
                evaluate=lambda model: {"loss": float(loss(model, (x,)))})


async def _nudge(swarm, shift: float):
    """Push ``swarm``'s latest published model moved by ``shift`` to it as a nudge, from a client
    that is no peer; the reply, or the Rejected it raised."""
    from swarmnet.codecs import make_codec
    from swarmnet.peer.client import PeerClient, Rejected
    from swarmnet.peer.stats import PeerStats
    from swarmnet.transport import TransportSet
    from swarmnet.wire import Limits, MsgType, request

    transports = TransportSet()
    client = PeerClient(sender="nudger", transports=transports, limits=Limits(), timeout=20, stats=PeerStats(),
                        max_frame_bytes=2**31 - 1)
    try:
        latest = swarm.replica.store.latest()
        encoded = make_codec("fp32").encode(latest.values_N + shift)
        msg = request(MsgType.NUDGE, "nudger", encoded.frames, used=latest.version, codec="fp32", meta=encoded.meta)
        return await client.call(swarm.address, msg)
    except Rejected as exc:
        return exc
    finally:
        await client.aclose()
        await transports.aclose()


@pytest.mark.timeout(60)
def test_a_nudge_still_decoding_when_weights_are_reloaded_is_refused_and_the_next_one_lands(tmp_path):
    """Symmetric mode: a neighbour's nudge is measured from our published weights. Weights loaded
    while it decodes (resync) make it stale: answered ``gone``, so that its sender drops its half
    too, and the merge gate is left free for the next nudge, measured from the new weights."""
    import asyncio
    import threading

    from swarmnet.peer.client import Rejected

    model, opt = _model_and_optimizer()
    with swarmnet.SwarmOptimizer(opt, model, run_dir=tmp_path,
                                 settings={"network.linger": 0.0, "algorithm.symmetric": True}) as swarm:
        exchange = swarm.peer.exchange
        accept, entered, release = exchange.accept_nudge, threading.Event(), threading.Event()

        async def held_accept(msg, used):  # the real decode and add, once the test has reloaded the weights
            entered.set()
            await asyncio.to_thread(release.wait, 20)
            return await accept(msg, used)

        exchange.accept_nudge = held_accept

        async def nudge() -> str:
            answer = await _nudge(swarm, 1.0)
            return str(answer.code if isinstance(answer, Rejected) else answer.type)

        answers: list[str] = []
        sender = threading.Thread(target=lambda: answers.append(asyncio.run(nudge())))
        sender.start()
        assert entered.wait(20)
        with torch.no_grad():
            model[0].weight.add_(5.0)  # a checkpoint loaded while the nudge decodes
        swarm.resync()
        release.set()
        sender.join(20)
        assert answers == ["gone"]
        exchange.accept_nudge = accept
        inbox, adders = swarm.replica.inbox, []
        add = inbox.add
        inbox.add = lambda delta, version: adders.append(threading.current_thread().name) or add(delta, version)
        before = swarm.replica.live_N.clone()
        assert asyncio.run(nudge()) == "ack"  # measured from the new weights: admitted and applied
        assert adders and all(name.startswith("codec-") for name in adders), adders  # a model-sized pass: off the loop
        swarm.zero_grad()
        swarm.step()  # applies it between steps (no gradients: the optimizer itself moves nothing)
        assert torch.allclose(swarm.replica.live_N, before + 0.5, atol=1e-5)


@pytest.mark.timeout(60)
def test_a_pull_only_peer_refuses_a_nudge_unread(tmp_path):
    """No peer of a pull-only swarm sends nudges: one comes from a stranger (or a peer given
    another [algorithm]), and a stranger's model pushed in would move ours however it likes."""
    import asyncio

    from swarmnet.peer.client import Rejected

    model, opt = _model_and_optimizer()
    with swarmnet.SwarmOptimizer(opt, model, run_dir=tmp_path, settings={"network.linger": 0.0}) as swarm:
        before = swarm.replica.live_N.clone()
        refusal = asyncio.run(_nudge(swarm, 9.0))
        assert isinstance(refusal, Rejected) and refusal.code == "mismatch" and "algorithm.symmetric = false" in str(refusal)
        swarm.zero_grad()
        swarm.step()
        assert torch.equal(swarm.replica.live_N, before)
        assert swarm.peer.stats.nudges_refused == 1 and swarm.peer.stats.nudges_applied == 0


@contextlib.contextmanager
def _raw_dealer(address: str):
    """A bare ZeroMQ DEALER connected to ``address``, for requests written by hand."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    try:
        sock.connect(address)
        yield sock
    finally:
        sock.close()
        ctx.term()


@pytest.mark.timeout(60)
def test_a_burst_of_requests_that_outspends_the_exchange_budget_is_said(tmp_path, monkeypatch, caplog):
    """Answering requests is charged to the exchange's CPU budget (the event loop serves them):
    a burst of them pauses merging until the budget has caught up, and the peer says so and why,
    where it used to merge with no one in silence (5 s of status requests paused a peer for 100 s)."""
    import msgpack

    from swarmnet.wire import MsgType, encode, request

    monkeypatch.setattr(swarmnet.peer.exchange, "BUDGET_WAIT_WARN_S", 0.5)  # 30 s in production
    model, opt = _model_and_optimizer()
    settings = {"network.linger": 0.0, "network.exchange_cpu": 0.02}
    with caplog.at_level(logging.WARNING), swarmnet.SwarmOptimizer(opt, model, run_dir=tmp_path,
                                                                   settings=settings) as swarm:
        with _raw_dealer(swarm.address) as sock:
            ask = encode(request(MsgType.STATUS, "curious"))
            until = time.monotonic() + 1.0
            while time.monotonic() < until:
                sock.send_multipart(ask)
                assert msgpack.unpackb(sock.recv_multipart()[0], raw=False)["t"] == "status_reply"
        wait_until(lambda: "merging pauses for" in caplog.text, 20, what="the warning of a long budget wait")
    assert "over the exchange's budget of 0.02 cores (network.exchange_cpu)" in caplog.text
    assert "answering other peers' and clients' requests" in caplog.text


@pytest.mark.timeout(60)
def test_a_handler_bug_is_answered_as_a_refusal_of_that_request(tmp_path, monkeypatch):
    """A request whose handler fails in a way no check foresaw (a bug, injected here) still gets
    its answer: a refusal naming its mid, counted as an internal error; the peer goes on."""
    import msgpack

    from swarmnet.peer.server import PeerServer
    from swarmnet.wire import MsgType, encode, request

    async def broken(self, msg):
        raise KeyError("a bug")

    monkeypatch.setattr(PeerServer, "handle_bye", broken)
    model, opt = _model_and_optimizer()
    with swarmnet.SwarmOptimizer(opt, model, name="a", run_dir=tmp_path, settings={"network.linger": 0.0}) as a:
        with _raw_dealer(a.address) as sock:
            bye = request(MsgType.BYE, "prober")
            sock.send_multipart(encode(bye))
            head = msgpack.unpackb(sock.recv_multipart()[0], raw=False)
        assert (head["t"], head["code"], head.get("re")) == ("reject", "malformed", bye.mid), head
        assert "internal error: KeyError" in head["reason"]
        assert a.status()["rejected"]["internal_error"] == 1


@pytest.mark.timeout(60)
def test_a_neighbour_training_another_model_of_as_many_coordinates_is_refused(tmp_path, caplog):
    """The same 58 coordinates laid out as another model: merged silently before, since only the
    count was compared. Snapshots now carry the model's fingerprint."""
    torch.manual_seed(0)
    models = {"a": nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), "b": nn.Sequential(nn.Linear(8, 2), nn.Linear(4, 8))}
    assert [sum(p.numel() for p in m.parameters()) for m in models.values()] == [58, 58]
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.01) for name, m in models.items()}
    settings = {"network.linger": 0.0, "network.failure_backoff": 0.2}
    with swarmnet.SwarmOptimizer(optimizers["a"], models["a"], name="a", run_dir=tmp_path, settings=settings) as a, \
         swarmnet.SwarmOptimizer(optimizers["b"], models["b"], name="b", run_dir=tmp_path, seeds=[a.address],
                                 settings=settings) as b:
        def step_both():
            for opt, model in ((a, models["a"]), (b, models["b"])):
                opt.zero_grad()
                sum(p.pow(2).sum() for p in model.parameters()).backward()
                opt.step()
            return all(opt.peer.stats.pulls_failed >= 2 for opt in (a, b))

        wait_until(step_both, 30, interval=0.005, what="each peer tried to pull the other twice")
        assert a.peer.stats.pulls_ok == b.peer.stats.pulls_ok == 0
    assert "the neighbour trains another model: the shapes of its parameters (fingerprint" in caplog.text


def test_a_peer_that_can_reach_no_neighbours_address_warns_and_says_why(tmp_path, caplog, monkeypatch):
    """a advertises an address nothing listens on (an --advertise another host cannot dial, in
    effect): b hears from a, which reaches it, but can never pull from a. b once trained alone,
    logging nothing above DEBUG and counting no failed pull (a stayed on back-off)."""
    monkeypatch.setattr(swarmnet.peer.exchange, "STUCK_WARN_S", 1.0)
    nowhere = f"tcp://127.0.0.1:{unused_port()}"
    models = {name: _model_and_optimizer() for name in "ab"}
    settings = {"network.linger": 0.0}
    listening = f"tcp://127.0.0.1:{unused_port()}"
    with swarmnet.SwarmOptimizer(models["a"][1], models["a"][0], name="a", run_dir=tmp_path, listen=listening,
                                 settings={**settings, "network.advertise": nowhere}) as a:
        with swarmnet.SwarmOptimizer(models["b"][1], models["b"][0], name="b", run_dir=tmp_path, seeds=[listening],
                                     settings=settings) as b:
            x = torch.randn(16, 4)

            def warned():
                for opt, (model, _) in ((a, models["a"]), (b, models["b"])):
                    opt.zero_grad()
                    model(x).pow(2).mean().backward()
                    opt.step()
                return "no merge for" in caplog.text and a.peer.stats.interactions > 0

            wait_until(warned, 30, interval=0.005, what="b's warning, and a merging")
            assert b.peer.stats.interactions == 0
    said = next(r.getMessage() for r in caplog.records if "no merge for" in r.getMessage())
    assert f"a at {nowhere}: connection to {nowhere} refused or unreachable" in said, said
    assert "check the --advertise of each peer from every host" in said
