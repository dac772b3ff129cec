"""A short CPU demo: DecaySGD trains a small MLP with and without weight decay; rank is printed.

    python training/demo.py                 # about ten seconds on a laptop CPU

The data is synthetic (4096 Gaussian points in 32 dimensions, labelled by the argmax of a fixed
random linear map into 10 classes), so the demo needs no download. Two identical models start from
the same weights and see the same batches; one is trained with weight decay, one without. Every
``--log-every`` steps it prints the loss, the accuracy and the threshold rank (number of singular
values above eps * ||W||_F) of each Linear weight. With weight decay the hidden 128 x 128
matrices lose rank; without it they stay full rank: the low-rank bias of SGD + weight decay.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from lowrank_kernels import DecaySGD


def threshold_rank(weight: torch.Tensor, eps: float = 1e-3) -> int:
    s = torch.linalg.svdvals(weight.detach().double())
    return int((s / s.norm() > eps).sum())


def make_data(n: int, dim: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = (x @ torch.randn(dim, classes, generator=g)).argmax(1)
    return x, y


def make_model(dim: int, width: int, depth: int, classes: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers, fan_in = [], dim
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(fan_in, classes))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--log-every", type=int, default=1000)
    parser.add_argument("--backend", default="auto", help="auto | torch | triton | cuda")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.log_every < 1:
        parser.error("--steps, --batch-size and --log-every must be positive")

    x, y = make_data(4096, 32, 10, args.seed)
    runs = {}
    for wd in (args.weight_decay, 0.0):
        model = make_model(32, args.width, args.depth, 10, args.seed)
        runs[wd] = (model, DecaySGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=wd, backend=args.backend))
    decay = runs[args.weight_decay][1].decay_factor()
    print(f"DecaySGD lr={args.lr} momentum={args.momentum} batch={args.batch_size}; "
          f"weight decay {args.weight_decay} (shrink {decay:.6f} per step) vs none")
    print(f"{'step':>6} {'weight_decay':>12} {'loss':>8} {'acc':>6}  threshold rank per Linear layer")

    batches = torch.Generator().manual_seed(args.seed + 1)
    start = time.perf_counter()
    for step in range(args.steps + 1):
        idx = torch.randint(0, x.shape[0], (args.batch_size,), generator=batches)
        for wd, (model, opt) in runs.items():
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % args.log_every == 0 or step == args.steps:
                with torch.no_grad():
                    full_loss = nn.functional.cross_entropy(model(x), y).item()
                    acc = (model(x).argmax(1) == y).float().mean().item()
                ranks = [threshold_rank(m.weight, args.eps) for m in model if isinstance(m, nn.Linear)]
                print(f"{step:>6} {wd:>12g} {full_loss:>8.4f} {acc:>6.3f}  {ranks}", flush=True)
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
