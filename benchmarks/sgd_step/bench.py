"""pytest-benchmark suite of the SGD step: DecaySGD's backends against torch.optim.SGD.

    python -m pytest benchmarks/sgd_step/bench.py --benchmark-only
    python -m pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/bench.json

One benchmark per (param set, contender), grouped by param set. Contenders and param sets are
the report's (``cases.py``, ``param_sets.py``): lr=0.1, momentum=0.9, weight_decay=5e-4,
fp32, timed after a warm-up step. On a GPU every round ends with ``torch.cuda.synchronize()`` so
the wall time covers the kernels; the 124M-param set runs there only, the CPU runs the reduced
one and a few rounds. Contenders that cannot run here are skipped with the reason.
"""
from __future__ import annotations

import pytest

import param_sets
import runner
from suite import DEVICE, ON_GPU, device_set_fixture, skip_unrunnable

from . import cases

ROUNDS = 50 if ON_GPU else 5
WARMUP_ROUNDS = 5 if ON_GPU else 1


# (ParamSet, params with grads) on the benchmark device; shared by every contender.
param_set = device_set_fixture("param_set", param_sets.PARAM_SETS,
                               lambda ps: (ps, param_sets.materialize(ps, DEVICE)))


@pytest.mark.parametrize("contender", [c.key for c in cases.ALL_CONTENDERS])
def test_sgd_step(benchmark, param_set, contender):
    ps, params = param_set
    c = cases.BY_KEY[contender]
    reason = cases.why_skipped(c, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    try:
        opt = cases.prepare(c, params)
    except (RuntimeError, ValueError, TypeError) as exc:  # e.g. fused=True unsupported here
        skip_unrunnable(c.label, exc)

    benchmark.group = f"sgd_step[{ps.name}] {ps.n_tensors} tensors, {ps.n_params:,} params"
    benchmark.extra_info.update(
        device=runner.device_name(DEVICE), param_set=ps.name, n_tensors=ps.n_tensors,
        n_params=ps.n_params, contender=c.label, bytes_per_step=cases.bytes_per_step(ps.n_params),
        **cases.HYPER)
    try:
        benchmark.pedantic(runner.synchronized(opt.step, DEVICE), rounds=ROUNDS, iterations=1,
                           warmup_rounds=WARMUP_ROUNDS)
        if benchmark.stats is not None:  # None under --benchmark-disable
            median_s = benchmark.stats.stats.median
            benchmark.extra_info["gb_per_s_at_median"] = (
                cases.bytes_per_step(ps.n_params) / median_s / 1e9)
    finally:
        del opt
        runner.free(DEVICE)
