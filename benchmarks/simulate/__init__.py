"""Benchmark of the mechanism simulator (lowrank_kernels.simulate) against its own op: only a
report section (``section.py``); the simulator times itself, so there are no separate cases or
pytest-benchmark suite."""
