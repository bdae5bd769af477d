"""Least squares tasks that fail at one step, as a user's task with a bug in its data, loss or
optimizer (or a device error mid-run) would."""

import os
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from swarmnet.tasks import Task, lsq


def task(fail_at: int = 45, **options):
    """The loss raises at step ``fail_at``."""
    base = lsq.task(**options)
    calls = 0

    def loss(model, batch):
        nonlocal calls
        calls += 1
        if calls == fail_at:
            raise RuntimeError("the data loader broke")
        return base.loss(model, batch)
    return Task(name=base.name, build_model=base.build_model, train=base.train, loss=loss, evaluate=base.evaluate)


def unsavable(**options):
    """Least squares whose model cannot be saved, as a device left unusable by an error would
    make the final checkpoint fail."""
    base = lsq.task(**options)

    def build_model():
        model = base.build_model()

        def state_dict(*args, **kwargs):
            raise RuntimeError("the device is gone")
        model.state_dict = state_dict
        return model
    return Task(name=base.name, build_model=build_model, train=base.train, loss=base.loss, evaluate=base.evaluate)


def failing_update(record: str, fail_at: int = 45, **options):
    """Least squares whose optimizer raises once its update of one step is applied, as an
    optimizer with a bug or a device error midway through the update would: the model then holds
    (part of) a step that was never counted. The weights that step began from are saved under
    ``record``, one file per process."""
    base = lsq.task(**options)
    calls = 0

    def broken(optimizer, args, kwargs):
        raise RuntimeError("the optimizer broke after its update")

    def loss(model, batch):
        nonlocal calls
        calls += 1
        if calls == fail_at:
            torch.save(model.state_dict(), Path(record) / f"{os.getpid()}.pt")
            register_optimizer_step_post_hook(broken)
        return base.loss(model, batch)
    return Task(name=base.name, build_model=base.build_model, train=base.train, loss=loss, evaluate=base.evaluate)
