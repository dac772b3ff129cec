"""DecaySGD's factored mode under data parallelism (``optim/distributed_factors.py``).

2 and 4 processes on gloo, on the CPU, run this file as a script (one run per world size: the
start-up of the torch processes is most of its cost). Each rank trains the same small model
(a Conv2d and Linear layers: layers on each side of the all-gather / all-reduce rule) with
DecaySGD(factored=True), wrapped in DDP after the optimizer for the biases, on its own batches;
the tests compare every rank's parameters after STEPS steps with one process stepping DecaySGD
factored over the concatenated batch (the same objective: the mean of the ranks' mean losses),
and check the bytes counted against what the rule sends.
"""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from helpers import error_of, join_ranks, run_ranks

STEPS = 4
CHILD_TIMEOUT_S = 180
HYPER = dict(lr=0.2, weight_decay=0.05)
CONFIGS = {
    "plain": dict(momentum=0.0),
    "momentum": dict(momentum=0.9, dampening=0.1),
    "nesterov": dict(momentum=0.9, nesterov=True),
    # Uneven per-rank batches, and the side layer reached by rank 0's backward only.
    "uneven": dict(momentum=0.9),
}
# Per-rank batch sizes: the same on every rank, or (config "uneven") differing.
BATCH = 3
UNEVEN = {2: [3, 1], 4: [3, 2, 1, 3]}
# The configs whose dense DDP twin (DecaySGD factored=False, DDP's all-reduce, counted) runs.
DENSE_TWINS = ("momentum",)
PAIRS = {"plain": HYPER, **{k: {**HYPER, **v} for k, v in CONFIGS.items()}}


class Net(nn.Module):
    """(B, 3, 4, 4) -> 3 classes. The conv (16 output positions per example) and the head
    (3 outputs) all-reduce their dense gradients; fc1, fc2 and side gather their factors."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 32, bias=False)
        self.side = nn.Linear(32, 32, bias=False)
        self.head = nn.Linear(32, 3)

    def forward(self, x, side: bool = False):
        h = torch.relu(self.conv(x)).flatten(1)
        h = torch.tanh(self.fc2(torch.tanh(self.fc1(h))))
        if side:
            h = h + torch.tanh(self.side(h))
        return self.head(h)


def _model() -> Net:
    torch.manual_seed(0)
    return Net()


def batch_sizes(config: str, world: int) -> list[int]:
    return UNEVEN[world] if config == "uneven" else [BATCH] * world


def uses_side(config: str, rank: int) -> bool:
    return config == "uneven" and rank == 0


def _batch(rank: int, step: int, size: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(size, 3, 4, 4, generator=g), torch.randint(0, 3, (size,), generator=g)


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------------------------
# The worker: one rank (this file run as a script).
# ----------------------------------------------------------------------------------------------
def _factored_run(config: str, rank: int, world: int, process_group=None) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from lowrank_kernels import DecaySGD

    model = _model()
    opt = DecaySGD(model.parameters(), factored=True, model=model,
                   process_group=process_group, **PAIRS[config])
    ddp = DistributedDataParallel(model, process_group=process_group)  # after: the biases only
    size = batch_sizes(config, world)[rank]
    for step in range(STEPS):
        opt.zero_grad()
        x, y = _batch(rank, step, size)
        nn.functional.cross_entropy(ddp(x, side=uses_side(config, rank)), y).backward()
        opt.step()
    stats = opt.communication_stats()
    return {"params": _params(model),
            "stats": {"world_size": stats.world_size, "exchanges": stats.exchanges,
                      "collectives": stats.collectives, "sent_bytes": stats.sent_bytes,
                      "received_bytes": stats.received_bytes,
                      "metadata_sent_bytes": stats.metadata_sent_bytes,
                      "layers": {n: vars(t) for n, t in stats.layers.items()}}}


def _dense_run(config: str, rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from lowrank_kernels import DecaySGD
    from lowrank_kernels.optim.distributed_factors import (DenseAllReduceCounter,
                                                           counting_allreduce_hook)

    model = _model()
    model.side.weight.requires_grad_(False)  # unused here, as in the factored run: not stepped
    opt = DecaySGD(model.parameters(), **PAIRS[config])
    ddp = DistributedDataParallel(model)
    counter = DenseAllReduceCounter(model)
    ddp.register_comm_hook(counter, counting_allreduce_hook)
    for step in range(STEPS):
        opt.zero_grad()
        x, y = _batch(rank, step, batch_sizes(config, world)[rank])
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    return {"params": _params(model), "sent_bytes": counter.sent_bytes,
            "layers": dict(counter.layers)}




def _ddp_first_error() -> str | None:
    from torch.nn.parallel import DistributedDataParallel

    from lowrank_kernels import DecaySGD

    ddp = DistributedDataParallel(_model())
    opt = DecaySGD(ddp.parameters(), lr=0.1, factored=True, model=ddp)
    nn.functional.cross_entropy(ddp(_batch(0, 0, 2)[0]), torch.tensor([0, 1])).backward()
    return error_of(opt.step)


def _worker(rank: int, world: int, store_port: int, out_path: str) -> None:
    import torch.distributed as dist

    join_ranks(rank, world, store_port)
    try:
        results = {"factored": {}, "dense": {}}
        for config in CONFIGS:
            # One config through an explicit group (all ranks), the others the default group.
            group = dist.new_group(list(range(world))) if config == "nesterov" else None
            results["factored"][config] = _factored_run(config, rank, world, group)
        for config in DENSE_TWINS:
            results["dense"][config] = _dense_run(config, rank, world)
        # A group of one rank: each rank steps alone, as in a single process.
        alone, _ = dist.new_subgroups(group_size=1)
        results["alone"] = _factored_run("momentum", rank, world, alone)
        results["ddp_first_error"] = _ddp_first_error()
    finally:
        dist.destroy_process_group()
    torch.save(results, out_path)


# ----------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------
pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend")



@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def run(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"world{world}")
    run_ranks(__file__, world, lambda rank, port: [rank, world, port, out / f"rank{rank}.pt"],
              CHILD_TIMEOUT_S)
    ranks = [torch.load(out / f"rank{rank}.pt") for rank in range(world)]
    return world, ranks


def _single_process(config: str, world: int, ranks_data=None) -> dict[str, torch.Tensor]:
    """One process, DecaySGD factored, over the ranks' concatenated batches. With equal
    batches the loss is the mean over the concatenation; otherwise (or with the side layer on
    some ranks) the mean over ranks of each rank's mean loss, DDP's objective, from one forward
    per rank and one backward."""
    from lowrank_kernels import DecaySGD

    model = _model()
    opt = DecaySGD(model.parameters(), factored=True, model=model, **PAIRS[config])
    sizes = batch_sizes(config, world)
    ranks = ranks_data if ranks_data is not None else range(world)
    for step in range(STEPS):
        opt.zero_grad()
        batches = [_batch(r, step, sizes[r]) for r in ranks]
        if config != "uneven":
            x, y = (torch.cat(t) for t in zip(*batches))
            loss = nn.functional.cross_entropy(model(x), y)
        else:
            loss = sum(nn.functional.cross_entropy(model(x, side=uses_side(config, r)), y)
                       for r, (x, y) in zip(ranks, batches)) / len(batches)
        loss.backward()
        opt.step()
    return _params(model)


def _assert_params_close(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        # fp32 rounding: the additions run in another order (and the all-reduce path steps
        # with the fused dense kernel); nothing more is allowed.
        torch.testing.assert_close(actual[name], expected[name], rtol=2e-6, atol=2e-7,
                                   msg=lambda m: f"{what}, {name}: {m}")


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_rank_equals_one_process_over_the_concatenated_batch(run, config):
    world, ranks = run
    expected = _single_process(config, world)
    initial = _params(_model())
    for rank, result in enumerate(ranks):
        got = result["factored"][config]["params"]
        _assert_params_close(got, expected, f"world {world}, {config}, rank {rank}")
        for name in ("conv.weight", "fc1.weight", "fc2.weight", "head.weight"):
            assert not torch.equal(got[name], initial[name]), name
    # The side layer: stepped only where some rank's backward reached it.
    side = [r["factored"][config]["params"]["side.weight"] for r in ranks]
    assert torch.equal(side[0], initial["side.weight"]) == (config != "uneven")


def test_factored_equals_dense_ddp(run):
    world, ranks = run
    for rank, result in enumerate(ranks):
        for config in DENSE_TWINS:
            _assert_params_close(result["factored"][config]["params"],
                                 result["dense"][config]["params"],
                                 f"world {world}, {config}, rank {rank}: factored vs dense DDP")


def test_a_group_of_one_rank_steps_each_rank_alone(run):
    world, ranks = run
    for rank, result in enumerate(ranks):
        _assert_params_close(result["alone"]["params"],
                             _single_process("momentum", world, ranks_data=[rank]),
                             f"world {world}, rank {rank} alone")
        assert result["alone"]["stats"]["collectives"] == 0


def _expected_traffic(world: int, config: str) -> dict[str, tuple[str, int, int]]:
    """(path, sent, received) bytes of each stepped layer per step, from the rule and the shapes
    (fp32): the gather sends K_max rows of D and F per rank, the all-reduce the gradient."""
    from lowrank_kernels.optim.distributed_factors import gathers

    k_max = max(batch_sizes(config, world))
    model = _model()
    shapes = {"conv.weight": (4, 27, k_max * 16), "fc1.weight": (32, 64, k_max),
              "fc2.weight": (32, 32, k_max), "head.weight": (3, 32, k_max)}
    if config == "uneven":
        shapes["side.weight"] = (32, 32, batch_sizes(config, world)[0])  # rank 0's only
    expected = {}
    for name, (d_out, d_in, rows) in shapes.items():
        assert model.get_parameter(name).shape[0] == d_out
        if gathers(rows, world, d_out, d_in):
            sent = 4 * rows * (d_out + d_in)
            expected[name] = ("all_gather", sent, world * sent)
        else:
            expected[name] = ("all_reduce", 4 * d_out * d_in, 4 * d_out * d_in)
    return expected


def test_each_side_of_the_rule_is_taken(run):
    world, _ = run
    paths = {name: path for name, (path, _, _) in _expected_traffic(world, "momentum").items()}
    assert paths == {"conv.weight": "all_reduce", "fc1.weight": "all_gather",
                     "fc2.weight": "all_gather", "head.weight": "all_reduce"}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_bytes_counted_are_the_bytes_sent(run, config):
    world, ranks = run
    expected = _expected_traffic(world, config)
    for rank, result in enumerate(ranks):
        stats = result["factored"][config]["stats"]
        assert stats["world_size"] == world
        layers = {n: (t["path"], t["sent_bytes"], t["received_bytes"])
                  for n, t in stats["layers"].items()}
        assert layers == expected, f"rank {rank}"
        # Per step: the metadata (row count and size, int64, per captured weight), one
        # all-gather and one all-reduce; every layer stepped at every step.
        metadata = 5 * 2 * 8
        assert stats["exchanges"] == STEPS and stats["collectives"] == 3 * STEPS
        assert stats["metadata_sent_bytes"] == STEPS * metadata
        assert stats["sent_bytes"] == STEPS * (metadata + sum(s for _, s, _ in expected.values()))
        assert stats["received_bytes"] == STEPS * (world * metadata
                                                   + sum(r for _, _, r in expected.values()))


def test_dense_ddp_hook_counts_every_gradient(run):
    world, ranks = run
    model = _model()
    for result in ranks:
        dense = result["dense"]["momentum"]
        reduced = {n: 4 * p.numel() for n, p in model.named_parameters() if n != "side.weight"}
        assert dense["layers"] == reduced
        assert dense["sent_bytes"] == STEPS * sum(reduced.values())


def test_ddp_built_before_the_optimizer_is_refused(run):
    _, ranks = run
    for result in ranks:
        error = result["ddp_first_error"]
        assert error is not None and error.startswith("RuntimeError"), error
        assert "DistributedDataParallel" in error and "after building DecaySGD" in error, error


def test_process_group_must_be_a_process_group():
    from lowrank_kernels import DecaySGD

    model = _model()
    with pytest.raises(TypeError, match="ProcessGroup"):
        DecaySGD(model.parameters(), lr=0.1, factored=True, model=model, process_group="world")


def test_single_process_has_no_traffic():
    from lowrank_kernels import DecaySGD

    model = _model()
    opt = DecaySGD(model.parameters(), lr=0.1, factored=True, model=model)
    x, y = _batch(0, 0, 2)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    stats = opt.communication_stats()
    assert (stats.world_size, stats.collectives, stats.sent_bytes, stats.layers) == (1, 0, 0, {})


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
