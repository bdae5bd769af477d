"""A plain torch training loop that joins a swarm through swarmnet.SwarmOptimizer.

Each process trains an MLP on scikit-learn's digits, optionally on a subset of the classes only
(--classes 0,1,2,3,4), so that without the swarm its model could not know the other classes:

    python examples/own_training_loop.py --name a --classes 0,1,2,3,4 --listen tcp://127.0.0.1:7000 --min-peers 1
    python examples/own_training_loop.py --name b --classes 5,6,7,8,9 --seed tcp://127.0.0.1:7000 --min-peers 1

(--min-peers 1: each waits for the other before its first step; without it, the first one
trains alone to the end of its budget before the second has started.)

It prints one JSON line: its steps, merges, and the accuracy of its final model on all classes.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn
from torch.nn import functional as F

import swarmnet
from swarmnet.tasks import datasets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--listen", default="tcp://127.0.0.1:0")
    parser.add_argument("--seed", action="append", default=[], help="address or file:// card of a peer")
    parser.add_argument("--run-dir", default="runs/own-loop")
    parser.add_argument("--classes", default="", help="train on these labels only (comma separated)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--min-peers", type=int, default=0, help="others to know before training")
    parser.add_argument("--join-timeout", type=float, default=30.0, help="longest wait for them, seconds")
    parser.add_argument("--no-exchange", action="store_true", help="train alone (baseline)")
    parser.add_argument("--save", default="", help="write the final state_dict here")
    args = parser.parse_args()

    torch.set_num_threads(1)
    x, y, x_test, y_test = datasets.digits()
    if args.classes:
        keep = torch.isin(y, torch.tensor([int(c) for c in args.classes.split(",")]))
        x, y = x[keep], y[keep]

    torch.manual_seed(0)  # every peer starts from the same model
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # Schedulers wrap the inner optimizer as usual. Decaying to zero also lets the last merges
    # settle the models: at a constant rate each one's final steps on its own classes pull it
    # away from the others (three peers ended 0.68-0.97 apart in accuracy; decayed, within 0.03).
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    generator = torch.Generator().manual_seed(sum(map(ord, args.name)))

    with swarmnet.SwarmOptimizer(
        optimizer, model, name=args.name, listen=args.listen, seeds=args.seed, run_dir=args.run_dir,
        settings={"network.min_peers": args.min_peers, "network.join_timeout": args.join_timeout,
                  "network.exchange": not args.no_exchange,
                  # A loop that ends first keeps serving its final model until the others have
                  # finished too (at most 30 s; leaving ends as soon as they have): a slower peer
                  # left to train its last steps alone on its own classes would forget the rest.
                  "network.linger": 30.0},
    ) as opt:
        for _ in range(args.steps):
            batch = torch.randint(len(x), (32,), generator=generator)
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
            scheduler.step()
        status = opt.status()

    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    if args.save:
        torch.save(model.state_dict(), args.save)
    print(json.dumps({"name": args.name, "steps": status["step"], "merges": status["interactions"],
                      "accuracy": accuracy}))


if __name__ == "__main__":
    main()
