"""Benchmark of decay_outer_ (W <- decay*W + alpha*D^T F) against torch.addmm_ and the unfused
GEMM + SGD step. ``cases.py`` holds the contenders, sizes and roofline counts, ``bench.py`` the
pytest-benchmark suite, ``section.py`` the report section."""
