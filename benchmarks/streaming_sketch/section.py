"""Report section: the streaming sketch's cost per record and per step, against the randomized
tier on the same matrices in the same run, and its accuracy against the exact tier
(``cases.py``)."""
from __future__ import annotations

import time
from typing import Any

import runner
from report_core import Context, Section, add_ratios, register_section, skip_note

from . import cases

RECORD_COLUMNS: list[runner.Column] = [
    ("matrix_set", "matrices", ""),
    ("n_matrices", "#", "d"),
    ("contender", "contender", ""),
    ("median_ms", "ms/record (median)", ".2f"),
    ("iqr_ms", "IQR ms", ".2f"),
    ("repeat", "calls", "d"),
    ("vs_anchor", "× randomized q=2", ".2f"),
    ("per_step_ms", f"ms/step, record every {cases.RECORD_EVERY}", ".3f"),
    ("topk_rel_err", f"top-{cases.K} max rel err", ".1e"),
    ("rank_agree_str", "threshold_rank = exact", ""),
    ("bound_over_s1", "max error bound / s_1", ".1e"),
    ("note", "note", ""),
]
STEP_COLUMNS: list[runner.Column] = [
    ("layer", "layer", ""),
    ("contender", "contender", ""),
    ("median_ms", "ms (median)", ".3f"),
    ("iqr_ms", "IQR ms", ".3f"),
    ("vs_weight_step", "of the W step", ".1%"),
    ("gflop_per_s", "GFLOP/s", ".1f"),
    ("note", "note", ""),
]

# Seconds of timed calls per record row (the exact tier takes seconds on a CPU), at least
# MIN_REPEAT calls.
ROW_BUDGET_S = {False: 10.0, True: 3.0}
MIN_REPEAT = 2


def _record_rows(ctx: Context) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for matrix_set in cases.MATRIX_SETS.for_device(ctx.device):
        names, matrices, _ = cases.sketched_matrices(matrix_set, ctx.device)
        exact = None
        set_rows = []
        for c in cases.RECORD_CONTENDERS:
            row: dict[str, Any] = {"matrix_set": matrix_set.name, "n_matrices": len(matrices),
                                   "contender": c.label, "key": c.key}
            try:
                run = c.make(names, matrices)
                runner.synchronize(ctx.device)
                t0 = time.perf_counter()
                result = run()
                runner.synchronize(ctx.device)
                first_s = time.perf_counter() - t0
            except (RuntimeError, ValueError, TypeError) as exc:
                row["note"] = skip_note(exc)
                set_rows.append(row)
                continue
            if exact is None:  # the exact tier comes first: the reference of every row
                exact = result[0]
            row.update(cases.accuracy(result, exact.values, exact.frobenius))
            del result
            repeat = max(MIN_REPEAT, min(ctx.repeat, int(ROW_BUDGET_S[ctx.quick] / max(first_s, 1e-9))))
            row.update(runner.time_fn(run, warmup=max(ctx.warmup - 1, 0), repeat=repeat,
                                      device=ctx.device))
            row["per_step_ms"] = row["median_ms"] / cases.RECORD_EVERY
            set_rows.append(row)
            runner.free(ctx.device)
        add_ratios(set_rows, {"vs_anchor": cases.RECORD_ANCHOR})
        rows += set_rows
        del matrices
        runner.free(ctx.device)
    return rows


def _step_rows(ctx: Context) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for layer in cases.layers_for(ctx.device):
        layer_rows = []
        for c in cases.STEP_CONTENDERS:
            row: dict[str, Any] = {"layer": layer.name, "contender": c.label, "key": c.key}
            reason = runner.why_backend_skipped(c.backend, ctx.device) \
                if c.backend not in (None, "torch") else None
            if reason is None:
                try:
                    fn = cases.make_step(c, layer, ctx.device)
                    fn()
                except (RuntimeError, ValueError, TypeError) as exc:
                    reason = exc
            if reason is not None:
                row["note"] = skip_note(reason)
                layer_rows.append(row)
                continue
            row.update(ctx.time(fn))
            row["gflop_per_s"] = cases.step_flops(c, layer) / (row["median_ms"] * 1e-3) / 1e9
            layer_rows.append(row)
            del fn
            runner.free(ctx.device)
        # Each row as a fraction of the W step of the same backend (torch for the torch rows).
        steps = {r["key"]: r["median_ms"] for r in layer_rows if "median_ms" in r}
        for r in layer_rows:
            c = cases.STEP_BY_KEY[r["key"]]
            anchor = steps.get(f"weight_step_{c.backend or 'torch'}")
            r["vs_weight_step"] = (r["median_ms"] / anchor
                                   if anchor and "median_ms" in r else None)
        rows += layer_rows
    return rows


def _step_notes(rows: list[dict[str, Any]]) -> list[str]:
    """The dense path against recomputing W @ Omega at the record: the break-even period."""
    notes = []
    for layer in dict.fromkeys(r["layer"] for r in rows):
        by_key = {r["key"]: r for r in rows if r["layer"] == layer and "median_ms" in r}
        dense, recompute = by_key.get("dense_sketch"), by_key.get("recompute")
        sketch, step = by_key.get("sketch_step_torch"), by_key.get("weight_step_torch")
        randomized, streaming = by_key.get("record_randomized"), by_key.get("record_streaming")
        if dense and recompute:
            notes.append(
                f"{layer}: the dense path costs {dense['median_ms']:.3f} ms per step, one "
                f"W @ Omega at a record {recompute['median_ms']:.3f} ms: keeping Y through G @ "
                f"Omega pays only when records come at least every "
                f"{recompute['median_ms'] / dense['median_ms']:.2f} steps.")
        if sketch and step:
            notes.append(
                f"{layer}: the factored sketch update adds {sketch['median_ms']:.3f} ms "
                f"({sketch['median_ms'] / step['median_ms']:.1%}) to the "
                f"{step['median_ms']:.3f} ms factored step (torch backend).")
        if sketch and randomized and streaming:
            saved = randomized["median_ms"] - streaming["median_ms"]
            notes.append(
                f"{layer}: a record costs {randomized['median_ms']:.3f} ms by the randomized "
                f"tier, {streaming['median_ms']:.3f} ms from the kept sketch; the sketch's "
                f"update has cost the {saved:.3f} ms saved after "
                f"{saved / sketch['median_ms']:.1f} steps: it pays for records at least that "
                "often" + (" (never: the record saves nothing)" if saved <= 0 else "") + ".")
        if sketch and recompute:
            notes.append(
                f"{layer}: at the sketch's own accuracy (the randomized tier with q=0 is one "
                "W @ Omega more than the streaming record) the update has cost that W @ Omega "
                f"after {recompute['median_ms'] / sketch['median_ms']:.1f} steps.")
    return notes


@register_section("streaming_record")
def streaming_record_section(ctx: Context) -> Section:
    title = "Streaming sketch, per record: vs the randomized tier, accuracy vs the exact tier"
    if not ctx.wants(headline=False):  # none of its rows is a headline row
        return Section("streaming_record", title, RECORD_COLUMNS, [])
    rows = _record_rows(ctx)
    notes = [
        f"Sketch width {cases.K} + {cases.OVERSAMPLE} range columns, {cases.PROBES} probe "
        f"columns (streaming), seed {cases.SEED}; the matrices of the spectra section whose "
        f"short side exceeds {cases.K + cases.OVERSAMPLE} (the others the randomized tier "
        "computes exactly); every row ends with all eight measures. The streaming row starts "
        "from sketches kept by the optimizer (made once, untimed). "
        f"ms/step, record every {cases.RECORD_EVERY}: the record's median / "
        f"{cases.RECORD_EVERY}; the streaming sketch adds its per-step update "
        "(streaming_step section).",
        f"top-{cases.K} max rel err: largest |s_i - s_i^exact| / s_i^exact over i <= {cases.K} "
        f"and s_i^exact > {cases.EPS:g}·||W||_F, against the exact tier (float64 Gram matrix) "
        "of this run; threshold_rank = exact: matrices whose threshold_rank(eps="
        f"{cases.EPS:g}) equals the exact tier's; max error bound / s_1: the largest "
        "Halko-Martinsson-Tropp bound on ||(I - QQ^T) W||_2 (which bounds the error of every "
        "s_i) over s_1.",
        f"Timed calls per row: the report's count cut to about {ROW_BUDGET_S[ctx.quick]:g} s "
        "of calls (column 'calls'), after one untimed call.",
    ]
    if ctx.device.type != "cuda":
        notes.append("CPU: the Transformer set is its first 5 layers (20 matrices, the same "
                     "shapes).")
    return Section("streaming_record", title, RECORD_COLUMNS, rows, notes)


@register_section("streaming_step")
def streaming_step_section(ctx: Context) -> Section:
    title = "Streaming sketch, per step: the sketch update vs the factored step of W"
    if not ctx.wants(headline=False):
        return Section("streaming_step", title, STEP_COLUMNS, [])
    rows = _step_rows(ctx)
    notes = [
        f"One weight, float32, lr {cases.LR}, weight decay {cases.WEIGHT_DECAY}, momentum 0; "
        f"sketch width {cases.WIDTH} ({cases.K} + {cases.OVERSAMPLE} + {cases.PROBES} probes); "
        f"{ctx.timing_note()}. 'of the W step': this row's time over the factored step of W "
        "on the same backend (torch for the torch-only rows). GFLOP/s: the row's matmul flops "
        "(W step 2 d_out d_in K; factored sketch 2 K (d_in + d_out) width; dense sketch and "
        "recompute 2 d_out d_in width) over its time.",
        "Rows: 'W factored step' = factored_update_ on W; 'sketch update, factored' = F @ "
        "Omega + factored_update_ on the sketch (what the hook adds to each step); 'sketch "
        "update, dense' = G @ Omega + the fused SGD step on the sketch (the dense path, per "
        "step); 'W @ Omega' = what a record recomputes instead of keeping Y; 'record of W' "
        f"= the top {cases.K} values of this W by singular_values(method='randomized') and "
        "by StreamingSketch.spectra() (values only, no measures).",
    ]
    notes += _step_notes(rows)
    if ctx.device.type != "cuda":
        notes.append("CPU: smaller widths and batches than on a GPU; Triton (its interpreter) "
                     "and CUDA rows are GPU rows.")
    return Section("streaming_step", title, STEP_COLUMNS, rows, notes)
