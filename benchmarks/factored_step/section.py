"""Report section: one MLP training step, DecaySGD factored vs dense vs torch SGD fused."""
from __future__ import annotations

from typing import Any

import runner
from report_core import Context, Section, add_ratios, register_section, skip_note

from . import cases

COLUMNS: list[runner.Column] = [
    ("model", "model", ""),
    ("contender", "contender", ""),
    ("median_ms", "ms/step (median)", ".2f"),
    ("iqr_ms", "IQR ms", ".2f"),
    ("vs_sgd_fused", "× SGD fused", ".2f"),
    ("vs_decaysgd_dense", "× dense", ".2f"),
    ("grad_mib", ".grad held (MiB)", ".1f"),
    ("peak_mib", "peak step memory (MiB)", ".1f"),
    ("note", "note", ""),
]


@register_section("factored_step")
def factored_step_section(ctx: Context) -> Section:
    title = "Training step: DecaySGD factored vs dense vs torch SGD fused"
    if not ctx.wants(headline=False):  # none of its rows is a headline row
        return Section("factored_step", title, COLUMNS, [])
    width = cases.width_for(ctx.device)
    model_name = f"MLP {cases.DEPTH} x Linear({width}, {width}), batch {cases.BATCH}"
    rows: list[dict[str, Any]] = []
    for c in cases.CONTENDERS:
        row: dict[str, Any] = {"model": model_name, "contender": c.label, "key": c.key}
        try:
            step, model, opt = cases.build(c, ctx.device)
        except (RuntimeError, ValueError, TypeError) as exc:
            row["note"] = skip_note(exc)
            rows.append(row)
            continue
        row.update(ctx.time(step))
        row["grad_mib"] = cases.grad_bytes(model) / runner.MiB
        peak = cases.peak_step_bytes(step, ctx.device)
        row["peak_mib"] = None if peak is None else peak / runner.MiB
        rows.append(row)
        del step, model, opt
        runner.free(ctx.device)
    add_ratios(rows, {"vs_sgd_fused": "sgd_fused", "vs_decaysgd_dense": "decaysgd_dense"})
    notes = [
        f"lr={cases.HYPER['lr']}, weight_decay={cases.HYPER['weight_decay']}, momentum 0, fp32, "
        "MSE loss; one step = zero_grad + forward + backward + optimizer step, timed after a "
        f"warm-up step; {ctx.timing_note('steps')}.",
        "× columns: the anchor's median time over this row's (> 1: this row is faster).",
        "'.grad held' sums the .grad tensors present after backward (the factored weights have "
        "none: only their biases do); 'peak step memory' is CUDA's max_memory_allocated during "
        "one step above the memory allocated before it (not measured on the CPU).",
    ]
    if ctx.device.type != "cuda":
        notes.append(f"CPU: width {width} instead of 4096 to keep the run short; the factored "
                     "step runs decay_outer_'s torch reference (W.addmm_) here.")
    return Section("factored_step", title, COLUMNS, rows, notes)
