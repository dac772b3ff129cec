"""pytest set-up of the benchmark suites (never loaded by ``pytest tests``).

* Collects each op folder's ``bench.py`` (``<op>/bench.py``) when a directory is given
  (``pytest benchmarks --benchmark-only``); a file named on the command line is collected by
  pytest itself.
* Puts this directory on ``sys.path`` so the suites import ``runner``, ``param_sets`` and the op
  packages (``sgd_step``, ``spectra``, ...) under any ``--import-mode``.
* Prints the environment (device, versions) in the session header.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
BENCH_FILE = "bench.py"            # the pytest-benchmark suite in each op folder
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))


def pytest_collect_file(file_path: Path, parent):
    if (file_path.name == BENCH_FILE and file_path.parent.parent == _HERE
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_report_header(config):
    import runner

    env = runner.environment(runner.default_device())
    keys = ("device_name", "torch", "triton", "cupy", "cuda_driver", "cuda_runtime", "cpu_count",
            "git_commit", "date_utc")
    return ["benchmarks: " + ", ".join(f"{k}={env.get(k)}" for k in keys)]
