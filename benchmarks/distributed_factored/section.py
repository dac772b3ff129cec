"""Report sections: DecaySGD factored under data parallelism vs dense DDP, on CPU gloo.

Three tables from one 2-process run (``cases.run_ranks``, made by whichever of the three runs
first): the measured step (time and counted bytes per contender), the counted bytes per layer,
and the projection of the communication time at NCCL bus bandwidths. The run is on CPU gloo
in a CPU report (a GPU report lists the sections as skipped): nothing here ran on NCCL or a
GPU.
"""
from __future__ import annotations

import statistics
from typing import Any

import runner
from report_core import Context, Section, add_ratios, register_section, skip_note

from . import cases

_RUNS: dict[tuple[int, int], dict[str, Any]] = {}


def _steps(ctx: Context) -> tuple[int, int]:
    """(timed steps, warm-up steps): few, the 67 M-parameter model is heavy for a small CPU."""
    return (2, 1) if ctx.quick else (5, 1)


class NotOnThisDevice(RuntimeError):
    pass


def _run(ctx: Context) -> dict[str, Any]:
    if ctx.device.type != "cpu":
        # The ranks run on CPU gloo: a GPU report (and its device time) is not the place.
        raise NotOnThisDevice("CPU gloo benchmark, run in a CPU report or by "
                              "benchmarks/distributed_factored/run.py")
    key = _steps(ctx)
    if key not in _RUNS:
        _RUNS[key] = cases.run_ranks(steps=key[0], warmup=key[1])
    return _RUNS[key]


def _slowest(run: dict[str, Any], key: str, part: str) -> list[float]:
    """Per timed step, the slowest rank's time (the step of data parallelism ends there)."""
    per_rank = [r["results"][key][part] for r in run["ranks"]]
    return [max(times) for times in zip(*per_rank)]


def _title_model(run: dict[str, Any]) -> str:
    return (f"MLP {run['depth']} x Linear({run['width']}, {run['width']}), batch "
            f"{run['batch_per_rank']} per rank, {run['world']} ranks, CPU gloo")


MEASURED_COLUMNS: list[runner.Column] = [
    ("contender", "contender", ""),
    ("collectives", "collectives / step", ".1f"),
    ("sent_mib", "MiB sent / rank / step (counted)", ".3f"),
    ("median_ms", "step ms (median)", ".1f"),
    ("min_ms", "min ms", ".1f"),
    ("fb_ms", "fwd+bwd ms", ".1f"),
    ("opt_ms", "optimizer.step ms", ".1f"),
    ("vs_dense", "× dense", ".2f"),
    ("note", "note", ""),
]


@register_section("distributed_factored")
def measured_section(ctx: Context) -> Section:
    title = "Data-parallel step: factored all-gather vs dense DDP all-reduce (measured)"
    if not ctx.wants(headline=False):
        return Section("distributed_factored", title, MEASURED_COLUMNS, [])
    try:
        run = _run(ctx)
    except (RuntimeError, OSError) as exc:
        return Section("distributed_factored", title, MEASURED_COLUMNS,
                       [{"contender": "both", "note": skip_note(exc)}])
    rows = []
    rank0 = run["ranks"][0]["results"]
    for key, label in cases.CONTENDERS:
        r = rank0[key]
        total = [a + b for a, b in zip(_slowest(run, key, "forward_backward_ms"),
                                       _slowest(run, key, "step_ms"))]
        sent = r["factored"]["sent_bytes_per_step"] + r["ddp"]["sent_bytes_per_step"]
        rows.append({
            "key": key, "contender": label,
            "collectives": r["factored"]["collectives_per_step"] + r["ddp"]["calls_per_step"],
            "sent_mib": sent / runner.MiB, **runner.summarize_ms(total),
            "fb_ms": statistics.median(_slowest(run, key, "forward_backward_ms")),
            "opt_ms": statistics.median(_slowest(run, key, "step_ms")),
            "note": ("DDP all-reduces the biases during backward; the factors are gathered in "
                     "optimizer.step" if key == "factored" else "DDP's all-reduce overlaps "
                     "backward"),
        })
    add_ratios(rows, {"vs_dense": "dense"})
    diffs = [r["max_abs_diff_factored_vs_dense"] for r in run["ranks"]]
    notes = [
        f"{_title_model(run)}; lr={run['hyper']['lr']}, weight_decay="
        f"{run['hyper']['weight_decay']}, momentum 0, fp32, MSE loss; one process per rank, "
        f"one thread each; {run['warmup']} warm-up + {run['steps']} timed steps, each after a "
        "barrier; a step's time is the slowest rank's zero_grad + forward + backward + "
        "optimizer.step (time.perf_counter).",
        "Bytes: what each rank passed to the collectives, counted from the tensors (factored: "
        "communication_stats(), metadata included; DDP: counting_allreduce_hook on the buckets).",
        f"Both contenders take DDP's step (the mean of the ranks' gradients); largest parameter "
        f"difference between them after the run: {max(diffs):.2e}.",
        "The factored update multiplies the stacked factors, K = 32 x ranks rows: its GEMM is "
        "ranks times the local weight-gradient GEMM that it replaces.",
    ]
    return Section("distributed_factored", title, MEASURED_COLUMNS, rows, notes)


LAYER_COLUMNS: list[runner.Column] = [
    ("layer", "layer", ""),
    ("path", "factored path", ""),
    ("rows", "rows / rank", "d"),
    ("sent", "factored bytes sent", ",d"),
    ("received", "factored bytes received", ",d"),
    ("dense", "DDP bytes all-reduced", ",d"),
    ("ratio", "DDP / factored (sent)", ".1f"),
]


@register_section("distributed_factored_layers")
def layers_section(ctx: Context) -> Section:
    title = "Data-parallel step: bytes per layer per step, counted (rank 0)"
    if not ctx.wants(headline=False):
        return Section("distributed_factored_layers", title, LAYER_COLUMNS, [])
    try:
        run = _run(ctx)
    except (RuntimeError, OSError) as exc:
        return Section("distributed_factored_layers", title, LAYER_COLUMNS,
                       [{"layer": "all", "path": skip_note(exc)}])
    rank0 = run["ranks"][0]["results"]
    factored, dense = rank0["factored"], rank0["dense"]
    rows = []
    for name, traffic in factored["factored"]["layers"].items():
        d = dense["ddp"]["layers"].get(name)
        rows.append({"layer": name, "path": traffic["path"], "rows": traffic["rows_per_rank"],
                     "sent": traffic["sent_bytes"], "received": traffic["received_bytes"],
                     "dense": d, "ratio": d / traffic["sent_bytes"] if d else None})
    for name, b in factored["ddp"]["layers"].items():
        rows.append({"layer": name, "path": "DDP all-reduce", "sent": b, "received": b,
                     "dense": dense["ddp"]["layers"].get(name)})
    notes = [
        "Sent: the layer's part of the tensor this rank passed to the collective (all-gather: "
        "its D/n and F rows; all-reduce: the gradient); received: of the output (n times the "
        "input for the all-gather). Per step the factored mode also all-gathers "
        f"{factored['factored']['metadata_sent_bytes_per_step']:.0f} bytes of row counts.",
    ]
    return Section("distributed_factored_layers", title, LAYER_COLUMNS, rows, notes)


PROJECTION_COLUMNS: list[runner.Column] = [
    ("gpus", "GPUs", "d"),
    ("link", "link (assumed)", ""),
    ("busbw_gb_s", "bus GB/s (assumed)", ".0f"),
    ("gather_mib", "all-gather MiB / GPU / layer", ".1f"),
    ("gather_ms", "all-gather ms / step", ".3f"),
    ("reduce_mib", "all-reduce MiB / GPU / layer", ".1f"),
    ("reduce_ms", "all-reduce ms / step", ".3f"),
    ("rule", "path the rule takes", ""),
    ("chosen_ms", "factored mode ms / step", ".3f"),
    ("ratio", "× all-reduce (bytes)", ".1f"),
]


@register_section("distributed_factored_projection")
def projection_section(ctx: Context) -> Section:
    title = "Data-parallel step: communication time at NCCL bandwidths (projection, not measured)"
    if not ctx.wants(headline=False):
        return Section("distributed_factored_projection", title, PROJECTION_COLUMNS, [])
    try:
        run = _run(ctx)
    except (RuntimeError, OSError) as exc:
        return Section("distributed_factored_projection", title, PROJECTION_COLUMNS,
                       [{"link": skip_note(exc)}])
    rank0 = run["ranks"][0]["results"]
    layers = rank0["factored"]["factored"]["layers"]
    first = next(iter(layers))
    counted = {"gather_sent": layers[first]["sent_bytes"],
               "dense_buffer": rank0["dense"]["ddp"]["layers"][first]}
    rows = cases.project(counted, len(layers))
    notes = [
        f"From the counted bytes of one {run['width']} x {run['width']} layer at "
        f"{run['world']} ranks (factors sent per rank: {counted['gather_sent']:,} B, "
        f"independent of the number of ranks at a fixed per-rank batch; dense gradient: "
        f"{counted['dense_buffer']:,} B), for the {len(layers)} weights; biases (a few KiB, "
        "through DDP in both) and the row-count metadata are left out.",
        "Bytes on the wire per GPU: ring all-reduce 2(n-1)/n of the buffer, all-gather (n-1)/n "
        "of the gathered output (n times the per-rank input); time = bytes / bus bandwidth, "
        "latency ignored. The bus bandwidths are assumptions (typical nccl-tests busbw on such "
        "systems), not measured: nothing here ran on NCCL or a GPU.",
        "The rule (all-gather while K*n*(d_out + d_in) < d_out*d_in) switches these layers to "
        "the dense all-reduce at n = 64 (32 x 64 x 8192 = 4096^2): there the factored mode "
        "communicates what DDP does, although the all-gather would still move half the bytes.",
        "DDP overlaps its all-reduce with backward; the factored all-gather runs in "
        "optimizer.step, after backward: a projection of communication time, not of step time.",
    ]
    return Section("distributed_factored_projection", title, PROJECTION_COLUMNS, rows, notes)
