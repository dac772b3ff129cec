"""Expected cost of one ``resnet18-gpu`` sweep run, projected from a step measured here.

    python training/gpu_cost.py [--batch-size 128] [--steps 3] [--threads N]

What is measured: the floating-point operations of one training step of the full-width ResNet-18
on CIFAR-sized images (forward, backward and the DecaySGD step, counted by
``torch.utils.flop_counter.FlopCounterMode``) and the step's time on this machine's device. What
is projected: the time of that step on an H200 from its counted operations and an assumed
fraction of the chip's dense bf16 peak (989 TFLOP/s, NVIDIA's H200 datasheet, without sparsity).
Small 32x32 convolutions reach a small fraction of peak; the range printed spans 5% to 20%
utilisation. A projection is not a measurement: where a GPU is at hand, the training benchmark
(``benchmarks/training_step``) measures the epoch itself.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    _here = Path(__file__).resolve().parent
    if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == _here:
        sys.path[0] = str(_here.parent)
    else:
        sys.path.insert(0, str(_here.parent))

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as nnf  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lowrank_kernels import DecaySGD  # noqa: E402
from training import models  # noqa: E402

H200_BF16_DENSE_FLOPS = 989e12
UTILISATION = (0.05, 0.20)
TRAIN_IMAGES = 50_000  # the full CIFAR-10 training set
PAPER_EPOCHS = 500     # Galanti et al.'s ResNet-18 runs


def step_cost(batch_size: int, steps: int, width: int = 64) -> tuple[float, float]:
    """(FLOPs of one training step, median seconds of ``steps`` timed steps) on the CPU."""
    torch.manual_seed(0)
    model = models.build_model("resnet18", width=width)
    optimizer = DecaySGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch_size, 3, 32, 32)
    y = torch.randint(0, models.NUM_CLASSES, (batch_size,))

    def step():
        optimizer.zero_grad()
        nnf.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()  # warm-up (allocations, the first-step rule of the momentum buffer)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return float(counter.get_total_flops()), sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_cost.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128, help="the preset's middle batch size")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of one preset run")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1:
        parser.error("--batch-size and --steps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    flops, seconds = step_cost(args.batch_size, args.steps)
    steps_per_epoch = -(-TRAIN_IMAGES // args.batch_size)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"measured on the CPU ({torch.get_num_threads()} threads, load {load:.1f}): one ResNet-18 "
          f"training step at batch {args.batch_size}: {flops / 1e9:.1f} GFLOP, {seconds:.2f} s "
          f"({flops / seconds / 1e9:.1f} GFLOP/s); one epoch here: {steps_per_epoch * seconds / 60:.0f} min")
    print(f"projected on an H200 at {UTILISATION[0]:.0%}-{UTILISATION[1]:.0%} of the dense bf16 peak "
          "(an assumption, not a measurement):")
    for utilisation in UTILISATION:
        step_s = flops / (H200_BF16_DENSE_FLOPS * utilisation)
        epoch_s = step_s * steps_per_epoch
        print(f"  {utilisation:.0%}: step {step_s * 1e3:.2f} ms, epoch {epoch_s:.1f} s, "
              f"{args.epochs}-epoch preset run {epoch_s * args.epochs / 60:.1f} min, "
              f"{PAPER_EPOCHS}-epoch paper run {epoch_s * PAPER_EPOCHS / 3600:.2f} h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
