"""Side-by-side benchmark report: every contender timed in one process, one markdown table per op.

    python benchmarks/report.py [--out DIR] [--quick] [--device cpu|cuda] [--sections NAME ...]

Prints the report and writes it as markdown + JSON into ``benchmarks/results/`` (or ``--out``),
named ``report_<device kind>_<UTC date-time>``. The header records the environment and the
device's measured copy bandwidth, against which memory-bound ops are judged.

The sections live one per op in ``section_<op>.py`` (framework: ``report_core.py``); every
section runs, in ``SECTION_MODULES`` order, unless ``--sections`` picks some.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import runner  # noqa: E402
from report_core import SECTIONS, TIMING, Context  # noqa: E402

# Importing a section module registers its sections; the order here is the report's order.
SECTION_MODULES = ("section_sgd_step", "section_spectra", "section_decay_outer",
                   "section_factored_step", "section_simulate", "section_training")
for _module in SECTION_MODULES:
    importlib.import_module(_module)


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def header_markdown(ctx: Context) -> str:
    c = ctx.copy
    load, cpus = ctx.env.get("load_avg_1m"), ctx.env.get("cpu_count") or 1
    busy = ([f"**Warning**: 1-minute load average {load} on {cpus} CPUs when the run started: "
             "other processes were competing for the CPU, so CPU timings may be inflated.", ""]
            if load is not None and load > 0.5 * cpus else [])
    return "\n".join([
        f"# lowrank_kernels benchmark report — {ctx.env['device_name']} ({ctx.device.type})",
        "",
        runner.environment_markdown(ctx.env),
        "",
        *busy,
        f"**Measured copy bandwidth**: {c['gb_per_s']:.1f} GB/s "
        f"(`dst.copy_(src)` of {c['nbytes'] / runner.MiB:.0f} MiB, read + write bytes over the "
        f"median of {c['repeat']} copies, {c['median_ms']:.3f} ms).",
        "",
        f"**Timing**: {ctx.warmup} warm-up + {ctx.repeat} timed calls per row"
        + (" (--quick)" if ctx.quick else "") + "; "
        + ("CUDA events around each call, one synchronize at the end." if ctx.device.type == "cuda"
           else "time.perf_counter around each call."),
    ])


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=runner.DEFAULT_RESULTS_DIR,
                    help="directory for the .md and .json results (default: benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="fewer warm-up and timed calls")
    ap.add_argument("--device", default=None,
                    help="torch device (default: cuda when available, else cpu)")
    ap.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=None,
                    help="run only these sections (default: all)")
    ap.add_argument("--no-write", action="store_true", help="print only, write no files")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else runner.default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    warmup, repeat = TIMING[("cuda" if device.type == "cuda" else "cpu", args.quick)]
    t0 = time.perf_counter()
    env = runner.environment(device)
    copy = runner.measure_copy_bandwidth(device, warmup=2 if args.quick else 3,
                                         repeat=5 if args.quick else 10)
    ctx = Context(device=device, quick=args.quick, warmup=warmup, repeat=repeat, copy=copy, env=env)
    print(header_markdown(ctx), flush=True)

    sections = []
    for name in args.sections or list(SECTIONS):
        section = SECTIONS[name](ctx)
        sections.append(section)
        print("\n" + section.markdown(), flush=True)
    elapsed = time.perf_counter() - t0
    print(f"\n_Report took {elapsed:.1f} s._")

    if not args.no_write:
        markdown = "\n\n".join([header_markdown(ctx)] + [s.markdown() for s in sections])
        markdown += f"\n\n_Report took {elapsed:.1f} s._\n"
        payload = {
            "environment": env,
            "copy_bandwidth": copy,
            "timing": {"warmup": warmup, "repeat": repeat, "quick": args.quick},
            "elapsed_s": elapsed,
            "sections": [asdict(s) for s in sections],
        }
        md_path, json_path = runner.write_results("report", markdown, payload, device=device,
                                                  out_dir=args.out)
        print(f"wrote {md_path}\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
