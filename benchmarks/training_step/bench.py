"""pytest-benchmark suite: one ResNet-18 training step, DecaySGD vs torch SGD fused, with and
without rank tracking.

    python -m pytest benchmarks/training_step/bench.py --benchmark-only

Model, data, batch and hyper-parameters: ``cases.py``. A round is a block of steps that
holds a whole number of tracking periods (100 steps on a GPU), so a RankTracker recording every
100 steps is charged for its records; ``extra_info["ms_per_step"]`` is the block time over its
steps. On the CPU a block is 2 steps and the every-100 contender is skipped (a block of 100
ResNet-18 steps takes minutes there); the report estimates it instead. On a GPU every round ends
with ``torch.cuda.synchronize()``.
"""
from __future__ import annotations

import pytest

import runner
from suite import DEVICE, ON_GPU, skip_unrunnable

from . import cases

BLOCK = cases.TRACK_EVERY_SPARSE if ON_GPU else 2


@pytest.fixture(scope="module")
def batches():
    return cases.synthetic_batches(DEVICE, cases.batch_for(DEVICE))


@pytest.mark.parametrize("contender", [c.key for c in cases.CONTENDERS])
def test_training_step(benchmark, contender, batches):
    c = cases.BY_KEY[contender]
    if c.track_every is not None and BLOCK % c.track_every:
        pytest.skip(f"a block of {BLOCK} steps on {DEVICE.type} holds no whole period of "
                    f"{c.track_every} steps; the report estimates this contender there")
    try:
        case = cases.build(c, DEVICE, batches)
    except (RuntimeError, ValueError, TypeError) as exc:
        skip_unrunnable(c.label, exc)

    def block():
        for _ in range(BLOCK):
            case.step()

    batch = cases.batch_for(DEVICE)
    benchmark.group = (f"training step, ResNet-18, batch {batch}, {cases.amp_for(DEVICE)}, "
                       f"blocks of {BLOCK} steps")
    benchmark.extra_info.update(device=runner.device_name(DEVICE), contender=c.label,
                                batch=batch, steps_per_round=BLOCK, amp=cases.amp_for(DEVICE),
                                track_every=c.track_every, **cases.HYPER)
    benchmark.pedantic(runner.synchronized(block, DEVICE), rounds=5 if ON_GPU else 2, iterations=1,
                       warmup_rounds=1)
    if benchmark.stats is not None:
        median_s = benchmark.stats.stats.median
        benchmark.extra_info["ms_per_step"] = median_s * 1e3 / BLOCK
        benchmark.extra_info["epoch_estimate_s"] = median_s / BLOCK * cases.steps_per_epoch(DEVICE)
    del case
    runner.free(DEVICE)
