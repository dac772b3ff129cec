"""Report section: decay_outer_ against torch.addmm_ and the unfused GEMM + SGD step, with the
roofline of one pass over W (contenders and sizes: cases.py)."""
from __future__ import annotations

import time
import warnings
from typing import Any

import torch

import runner
from report_core import Context, Section, add_ratios, register_section, skip_note

from . import cases

COLUMNS: list[runner.Column] = [
    ("dtype", "dtype", ""),
    ("k", "K", "d"),
    ("contender", "contender", ""),
    ("median_ms", "ms (median)", ".3f"),
    ("iqr_ms", "IQR ms", ".3f"),
    ("vs_addmm", "× addmm_", ".2f"),
    ("vs_unfused", "× unfused", ".2f"),
    ("roofline_ms", "roofline ms", ".3f"),
    ("frac_roofline", "of roofline", ".0%"),
    ("gb_per_s", "GB/s", ".0f"),
    ("tflop_per_s", "TFLOP/s", ".2f"),
    ("note", "note", ""),
]


def _matmul_throughput(ctx: Context, dtype: torch.dtype) -> dict[str, Any]:
    """flop/s of one large square ``torch.mm`` of ``dtype`` on the device (the compute roof)."""
    size = cases.MATMUL_SIZE["cuda" if ctx.device.type == "cuda" else "cpu"]
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    a = torch.randn(size, size, generator=gen, device=ctx.device).to(dtype)
    b = torch.randn(size, size, generator=gen, device=ctx.device).to(dtype)
    c = torch.empty(size, size, device=ctx.device, dtype=dtype)
    start = time.perf_counter()
    torch.mm(a, b, out=c)
    runner.synchronize(ctx.device)
    first_s = time.perf_counter() - start
    if ctx.device.type != "cuda" and first_s > cases.CPU_CALL_LIMIT_S:
        return {"size": size, "skipped": f"one {size}^3 matmul took {first_s:.1f} s on this CPU"}
    stats = runner.time_fn(lambda: torch.mm(a, b, out=c), warmup=1 if ctx.quick else 2,
                           repeat=3 if ctx.quick else 10, device=ctx.device)
    del a, b, c
    runner.free(ctx.device)
    return {"size": size, "median_ms": stats["median_ms"],
            "flop_per_s": 2 * size**3 / (stats["median_ms"] * 1e-3)}


def _tf32_allowed() -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(torch.backends.cuda.matmul.allow_tf32)


@register_section("decay_outer")
def decay_outer_section(ctx: Context) -> Section:
    size = cases.size_for(ctx.device)
    rows: list[dict[str, Any]] = []
    matmul: dict[str, dict[str, Any]] = {}
    copies: dict[str, int] = {}
    for dtype in cases.DTYPES:
        wanted = {k: [c for c in cases.ALL_CONTENDERS
                      if ctx.wants(headline=cases.is_headline(c, dtype, k))] for k in cases.KS}
        if not any(wanted.values()):
            continue
        name = cases.dtype_name(dtype)
        matmul[name] = _matmul_throughput(ctx, dtype)
        dtype_skip = matmul[name].get("skipped")
        for k in cases.KS:
            if not wanted[k]:
                continue
            problem = None if dtype_skip else cases.make_problem(size, size, k, dtype, ctx.device)
            if problem is not None:
                copies[name] = cases.weight_copies(problem)
            moved = cases.bytes_moved(size, size, k, dtype)
            work = cases.flops(size, size, k)
            roof_s = moved / ctx.copy_bytes_per_s
            if not dtype_skip:
                roof_s = max(roof_s, work / matmul[name]["flop_per_s"])
            group = []
            for c in wanted[k]:
                row: dict[str, Any] = {"dtype": name, "k": k, "m": size, "n": size,
                                       "contender": c.label, "key": c.key, "bytes": moved,
                                       "flops": work,
                                       "roofline_ms": None if dtype_skip else roof_s * 1e3}
                reason = (f"dtype skipped: {dtype_skip}" if dtype_skip
                          else cases.why_skipped(c, ctx.device))
                step = None
                if reason is None:
                    try:
                        step, note = cases.prepare(c, problem)
                    except (RuntimeError, ValueError, TypeError) as exc:
                        reason = exc
                    else:
                        if note:
                            row["note"] = note
                        if ctx.device.type != "cuda":
                            start = time.perf_counter()
                            step()
                            call_s = time.perf_counter() - start
                            if call_s > cases.CPU_CALL_LIMIT_S:
                                reason = f"one call took {call_s:.1f} s on this CPU"
                                step = None
                if reason is not None:
                    row["note"] = skip_note(reason)
                    group.append(row)
                    continue
                stats = ctx.time(step)
                del step
                row.update(stats)
                seconds = stats["median_ms"] * 1e-3
                row["gb_per_s"] = moved / seconds / 1e9
                row["tflop_per_s"] = work / seconds / 1e12
                row["frac_roofline"] = roof_s / seconds
                group.append(row)
                runner.free(ctx.device)
            add_ratios(group, {"vs_addmm": cases.ADDMM.key, "vs_unfused": cases.UNFUSED.key})
            rows += group
            del problem
            runner.free(ctx.device)

    roofs = "; ".join(
        f"{name}: {m['flop_per_s'] / 1e12:.2f} TFLOP/s ({m['size']}^3 torch.mm, "
        f"{m['median_ms']:.2f} ms)" if "flop_per_s" in m else f"{name}: skipped ({m['skipped']})"
        for name, m in matmul.items())
    notes = [
        f"One SGD step with weight decay of a {size} x {size} weight from K factor pairs: "
        f"W <- {cases.DECAY:g} W {cases.ALPHA:+g} D^T F (lr={cases.LR}, wd={cases.WEIGHT_DECAY}); "
        "D ~ 1e-2 N(0, 1), F ~ N(0, 1). Every contender updates its own copies of W in place, "
        "cycling through enough of them (per dtype: " + ", ".join(
            f"{n}: {c}" for n, c in copies.items()) + ") to span twice the GPU's L2 cache "
        "(64 MiB on the CPU), so that no call finds W still cached from the previous one.",
        "torch.addmm_ = W.addmm_(D.T, F, beta, alpha); unfused = torch.mm(D.T, F, out=W.grad) "
        "then torch.optim.SGD(weight_decay).step() (the variant in the note).",
        "× addmm_ / × unfused = that contender's median time / this row's: > 1 means this row "
        "is faster.",
        "roofline ms = max(bytes / copy bandwidth, flops / matmul throughput) with bytes = "
        "2 m n s + K (m + n) s (s = element size) and flops = 2 m n K; of roofline = roofline "
        "ms / this row's ms. GB/s and TFLOP/s count those same bytes and flops.",
        f"Measured matmul throughput (compute roof): {roofs}.",
        f"float32 matmuls {'may' if _tf32_allowed() else 'do not'} use TF32 "
        f"(torch.backends.cuda.matmul.allow_tf32 = {_tf32_allowed()}); the Triton kernel follows "
        "that flag, the CUDA C++ kernel is always IEEE fp32 (CUDA cores) for float32 and uses "
        "tensor cores (mma.sync) for bfloat16.",
        f"Timing: {ctx.timing_note()}, after one call that compiles (and, for Triton, "
        "autotunes) the kernels.",
    ]
    if ctx.device.type != "cuda":
        notes.append(f"CPU: m = n = {size} instead of {cases.SIZE['cuda']} to keep the run short; "
                     "only the torch paths run (Triton on the CPU is an interpreter, the CUDA "
                     f"kernels need a GPU); a row whose call (after the warm-up one) exceeds "
                     f"{cases.CPU_CALL_LIMIT_S:g} s is skipped. W (4 MiB in float32) stays in "
                     "the CPU's caches while a call runs, so a CPU row can pass 100% of a "
                     "roofline drawn from DRAM copy bandwidth.")
    return Section("decay_outer", "decay_outer_: W <- decay·W + alpha·DᵀF vs torch.addmm_ and "
                   "the unfused GEMM + SGD step", COLUMNS, rows, notes)
