import math

import pytest
import torch

from swarmnet.codecs import make_codec
from swarmnet.config import ScreeningConfig, load_config
from swarmnet.errors import ConfigError
from swarmnet.peer.screening import Poisoned, Screen
from swarmnet.peer.state import SnapshotStore
from swarmnet.peer.stats import PeerStats


def own_snapshot(values):
    return SnapshotStore().publish(values, make_codec("fp32").encode(values), step=0)


def screen(**options):
    return Screen(ScreeningConfig(**options), PeerStats())


def test_non_finite_and_absurd_models_are_refused_and_counted():
    own = own_snapshot(torch.ones(100))  # norm 10
    s = screen()
    delta = torch.zeros(100)
    assert s.check(5.0, own, delta) == 5.0
    with pytest.raises(Poisoned, match="non-finite"):
        s.check(math.nan, own, delta)
    with pytest.raises(Poisoned, match="non-finite"):
        s.check(math.inf, own, delta, "nudge")
    with pytest.raises(Poisoned, match="distance_ratio"):
        s.check(101.0, own, delta)  # > 10 x max(norm 10, typical 5)
    assert s.check(99.0, own, delta) == 99.0
    assert s.stats.rejected == {"non_finite": 2, "too_far": 1}


def test_typical_distance_raises_the_bound_when_models_are_small():
    own = own_snapshot(torch.zeros(10))  # norm 0: only the typical distance can judge
    s = screen(distance_ratio=4.0)
    delta = torch.zeros(10)
    assert s.check(1e6, own, delta) == 1e6  # nothing to judge by yet: accepted
    for _ in range(4):
        s.check(1.0, own, delta)
    assert s.typical() == 1.0
    with pytest.raises(Poisoned, match="too_far|away"):
        s.check(4.5, own, delta)


def test_a_swarm_that_moved_away_is_followed_not_refused_forever():
    """A peer that adopted a young model (norm 0.1) meets a swarm whose models all sit 2 away
    (each half of it trained on its own data): refusing them all would freeze its reference.
    Once most distinct neighbours, three at least, are that far, they are accepted again; one
    far neighbour among near ones is still refused, and a nudge's claimed sender counts for nothing."""
    own = own_snapshot(torch.full((4,), 0.05))  # norm 0.1
    s = screen()
    delta = torch.zeros(4)
    s.check(0.1, own, delta, source="a")
    s.check(0.1, own, delta, source="b")
    with pytest.raises(Poisoned):
        s.check(2.0, own, delta, source="a")  # one far, one near: a is refused
    for _ in range(3):
        with pytest.raises(Poisoned):
            s.check(2.0, own, delta, "nudge")  # claims do not move the verdict
    with pytest.raises(Poisoned):
        s.check(2.0, own, delta, source="b")  # two far: could be two poisoners met first
    assert s.check(2.0, own, delta, source="c") == 2.0  # three of three: the swarm is there
    assert s.check(2.0, own, delta, source="a") == 2.0
    assert s.stats.rejected == {"too_far": 5}


def test_absolute_bound():
    s = screen(distance_ratio=0.0, max_distance=2.0)
    own = own_snapshot(torch.ones(4))
    s.check(2.0, own, torch.zeros(4))
    with pytest.raises(Poisoned, match="max_distance"):
        s.check(2.5, own, torch.zeros(4))


def test_clipping_scales_the_delta_to_the_bound_after_warmup():
    own = own_snapshot(torch.ones(4) * 100)
    s = screen(clip_ratio=3.0, warmup=3)
    delta = torch.full((4,), 5.0)  # ||delta|| = 10, distance 20
    assert s.check(20.0, own, delta) == 20.0 and torch.equal(delta, torch.full((4,), 5.0))  # warm-up
    for _ in range(3):
        s.check(1.0, own, torch.zeros(4))
    assert s.check(20.0, own, delta) == 3.0  # median 1.0, bound 3
    assert torch.allclose(delta, torch.full((4,), 5.0 * 3.0 / 20.0))
    assert s.stats.clipped == 1


def test_own_norm_is_computed_once_per_version():
    store = SnapshotStore()
    codec = make_codec("fp32")
    first = store.publish(torch.full((4,), 1.0), codec.encode(torch.full((4,), 1.0)), 0)
    second = store.publish(torch.full((4,), 2.0), codec.encode(torch.full((4,), 2.0)), 1)
    s = screen()
    assert s.own_norm(first) == 2.0 and s.own_norm(second) == 4.0 and s.own_norm(second) == 4.0


@pytest.mark.parametrize("key,value", [("distance_ratio", -1.0), ("max_distance", float("inf")),
                                       ("clip_ratio", 0.5), ("warmup", 0)])
def test_bad_screening_options_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"screening.{key}"):
        load_config(None, {f"screening.{key}": value})


def test_nudges_do_not_raise_the_reference_the_next_nudge_is_held_to():
    """A stranger's nudges, each just under the ratio, would otherwise ratchet the reference up
    tenfold per nudge (the median of accepted distances) until a model is pushed anywhere."""
    own = own_snapshot(torch.ones(100))  # norm 10: a bound of 100
    s = screen()
    delta = torch.zeros(100)
    for _ in range(5):
        assert s.check(99.0, own, delta, "nudge", pushed=True) == 99.0
    assert s.typical() == 0.0
    with pytest.raises(Poisoned, match="distance_ratio"):
        s.check(990.0, own, delta, "nudge", pushed=True)
    s.check(99.0, own, delta, source="a")  # a pull's distance does count
    assert s.typical() == 99.0
