"""Report section: a ResNet-18 training step with DecaySGD vs torch SGD fused, and the cost of
rank tracking (RankTracker every 100 steps and every step)."""
from __future__ import annotations

from typing import Any

import runner
from report_core import Context, Section, add_ratios, register_section, skip_note

from . import cases

COLUMNS: list[runner.Column] = [
    ("contender", "contender", ""),
    ("median_ms", "ms/step (median)", ".2f"),
    ("iqr_ms", "IQR ms", ".2f"),
    ("amortized_ms", "ms/step (mean)", ".2f"),
    ("vs_sgd_fused", "× fused", ".3f"),
    ("tracking_overhead", "tracking overhead", "+.2%"),
    ("epoch_s", "epoch estimate (s)", ".1f"),
    ("note", "note", ""),
]

# On the CPU a ResNet-18 step takes seconds: a few steps per row, whatever the report's timing.
CPU_MAX_WARMUP, CPU_MAX_REPEAT, CPU_RECORD_REPEAT = 1, 5, 2


@register_section("training")
def training_section(ctx: Context) -> Section:
    title = "Training step: ResNet-18, DecaySGD vs torch SGD fused, rank tracking cost"
    if not any(ctx.wants(headline=c.key in cases.HEADLINE) for c in cases.CONTENDERS):
        return Section("training", title, COLUMNS, [])
    device = ctx.device
    on_gpu = device.type == "cuda"
    batch = cases.batch_for(device)
    steps_per_epoch = cases.steps_per_epoch(device)
    batches = cases.synthetic_batches(device, batch)
    if on_gpu:
        # A whole number of tracking periods per row, so the mean of the "every 100" row holds
        # exactly one record per 100 steps; the untracked rows time as many steps, for equal
        # noise. Recording every step needs no such window: the report's usual count will do.
        warmup = ctx.warmup
        repeat = cases.TRACK_EVERY_SPARSE * (1 if ctx.quick else 3)
    else:
        warmup, repeat = min(ctx.warmup, CPU_MAX_WARMUP), min(ctx.repeat, CPU_MAX_REPEAT)

    def timed(fn, n=repeat):
        return runner.time_fn(fn, warmup=warmup, repeat=n, device=device)

    rows: list[dict[str, Any]] = []
    record_stats = record_method = n_tracked = None
    for c in cases.CONTENDERS:
        row: dict[str, Any] = {"contender": c.label, "key": c.key}
        rows.append(row)
        if not on_gpu and c.track_every is not None:
            continue  # estimated below from the DecaySGD step and the measured record time
        try:
            case = cases.build(c, device, batches)
        except (RuntimeError, ValueError, TypeError) as exc:
            row["note"] = skip_note(exc)
            continue
        try:
            stats = timed(case.step, n=ctx.repeat if on_gpu and c.track_every == 1 else repeat)
        except RuntimeError as exc:  # e.g. a kernel that fails on this device: keep the others
            row["note"] = skip_note(exc)
            del case
            runner.free(device)
            continue
        row.update(stats)
        row["amortized_ms"] = stats["mean_ms"]
        row["note"] = "measured"
        if c.key == "decaysgd" and not on_gpu:
            # Measure the record alone on this model: the tracked rows are computed from it.
            tracker = cases.RankTracker(case.model, every=1, keep_spectra=False)
            record_stats = runner.time_fn(tracker.record, warmup=1, repeat=CPU_RECORD_REPEAT,
                                          device=device)
            record_method, n_tracked = tracker.last_method, len(tracker.layer_names)
        if c.track_every == 1 and on_gpu:
            record_stats = timed(case.tracker.record, n=min(repeat, 20))
            record_method, n_tracked = case.tracker.last_method, len(case.tracker.layer_names)
        del case
        runner.free(device)

    by_key = {r["key"]: r for r in rows}
    base = by_key["decaysgd"].get("amortized_ms")
    if not on_gpu:
        for c in cases.CONTENDERS:
            if c.track_every is None:
                continue
            row = by_key[c.key]
            if base is None or record_stats is None:
                row["note"] = skip_note("the DecaySGD step or the record could not be timed")
                continue
            row["amortized_ms"] = base + record_stats["median_ms"] / c.track_every
            row["note"] = f"estimated: DecaySGD mean + record median / {c.track_every}"

    add_ratios(rows, {"vs_sgd_fused": "sgd_fused"}, value="amortized_ms")
    for r in rows:
        ms = r.get("amortized_ms")
        if ms is None:
            continue
        if cases.BY_KEY[r["key"]].track_every is not None and base:
            r["tracking_overhead"] = ms / base - 1
        r["epoch_s"] = ms * steps_per_epoch / 1e3
        if record_stats is not None:
            r["record_ms"] = record_stats["median_ms"]

    precision = "bf16 autocast (forward and loss), fp32 weights" if on_gpu else "fp32"
    notes = [
        f"ResNet-18 (CIFAR variant, training/models.py), batch {batch}, {precision}, synthetic "
        f"CIFAR-shaped data (training/data.py, not CIFAR-10: {cases.NUM_BATCHES} pre-normalised "
        "batches cycled, so data loading is not timed); lr 0.1, momentum 0.9, weight decay "
        "5e-4. A step = zero_grad + forward + cross-entropy + backward + optimizer.step() "
        "(+ tracker.step()).",
        f"{warmup} untimed + {repeat} timed steps per measured row"
        + (f" ({repeat // cases.TRACK_EVERY_SPARSE} whole tracking period(s) of "
           f"{cases.TRACK_EVERY_SPARSE} steps; {ctx.repeat} for the every-step row)" if on_gpu else "")
        + ". 'ms/step (mean)' is "
        "the amortised cost (a record every N steps lands in the mean, not in the median); "
        "× fused and the overhead are ratios of means.",
        "× fused = torch SGD fused's mean step time / this row's (> 1: faster). Tracking "
        "overhead = this row's mean / DecaySGD's mean - 1.",
        f"Epoch estimate = mean step time x {steps_per_epoch} steps ({cases.EPOCH_IMAGES:,} "
        f"images / batch {batch}), computed from the step time, not measured; no evaluation "
        "or data loading included.",
    ]
    if record_stats is not None:
        notes.append(f"One tracker.record() ({n_tracked} weight matrices, {record_method} "
                     f"spectra, default measures) takes {record_stats['median_ms']:.1f} ms "
                     f"(median of {record_stats['repeat']}).")
    if not on_gpu:
        notes.append(f"CPU: batch {batch} instead of 128, fp32, at most {CPU_MAX_REPEAT} timed "
                     "steps per row; the tracked rows are not timed as whole training runs "
                     "(100 steps would take minutes) but estimated from the DecaySGD step and "
                     "the measured record time. The targets (DecaySGD no slower than SGD fused, "
                     "tracking every 100 steps under 2%) are for the H100.")
    return Section("training", title, COLUMNS, rows, notes)
