"""Which training samples a peer sees, in which order (SPEC 1.4, 4 item 7).

- ``random``: every peer draws from the whole set, reshuffled each epoch with its own seed.
- ``partition``: the set is reshuffled each epoch (with the run seed, so all peers agree) and
  cut into n/2 shards; ranks r and r + n/2 share shard r mod n/2 but walk it in their own order.
One epoch is ceil(|D| / batch) steps whatever the shard size, as in the sequential recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from swarmnet.errors import ConfigError


@dataclass(slots=True)
class SamplerPosition:
    epoch: int = 0
    batch: int = 0


class ShardSampler:
    def __init__(
        self, num_samples: int, batch_size: int, *, shard: str, rank: int, peers: int, seed: int,
        peer_seed: int,
    ) -> None:
        if num_samples < 1:
            raise ValueError("the task has no training samples")
        self.num_samples = num_samples
        self.batch_size = min(batch_size, num_samples)
        self.steps_per_epoch = math.ceil(num_samples / batch_size)
        self.shard = shard
        self.rank = rank % max(1, peers)
        self.shards = shard_count(peers)
        if shard == "partition" and num_samples < self.shards:
            raise ConfigError(f"train.shard = 'partition' cuts {num_samples} training samples into {self.shards} "
                              f"shards (one per two of the {peers} peers): some would be empty; use train.shard = "
                              "'random', fewer peers or more data")
        self.seed = seed
        self.peer_seed = peer_seed
        self.position = SamplerPosition()
        self._order: Tensor | None = None

    def _epoch_order(self, epoch: int) -> Tensor:
        own = torch.Generator().manual_seed(self.peer_seed * 1_000_003 + epoch)
        if self.shard == "random":
            pool = torch.arange(self.num_samples)
        else:
            common = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            pool = torch.randperm(self.num_samples, generator=common).tensor_split(self.shards)[
                self.rank % self.shards
            ]
        # Walk the pool in a per-peer order, repeated as often as one epoch needs.
        needed = self.steps_per_epoch * self.batch_size
        order = pool[torch.randperm(len(pool), generator=own)]
        while len(order) < needed:
            again = pool[torch.randperm(len(pool), generator=own)]
            # A batch straddling two walks takes, from the new one, samples it does not hold yet.
            straddling = order[len(order) - len(order) % self.batch_size:]
            held = torch.isin(again, straddling)
            order = torch.cat([order, again[~held], again[held]])
        return order

    def next_indices(self) -> Tensor:
        pos = self.position
        if self._order is None or pos.batch == 0:
            self._order = self._epoch_order(pos.epoch)
        start = pos.batch * self.batch_size
        indices = self._order[start : start + self.batch_size]
        pos.batch += 1
        if pos.batch >= self.steps_per_epoch:
            pos.epoch, pos.batch = pos.epoch + 1, 0
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.position.epoch, "batch": self.position.batch, "batch_size": self.batch_size,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, int]) -> float:
        """Resume at the saved place. Saved with another batch size or data set size (the config
        changed between runs), the batch index is rescaled to the same share of the epoch: taken
        as it is, it could lie past the new epoch's end, where every batch is empty. Returns how
        many of this sampler's steps make one step of the saved one (1.0: the same epochs)."""
        epoch, batch = int(state["epoch"]), int(state["batch"])
        saved = (int(state.get("batch_size", self.batch_size)), int(state.get("num_samples", self.num_samples)))
        if saved != (self.batch_size, self.num_samples):
            share = batch * saved[0] / max(1, saved[1])
            batch = min(int(share * self.steps_per_epoch), self.steps_per_epoch - 1)
        self.position = SamplerPosition(epoch, batch)
        if self.position.batch:
            self._order = self._epoch_order(self.position.epoch)
        return self.steps_per_epoch / math.ceil(max(1, saved[1]) / max(1, saved[0]))

    def seek(self, steps: int) -> None:
        """Continue as if ``steps`` batches had been drawn (a newcomer joining at a donor's step)."""
        self.position = SamplerPosition(*divmod(steps, self.steps_per_epoch))
        self._order = self._epoch_order(self.position.epoch) if self.position.batch else None


def batch_shortfall(batch_size: int, num_samples: int, shard: str, peers: int) -> str | None:
    """Why batches hold fewer distinct samples than train.batch_size, if they do (None where
    they do not): a batch larger than the training set is cut to it (:class:`ShardSampler`), and
    one larger than a peer's partition shard repeats samples within the batch."""
    if batch_size > num_samples:
        return (f"train.batch_size = {batch_size}, but the task has {num_samples} training samples: every batch "
                f"takes those {num_samples}, fewer than asked (with the learning rate and epochs set for "
                f"{batch_size}); lower train.batch_size to at most {num_samples}, or give the task more data")
    smallest = num_samples // shard_count(peers)
    if shard == "partition" and batch_size > smallest:
        return (f"train.batch_size = {batch_size}, but train.shard = 'partition' gives a peer as few as {smallest} "
                f"training samples ({num_samples} cut into {shard_count(peers)} shards): a batch repeats samples; "
                f"lower train.batch_size to at most {smallest}, or use train.shard = 'random'")
    return None


def shard_count(peers: int) -> int:
    """Shards of ``train.shard = "partition"``: every one shared by two peers (SPEC 1.4)."""
    return max(1, peers // 2)
