"""Least squares whose evaluation always fails, as a user's buggy evaluate (or a GPU out of
memory during it) would."""

from swarmnet.tasks import Task, lsq


def task(**options):
    base = lsq.task(**options)

    def evaluate(model):
        raise RuntimeError("the evaluation's own bug")
    return Task(name=base.name, build_model=base.build_model, train=base.train, loss=base.loss, evaluate=evaluate)
