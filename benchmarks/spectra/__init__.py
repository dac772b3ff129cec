"""Benchmark of the spectra: singular values and every rank measure of a model's weight matrices,
ours against torch's (and CuPy's) SVDs. ``cases.py`` holds the matrix sets, contenders and
accuracy, ``bench.py`` the pytest-benchmark suite, ``section.py`` the report section."""
