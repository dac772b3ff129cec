"""Side-by-side benchmark report: every contender timed in one process, one markdown table per op.

    python benchmarks/report.py [--out DIR] [--quick] [--device cpu|cuda] [--sections NAME ...]
                                [--headline | --rest] [--timer events|do_bench]

Prints the report and writes it as markdown + JSON into ``benchmarks/results/`` (or ``--out``),
named ``report_<device kind>_<UTC date-time>``. The header records the environment and the
device's measured copy bandwidth, against which memory-bound ops are judged.

The sections live one per op in ``<op>/section.py`` (framework: ``report_core.py``); every
section runs, in ``SECTION_MODULES`` order, unless ``--sections`` picks some.

``--headline`` keeps only the headline rows (each ``<op>/cases.py`` names its own: the step vs
``torch.optim.SGD(fused=True)``, decay_outer_ vs ``addmm_``, the ResNet-18 spectra vs the svdvals
loop and ``svd_lowrank``, the training step with and without tracking); ``--rest`` runs every
other row. ``--timer do_bench`` times the rows a section times through ``Context.time`` with
``triton.testing.do_bench`` (L2 flushed before each call) on a GPU.
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
from report_core import SECTIONS, TIMERS, TIMING, Context  # noqa: E402

# Importing a section module registers its sections; the order here is the report's order.
SECTION_MODULES = ("sgd_step.section", "spectra.section", "decay_outer.section",
                   "factored_step.section", "simulate.section", "training_step.section",
                   "distributed_factored.section", "streaming_sketch.section")
for _module in SECTION_MODULES:
    importlib.import_module(_module)


def timing_markdown(ctx: Context) -> str:
    if ctx.uses_do_bench:
        return (f"**Timing**: sgd_step, decay_outer and factored_step rows: {ctx.timing_note()}; "
                "spectra and training rows (their own budgets): "
                f"{ctx.warmup} warm-up + {ctx.repeat} timed calls with CUDA events.")
    return (f"**Timing**: {ctx.warmup} warm-up + {ctx.repeat} timed calls per row"
            + (" (--quick)" if ctx.quick else "") + "; "
            + ("CUDA events around each call, one synchronize at the end."
               if ctx.device.type == "cuda" else "time.perf_counter around each call."))


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
        timing_markdown(ctx),
        *([] if ctx.rows == "all" else
          ["", f"**Rows**: {ctx.rows} only (--{ctx.rows}); the other rows are in the "
           + ("--rest" if ctx.rows == "headline" else "--headline") + " run."]),
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
    rows = ap.add_mutually_exclusive_group()
    rows.add_argument("--headline", dest="rows", action="store_const", const="headline",
                      help="only the headline rows of each section (sections without any: skipped)")
    rows.add_argument("--rest", dest="rows", action="store_const", const="rest",
                      help="every row that --headline leaves out")
    ap.set_defaults(rows="all")
    ap.add_argument("--timer", choices=TIMERS, default="events",
                    help="per-call rows on a GPU: CUDA events (default) or triton.testing.do_bench")
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
    ctx = Context(device=device, quick=args.quick, warmup=warmup, repeat=repeat, copy=copy,
                  env=env, rows=args.rows, timer=args.timer)
    print(header_markdown(ctx), flush=True)

    sections = []
    for name in args.sections or list(SECTIONS):
        section = SECTIONS[name](ctx)
        if not section.rows and ctx.rows != "all":  # every row of it is on the other side
            print(f"\n_Section {name}: no {ctx.rows} rows._", flush=True)
            continue
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
            "timing": {"warmup": warmup, "repeat": repeat, "quick": args.quick,
                       "timer": args.timer},
            "rows": args.rows,
            "elapsed_s": elapsed,
            "sections": [asdict(s) for s in sections],
        }
        md_path, json_path = runner.write_results("report", markdown, payload, device=device,
                                                  out_dir=args.out)
        print(f"wrote {md_path}\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
