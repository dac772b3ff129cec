"""The measured rank of every trained layer of one run next to the bound of the theory.

    python training/rank_bound.py RUN_DIR            # writes RUN_DIR/rank_bound.md and .png

Galanti et al., "SGD and Weight Decay Secretly Minimize the Rank of Your Neural Network": with
SGD and L2 decay, W is a window of about log(1/eps)/(mu*lam) past updates, each of rank at most
B*R (R: the positions a layer is applied at per example, H*W of a conv's output), so

    threshold_rank_eps(W) <~ min(d_out, d_in, B * R * log(1/eps) / (mu * lam)).

mu is the run's learning rate and lam the papers' decay, half of PyTorch's weight decay (the
shrink per step is 1 - 2*mu*lam = 1 - lr*wd). The bound is of the steady state of plain SGD
(momentum 0, constant lr); the table says which of these the run had. Where the window term is
at least min(d_out, d_in) the bound is the matrix's full rank and predicts nothing; the table's
``predicts`` column says so for each layer. R is counted from one forward pass of the run's model
at the data's image size (``lowrank_kernels.gradient_rank``); the measured rank is the run's
final record (``summary.json``).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the training package from the repository
    _here = Path(__file__).resolve().parent
    if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == _here:
        sys.path[0] = str(_here.parent)
    else:
        sys.path.insert(0, str(_here.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from typing import Sequence  # noqa: E402

import torch  # noqa: E402

from lowrank_kernels import gradient_rank  # noqa: E402
from lowrank_kernels.tracker import agg_figure  # noqa: E402
from training import models  # noqa: E402
from training.checkpoint import atomic_write_text  # noqa: E402
from training.runtime import model_options  # noqa: E402

IMAGE_SHAPE = (3, 32, 32)  # CIFAR-10 (and the synthetic stand-in)
COLUMNS = ("layer", "d_out", "d_in", "B", "R", "mu", "lam", "eps", "window", "bound", "measured",
           "predicts")


class RunError(ValueError):
    """The directory is not a finished train.py run."""


def read_run(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise RunError(f"{run_dir} has no summary.json: not a finished train.py run directory")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise RunError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(summary.get("config"), dict) or not isinstance(summary.get("final"), dict):
        raise RunError(f"{path} lacks the 'config' or 'final' object of a train.py summary")
    return summary


def rows_per_example(cfg: dict) -> dict[str, int]:
    """R of every Linear / Conv2d weight of the run's model, from one forward pass."""
    model = models.build_model(cfg["model"], **model_options(cfg))
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2, *IMAGE_SHAPE, generator=generator)
    targets = torch.randint(0, models.NUM_CLASSES, (2,), generator=generator)
    return {row["layer"]: row["rows_per_example"] for row in gradient_rank(model, inputs, targets)}


def bound_rows(summary: dict) -> list[dict]:
    """One row per trained weight matrix of the run with a final threshold rank."""
    cfg = summary["config"]
    mu, lam, eps = float(cfg["lr"]), float(cfg["weight_decay"]) / 2, float(cfg.get("eps", 1e-3))
    batch = int(cfg["batch_size"])
    shapes = {}
    model = models.build_model(cfg["model"], **model_options(cfg))
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            shapes[name] = (p.shape[0], p[0].numel())
    r_of = rows_per_example(cfg)
    rows = []
    for layer, measures in summary["final"].get("layers", {}).items():
        if layer not in r_of or layer not in shapes or measures.get("threshold_rank") is None:
            continue
        d_out, d_in = shapes[layer]
        r = r_of[layer]
        window = batch * r * math.log(1 / eps) / (mu * lam) if mu * lam > 0 else math.inf
        full = min(d_out, d_in)
        rows.append(dict(layer=layer, d_out=d_out, d_in=d_in, B=batch, R=r, mu=mu, lam=lam, eps=eps,
                         window=window, bound=min(full, window), measured=int(measures["threshold_rank"]),
                         predicts=window < full))
    if not rows:
        raise RunError("the run's final record has no threshold rank of a Linear or Conv2d weight")
    return rows


def _cell(key: str, value) -> str:
    if key == "predicts":
        return "yes" if value else "no (bound = full rank)"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.3g}" if key in ("mu", "lam", "eps") else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(k, row[k]) for k in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def figure(rows: Sequence[dict], title: str):
    """Measured threshold rank, min(d_out, d_in) and the window term per layer, log scale."""
    fig = agg_figure(max(7.0, 0.38 * len(rows) + 2), 4.8)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(rows)))
    ax.bar(x, [r["measured"] for r in rows], color="tab:blue", alpha=0.8, label="measured threshold rank")
    ax.plot(x, [min(r["d_out"], r["d_in"]) for r in rows], "k_", ms=14, mew=2, label="min(d_out, d_in)")
    finite = [(i, r["window"]) for i, r in zip(x, rows) if math.isfinite(r["window"])]
    if finite:
        ax.plot(*zip(*finite), "rx", ms=7, label="B·R·log(1/ε)/(μλ)")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([r["layer"].removesuffix(".weight") for r in rows], rotation=70, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("rank (log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def describe(summary: dict) -> str:
    cfg = summary["config"]
    return (f"{cfg['model']} (width {cfg.get('width')}) on {summary.get('dataset', '?')}, "
            f"batch {cfg['batch_size']}, lr {cfg['lr']:g}, weight decay {cfg['weight_decay']:g}, "
            f"momentum {cfg.get('momentum')}, {cfg.get('schedule')} lr, "
            f"{summary.get('epochs_completed')} epochs")


def memory_note(summary: dict) -> str:
    """The run's length in steps against the memory window log(1/eps)/(mu*lam) of the bound."""
    cfg = summary["config"]
    mu_lam = float(cfg["lr"]) * float(cfg["weight_decay"]) / 2
    per_epoch = (summary.get("resolved") or {}).get("steps_per_epoch")
    steps = per_epoch * summary["epochs_completed"] if per_epoch and summary.get("epochs_completed") else None
    if mu_lam == 0:
        return "No weight decay: the window is infinite and the bound is min(d_out, d_in)."
    window = math.log(1 / float(cfg.get("eps", 1e-3))) / mu_lam
    text = f"Memory window log(1/eps)/(mu*lam) = {window:,.0f} steps"
    if steps:
        text += (f"; the run took {steps:,} steps, so the decay had "
                 + ("time to reach its steady state." if steps >= window else
                    f"not yet forgotten the initialisation ({steps / window:.2f} windows)."))
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rank_bound.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished train.py run directory")
    parser.add_argument("--out", help="output directory (default: the run directory)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        summary = read_run(run_dir)
        rows = bound_rows(summary)
    except (RunError, ValueError) as err:
        parser.error(str(err))
    out = Path(args.out) if args.out else run_dir
    out.mkdir(parents=True, exist_ok=True)
    title = describe(summary)
    text = (f"# Measured rank against the bound\n\n{title}. {memory_note(summary)}\n\n"
            f"{markdown_table(rows)}\n")
    atomic_write_text(out / "rank_bound.md", text)
    written = [out / "rank_bound.md"]
    try:
        fig = figure(rows, title)
    except ImportError:
        print("matplotlib is missing: no plot (pip install -e '.[plots]')")
    else:
        fig.savefig(out / "rank_bound.png", dpi=110)
        written.append(out / "rank_bound.png")
    print(markdown_table(rows))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
