"""Side-by-side benchmark report: every contender timed in one process, one markdown table per op.

    python benchmarks/report.py [--out DIR] [--quick] [--device cpu|cuda] [--sections NAME ...]

Prints the report and writes it as markdown + JSON into ``benchmarks/results/`` (or ``--out``),
named ``report_<device kind>_<UTC date-time>``. The header records the environment and the
device's measured copy bandwidth, against which memory-bound ops are judged.

The report is a registry of sections: a section is a function taking the ``Context`` and
returning a ``Section`` (title, columns, rows, notes). A later op adds its own with::

    @register_section("my_op")
    def my_op_section(ctx: Context) -> Section:
        ...

and every section runs, in registration order, unless ``--sections`` picks some.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import param_sets  # noqa: E402
import runner  # noqa: E402
import sgd_step_cases as sgd_cases  # noqa: E402

# (warmup, repeat) calls per measurement, by device type and --quick.
TIMING = {
    ("cuda", False): (10, 100), ("cuda", True): (3, 20),
    ("cpu", False): (3, 30), ("cpu", True): (1, 5),
}


@dataclass
class Context:
    device: torch.device
    quick: bool
    warmup: int
    repeat: int
    copy: dict[str, Any]              # runner.measure_copy_bandwidth() of this device
    env: dict[str, Any]

    @property
    def copy_bytes_per_s(self) -> float:
        return self.copy["bytes_per_s"]

    def time(self, fn: Callable[[], Any]) -> dict[str, Any]:
        return runner.time_fn(fn, warmup=self.warmup, repeat=self.repeat, device=self.device)


@dataclass
class Section:
    name: str
    title: str
    columns: list[runner.Column]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        parts = [f"## {self.title}", "", runner.markdown_table(self.rows, self.columns)]
        if self.notes:
            parts += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(parts)


SECTIONS: dict[str, Callable[[Context], Section]] = {}


def register_section(name: str):
    def decorate(fn: Callable[[Context], Section]) -> Callable[[Context], Section]:
        if name in SECTIONS:
            raise ValueError(f"report section {name!r} registered twice")
        SECTIONS[name] = fn
        return fn
    return decorate


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Section: fused SGD step (DecaySGD) against torch.optim.SGD
# ----------------------------------------------------------------------------------------------
SGD_COLUMNS: list[runner.Column] = [
    ("param_set", "param set", ""),
    ("n_tensors", "#tensors", "d"),
    ("n_params", "#params", ",d"),
    ("contender", "contender", ""),
    ("median_ms", "ms/step (median)", ".3f"),
    ("iqr_ms", "IQR ms", ".3f"),
    ("vs_sgd_forloop", "× for-loop", ".2f"),
    ("vs_sgd_foreach", "× foreach", ".2f"),
    ("vs_sgd_fused", "× fused", ".2f"),
    ("gb_per_s", "GB/s (20 B/param)", ".1f"),
    ("frac_copy_bw", "of copy BW", ".0%"),
    ("note", "note", ""),
]


@register_section("sgd_step")
def sgd_step_section(ctx: Context) -> Section:
    rows: list[dict[str, Any]] = []
    for ps in param_sets.param_sets_for(ctx.device):
        params = param_sets.materialize(ps, ctx.device)
        moved = sgd_cases.bytes_per_step(ps.n_params)
        set_rows = []
        for c in sgd_cases.ALL_CONTENDERS:
            row: dict[str, Any] = {"param_set": ps.name, "n_tensors": ps.n_tensors,
                                   "n_params": ps.n_params, "contender": c.label, "key": c.key,
                                   "bytes_per_step": moved}
            reason = sgd_cases.why_skipped(c, ctx.device)
            opt = None
            if reason is None:
                try:
                    opt = sgd_cases.prepare(c, params)
                except (RuntimeError, ValueError, TypeError) as exc:
                    reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
            if reason is not None:
                row["note"] = f"skipped: {reason}"
                set_rows.append(row)
                continue
            stats = ctx.time(opt.step)
            del opt
            _free(ctx.device)
            bytes_per_s = moved / (stats["median_ms"] * 1e-3)
            row.update(stats)
            row["gb_per_s"] = bytes_per_s / 1e9
            row["frac_copy_bw"] = bytes_per_s / ctx.copy_bytes_per_s
            set_rows.append(row)
        anchors = {r["key"]: r["median_ms"] for r in set_rows
                   if sgd_cases.BY_KEY[r["key"]].anchor and "median_ms" in r}
        for r in set_rows:
            for a in sgd_cases.ANCHORS:
                r[f"vs_{a.key}"] = (anchors[a.key] / r["median_ms"]
                                    if a.key in anchors and "median_ms" in r else None)
        rows += set_rows
        del params
        _free(ctx.device)
    notes = [
        f"lr={sgd_cases.HYPER['lr']}, momentum={sgd_cases.HYPER['momentum']}, "
        f"weight_decay={sgd_cases.HYPER['weight_decay']}, fp32; timed after a warm-up step "
        f"(momentum buffers exist); {ctx.warmup} untimed + {ctx.repeat} timed steps per row.",
        "× for-loop / × foreach / × fused = anchor's median time / this row's: > 1 means this "
        "row is faster than that torch.optim.SGD variant.",
        "GB/s counts the minimum traffic of a momentum step, 20 bytes per fp32 param (param, "
        "grad, buffer read; param, buffer written); 'of copy BW' divides it by the measured "
        "copy bandwidth above.",
    ]
    if ctx.device.type != "cuda":
        notes.append("CPU: only the torch paths run (Triton on the CPU is an interpreter); the "
                     "124M-param set is replaced by 'large_reduced'. A CPU copy also pays a "
                     "read-for-ownership of the destination, so an in-place step can exceed 100%.")
    return Section("sgd_step", "Fused SGD step: DecaySGD vs torch.optim.SGD", SGD_COLUMNS, rows,
                   notes)


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
