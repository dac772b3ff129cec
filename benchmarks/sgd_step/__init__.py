"""Benchmark of the SGD step: DecaySGD's backends against torch.optim.SGD (for-loop, foreach,
fused). ``cases.py`` holds the contenders, ``bench.py`` the pytest-benchmark suite, ``section.py``
the report section."""
