"""Data-parallel training step of a wide MLP: DecaySGD factored (factor all-gather) vs DecaySGD
dense under DDP (dense all-reduce), on CPU gloo.

The model: 4 ``Linear(4096, 4096)`` layers (67 M parameters), ReLU between them, a per-rank batch
of 32, mean-squared loss, plain SGD with weight decay (lr=0.1, wd=5e-4, momentum 0: the
factored_step benchmark's setting). Both contenders wrap the model in DDP (the factored one after
building the optimizer, so DDP all-reduces only the biases) with ``counting_allreduce_hook``,
which counts DDP's bucket bytes; the factored step counts its own (``communication_stats()``).

``run_ranks`` starts the ranks (``ranks.py``, one process each, ``OMP_NUM_THREADS=1``) and returns
what rank 0 gathered. ``project`` turns the counted bytes into communication times at assumed
NCCL bus bandwidths: a projection, not a measurement.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

WIDTH = 4096
DEPTH = 4
BATCH = 32          # per rank
WORLD = 2
HYPER = dict(lr=0.1, weight_decay=5e-4)
CONTENDERS = (("factored", "DecaySGD factored, all-gather of factors (+ DDP for biases)"),
              ("dense", "DecaySGD dense under DDP (all-reduce of gradients)"))
TIMEOUT_S = 900

# Assumed NCCL bus bandwidths (nccl-tests' "busbw": a collective of S bytes takes
# S * factor / busbw, factor 2(n-1)/n for a ring all-reduce of an S-byte buffer and (n-1)/n for
# an all-gather of an S-byte output). Typical published figures, not measured here.
LINKS = (
    dict(gpus=8, link="1 node, NVLink 4 + NVSwitch (H100/H200 HGX)", busbw_gb_s=400.0),
    dict(gpus=64, link="8 nodes, InfiniBand NDR, 400 Gb/s per GPU", busbw_gb_s=45.0),
)


def run_ranks(width: int = WIDTH, world: int = WORLD, steps: int = 5, warmup: int = 1
              ) -> dict[str, Any]:
    """Run the ranks; rank 0's JSON (every rank's samples and counts)."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        raise RuntimeError("needs torch.distributed with the gloo backend")
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=120))
    script = Path(__file__).with_name("ranks.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(world),
                                   str(store.port), str(out), str(width), str(steps),
                                   str(warmup)], env=env, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for rank in range(world)]
        try:
            outputs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise RuntimeError(f"the ranks did not finish within {TIMEOUT_S} s") from None
        failed = [(r, p.returncode, err[-3000:]) for r, (p, (_, err)) in
                  enumerate(zip(procs, outputs)) if p.returncode != 0]
        if failed:
            raise RuntimeError("a rank failed: " + "; ".join(
                f"rank {r} exit {code}: {err}" for r, code, err in failed))
        return json.loads(out.read_text())


def project(bytes_per_layer: dict[str, int], layers: int) -> list[dict[str, Any]]:
    """Communication time per step at each of ``LINKS``, from the counted bytes of one layer at
    the measured world size: ``gather_sent`` (this rank's share of the all-gather input, which
    does not depend on the world size at a fixed per-rank batch) and ``dense_buffer`` (the
    all-reduced gradient, likewise). Latency (the per-collective start-up) is left out."""
    from lowrank_kernels.optim.distributed_factors import gathers

    rows = []
    for link in LINKS:
        n, busbw = link["gpus"], link["busbw_gb_s"] * 1e9
        gather_wire = (n - 1) / n * n * bytes_per_layer["gather_sent"]
        reduce_wire = 2 * (n - 1) / n * bytes_per_layer["dense_buffer"]
        rule = "all_gather" if gathers(BATCH, n, WIDTH, WIDTH) else "all_reduce"
        chosen_wire = gather_wire if rule == "all_gather" else reduce_wire
        rows.append({
            "gpus": n, "link": link["link"], "busbw_gb_s": link["busbw_gb_s"],
            "gather_mib": gather_wire / 2**20, "gather_ms": layers * gather_wire / busbw * 1e3,
            "reduce_mib": reduce_wire / 2**20, "reduce_ms": layers * reduce_wire / busbw * 1e3,
            "rule": rule, "chosen_ms": layers * chosen_wire / busbw * 1e3,
            "ratio": reduce_wire / chosen_wire,
        })
    return rows
