"""Digits whose evaluation takes seconds in a peer, as a large test set's would: a peer asked to
stop runs its final evaluation before it exits, so it stops over seconds. The launcher's
evaluation of the average stays fast."""

import dataclasses
import sys
import time

from swarmnet.tasks import digits


def task(**options):
    base = digits.task(**options)
    if sys.argv[1:2] != ["peer"]:  # `swarmnet up` itself
        return base

    def evaluate(model):
        time.sleep(3.0)
        return base.evaluate(model)
    return dataclasses.replace(base, evaluate=evaluate)
