"""The rank mechanism of SGD with weight decay, in two pictures.

    python examples/mechanism.py [--out-dir docs/images] [--size 256] [--device cpu]

1. ``explorer.png``: a screenshot of the interactive explorer, rendered by its headless mode
   (``python -m lowrank_kernels.explore --preset 4 --save explorer.png --steps 150``).
2. ``rank_vs_bound.png``: a sweep over (B, mu, lam) on a size x size matrix; the measured
   steady-state rank against B*log(1/eps)/(mu*lam) on log axes, with the bound. The sweep's table
   is printed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lowrank_kernels import explore
from lowrank_kernels.simulate import format_sweep_table, plot_sweep, sweep

BATCH_SIZES = (1, 2, 4, 8)
# mu*lam takes 8 distinct values (ranks depend on mu and lam only through mu*lam from W[0] = 0).
LRS = (0.1, 0.4)
LAMS = (0.03, 0.1, 0.3, 1.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "images")
    ap.add_argument("--size", type=int, default=256, help="the sweep's W is size x size")
    ap.add_argument("--device", default=None, help="default: CUDA when available, else CPU")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    shot = args.out_dir / "explorer.png"
    code = explore.main(["--preset", "4", "--save", str(shot), "--steps", "150", "--dpi", "80",
                         "--seed", str(args.seed)])
    if code:
        return code

    t0 = time.perf_counter()
    rows = sweep(BATCH_SIZES, LRS, LAMS, m=args.size, eps=1e-3, seed=args.seed, device=args.device)
    print(f"\nsweep of {len(rows)} settings on a {args.size}x{args.size} W "
          f"({time.perf_counter() - t0:.1f} s):\n")
    print(format_sweep_table(rows))
    plot = args.out_dir / "rank_vs_bound.png"
    plot_sweep(rows, plot)
    print(f"\nwrote {shot}\nwrote {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
