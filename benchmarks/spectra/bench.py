"""pytest-benchmark suite of the spectra: singular values + every measure of a model's weight
matrices, ours (exact, randomized, adaptive) against torch.linalg.svdvals (loop and batched),
torch.svd_lowrank and, on a GPU, cupy.linalg.svd.

    python -m pytest benchmarks/spectra/bench.py --benchmark-only
    python -m pytest benchmarks/spectra/bench.py --benchmark-only -k resnet18

One benchmark per (matrix set, contender), grouped by matrix set. Matrix sets and contenders are
the report's (``cases.py``): the 21 weight matrices of a CIFAR ResNet-18 and the 48 of a
12-layer, 768-wide Transformer (its first 5 layers on the CPU), trained-like float32 matrices. On
a GPU every round ends with ``torch.cuda.synchronize()`` so the wall time covers the kernels.
Each benchmark's ``extra_info`` holds the accuracy against float64 LAPACK (top-64 relative error,
threshold-rank agreement). Contenders that cannot run here are skipped with the reason.
"""
from __future__ import annotations

import pytest

import runner
from suite import DEVICE, ON_GPU, device_set_fixture, skip_unrunnable

from . import cases

# The CPU loops of LAPACK SVDs take seconds per call on the Transformer set: few rounds there.
ROUNDS = 20 if ON_GPU else 3
WARMUP_ROUNDS = 2 if ON_GPU else 0


# (MatrixSet, matrices on the benchmark device, float64 reference values).
matrix_set = device_set_fixture(
    "matrix_set", cases.MATRIX_SETS,
    lambda ms: (ms, cases.materialize(ms, DEVICE), cases.reference_values(ms)))


@pytest.mark.parametrize("contender", [c.key for c in cases.CONTENDERS])
def test_spectra(benchmark, matrix_set, contender):
    ms, matrices, reference = matrix_set
    c = cases.BY_KEY[contender]
    reason = cases.why_skipped(c, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    try:
        result = c.run(matrices)  # warm-up, and the accuracy of this contender
    except (RuntimeError, ValueError, TypeError, ImportError) as exc:
        skip_unrunnable(c.label, exc)

    benchmark.group = (f"spectra[{ms.name}] {ms.n_matrices} matrices, {ms.n_shape_groups} shapes, "
                       f"{ms.n_weights:,} weights")
    accuracy = cases.accuracy(result, reference)
    del result
    benchmark.extra_info.update(
        device=runner.device_name(DEVICE), matrix_set=ms.name, n_matrices=ms.n_matrices,
        contender=c.label, tier=c.tier, k=cases.K, eps=cases.EPS,
        topk_rel_err=accuracy["topk_rel_err"], threshold_rank_agree=accuracy["rank_agree_str"])
    try:
        benchmark.pedantic(runner.synchronized(lambda: c.run(matrices), DEVICE), rounds=ROUNDS,
                           iterations=1, warmup_rounds=WARMUP_ROUNDS)
    finally:
        runner.free(DEVICE)
