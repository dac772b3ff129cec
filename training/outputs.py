"""What a training run writes: the run directory, per-epoch metrics, rank records, TensorBoard
scalars, the console lines, the plots and the closing summary."""
from __future__ import annotations

import csv
import datetime
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from lowrank_kernels import RankTracker
from lowrank_kernels.tracker import agg_figure
from training import checkpoint as ckpt
from training.settings import ConfigError

TIMING_FIELDS = ("epoch_time_s", "eval_time_s", "images_per_s")
SCALAR_FIELDS = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                 "avg_threshold_rank", *TIMING_FIELDS, "dataset")
RUN_MARKERS = ("config.json", "metrics.jsonl", "summary.json", ckpt.CHECKPOINT_DIR)
PLOTS_HINT = "pip install -e '.[plots]' (or pip install matplotlib)"


# ------------------------------------------------------------------------------------ run directory
def default_run_dir(cfg: dict, dataset_name: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{cfg['model']}-{dataset_name}-{stamp}"
    candidate, n = base, 1
    while candidate.exists():
        candidate = base.with_name(f"{base.name}-{n}")
        n += 1
    return candidate


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_MARKERS)


def check_run_dir(run_dir: Path) -> None:
    """ConfigError unless ``run_dir`` is, or can be created as, a directory: checked before any
    data or model is loaded, so a bad ``--out`` costs nothing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a directory")
    for parent in run_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {run_dir}: {parent} is a file, not a directory")
            break


def versions() -> dict:
    import lowrank_kernels
    return {"python": sys.version.split()[0], "torch": str(torch.__version__),
            "lowrank_kernels": str(lowrank_kernels.__version__), "cuda": torch.version.cuda}


def dataset_label(resolved: dict) -> str:
    """What the data were, for titles: CIFAR-10, a CIFAR-10 subset (with its size), or synthetic."""
    if resolved["dataset"] == "synthetic":
        return "SYNTHETIC data, not CIFAR-10"
    sizes = f"{resolved['num_train']:,} train / {resolved['num_test']:,} test images"
    if (resolved["num_train"], resolved["num_test"]) == (50_000, 10_000):
        return f"CIFAR-10 ({sizes})"
    return f"CIFAR-10 subset ({sizes})"


# ------------------------------------------------------------------------------------ records
def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def write_metrics(run_dir: Path, records: list[dict]) -> None:
    """metrics.jsonl and metrics.csv, rewritten atomically (a crash never leaves a torn line)."""
    lines = "".join(json.dumps(ckpt.json_safe(rec)) + "\n" for rec in records)
    ckpt.atomic_write_text(run_dir / "metrics.jsonl", lines)
    layer_columns = []
    for rec in records:
        for layer, measures in (rec.get("layers") or {}).items():
            for measure in measures:
                column = f"{layer}/{measure}"
                if column not in layer_columns:
                    layer_columns.append(column)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*SCALAR_FIELDS, *layer_columns])
    for rec in records:
        flat = {f"{layer}/{m}": v for layer, ms in (rec.get("layers") or {}).items() for m, v in ms.items()}
        row = [rec.get(f) for f in SCALAR_FIELDS] + [flat.get(c) for c in layer_columns]
        writer.writerow(["" if v is None else v for v in row])
    ckpt.atomic_write_text(run_dir / "metrics.csv", buffer.getvalue())


def write_rank_records(run_dir: Path, records: list[dict], rewrite: bool = False) -> None:
    path = run_dir / "ranks.jsonl"
    if rewrite:
        ckpt.atomic_write_text(path, "".join(json.dumps(ckpt.json_safe(r)) + "\n" for r in records))
        return
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(ckpt.json_safe(rec)) + "\n")


def open_tensorboard(run_dir: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    except Exception as err:  # a broken install (protobuf mismatch and the like)
        print(f"TensorBoard logging disabled: {err}", file=sys.stderr)
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)


def log_scalars(tb, record: dict) -> None:
    if tb is None:
        return
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "avg_threshold_rank", "lr"):
        value = record[key]
        if _is_number(value) and np.isfinite(value):
            tb.add_scalar(key, value, record["epoch"])
    tb.flush()


def format_epoch_line(rec: dict, epochs: int, synthetic: bool) -> str:
    def pct(v):
        return "   -  " if v is None else f"{100 * v:5.1f}%"

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    parts = [f"epoch {rec['epoch']:>{len(str(epochs))}}/{epochs}",
             f"lr {num(rec['lr'], '.4g')}",
             f"train loss {num(rec['train_loss'], '.4f')} acc {pct(rec['train_acc'])}",
             f"test loss {num(rec['test_loss'], '.4f')} acc {pct(rec['test_acc'])}",
             f"avg rank {num(rec['avg_threshold_rank'], '.2f')}"]
    if rec.get("epoch_time_s") is not None:
        parts.append(f"{rec['epoch_time_s']:.1f}s")
    line = "  ".join(parts)
    return line + "  [SYNTHETIC DATA]" if synthetic else line


# ------------------------------------------------------------------------------------ plots
def plots_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def curves_figure(records: list[dict], eps: float, layer_count: int):
    """Average rank, accuracy and loss (log scale: one diverging test loss would flatten the
    rest to zero) per epoch."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    epochs = [r["epoch"] for r in records]
    fig = agg_figure(13, 4)
    ax = fig.add_subplot(1, 3, 1)
    ax.plot(epochs, [r["avg_threshold_rank"] for r in records], marker="o", ms=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"average threshold rank (eps={eps:g})")
    ax.set_title(f"rank over {layer_count} layers")
    for panel, (metric, ylabel) in enumerate((("acc", "accuracy"), ("loss", "cross-entropy loss (log scale)")), 2):
        ax = fig.add_subplot(1, 3, panel)
        for split in ("train", "test"):
            key = f"{split}_{metric}"
            ax.plot(epochs, [np.nan if r[key] is None else r[key] for r in records], marker="o", ms=3,
                    label=split)
        if metric == "loss":
            ax.set_yscale("log")
            plain = FuncFormatter(lambda value, _: f"{value:g}")  # 2.2, not 2.2 x 10^0
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel.split(' (')[0]}")
        ax.legend()
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def write_plots(run_dir: Path, tracker: RankTracker, records: list[dict], rank_names: list[str],
                title: str) -> list[Path]:
    """Rank and accuracy curves, singular-value evolution and the effective-rank heat map, each
    titled with ``title`` (the run's settings and its data set)."""
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    written = []

    def save(fig, name):
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = plot_dir / name
        fig.savefig(path, dpi=110)
        written.append(path)

    save(curves_figure(records, tracker.eps, len(rank_names)), "curves.png")
    save(tracker.plot("average_rank", average_over=rank_names), "average_rank.png")
    save(tracker.plot("effective_rank_heatmap"), "effective_rank_heatmap.png")
    if tracker.pairs:
        save(tracker.plot("alignment"), "alignment.png")
    picks = list(dict.fromkeys([rank_names[0], rank_names[len(rank_names) // 2], rank_names[-1]]))
    for layer in picks:
        save(tracker.plot("singular_values", layer=layer), f"singular_values_{layer.replace('.', '_')}.png")
    return written


# ------------------------------------------------------------------------------------ summary
def write_summary(run_dir: Path, status: str, records: list[dict], resolved: dict, saved_cfg: dict,
                  elapsed_s: float) -> dict:
    """summary.json, atomically and last: its presence means the run is finished."""
    final = records[-1]
    trained = [r for r in records if r["epoch"] > 0]
    summary = {
        "status": status,
        "dataset": resolved["dataset"],
        "dataset_note": resolved["dataset_note"],
        "epochs_completed": final["epoch"],
        "final": final,
        "initial_avg_threshold_rank": records[0]["avg_threshold_rank"],
        "best_test_acc": max((r["test_acc"] for r in trained if r["test_acc"] is not None), default=None),
        "train_time_s": sum(r["epoch_time_s"] or 0.0 for r in trained),
        "elapsed_s": elapsed_s,
        "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": saved_cfg,
        "resolved": resolved,
    }
    ckpt.atomic_write_json(run_dir / "summary.json", ckpt.json_safe(summary))
    return summary


def closing_line(records: list[dict], run_dir: Path, synthetic: bool, plots_missing: bool) -> str | None:
    """The run's last line: the rank's fall, the accuracy, where the outputs are, and how to get
    the plots when matplotlib is missing."""
    first, final = records[0]["avg_threshold_rank"], records[-1]["avg_threshold_rank"]
    if first is None or final is None:
        return None
    line = (f"Average threshold rank {first:.2f} -> {final:.2f}; test accuracy "
            f"{100 * (records[-1]['test_acc'] or 0):.1f}%. Outputs in {run_dir}")
    if synthetic:
        line += "  [SYNTHETIC DATA]"
    if plots_missing:
        line += f". No plots: matplotlib is not installed ({PLOTS_HINT})"
    return line
