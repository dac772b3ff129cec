"""Benchmark of one MLP training step: DecaySGD factored vs dense vs torch.optim.SGD fused.
``cases.py`` holds the model and contenders, ``bench.py`` the pytest-benchmark suite,
``section.py`` the report section."""
