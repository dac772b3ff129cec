"""Benchmark of the streaming randomized sketch: its cost per step and per record against the
randomized tier, and the accuracy of its top-k values against the exact tier. ``cases.py``
holds the cases, ``bench.py`` the pytest-benchmark suite, ``section.py`` the report section."""
