"""Shared by the GPU check's stage scripts: the device, the backends to check, a recorder of
passed / failed / skipped checks, exact and tolerant comparisons, and decay_outer_'s inputs.

Importing this module before ``lowrank_kernels`` switches Triton's CPU interpreter on when there
is no GPU (as ``tests/conftest.py`` does), so that a dry run on a CPU still runs the Triton
kernels. ``GPU_CHECK_DRY_RUN=1`` selects the dry run's tiny sizes.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from lowrank_kernels import decay_outer_  # noqa: E402
from lowrank_kernels.backends import BACKENDS, why_unavailable  # noqa: E402

DRY_RUN = os.environ.get("GPU_CHECK_DRY_RUN", "0").lower() in ("1", "true", "yes", "on")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
KERNEL_BACKENDS = tuple(b for b in BACKENDS if b != "torch")

# Integer views of a floating dtype, for bitwise comparisons (NaN payloads and -0 included).
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
         torch.float16: torch.int16}


def why_backend_skipped(backend: str) -> str | None:
    """None when ``backend`` runs on this check's device, else why it does not."""
    reason = why_unavailable(backend, DEVICE)
    if reason is None and backend == "cuda" and not ON_GPU:
        reason = "the CUDA C++ kernels need a GPU"
    return reason


def runnable(report: Checks, backends: Iterable[str], what: str) -> list[str]:
    """The ``backends`` that run here; each of the others is recorded as a SKIP of
    ``what[backend]`` with the reason."""
    names = []
    for backend in backends:
        reason = why_backend_skipped(backend)
        if reason is None:
            names.append(backend)
        else:
            report.skip(f"{what}[{backend}]", reason)
    return names


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bit pattern of every element."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    bits = _BITS.get(a.dtype)
    if bits is None:
        return bool(torch.equal(a, b))
    return bool(torch.equal(a.contiguous().view(bits), b.contiguous().view(bits)))


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float) -> float:
    """max |actual - expected| / max(|expected|, floor), in float64 (NaN where either is NaN)."""
    a, e = actual.detach().double(), expected.detach().double().to(actual.device)
    if a.shape != e.shape:
        raise ValueError(f"shape {tuple(a.shape)} != {tuple(e.shape)}")
    if a.numel() == 0:
        return 0.0
    err = (a - e).abs() / e.abs().clamp_min(floor)
    return float(err.max()) if not bool(torch.isnan(err).any()) else float("nan")


def normwise_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    scale = float(expected.detach().double().abs().max().clamp_min(1e-30))
    return float((actual.double() - expected.double()).abs().max()) / scale


class Checks:
    """Records each check as PASS, FAIL or SKIP, one line each, and a closing count line."""

    def __init__(self, name: str):
        self.name = name
        self.counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
        self.started = time.perf_counter()

    def record(self, status: str, label: str, detail: str = "") -> None:
        self.counts[status] += 1
        elapsed = time.perf_counter() - self.started
        print(f"{status} [{elapsed:6.1f} s] {label}" + (f": {detail}" if detail else ""),
              flush=True)

    def check(self, ok: bool, label: str, detail: str = "") -> bool:
        self.record("PASS" if ok else "FAIL", label, detail)
        return ok

    def skip(self, label: str, reason: str) -> None:
        self.record("SKIP", label, reason)

    def run(self, label: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` (which records its own checks); an exception it raises is a FAIL."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - every error is a finding of the check
            detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            self.record("FAIL", label, f"raised {detail}")
            traceback.print_exc(limit=4, file=sys.stdout)
        finally:
            if ON_GPU:
                torch.cuda.empty_cache()

    def finish(self) -> int:
        """Print the closing line; exit status 1 when anything failed."""
        seconds = time.perf_counter() - self.started
        c = self.counts
        print(f"{self.name} summary - pass {c['PASS']}, fail {c['FAIL']}, skip {c['SKIP']} "
              f"({seconds:.1f} s, {DEVICE.type}{', dry run' if DRY_RUN else ''})", flush=True)
        return 1 if c["FAIL"] else 0


def synchronize() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


# decay_outer_'s decay and alpha in every check: one SGD step, lr 0.1, weight decay 5e-3.
DECAY, ALPHA = 0.9995, -0.1


def decay_inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    """(W, D, F) of an m x n decay_outer_ problem with k factor pairs, at a training step's
    magnitudes, drawn on the CPU (the same values on every device) and moved to the device."""
    gen = torch.Generator().manual_seed(seed)
    W = (torch.randn(m, n, generator=gen) * 0.02).to(DEVICE, dtype)
    D = (torch.randn(k, m, generator=gen) * 1e-2).to(DEVICE, dtype)
    F = torch.randn(k, n, generator=gen).to(DEVICE, dtype)
    return W, D, F


def decay_outer_vs_torch(backend: str, m: int, n: int, k: int, dtype: torch.dtype,
                         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, torch's): decay_outer_ of the same inputs on ``backend`` and on the torch backend."""
    W, D, F = decay_inputs(m, n, k, dtype, seed)
    ours, ref = W.clone(), W.clone()
    decay_outer_(ours, D, F, DECAY, ALPHA, backend=backend)
    decay_outer_(ref, D, F, DECAY, ALPHA, backend="torch")
    synchronize()
    return ours, ref
