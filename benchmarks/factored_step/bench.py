"""pytest-benchmark suite: one MLP training step, DecaySGD factored vs dense vs torch SGD fused.

    python -m pytest benchmarks/factored_step/bench.py --benchmark-only

Model, batch and hyper-parameters: ``cases.py``. On a GPU every round ends with
``torch.cuda.synchronize()``.
"""
from __future__ import annotations

import pytest

import runner
from suite import DEVICE, ON_GPU, skip_unrunnable

from . import cases



@pytest.mark.parametrize("contender", [c.key for c in cases.CONTENDERS])
def test_factored_training_step(benchmark, contender):
    c = cases.BY_KEY[contender]
    try:
        step, model, opt = cases.build(c, DEVICE)
    except (RuntimeError, ValueError, TypeError) as exc:
        skip_unrunnable(c.label, exc)

    width = cases.width_for(DEVICE)
    benchmark.group = f"training step, MLP {cases.DEPTH}x{width}, batch {cases.BATCH}"
    benchmark.extra_info.update(device=runner.device_name(DEVICE), contender=c.label,
                                width=width, grad_bytes=cases.grad_bytes(model), **cases.HYPER)
    peak = cases.peak_step_bytes(step, DEVICE)
    if peak is not None:
        benchmark.extra_info["peak_step_bytes"] = peak
    benchmark.pedantic(runner.synchronized(step, DEVICE), rounds=30 if ON_GPU else 5,
                       iterations=1, warmup_rounds=5 if ON_GPU else 1)
    del step, model, opt
    runner.free(DEVICE)
