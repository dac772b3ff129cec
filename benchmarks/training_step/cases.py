"""One ResNet-18 training step on synthetic CIFAR-shaped data: torch SGD fused vs DecaySGD, and
DecaySGD with a RankTracker recording every 100 steps and every step.

The model is ``training/models.py``'s CIFAR ResNet-18 (11.2 M parameters, fp32 weights); a step is
zero_grad + forward + cross-entropy + backward + optimizer step (+ ``tracker.step()``), with the
forward and the loss under bf16 autocast on CUDA and in fp32 on the CPU. Batches come from
``training/data.py``'s synthetic CIFAR-shaped set (not CIFAR-10: only shapes matter for speed),
normalised once and cycled, so the step time excludes data loading and augmentation.

Hyper-parameters: lr 0.1, momentum 0.9, weight decay 5e-4 (the usual CIFAR ResNet-18 setting).
Batch 128 on CUDA, 8 on the CPU (a ResNet-18 step at 128 takes many seconds on a CPU).

Shared by the pytest-benchmark suite and the report: ``build(contender, device)`` returns a
``Case`` whose ``step()`` runs one training step; one warm-up step has been taken.
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # training/ is a folder of the repository, not of the package
    sys.path.insert(0, str(REPO_ROOT))

from lowrank_kernels import DecaySGD, RankTracker  # noqa: E402
from training.data import DeviceLoader, make_synthetic  # noqa: E402
from training.models import build_model  # noqa: E402

HYPER = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
BATCH = {"cuda": 128, "cpu": 8}
NUM_BATCHES = 8                  # distinct batches cycled through
EPOCH_IMAGES = 50_000            # CIFAR-10's training set: 390 steps of 128 per epoch
TRACK_EVERY_SPARSE = 100


def batch_for(device: torch.device) -> int:
    return BATCH["cuda" if device.type == "cuda" else "cpu"]


def amp_for(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" else "fp32"


def steps_per_epoch(device: torch.device) -> int:
    return EPOCH_IMAGES // batch_for(device)


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    optimizer: str               # "sgd_fused" or "decaysgd"
    track_every: int | None      # RankTracker period in steps; None: no tracking


CONTENDERS = (
    Contender("sgd_fused", "torch SGD fused", "sgd_fused", None),
    Contender("decaysgd", "DecaySGD", "decaysgd", None),
    Contender("decaysgd_track100", f"DecaySGD + RankTracker every {TRACK_EVERY_SPARSE}",
              "decaysgd", TRACK_EVERY_SPARSE),
    Contender("decaysgd_track1", "DecaySGD + RankTracker every step", "decaysgd", 1),
)
BY_KEY = {c.key: c for c in CONTENDERS}
# The report's --headline rows: all of them (one step with and without tracking).
HEADLINE = frozenset(BY_KEY)


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd_fused":
        return torch.optim.SGD(model.parameters(), fused=True, **HYPER)
    if kind == "decaysgd":
        return DecaySGD(model.parameters(), **HYPER)
    raise ValueError(f"unknown optimizer {kind!r}")


def synthetic_batches(device: torch.device, batch: int, count: int = NUM_BATCHES):
    """``count`` normalised (images, labels) batches of the synthetic set, on ``device``."""
    data = make_synthetic(device, train_size=batch * count, test_size=1, seed=0)
    loader = DeviceLoader(data.train, batch_size=batch, shuffle=True, augment=False, seed=0)
    return [(x.contiguous(), y) for x, y in loader.epoch(0)]


@dataclass
class Case:
    step: Callable[[], None]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    tracker: RankTracker | None


def build(contender: Contender, device: torch.device, batches=None) -> Case:
    """The step function of ``contender`` on ``device``, after one warm-up step."""
    torch.manual_seed(0)
    model = build_model("resnet18").to(device)
    model.train()
    optimizer = make_optimizer(contender.optimizer, model)
    tracker = (RankTracker(model, every=contender.track_every, keep_spectra=False)
               if contender.track_every else None)
    batches = batches if batches is not None else synthetic_batches(device, batch_for(device))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else nullcontext
    position = [0]

    def step():
        x, y = batches[position[0] % len(batches)]
        position[0] += 1
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if tracker is not None:
            tracker.step()

    step()
    return Case(step, model, optimizer, tracker)

