"""The SGD-step contenders, shared by the pytest-benchmark suite and the report.

Every contender is an optimizer over the same parameters with lr=0.1, momentum=0.9,
weight_decay=5e-4 (fp32): torch.optim.SGD as a per-tensor for-loop, with ``foreach=True`` and with
``fused=True`` (the three anchors), and DecaySGD on each backend that is a real speed path on the
device (on the CPU: torch only; Triton there is an interpreter and is never benchmarked).
``prepare()`` builds the optimizer and takes one warm-up step, so the momentum buffers exist
before anything is timed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lowrank_kernels import DecaySGD
from lowrank_kernels.backends import BACKENDS
from runner import synchronize, why_backend_skipped

HYPER = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)

# Bytes of memory traffic per parameter of one fp32 step with momentum: param, grad and momentum
# buffer read (12 B), param and momentum buffer written (8 B).
BYTES_PER_PARAM_FP32_MOMENTUM = 20


@dataclass(frozen=True)
class Contender:
    key: str                                   # pytest id / JSON key
    label: str                                 # table label
    anchor: bool                               # a torch.optim.SGD baseline the others compare to
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    backend: str | None = None                 # DecaySGD backend


def _sgd(**kw) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    return lambda params: torch.optim.SGD(params, **HYPER, **kw)


def _decay_sgd(backend: str) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    return lambda params: DecaySGD(params, **HYPER, backend=backend)


ANCHORS = (
    Contender("sgd_forloop", "SGD for-loop", True, _sgd(foreach=False, fused=False)),
    Contender("sgd_foreach", "SGD foreach", True, _sgd(foreach=True, fused=False)),
    Contender("sgd_fused", "SGD fused", True, _sgd(fused=True)),
)
DECAY_SGD = tuple(Contender(f"decaysgd_{b}", f"DecaySGD[{b}]", False, _decay_sgd(b), backend=b)
                  for b in BACKENDS)
ALL_CONTENDERS = ANCHORS + DECAY_SGD
BY_KEY = {c.key: c for c in ALL_CONTENDERS}
# The report's --headline rows: DecaySGD on each backend against torch.optim.SGD(fused=True), on
# every parameter set.
HEADLINE = frozenset({"sgd_fused", *(c.key for c in DECAY_SGD)})


def why_skipped(contender: Contender, device: torch.device | str) -> str | None:
    """None when the contender is benchmarked on ``device``, else the reason it is not.

    (An anchor torch rejects at run time, e.g. ``fused=True`` on an old CPU build, is skipped by
    the caller when ``prepare`` raises.)
    """
    return why_backend_skipped(contender.backend, device)


def prepare(contender: Contender, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The contender's optimizer over ``params`` after one warm-up step (momentum buffers exist,
    kernels compiled). Raises whatever the optimizer raises when it cannot run here."""
    opt = contender.make(params)
    opt.step()
    if params:
        synchronize(params[0].device)
    return opt


def bytes_per_step(n_params: int, dtype: torch.dtype = torch.float32) -> int:
    """Minimum memory traffic of one momentum step: 5 tensor passes of the param dtype."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return BYTES_PER_PARAM_FP32_MOMENTUM // 4 * itemsize * n_params
