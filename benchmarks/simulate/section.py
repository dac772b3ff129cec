"""Report section: the mechanism simulator (``lowrank_kernels.simulate``) against its own op.

On a GPU: a 4096 x 4096 W for 10,000 steps with B = 8 (2,000 with --quick). On the CPU the same
runs at a reduced size (512 x 512, 1,000 steps; 200 with --quick), named as such in the table.
Rows: the fused op ``decay_outer_`` alone (and ``torch.addmm_``, the one-cuBLAS-call anchor) on
the simulation's shapes, then the whole simulation with the spectrum recorded only at the first
and last step (its per-step time against the op's: factor generation and the Python loop are the
difference), and with a record every ``steps / 10`` steps (the share of time spent in spectra).
"""
from __future__ import annotations

from typing import Any

import torch

import runner
from report_core import Context, Section, register_section, skip_note

from lowrank_kernels.ops.decay_outer import decay_outer_
from lowrank_kernels.simulate import check_decay, simulate

BATCH_SIZE = 8
LR, LAM = 0.05, 0.01          # shrink 0.999: a window of ~7,000 steps, the bound is min(m, n)

COLUMNS: list[runner.Column] = [
    ("case", "case", ""),
    ("shape", "W", ""),
    ("steps", "steps", ",d"),
    ("records", "records", "d"),
    ("total_s", "total s", ".2f"),
    ("steps_per_s", "steps/s", ",.0f"),
    ("ms_per_step", "ms/step (updates)", ".4f"),
    ("vs_op", "time / op alone", ".2f"),
    ("record_share", "time in spectra", ".0%"),
    ("final_rank", "final threshold rank", "d"),
    ("note", "note", ""),
]


def _sizes(ctx: Context) -> tuple[int, int, str]:
    if ctx.device.type == "cuda":
        return 4096, (2000 if ctx.quick else 10_000), ""
    return 512, (200 if ctx.quick else 1000), "CPU: reduced size (the GPU run is 4096 x 4096 x 10k)"


def _simulation_row(ctx: Context, case: str, size: int, steps: int, record_every: int,
                    op_ms: float | None, note: str) -> dict[str, Any]:
    row: dict[str, Any] = {"case": case, "shape": f"{size}x{size}", "steps": steps, "note": note}
    try:
        result = simulate(size, size, BATCH_SIZE, LR, LAM, steps, device=ctx.device,
                          record_every=record_every, seed=0)
    except (RuntimeError, ValueError) as exc:
        row["note"] = skip_note(exc)
        return row
    timing = result.timing
    row.update(records=len(result.steps), total_s=timing["total_s"],
               steps_per_s=steps / timing["total_s"],
               ms_per_step=timing["update_s"] / steps * 1e3,
               record_share=timing["record_s"] / timing["total_s"],
               final_rank=int(result.threshold_rank[-1]), timing=timing)
    if op_ms:
        row["vs_op"] = row["ms_per_step"] / op_ms
    return row


@register_section("simulate")
def simulate_section(ctx: Context) -> Section:
    title = "Mechanism simulator: simulate() vs decay_outer_ alone"
    if not ctx.wants(headline=False):  # none of its rows is a headline row
        return Section("simulate", title, COLUMNS, [])
    size, steps, note = _sizes(ctx)
    decay, alpha = check_decay(LR, LAM), -LR / BATCH_SIZE
    W = torch.zeros(size, size, device=ctx.device)
    D = torch.randn(BATCH_SIZE, size, device=ctx.device)
    F = torch.randn(BATCH_SIZE, size, device=ctx.device)
    rows: list[dict[str, Any]] = []
    op_ms = None
    for case, fn in (("decay_outer_ alone", lambda: decay_outer_(W, D, F, decay, alpha)),
                     ("torch addmm_ (anchor)",
                      lambda: W.addmm_(D.T, F, beta=decay, alpha=alpha))):
        row: dict[str, Any] = {"case": case, "shape": f"{size}x{size}", "note": "one step, "
                               "factors given"}
        try:
            # More warm-up than the report's default: the first calls of a fresh shape pay
            # allocator and BLAS set-up costs that would swamp a --quick median.
            stats = runner.time_fn(fn, warmup=max(ctx.warmup, 20), repeat=max(ctx.repeat, 20),
                                   device=ctx.device)
        except (RuntimeError, ValueError) as exc:
            row["note"] = skip_note(exc)
            rows.append(row)
            continue
        row.update(ms_per_step=stats["median_ms"], steps_per_s=1e3 / stats["median_ms"],
                   median_ms=stats["median_ms"], iqr_ms=stats["iqr_ms"])
        if case.startswith("decay_outer_"):
            op_ms = stats["median_ms"]
        row["vs_op"] = stats["median_ms"] / op_ms if op_ms else None
        rows.append(row)
    del W, D, F
    runner.free(ctx.device)

    # Warm-up on the same shapes: the first spectral call and first kernel launches pay one-off
    # set-up costs (solver workspaces, allocator growth) that belong to no step.
    try:
        simulate(size, size, BATCH_SIZE, LR, LAM, 20, device=ctx.device, record_every=10)
    except (RuntimeError, ValueError):
        pass  # the rows below report the error
    rows.append(_simulation_row(ctx, "simulate, updates only", size, steps, steps, op_ms,
                                note or "records W[0] and W[steps] only"))
    runner.free(ctx.device)
    rows.append(_simulation_row(ctx, "simulate, 11 records", size, steps, steps // 10, op_ms,
                                note or "exact float64 spectra, batched"))
    runner.free(ctx.device)
    notes = [
        f"B = {BATCH_SIZE}, mu = {LR}, lam = {LAM} (shrink 1 - 2*mu*lam = {decay:.4f}), "
        "Gaussian factors, fp32, W[0] = 0, backend 'auto'.",
        "ms/step (updates) = (total time - time in spectra) / steps: the fused op plus the "
        "factors' generation (one randn per chunk of steps) and the per-step Python call; "
        "time / op alone divides it by the op's median time on the same shapes (> 1: slower "
        "than the op alone, unlike the × columns of the other sections).",
        "Each simulate row is one run, timed once end to end (perf_counter, device synchronised); "
        "time in spectra includes the device synchronisation before each batch of records.",
    ]
    return Section("simulate", title, COLUMNS,
                   rows, notes)
