"""One training step of a wide MLP: DecaySGD factored vs DecaySGD dense vs torch.optim.SGD fused.

The model is the issue's: 4 Linear layers of width 4096 (2048 on the CPU, to keep the run short),
ReLU between them, batch 32, mean-squared loss against a fixed target; plain SGD with weight
decay (lr=0.1, wd=5e-4, momentum 0: the setting of the papers' mechanism, where the factored
step is a single pass over each weight). A step is zero_grad + forward + backward + step.

Shared by the pytest-benchmark suite and the report: ``build(contender, device)`` returns the
step function and the objects it closes over, after one warm-up step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lowrank_kernels import DecaySGD

HYPER = dict(lr=0.1, weight_decay=5e-4)
BATCH = 32
DEPTH = 4


def width_for(device: torch.device) -> int:
    return 4096 if device.type == "cuda" else 2048


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    make: Callable[[nn.Module], torch.optim.Optimizer]


CONTENDERS = (
    Contender("sgd_fused", "torch SGD fused",
              lambda m: torch.optim.SGD(m.parameters(), fused=True, **HYPER)),
    Contender("decaysgd_dense", "DecaySGD dense", lambda m: DecaySGD(m.parameters(), **HYPER)),
    Contender("decaysgd_factored", "DecaySGD factored",
              lambda m: DecaySGD(m.parameters(), factored=True, model=m, **HYPER)),
)
BY_KEY = {c.key: c for c in CONTENDERS}


def mlp(width: int, device: torch.device) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(DEPTH):
        layers.append(nn.Linear(width, width))
        if i < DEPTH - 1:
            layers.append(nn.ReLU())
    torch.manual_seed(0)
    return nn.Sequential(*layers).to(device)


def build(contender: Contender, device: torch.device):
    """(step function, model, optimizer) with one warm-up step taken."""
    width = width_for(device)
    model = mlp(width, device)
    opt = contender.make(model)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(BATCH, width, device=device, generator=g)
    target = torch.randn(BATCH, width, device=device, generator=g)

    def step():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        opt.step()

    step()
    return step, model, opt


def grad_bytes(model: nn.Module) -> int:
    """Bytes of the .grad tensors the model holds (measured after a backward)."""
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
               if p.grad is not None)


def peak_step_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak device memory above what was allocated before the step (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base
