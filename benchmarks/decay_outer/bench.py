"""pytest-benchmark suite of decay_outer_: the op's backends against torch.addmm_ and the unfused
weight-gradient GEMM + SGD step.

    python -m pytest benchmarks/decay_outer/bench.py --benchmark-only
    python -m pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/bench.json

One benchmark per (dtype, K, contender), grouped by (dtype, K). Contenders and sizes are the
report's (``decay_outer/cases.py``): m = n = 4096 on a GPU, 1024 on the CPU, K in
{1, 8, 32, 128, 512}, float32 and bfloat16, each contender cycling through its own copies of W.
On a GPU every round ends with ``torch.cuda.synchronize()`` so the wall time covers the kernel.
Contenders that cannot run here, or that take longer than a few seconds a call on the CPU, are
skipped with the reason.
"""
from __future__ import annotations

import time

import pytest

import runner
from suite import DEVICE, ON_GPU, skip_unrunnable

from . import cases

ROUNDS = 50 if ON_GPU else 5
WARMUP_ROUNDS = 5 if ON_GPU else 1
SIZE = cases.size_for(DEVICE)


@pytest.fixture(scope="module", params=[(d, k) for d in cases.DTYPES for k in cases.KS],
                ids=lambda p: f"{cases.dtype_name(p[0])}-K{p[1]}")
def problem(request):
    dtype, k = request.param
    p = cases.make_problem(SIZE, SIZE, k, dtype, DEVICE)
    yield p
    del p
    runner.free(DEVICE)


@pytest.mark.parametrize("contender", [c.key for c in cases.ALL_CONTENDERS])
def test_decay_outer(benchmark, problem, contender):
    c = cases.BY_KEY[contender]
    reason = cases.why_skipped(c, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    try:
        step, note = cases.prepare(c, problem)
    except (RuntimeError, ValueError, TypeError) as exc:
        skip_unrunnable(c.label, exc)
    if not ON_GPU:
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        if seconds > cases.CPU_CALL_LIMIT_S:
            pytest.skip(f"one call took {seconds:.1f} s on this CPU")

    dtype = cases.dtype_name(problem.dtype)
    moved = cases.bytes_moved(problem.m, problem.n, problem.k, problem.dtype)
    benchmark.group = f"decay_outer[{dtype}, K={problem.k}] {problem.m}x{problem.n}"
    benchmark.extra_info.update(
        device=runner.device_name(DEVICE), dtype=dtype, m=problem.m, n=problem.n, k=problem.k,
        contender=c.label, note=note, bytes=moved, flops=cases.flops(problem.m, problem.n,
                                                                       problem.k),
        weight_copies=cases.weight_copies(problem))
    try:
        benchmark.pedantic(runner.synchronized(step, DEVICE), rounds=ROUNDS, iterations=1,
                           warmup_rounds=WARMUP_ROUNDS)
        if benchmark.stats is not None:  # None under --benchmark-disable
            benchmark.extra_info["gb_per_s_at_median"] = moved / benchmark.stats.stats.median / 1e9
    finally:
        del step
        runner.free(DEVICE)
