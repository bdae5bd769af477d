"""The compute loop's local recipe on a real peer's loop (digits MLP): train.optimizer,
train.precision (mixed precision under torch.autocast, fp16 with loss scaling) and
train.clip_grad_norm."""

import dataclasses
import logging

import pytest
import torch

from .test_compute_slowdown import compute_loop

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_computes_in_its_dtype_keeps_fp32_weights_and_learns(tmp_path, precision, dtype):
    compute = compute_loop(tmp_path, steps=300, slowdown=1.0, **{"train.precision": precision})
    seen, loss_fn = set(), compute.task.loss
    first_layer = next(m for m in compute.model.modules() if isinstance(m, torch.nn.Linear))
    first_layer.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    with torch.no_grad():
        first = float(loss_fn(compute.model, tuple(t[:256] for t in compute.train_data)))
    seen.clear()
    assert compute.run() == "budget"
    assert seen == {dtype}, seen  # the task's forward pass ran under autocast
    assert compute.live_N.dtype == torch.float32 and all(p.dtype == torch.float32 for p in compute.model.parameters())
    with torch.no_grad():
        last = float(loss_fn(compute.model, tuple(t[:256] for t in compute.train_data)))
    accuracy = compute.evaluate()["accuracy"]
    print(f"{precision}: loss {first:.3f} -> {last:.3f}, accuracy {accuracy:.4f}")
    assert last < 0.5 * first, (first, last)
    assert accuracy > 0.85  # fp32 on the same 300 steps: about 0.93


def test_the_fp16_loss_scale_is_kept_by_the_checkpoint(tmp_path):
    compute = compute_loop(tmp_path, steps=5, slowdown=1.0, **{"train.precision": "fp16"})
    assert compute.scaler.is_enabled()
    compute.run()
    compute.scaler.update(new_scale=1024.0)  # as if overflows had lowered it
    assert compute.save_checkpoint() is None
    resumed = compute_loop(tmp_path, steps=5, slowdown=1.0, **{"train.precision": "fp16"})
    assert resumed.scaler.get_scale() == 65536.0 and resumed.resume() and resumed.scaler.get_scale() == 1024.0
    plain = compute_loop(tmp_path, steps=5, slowdown=1.0)  # the same checkpoint read in fp32: nothing to scale
    assert plain.resume() and not plain.scaler.is_enabled()


def test_an_fp16_step_the_scaler_skips_is_no_divergence_and_a_window_of_them_is_named(tmp_path, caplog):
    """A loss that overflows fp16 makes the scaler skip that step and lower its scale: the window's
    mean loss left it out (one inf stopped the peer as diverged, with no final checkpoint)."""
    calls = [0]

    def overflowing(every):
        loss_fn = compute.task.loss

        def loss(model, batch):
            calls[0] += 1
            value = loss_fn(model, batch)
            return value * float("inf") if calls[0] % every == 0 else value
        return loss

    compute = compute_loop(tmp_path / "one", steps=50, slowdown=1.0, metrics_every=10,
                           **{"train.precision": "fp16"})
    compute.task = dataclasses.replace(compute.task, loss=overflowing(every=17))  # 2 steps of 50
    assert compute.run() == "budget" and compute.step == 50
    assert compute.scaler.get_scale() < 65536.0 and bool(torch.isfinite(compute.live_N).all())
    assert compute.finalize() is None  # the final checkpoint is written
    compute = compute_loop(tmp_path / "all", steps=50, slowdown=1.0, metrics_every=10,
                           **{"train.precision": "fp16"})
    compute.task = dataclasses.replace(compute.task, loss=overflowing(every=1))
    with caplog.at_level(logging.ERROR):
        assert compute.run() == "diverged"
    assert "overflowed fp16 in each of the last 10 steps" in caplog.text and "bf16 or fp32" in caplog.text


def test_a_loss_of_shape_one_is_taken_as_the_scalar_it_holds(tmp_path):
    compute = compute_loop(tmp_path, steps=5, slowdown=1.0, metrics_every=5)
    loss_fn = compute.task.loss
    compute.task = dataclasses.replace(compute.task, loss=lambda model, batch: loss_fn(model, batch).reshape(1))
    assert compute.run() == "budget" and compute.step == 5


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_step_moves_the_weights_by_lr_times_the_clipped_norm(tmp_path, precision):
    """Plain SGD: a step moves the weights by lr x the gradient, whose norm clipping caps (the
    true gradient's norm in fp16: the scaler unscales before clipping)."""
    lr, clip = 0.1, 1e-3
    compute = compute_loop(tmp_path, steps=10, slowdown=1.0, **{"train.lr": lr, "train.clip_grad_norm": clip,
                                                                "train.precision": precision})
    moves = []
    for _ in range(5):  # fp16: a step whose scaled gradients overflow is skipped, and the scale drops
        before = compute.live_N.clone()
        compute.train_step()
        moves.append(float((compute.live_N - before).norm()))
    assert all(m == pytest.approx(lr * clip, rel=1e-3) for m in moves if m > 0) and moves[-1] > 0, moves
    unclipped = compute_loop(tmp_path / "u", steps=10, slowdown=1.0, **{"train.lr": lr})
    before = unclipped.live_N.clone()
    unclipped.train_step()
    assert float((unclipped.live_N - before).norm()) > 10 * lr * clip  # the clip did bind


def test_adamw_learns_keeps_its_moments_local_and_resumes_them(tmp_path, caplog):
    settings = {"train.optimizer": "adamw", "train.lr": 0.003, "train.weight_decay": 0.01, "train.betas": [0.8, 0.99]}
    compute = compute_loop(tmp_path, steps=300, slowdown=1.0, **settings)
    assert isinstance(compute.optimizer, torch.optim.AdamW)
    group = compute.optimizer.param_groups[0]
    assert (group["betas"], group["weight_decay"], group["eps"]) == ((0.8, 0.99), 0.01, 1e-8)
    assert compute.run() == "budget"
    assert compute.evaluate()["accuracy"] > 0.85  # about 0.95
    moments = [compute.optimizer.state[p]["exp_avg_sq"].clone() for p in compute.model.parameters()]
    assert all(float(m.abs().sum()) > 0 for m in moments)
    assert compute.save_checkpoint() is None
    resumed = compute_loop(tmp_path, steps=300, slowdown=1.0, **settings)
    assert resumed.resume()
    assert all(torch.equal(resumed.optimizer.state[p]["exp_avg_sq"], m)
               for p, m in zip(resumed.model.parameters(), moments))
    # Another optimizer: the model goes on, the optimizer's state starts afresh (torch would load
    # Adam's moments into SGD without a word, and SGD's buffers into Adam to fail at its first step).
    sgd = compute_loop(tmp_path, steps=310, slowdown=1.0, **{"train.momentum": 0.9})
    with caplog.at_level(logging.WARNING):
        assert sgd.resume()
    assert "the checkpoint's optimizer state is adamw's; this config's sgd starts its own afresh" in caplog.text
    assert not sgd.optimizer.state and torch.equal(sgd.live_N, resumed.live_N)
    assert sgd.run() == "budget" and sgd.step == 310
    assert sgd.save_checkpoint() is None
    again = compute_loop(tmp_path, steps=320, slowdown=1.0, **settings)  # and back: SGD's buffers are not Adam's
    assert again.resume() and not again.optimizer.state and again.run() == "budget"


def test_a_batch_larger_than_the_peers_data_is_named_once_at_start(tmp_path, caplog):
    """The sampler cuts such a batch to the data set without a word: the learning rate and the
    epochs were set for the batch asked."""
    with caplog.at_level(logging.WARNING):
        compute = compute_loop(tmp_path, steps=2, slowdown=1.0, **{"train.batch_size": 100_000})
        compute.run()
    said = [r.getMessage() for r in caplog.records if "train.batch_size" in r.getMessage()]
    n = compute.task.num_samples
    assert said == [f"[test] train.batch_size = 100000, but the task has {n} training samples: every batch takes "
                    f"those {n}, fewer than asked (with the learning rate and epochs set for 100000); lower "
                    f"train.batch_size to at most {n}, or give the task more data"], said
