"""What the pytest-benchmark suites (``<op>/bench.py``) share: the device they run on, a fixture
over a suite's named sets, and the skip of a contender that cannot run here.

The report never imports this module, so it runs where pytest is not installed.
"""
from __future__ import annotations

from typing import Any, Callable, NoReturn

import pytest

import runner

DEVICE = runner.default_device()
ON_GPU = DEVICE.type == "cuda"


def device_set_fixture(name: str, sets: runner.DeviceSets, materialize: Callable[[Any], Any]):
    """A module-scoped fixture ``name`` with one parameter per set of ``sets``: skipped with the
    reason where that set does not run on ``DEVICE``, else ``materialize(the set)``, its memory
    released after the module's last benchmark."""
    @pytest.fixture(scope="module", params=list(sets.builders), name=name)
    def fixture(request):
        reason = sets.why_not_on(request.param, DEVICE)
        if reason is not None:
            pytest.skip(reason)
        value = materialize(sets.builders[request.param]())
        yield value
        del value
        runner.free(DEVICE)
    return fixture


def skip_unrunnable(label: str, exc: BaseException) -> NoReturn:
    """Skip the benchmark of contender ``label``, which raised ``exc`` when built or first run
    here (e.g. ``fused=True`` on a torch build without it)."""
    pytest.skip(f"{label} cannot run on {DEVICE.type}: {type(exc).__name__}: {exc}")
