"""One rank of the distributed_factored benchmark (run by ``cases.run_ranks``).

    python ranks.py RANK WORLD STORE_PORT OUT_JSON WIDTH STEPS WARMUP

Each contender: build the MLP (same init on every rank), the optimizer, DDP with the counting
hook; ``WARMUP`` untimed steps, then ``STEPS`` timed ones, each after a barrier, timed with
``time.perf_counter`` in two parts: zero_grad + forward + backward (DDP's all-reduce overlaps the
backward), and ``optimizer.step()`` (the factored all-gather and update). Rank 0 gathers every
rank's samples and counts and writes them as JSON.
"""
from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lowrank_kernels import DecaySGD
from lowrank_kernels.optim.distributed_factors import DenseAllReduceCounter, counting_allreduce_hook

DEPTH, BATCH = 4, 32
HYPER = dict(lr=0.1, weight_decay=5e-4)


def _mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(DEPTH):
        layers.append(nn.Linear(width, width))
        if i < DEPTH - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _measure(key: str, rank: int, width: int, steps: int, warmup: int) -> tuple[dict, nn.Module]:
    model = _mlp(width)
    opt = (DecaySGD(model.parameters(), factored=True, model=model, **HYPER) if key == "factored"
           else DecaySGD(model.parameters(), **HYPER))
    ddp = DistributedDataParallel(model)  # after the optimizer: factored weights stay out
    counter = DenseAllReduceCounter(model)
    ddp.register_comm_hook(counter, counting_allreduce_hook)
    g = torch.Generator().manual_seed(1 + rank)
    x, target = torch.randn(BATCH, width, generator=g), torch.randn(BATCH, width, generator=g)
    forward_backward, step = [], []
    for i in range(warmup + steps):
        if i == warmup:  # count the timed steps only
            base = opt.communication_stats()
            base_calls, base_ddp = counter.calls, counter.sent_bytes
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), target).backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if i >= warmup:
            forward_backward.append((t1 - t0) * 1e3)
            step.append((t2 - t1) * 1e3)
    stats = opt.communication_stats()
    result = {
        "forward_backward_ms": forward_backward, "step_ms": step,
        "factored": {
            "collectives_per_step": (stats.collectives - base.collectives) / steps,
            "sent_bytes_per_step": (stats.sent_bytes - base.sent_bytes) / steps,
            "received_bytes_per_step": (stats.received_bytes - base.received_bytes) / steps,
            "metadata_sent_bytes_per_step":
                (stats.metadata_sent_bytes - base.metadata_sent_bytes) / steps,
            "layers": {n: vars(t) for n, t in stats.layers.items()}},
        "ddp": {"calls_per_step": (counter.calls - base_calls) / steps,
                "sent_bytes_per_step": (counter.sent_bytes - base_ddp) / steps,
                "layers": counter.layers},
    }
    return result, model


def main(rank: int, world: int, port: int, out: str, width: int, steps: int, warmup: int) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    try:
        results, finals = {}, {}
        for key in ("factored", "dense"):
            results[key], model = _measure(key, rank, width, steps, warmup)
            finals[key] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            del model
        # Both are DDP's step (the mean of the ranks' gradients): they agree to fp32 rounding.
        diff = (finals["factored"] - finals["dense"]).abs().max().item()
        gathered = [None] * world
        dist.all_gather_object(gathered, {"rank": rank, "results": results,
                                          "max_abs_diff_factored_vs_dense": diff})
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps({"world": world, "width": width, "depth": DEPTH,
                                         "batch_per_rank": BATCH, "hyper": HYPER,
                                         "steps": steps, "warmup": warmup, "ranks": gathered}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]),
         int(sys.argv[6]), int(sys.argv[7]))
