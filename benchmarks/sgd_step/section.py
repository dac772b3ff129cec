"""Report section: the fused SGD step (DecaySGD) against torch.optim.SGD."""
from __future__ import annotations

from typing import Any

import param_sets
import runner
from report_core import Context, Section, add_ratios, register_section, skip_note

from . import cases


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
    for ps in param_sets.PARAM_SETS.for_device(ctx.device):
        params = param_sets.materialize(ps, ctx.device)
        moved = cases.bytes_per_step(ps.n_params)
        set_rows = []
        for c in cases.ALL_CONTENDERS:
            if not ctx.wants(headline=c.key in cases.HEADLINE):
                continue
            row: dict[str, Any] = {"param_set": ps.name, "n_tensors": ps.n_tensors,
                                   "n_params": ps.n_params, "contender": c.label, "key": c.key,
                                   "bytes_per_step": moved}
            reason = cases.why_skipped(c, ctx.device)
            opt = None
            if reason is None:
                try:
                    opt = cases.prepare(c, params)
                except (RuntimeError, ValueError, TypeError) as exc:
                    reason = exc
            if reason is not None:
                row["note"] = skip_note(reason)
                set_rows.append(row)
                continue
            stats = ctx.time(opt.step)
            del opt
            runner.free(ctx.device)
            bytes_per_s = moved / (stats["median_ms"] * 1e-3)
            row.update(stats)
            row["gb_per_s"] = bytes_per_s / 1e9
            row["frac_copy_bw"] = bytes_per_s / ctx.copy_bytes_per_s
            set_rows.append(row)
        add_ratios(set_rows, {f"vs_{a.key}": a.key for a in cases.ANCHORS})
        rows += set_rows
        del params
        runner.free(ctx.device)
    notes = [
        f"lr={cases.HYPER['lr']}, momentum={cases.HYPER['momentum']}, "
        f"weight_decay={cases.HYPER['weight_decay']}, fp32; timed after a warm-up step "
        f"(momentum buffers exist); {ctx.timing_note('steps')}.",
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
