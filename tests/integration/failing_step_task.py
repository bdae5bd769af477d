"""Least squares whose loss raises at one step, as a user's task with a bug in its data or loss
(or a device error mid-run) would."""

from swarmnet.tasks import Task, lsq


def task(fail_at: int = 45, **options):
    base = lsq.task(**options)
    calls = 0

    def loss(model, batch):
        nonlocal calls
        calls += 1
        if calls == fail_at:
            raise RuntimeError("the data loader broke")
        return base.loss(model, batch)
    return Task(name=base.name, build_model=base.build_model, train=base.train, loss=loss, evaluate=base.evaluate)
