"""The streaming sketch under the data-parallel factored step: it is stepped with the factors
the step used (every rank's, gathered) or, where the step all-reduces a dense gradient instead,
with that gradient, so it follows W on every rank.

2 processes on gloo, on the CPU, run this file as a script (the start-up of the processes is
most of its cost).
"""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from helpers import join_ranks, run_ranks

STEPS = 25
CHILD_TIMEOUT_S = 180


class Net(nn.Module):
    """(B, 3, 4, 4) -> 3 classes. The conv (16 positions per example) all-reduces its dense
    gradient, fc1 and fc2 gather their factors (distributed_factors.py's rule)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 32, bias=False)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(h)))))


def _run(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from lowrank_kernels import DecaySGD
    from lowrank_kernels.spectral.streaming_sketch import StreamingSketch

    torch.manual_seed(0)
    model = Net()
    opt = DecaySGD(model.parameters(), factored=True, model=model, lr=0.1, weight_decay=0.01,
                   momentum=0.9, nesterov=True)
    ddp = DistributedDataParallel(model)  # after the optimizer: the biases only
    # After DDP, whose construction broadcasts rank 0's weights in place (a sketch made before
    # would report them as written behind its back).
    sketch = StreamingSketch(opt, {"conv": model.conv.weight, "fc1": model.fc1.weight,
                                   "fc2": model.fc2.weight}, k=2, oversample=1, probes=2)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(3, 3, 4, 4, generator=g), torch.randint(0, 3, (3,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    paths = {name: t.path for name, t in opt.communication_stats().layers.items()}
    return {"drift": {n: tuple(d) for n, d in sketch.drift().items()}, "paths": paths,
            "sketches": {n: sketch.sketch(n).clone() for n in sketch.names}}


def _worker(rank: int, world: int, store_port: int, out_path: str) -> None:
    import torch.distributed as dist

    join_ranks(rank, world, store_port)
    try:
        result = _run(rank)
    finally:
        dist.destroy_process_group()
    torch.save(result, out_path)


pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend")


def test_sketch_follows_the_data_parallel_factored_step(tmp_path):
    world = 2
    run_ranks(__file__, world, lambda rank, port: [rank, world, port, tmp_path / f"rank{rank}.pt"],
              CHILD_TIMEOUT_S)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
    paths = set(ranks[0]["paths"].values())
    assert len(paths) == 2, f"both sides of the rule should be taken, got {ranks[0]['paths']}"
    for rank, result in enumerate(ranks):
        for name, (weight, buffer) in result["drift"].items():
            assert weight < 1e-5 and buffer < 1e-5, (rank, name, weight, buffer)
        for name, y in result["sketches"].items():  # every rank steps the same W
            torch.testing.assert_close(y, ranks[0]["sketches"][name], rtol=1e-6, atol=1e-7)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
