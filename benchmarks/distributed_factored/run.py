"""Stand-alone run of the distributed_factored sections, written to
``results/distributed_factored_<device kind>_<UTC date-time>.md`` and ``.json``:

    python benchmarks/distributed_factored/run.py [--quick] [--out DIR] [--no-write]

(``python benchmarks/report.py --sections distributed_factored distributed_factored_layers
distributed_factored_projection`` runs the same inside the report.)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import runner  # noqa: E402
from report_core import SECTIONS, Context  # noqa: E402

import distributed_factored.section  # noqa: E402,F401  (registers the sections)

NAMES = ("distributed_factored", "distributed_factored_layers", "distributed_factored_projection")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 timed steps instead of 5")
    ap.add_argument("--out", type=Path, default=runner.DEFAULT_RESULTS_DIR)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cpu")  # the ranks run on CPU gloo
    t0 = time.perf_counter()
    env = runner.environment(device)
    ctx = Context(device=device, quick=args.quick, warmup=1, repeat=5, copy={}, env=env)
    sections = [SECTIONS[name](ctx) for name in NAMES]
    env["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    elapsed = time.perf_counter() - t0
    markdown = "\n\n".join(
        ["# DecaySGD factored mode under data parallelism — CPU gloo", "",
         runner.environment_markdown(env)]
        + [s.markdown() for s in sections]) + f"\n\n_Run took {elapsed:.1f} s._\n"
    print(markdown)
    if not args.no_write:
        paths = runner.write_results("distributed_factored", markdown,
                                     {"environment": env, "elapsed_s": elapsed,
                                      "sections": [asdict(s) for s in sections]},
                                     device=device, out_dir=args.out)
        print("\n".join(f"wrote {p}" for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
