"""The pictures of a hyper-parameter sweep, after Galanti et al., "SGD and Weight Decay Secretly
Minimize the Rank of Your Neural Network": Fig. 1 (average rank at the end of training over pairs
of hyper-parameters) and Figs. 2-4 (average rank and accuracy against one hyper-parameter).

Every function takes the sweep's table: a list of flat dicts, one per finished run, holding at
least ``lr``, ``weight_decay``, ``batch_size`` and the final ``avg_threshold_rank``,
``train_acc`` and ``test_acc`` (``training/sweep.py`` builds it from the runs' ``summary.json``).
Grid cells without a finished run are grey (labelled "diverged" when the run's ``status`` says
so); nothing is interpolated.

* ``heatmap_figure(rows, x, y)``: the metric over the (x, y) grid, one panel per value of the
  third hyper-parameter (a slice each, never an average over it: averaging ranks over batch
  sizes would mix runs whose rank bounds differ), all panels on one colour scale.
* ``curves_figure(rows)``: one row of panels per hyper-parameter that takes two values or more:
  average rank (left) and train/test accuracy (right) against it, one line per combination of
  the other hyper-parameters.
* ``history_figure(histories, metric, rows)``: a per-epoch average (threshold rank, normalised
  effective rank, alignment of consecutive layers) against the epoch, one line per run, coloured
  by weight decay when ``rows`` are given (Yunis et al., "Rank Minimization, Alignment and Weight
  Decay in Neural Networks", Figs. 2-3, plot these against the training step for several decays).
* ``plot_sweep(rows, histories, out_dir)``: all of the above as PNG files; returns their paths.

Figures are drawn on matplotlib's Agg canvas without pyplot, so no display is needed.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lowrank_kernels.tracker import agg_figure as _new_figure
from lowrank_kernels.tracker import colormap

# (table key, axis label, file-name tag), in the order of the sweep's grid.
HYPERPARAMETERS = (
    ("lr", "learning rate", "lr"),
    ("weight_decay", "weight decay", "wd"),
    ("batch_size", "batch size", "bs"),
)
HP_KEYS = tuple(key for key, _, _ in HYPERPARAMETERS)
HP_LABEL = {key: label for key, label, _ in HYPERPARAMETERS}
HP_TAG = {key: tag for key, _, tag in HYPERPARAMETERS}

METRIC_LABEL = {
    "avg_threshold_rank": "average threshold rank",
    "avg_normalized_effective_rank": "average normalised effective rank",
    "avg_alignment": "average alignment of consecutive layers",
    "train_acc": "train accuracy",
    "test_acc": "test accuracy",
    "train_loss": "train loss",
    "test_loss": "test loss",
}
MAX_PANELS = 6   # heat-map panels per figure (values of the third hyper-parameter)
MAX_LINES = 8    # lines per curve panel (combinations of the other hyper-parameters)
# Per-epoch averages drawn against the epoch, and their file names.
HISTORY_FILES = {"avg_threshold_rank": "rank_history.png",
                 "avg_normalized_effective_rank": "effective_rank_history.png",
                 "avg_alignment": "alignment_history.png"}
STALE_PATTERNS = ("heatmap_rank_*.png", "curves.png", *HISTORY_FILES.values())  # plot_sweep's files


def layer_averages(record: dict, rank_layers: Sequence[str] | None = None) -> dict:
    """From one per-epoch record's ``layers`` ({layer: {measure: value}}): the mean normalised
    effective rank over ``rank_layers`` (every layer when None) and the mean alignment over the
    layers that have one (those feeding the next tracked layer). None where nothing is recorded."""
    layers = record.get("layers") or {}
    chosen = [layers[n] for n in rank_layers if n in layers] if rank_layers else list(layers.values())

    def mean(values):
        values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        return float(np.mean(values)) if values else None

    return {"avg_normalized_effective_rank": mean(m.get("normalized_effective_rank") for m in chosen),
            "avg_alignment": mean(m.get("alignment") for m in layers.values())}


def format_value(value: Any) -> str:
    """A hyper-parameter value as it appears on axes and in run names: 0.05, 0.0005, 1e-05, 128."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    return format(float(value), "g")


def grid_values(rows: Sequence[dict], key: str) -> list:
    """The distinct values of ``key`` in the table, sorted."""
    return sorted({row[key] for row in rows if row.get(key) is not None})


def varying(rows: Sequence[dict]) -> list[str]:
    """The hyper-parameters that take two values or more in the table."""
    return [key for key in HP_KEYS if len(grid_values(rows, key)) > 1]


def _metric(row: dict, metric: str) -> float:
    value = row.get(metric)
    if value is None:
        return math.nan
    value = float(value)
    return value if math.isfinite(value) else math.nan


def _cell_mean(rows: Sequence[dict], metric: str, **fixed) -> float:
    """The metric of the run at ``fixed`` hyper-parameters (mean over repeats such as seeds)."""
    values = [_metric(r, metric) for r in rows if all(r.get(k) == v for k, v in fixed.items())]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _diverged(rows: Sequence[dict], **fixed) -> bool:
    return any(r.get("status") == "diverged" for r in rows
               if all(r.get(k) == v for k, v in fixed.items()))


def _evenly_spaced(items: list, count: int) -> list:
    if len(items) <= count:
        return items
    picks = np.unique(np.linspace(0, len(items) - 1, count).round().astype(int))
    return [items[i] for i in picks]


def _colormap(name: str):
    """The tracker's colormap lookup, with grey for cells without a finished run."""
    cmap = colormap(name)
    if hasattr(cmap, "with_extremes"):  # matplotlib >= 3.4
        return cmap.with_extremes(bad="0.85")
    cmap = cmap.copy()
    cmap.set_bad("0.85")
    return cmap


def _check_rows(rows: Sequence[dict], *keys: str) -> None:
    if not rows:
        raise ValueError("the sweep table is empty: no finished run to plot")
    for key in keys:
        if key not in HP_KEYS and key not in METRIC_LABEL:
            raise ValueError(f"unknown column {key!r}; hyper-parameters: {list(HP_KEYS)}, "
                             f"metrics: {list(METRIC_LABEL)}")
        if all(row.get(key) is None for row in rows):
            raise ValueError(f"no run in the table has a value for {key!r}")


# ------------------------------------------------------------------------------------ Fig. 1
def heatmap_figure(rows: Sequence[dict], x: str, y: str, metric: str = "avg_threshold_rank",
                   max_panels: int = MAX_PANELS):
    """The final ``metric`` over the grid of hyper-parameters ``x`` (columns) and ``y`` (rows),
    each cell annotated with its value; one panel per value of the third hyper-parameter (at most
    ``max_panels``, evenly spaced over its values, the figure title says when some are left out).
    """
    if x == y:
        raise ValueError(f"a heat map needs two different hyper-parameters, got {x!r} twice")
    _check_rows(rows, x, y, metric)
    (third,) = [k for k in HP_KEYS if k not in (x, y)]
    xs, ys = grid_values(rows, x), grid_values(rows, y)
    all_slices = grid_values(rows, third) or [None]
    slices = _evenly_spaced(all_slices, max_panels)
    grids = []
    for value in slices:
        fixed = {} if value is None else {third: value}
        grids.append(np.array([[_cell_mean(rows, metric, **{x: xv, y: yv}, **fixed) for xv in xs]
                               for yv in ys]))
    finite = np.concatenate([g[np.isfinite(g)] for g in grids])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5

    panel_w = max(2.8, 0.9 * len(xs) + 1.6)
    panel_h = max(2.4, 0.6 * len(ys) + 1.4)
    fig = _new_figure(panel_w * len(slices) + 1.2, panel_h + 0.8, layout="constrained")
    axes = fig.subplots(1, len(slices), squeeze=False, sharey=True)[0]
    cmap = _colormap("viridis")
    image = None
    for ax, value, grid in zip(axes, slices, grids):
        image = ax.imshow(np.ma.masked_invalid(grid), origin="lower", cmap=cmap, vmin=vmin,
                          vmax=vmax, aspect="auto", interpolation="nearest")
        fixed = {} if value is None else {third: value}
        for (i, j), cell in np.ndenumerate(grid):
            if math.isfinite(cell):
                shade = (cell - vmin) / (vmax - vmin)
                ax.text(j, i, _format_metric(cell, metric), ha="center", va="center", fontsize=8,
                        color="black" if shade > 0.55 else "white")
            elif _diverged(rows, **{x: xs[j], y: ys[i]}, **fixed):
                ax.text(j, i, "diverged", ha="center", va="center", fontsize=7, color="0.3")
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels([format_value(v) for v in xs], rotation=45 if len(xs) > 4 else 0)
        ax.set_yticks(range(len(ys)))
        ax.set_yticklabels([format_value(v) for v in ys])
        ax.set_xlabel(HP_LABEL[x])
        if ax is axes[0]:
            ax.set_ylabel(HP_LABEL[y])
        if value is not None:
            ax.set_title(f"{HP_LABEL[third]} = {format_value(value)}", fontsize=9)
    fig.colorbar(image, ax=list(axes), label=METRIC_LABEL.get(metric, metric), shrink=0.9)
    title = f"final {METRIC_LABEL.get(metric, metric)} over {HP_LABEL[x]} x {HP_LABEL[y]}"
    if len(slices) < len(all_slices):
        title += f" ({len(slices)} of {len(all_slices)} {HP_LABEL[third]} values shown)"
    fig.suptitle(title, fontsize=10)
    return fig


def _format_metric(value: float, metric: str) -> str:
    if metric.endswith("_acc"):
        return f"{value:.2f}" if value <= 1 else f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


# ------------------------------------------------------------------------------- Figs. 2-4
def curves_figure(rows: Sequence[dict], max_lines: int = MAX_LINES):
    """Average rank (left) and train/test accuracy (right, train solid, test dashed) against each
    hyper-parameter that varies, one row of panels per hyper-parameter and one line (one colour)
    per combination of the other hyper-parameters. An axis is logarithmic when every value is
    positive and they span a factor of four or more; ticks sit at the grid's values."""
    _check_rows(rows, "avg_threshold_rank")
    keys = varying(rows)
    if not keys:
        raise ValueError("every run has the same (lr, weight_decay, batch_size): there is no "
                         "hyper-parameter to draw curves against")
    fig = _new_figure(11, 3.3 * len(keys))
    axes = fig.subplots(len(keys), 2, squeeze=False)
    colours = _colormap("tab10")
    for row_axes, key in zip(axes, keys):
        rank_ax, acc_ax = row_axes
        others = [k for k in HP_KEYS if k != key]
        combos = sorted({tuple(r[k] for k in others) for r in rows})
        shown = _evenly_spaced(combos, max_lines)
        xs = grid_values(rows, key)
        for n, combo in enumerate(shown):
            fixed = dict(zip(others, combo))
            label = ", ".join(f"{HP_TAG[k]}={format_value(v)}" for k, v in fixed.items())
            colour = colours(n % 10)
            # Missing runs are skipped, so a line joins the runs that exist.
            rank_ax.plot(*_present(xs, rows, "avg_threshold_rank", key, fixed), marker="o",
                         color=colour, label=label)
            for metric, style in (("train_acc", "-"), ("test_acc", "--")):
                points = _present(xs, rows, metric, key, fixed)
                if points[0]:
                    acc_ax.plot(*points, marker="o", ls=style, color=colour)
        for ax in row_axes:
            ax.set_xlabel(HP_LABEL[key])
            if _log_axis(xs):
                ax.set_xscale("log")
            ax.set_xticks(xs)
            ax.set_xticklabels([format_value(v) for v in xs], rotation=45 if len(xs) > 5 else 0)
            ax.minorticks_off()
            ax.grid(alpha=0.3)
        rank_ax.set_ylabel("average threshold rank")
        acc_ax.set_ylabel("accuracy (train solid, test dashed)")
        title = f"against {HP_LABEL[key]}"
        if len(shown) < len(combos):
            title += f" ({len(shown)} of {len(combos)} combinations shown)"
        rank_ax.set_title(title, fontsize=9)
        rank_ax.legend(fontsize=7, title=" ".join(HP_TAG[k] for k in others), title_fontsize=7)
    fig.tight_layout()
    return fig


def _present(xs: Sequence, rows: Sequence[dict], metric: str, key: str, fixed: dict):
    points = [(v, _cell_mean(rows, metric, **{key: v}, **fixed)) for v in xs]
    points = [(v, m) for v, m in points if not math.isnan(m)]
    return [v for v, _ in points], [m for _, m in points]


def _log_axis(values: Sequence) -> bool:
    """Log scale for grids spread over a factor of four or more (learning rates, batch sizes
    that double); any zero (weight decay 0) keeps the axis linear."""
    positive = [float(v) for v in values if float(v) > 0]
    return len(positive) == len(values) and len(values) > 1 and max(positive) / min(positive) >= 4


# ------------------------------------------------------------------------ rank over training
def history_figure(histories: dict[str, Sequence[dict]], metric: str = "avg_threshold_rank",
                   rows: Sequence[dict] | None = None, max_lines: int = 24):
    """``metric`` against the epoch, one line per run (``histories``: run name -> its per-epoch
    records, as in the run's ``metrics.jsonl``, holding ``metric``). With the sweep's ``rows``
    the lines are coloured by the run's weight decay, one line style per (lr, batch size)."""
    if metric not in METRIC_LABEL:
        raise ValueError(f"unknown metric {metric!r}; choose from {list(METRIC_LABEL)}")
    series = {name: [(rec["epoch"], rec[metric]) for rec in records
                     if rec.get(metric) is not None and rec.get("epoch") is not None]
              for name, records in histories.items()}
    series = {name: points for name, points in series.items() if points}
    if not series:
        raise ValueError(f"no run has per-epoch {metric} records to plot")
    names = _evenly_spaced(sorted(series), max_lines)
    by_run = {r["run"]: r for r in rows or () if "run" in r}
    decays = grid_values([by_run[n] for n in names if n in by_run], "weight_decay")
    others = sorted({(by_run[n]["lr"], by_run[n]["batch_size"]) for n in names if n in by_run})
    styles = ("-", "--", ":", "-.")
    fig = _new_figure(8, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    colours = _colormap("viridis")
    for n, name in enumerate(names):
        epochs, values = zip(*sorted(series[name]))
        row = by_run.get(name)
        if row is not None and decays:
            colour = colours(decays.index(row["weight_decay"]) / max(len(decays) - 1, 1))
            style = styles[others.index((row["lr"], row["batch_size"])) % len(styles)]
            label = (f"wd {format_value(row['weight_decay'])}, lr {format_value(row['lr'])}, "
                     f"batch {row['batch_size']}")
        else:
            colour, style, label = colours(n / max(len(names) - 1, 1)), "-", name
        ax.plot(epochs, values, style, marker="o" if len(epochs) == 1 else None, ms=3,
                color=colour, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(METRIC_LABEL[metric])
    title = f"{METRIC_LABEL[metric]} during training"
    if len(names) < len(series):
        title += f" ({len(names)} of {len(series)} runs shown)"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2 if len(names) > 8 else 1, loc="best")
    fig.tight_layout()
    return fig


def rank_history_figure(histories: dict[str, Sequence[dict]], max_lines: int = 24):
    """Average threshold rank against the epoch, one line per run."""
    return history_figure(histories, "avg_threshold_rank", max_lines=max_lines)


# ------------------------------------------------------------------------------------ files
def heatmap_pairs(rows: Sequence[dict]) -> list[tuple[str, str]]:
    """The (x, y) pairs worth a heat map: both in grid order, at least one of them varying."""
    keys = varying(rows)
    return [(x, y) for x, y in itertools.combinations(HP_KEYS, 2) if x in keys or y in keys]


def plot_sweep(rows: Sequence[dict], histories: dict[str, Sequence[dict]] | None,
               out_dir: str | Path, dpi: int = 120) -> list[Path]:
    """Write the sweep's figures into ``out_dir`` and return their paths:

    * ``heatmap_rank_<x>_<y>.png`` for each pair of hyper-parameters with one varying;
    * ``curves.png`` when a hyper-parameter varies;
    * ``rank_history.png``, ``effective_rank_history.png``, ``alignment_history.png`` when
      ``histories`` hold those per-epoch averages.

    Files of those names left from an earlier call are removed first.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_rows(rows, "avg_threshold_rank")
    # Pictures of an earlier state of the sweep that this one would not redraw must not linger.
    for pattern in STALE_PATTERNS:
        for old in out_dir.glob(pattern):
            old.unlink()
    written = []

    def save(fig, name):
        path = out_dir / name
        fig.savefig(path, dpi=dpi)
        written.append(path)

    for x, y in heatmap_pairs(rows):
        save(heatmap_figure(rows, x, y), f"heatmap_rank_{HP_TAG[x]}_{HP_TAG[y]}.png")
    if varying(rows):
        save(curves_figure(rows), "curves.png")
    for metric, name in HISTORY_FILES.items():
        if histories and any(any(r.get(metric) is not None for r in h) for h in histories.values()):
            save(history_figure(histories, metric, rows), name)
    return written
