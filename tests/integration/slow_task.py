"""A task whose peers never finish loading it (the launcher loads it at once): a swarm whose
first peer is not up yet, for as long as a test needs. SIGTERM ends such a peer at once."""

import signal
import sys
import time

from swarmnet.tasks import digits


def task(**options):
    if sys.argv[1:2] == ["peer"]:  # `python -m swarmnet peer ...`, not `swarmnet up`
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the event loop that would handle it is blocked here
        time.sleep(600)
    return digits.task(**options)
