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
