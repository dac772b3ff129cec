"""Benchmark of one ResNet-18 training step: DecaySGD vs torch.optim.SGD fused, and the cost of a
RankTracker. ``cases.py`` holds the contenders, ``bench.py`` the pytest-benchmark suite,
``section.py`` the report section (named ``training`` in the report). The folder is not called
``training``: that name is the repository's training harness, which ``cases.py`` imports."""
