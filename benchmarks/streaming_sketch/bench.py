"""pytest-benchmark suite of the streaming sketch: a record from kept sketches against the
randomized and exact tiers on the spectra benchmarks' matrices, and the per-step sketch update
against the factored step of one weight.

    python -m pytest benchmarks/streaming_sketch/bench.py --benchmark-only

Cases: ``cases.py``. On a GPU every round ends with ``torch.cuda.synchronize()``. Each record
benchmark's ``extra_info`` holds its accuracy against the exact tier.
"""
from __future__ import annotations

import pytest

import runner
from suite import DEVICE, ON_GPU, device_set_fixture, skip_unrunnable

from . import cases

ROUNDS = 20 if ON_GPU else 3


def _materialize(matrix_set):
    names, matrices, _ = cases.sketched_matrices(matrix_set, DEVICE)
    exact = cases.RECORD_BY_KEY["exact"].make(names, matrices)()[0]
    return matrix_set, names, matrices, exact


matrix_set = device_set_fixture("matrix_set", cases.MATRIX_SETS, _materialize)


@pytest.mark.parametrize("contender", [c.key for c in cases.RECORD_CONTENDERS])
def test_streaming_record(benchmark, matrix_set, contender):
    ms, names, matrices, exact = matrix_set
    c = cases.RECORD_BY_KEY[contender]
    try:
        run = c.make(names, matrices)
        result = run()
    except (RuntimeError, ValueError, TypeError) as exc:
        skip_unrunnable(c.label, exc)
    benchmark.group = f"streaming sketch record [{ms.name}] {len(matrices)} matrices"
    benchmark.extra_info.update(device=runner.device_name(DEVICE), matrix_set=ms.name,
                                contender=c.label, k=cases.K,
                                **cases.accuracy(result, exact.values, exact.frobenius))
    del result
    try:
        benchmark.pedantic(runner.synchronized(run, DEVICE), rounds=ROUNDS, iterations=1,
                           warmup_rounds=1 if ON_GPU else 0)
    finally:
        runner.free(DEVICE)


@pytest.mark.parametrize("layer", range(len(cases.layers_for(DEVICE))),
                         ids=[l.name.split(",")[0].replace(" ", "_")
                              for l in cases.layers_for(DEVICE)])
@pytest.mark.parametrize("contender", [c.key for c in cases.STEP_CONTENDERS])
def test_streaming_step(benchmark, layer, contender):
    c = cases.STEP_BY_KEY[contender]
    lay = cases.layers_for(DEVICE)[layer]
    reason = runner.why_backend_skipped(c.backend, DEVICE) if c.backend != "torch" else None
    if reason is not None:
        pytest.skip(reason)
    try:
        fn = cases.make_step(c, lay, DEVICE)
        fn()
    except (RuntimeError, ValueError, TypeError) as exc:
        skip_unrunnable(c.label, exc)
    benchmark.group = f"streaming sketch step [{lay.name}]"
    benchmark.extra_info.update(device=runner.device_name(DEVICE), layer=lay.name,
                                contender=c.label, flops=cases.step_flops(c, lay))
    try:
        benchmark.pedantic(runner.synchronized(fn, DEVICE), rounds=30 if ON_GPU else 5,
                           iterations=1, warmup_rounds=2 if ON_GPU else 1)
    finally:
        runner.free(DEVICE)
