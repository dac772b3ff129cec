"""Train a CIFAR-10 model with DecaySGD (or torch.optim.SGD) and track the rank of its weights.

    python training/train.py --model resnet18 --data PATH --epochs 200 --batch-size 128 \\
        --lr 0.1 --momentum 0.9 --weight-decay 5e-4
    python training/train.py --config training/configs/quickstart.toml     # short CPU run
    torchrun --nproc_per_node 4 training/train.py --model resnet18 ...      # several GPUs

Every flag can also come from ``--config FILE`` (JSON or TOML, keys = flag names with dashes or
underscores); flags on the command line win over the file. A run directory (``--out``, default
``runs/<model>-<dataset>-<time>``) receives:

* ``config.json``: every setting, plus ``resolved`` (data set actually used, device, layer set).
* ``metrics.jsonl`` / ``metrics.csv``: one record per epoch (epoch 0 = the initial model, with no
  training figures): ``epoch, step, lr, train_loss, train_acc, test_loss, test_acc,
  avg_threshold_rank, epoch_time_s, eval_time_s, images_per_s, dataset`` and ``layers``
  (``{layer: {measure: value}}``; flattened to ``layer/measure`` columns in the CSV).
* ``ranks.jsonl``: every RankTracker record (every ``--track-every`` steps and every epoch end).
* ``checkpoints/epoch_NNNN.pt``: written atomically every ``--checkpoint-every`` epochs and at
  the end; ``--resume auto`` (or ``--resume PATH``) continues exactly where one left off.
* ``plots/``: rank and accuracy curves, singular-value evolution, effective-rank heat map.
* ``tensorboard/``: scalars, when the tensorboard package is installed.
* ``summary.json``: written last, atomically, when the run ends; its presence means "finished".

When no CIFAR-10 directory is given or found, the synthetic stand-in is used and every output
says so (``dataset: "synthetic"``). Average threshold rank: the mean, over the model's rank layer
set (``training.models.rank_layers``), of #{i: s_i / ||W||_F > eps}, as in Galanti et al.,
"SGD and Weight Decay Secretly Minimize the Rank of Your Neural Network".
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable, and keep the
    # training/ folder itself off sys.path so its modules (data, models) shadow nothing.
    _here = Path(__file__).resolve().parent
    if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == _here:
        sys.path[0] = str(_here.parent)
    else:
        sys.path.insert(0, str(_here.parent))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lowrank_kernels import DecaySGD, RankTracker  # noqa: E402
from training import checkpoint as ckpt  # noqa: E402
from training import data as data_mod  # noqa: E402
from training import models  # noqa: E402

PAPER_MILESTONES = [60, 100, 200]  # Galanti et al.'s code: lr x 0.2 at these epochs
PAPER_GAMMA = 0.2
TIMING_FIELDS = ("epoch_time_s", "eval_time_s", "images_per_s")
SCALAR_FIELDS = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                 "avg_threshold_rank", *TIMING_FIELDS, "dataset")
# Settings a resumed run may have differently from its checkpoint (they change neither the model
# nor the data order); every other setting must stay the same. Those of the invocation always take
# the current command line's value (or default); the others keep the checkpoint's unless given.
INVOCATION_SETTINGS = {"quiet", "plots", "device", "threads", "compile", "out", "resume", "config"}
RESUME_CHANGEABLE = INVOCATION_SETTINGS | {"epochs", "checkpoint_every", "keep_checkpoints", "data",
                                           "eval_batch_size", "track_every", "backend", "model_module"}
NOT_SAVED = ("config", "resume")


class ConfigError(ValueError):
    """A bad flag, config file or combination of settings; the message says which."""


# ------------------------------------------------------------------------------------ arguments
def build_parser(with_defaults: bool = True) -> argparse.ArgumentParser:
    """The command line. ``with_defaults=False`` gives the same parser with every default
    suppressed, to tell which settings were given explicitly."""
    parser = argparse.ArgumentParser(
        prog="train.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter if with_defaults else argparse.HelpFormatter,
        argument_default=None if with_defaults else argparse.SUPPRESS)

    def add(group, *flags, default=None, **kw):
        if with_defaults:
            kw["default"] = default
        group.add_argument(*flags, **kw)

    g = parser.add_argument_group("model")
    add(g, "--model", default="resnet18", help="registered model: resnet18, vgg16_bn, mlp, or one added "
        "with training.models.register_model")
    add(g, "--depth", type=int, help="hidden layers (mlp; default 10)")
    add(g, "--width", type=int, help="hidden width (mlp; default 100) or first-stage channels "
        "(resnet18, vgg16_bn; default 64)")
    add(g, "--batchnorm", action=argparse.BooleanOptionalAction, help="BatchNorm after each hidden layer "
        "(mlp; default on)")
    add(g, "--model-module", help="Python module to import first, e.g. one that registers your models")

    g = parser.add_argument_group("data")
    add(g, "--data", help=f"CIFAR-10 python-batch directory (default: ${data_mod.ENV_VAR}, then "
        "./data/cifar-10-batches-py and the shared subset beside the repository)")
    add(g, "--dataset", default="auto", choices=data_mod.DATASET_KINDS,
        help="auto: CIFAR-10 when found, else synthetic (announced)")
    add(g, "--train-subset", type=int, help="use the first N training images")
    add(g, "--test-subset", type=int, help="use the first N test images")
    add(g, "--augment", default=True, action=argparse.BooleanOptionalAction,
        help="random crop (padding 4) and horizontal flip, on the device")
    add(g, "--eval-batch-size", type=int, default=500)

    g = parser.add_argument_group("optimization")
    add(g, "--epochs", type=int, default=200)
    add(g, "--batch-size", type=int, default=128, help="global batch size (split across processes)")
    add(g, "--lr", type=float, default=0.1)
    add(g, "--momentum", type=float, default=0.9)
    add(g, "--weight-decay", type=float, default=5e-4,
        help="torch convention: adds wd*W to the gradient (the papers' lambda is wd/2)")
    add(g, "--nesterov", default=False, action="store_true")
    add(g, "--optimizer", default="decaysgd", choices=("decaysgd", "sgd"),
        help="DecaySGD (fused) or torch.optim.SGD as the baseline")
    add(g, "--factored", default=False, action="store_true", help="DecaySGD factored mode")
    add(g, "--backend", default="auto", choices=("auto", "torch", "triton", "cuda"), help="DecaySGD backend")
    add(g, "--schedule", default="multistep", choices=("constant", "multistep", "cosine"))
    add(g, "--milestones", type=int, nargs="+", default=list(PAPER_MILESTONES),
        help="multistep: epochs after which the lr is multiplied by --gamma")
    add(g, "--gamma", type=float, default=PAPER_GAMMA)
    add(g, "--warmup-epochs", type=float, default=0.0, help="linear warm-up from lr/steps to lr")

    g = parser.add_argument_group("rank tracking")
    add(g, "--track-every", type=int, default=0, help="also record ranks every N optimizer steps (0: epoch ends only)")
    add(g, "--eps", type=float, default=1e-3, help="threshold rank: #{s_i / ||W||_F > eps}")
    add(g, "--spectra", default="auto", choices=("auto", "exact", "randomized"),
        help="RankTracker method (auto: exact on the CPU and for small matrices)")

    g = parser.add_argument_group("practical")
    add(g, "--amp", default="none", choices=("none", "bf16"), help="autocast mixed precision")
    add(g, "--channels-last", default=False, action="store_true")
    add(g, "--compile", default=False, action="store_true", help="torch.compile the model")
    add(g, "--sync-bn", default=False, action="store_true",
        help="under torchrun: BatchNorm statistics over the global batch (CUDA only)")
    add(g, "--seed", type=int, default=0)
    add(g, "--deterministic", default=False, action="store_true", help="deterministic algorithms only")
    add(g, "--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add(g, "--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 is fastest for "
        "small models on a busy machine)")
    add(g, "--checkpoint-every", type=int, default=1, help="epochs between checkpoints (0: only the last)")
    add(g, "--keep-checkpoints", type=int, default=1, help="newest checkpoints kept (0: all)")
    add(g, "--resume", nargs="?", const="auto", metavar="PATH|auto",
        help="continue from a checkpoint file or run directory; 'auto': from --out's latest "
             "checkpoint if any (a finished run is left as it is), else start there")
    add(g, "--out", help="run directory (default runs/<model>-<dataset>-<time>)")
    add(g, "--plots", default=True, action=argparse.BooleanOptionalAction, help="write plots at the end")
    add(g, "--quiet", default=False, action="store_true", help="no progress output")
    add(g, "--config", help="JSON or TOML file of settings (keys: flag names); flags override it")
    return parser


def _option_table(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.Action, bool]]:
    """Config-file key -> (action, negated): 'batch-size', 'batch_size', 'no-augment', ..."""
    table = {}
    for action in parser._actions:
        for option in action.option_strings:
            if not option.startswith("--") or option == "--help":
                continue
            key = option[2:]
            negated = isinstance(action, argparse.BooleanOptionalAction) and key.startswith("no-")
            for spelling in (key, key.replace("-", "_")):
                table[spelling] = (action, negated)
    return table


def _config_value(path: str, key: str, value, action: argparse.Action, negated: bool):
    where = f"config file {path}: {key!r}"
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return (not value) if negated else value
    if value is None:
        return None
    if action.nargs in ("+", "*"):
        if not isinstance(value, list):
            value = [value]
        items = value
    else:
        if isinstance(value, (list, dict)):
            raise ConfigError(f"{where} must be a single value, got {value!r}")
        items = [value]
    converted = []
    for item in items:
        if action.type is int:
            integral = isinstance(item, int) or (isinstance(item, str) and item.strip().lstrip("-").isdigit())
            if isinstance(item, bool) or not integral:
                raise ConfigError(f"{where} must be an integer, got {item!r}")
            item = int(item)
        elif action.type is float:
            if isinstance(item, bool):
                raise ConfigError(f"{where} must be a number, got {item!r}")
            try:
                item = float(item)
            except (TypeError, ValueError):
                raise ConfigError(f"{where} must be a number, got {item!r}") from None
        elif not isinstance(item, str):
            raise ConfigError(f"{where} must be a string, got {item!r}")
        if action.choices is not None and item not in action.choices:
            raise ConfigError(f"{where} must be one of {list(action.choices)}, got {item!r}")
        converted.append(item)
    return converted if action.nargs in ("+", "*") else converted[0]


def read_config_file(path: str | os.PathLike, parser: argparse.ArgumentParser | None = None) -> dict:
    """Settings from a JSON or TOML file, keyed by destination (``batch_size``), validated."""
    parser = parser or build_parser()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python < 3.11
                try:
                    import tomli as tomllib
                except ImportError:
                    raise ConfigError(f"reading {path} needs Python >= 3.11 (tomllib) or the tomli "
                                      "package; or write the config as JSON") from None
            raw = tomllib.loads(text)
        else:
            raw = json.loads(text)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"config file {path} cannot be parsed ({type(err).__name__}: {err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a table/object of settings, got {type(raw).__name__}")
    raw.pop("resolved", None)  # the run description that train.py adds to config.json
    table = _option_table(parser)
    settings = {}
    for key, value in raw.items():
        if key not in table or key in ("config",):
            valid = sorted({k for k in table if "_" not in k and not k.startswith("no-")} - {"config"})
            raise ConfigError(f"config file {path}: unknown setting {key!r}; valid: {', '.join(valid)}")
        action, negated = table[key]
        settings[action.dest] = _config_value(str(path), key, value, action, negated)
    return settings


def parse_settings(argv: list[str] | None = None) -> tuple[dict, set[str]]:
    """(settings, names given explicitly on the command line or in the config file)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    explicit = set(vars(build_parser(with_defaults=False).parse_args(argv)))
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config_path = pre.parse_known_args(argv)[0].config
    if config_path:
        from_file = read_config_file(config_path, parser)
        parser.set_defaults(**from_file)
        explicit |= set(from_file)
    settings = vars(parser.parse_args(argv))
    return settings, explicit


def validate(cfg: dict) -> None:
    def positive(name, allow_zero=False, kind=int):
        value = cfg[name]
        if value is None:
            return
        low_ok = value >= 0 if allow_zero else value > 0
        if not low_ok or (kind is int and not isinstance(value, int)):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"--{name.replace('_', '-')} must be {bound}, got {value!r}")

    for name in ("epochs", "batch_size", "eval_batch_size", "train_subset", "test_subset", "depth", "width",
                 "threads"):
        positive(name)
    for name in ("track_every", "checkpoint_every", "keep_checkpoints"):
        positive(name, allow_zero=True)
    for name in ("lr", "momentum", "weight_decay", "eps", "warmup_epochs"):
        value = cfg[name]
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value!r}")
    if not (math.isfinite(cfg["gamma"]) and cfg["gamma"] > 0):
        raise ConfigError(f"--gamma must be > 0, got {cfg['gamma']!r}")
    if cfg["nesterov"] and cfg["momentum"] <= 0:
        raise ConfigError("--nesterov needs a momentum > 0")
    if cfg["factored"] and cfg["optimizer"] != "decaysgd":
        raise ConfigError("--factored is a DecaySGD mode; it does not apply to --optimizer sgd")
    milestones = cfg["milestones"] or []
    if any(m < 1 for m in milestones) or list(milestones) != sorted(set(milestones)):
        raise ConfigError(f"--milestones must be increasing positive epochs, got {milestones}")
    if cfg["warmup_epochs"] >= cfg["epochs"] and cfg["warmup_epochs"] > 0:
        raise ConfigError(f"--warmup-epochs {cfg['warmup_epochs']} must be shorter than --epochs {cfg['epochs']}")


# ------------------------------------------------------------------------------------ set-up
@dataclass
class Distributed:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_distributed(device_flag: str) -> tuple[Distributed, torch.device]:
    """Join the process group that torchrun describes through WORLD_SIZE/RANK/LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), resolve_device(device_flag)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_flag == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = resolve_device(device_flag)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        initialized_here = True
    return Distributed(dist.get_world_size(), dist.get_rank(), local_rank, initialized_here), device


def resolve_device(flag: str) -> torch.device:
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(flag)
    except RuntimeError as err:
        raise ConfigError(f"--device {flag!r} is not a device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {flag}: CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_determinism(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        # cuBLAS needs this before its first use to give reproducible results.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic


def lr_factor_fn(cfg: dict, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step ``step`` (0-based): linear warm-up over
    ``warmup_epochs``, then constant, multistep (x gamma once each milestone epoch is complete,
    as MultiStepLR stepped per epoch) or cosine to zero at the last step."""
    total = cfg["epochs"] * steps_per_epoch
    warmup = int(round(cfg["warmup_epochs"] * steps_per_epoch))
    schedule, milestones, gamma = cfg["schedule"], list(cfg["milestones"] or []), cfg["gamma"]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "multistep":
            epoch = step // steps_per_epoch
            return gamma ** sum(1 for m in milestones if epoch >= m)
        if schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def make_optimizer(cfg: dict, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
                  nesterov=cfg["nesterov"])
    if cfg["optimizer"] == "sgd":
        # The anchor of the benchmarks: PyTorch's fused kernel on CUDA, its default elsewhere.
        if device.type == "cuda":
            kwargs["fused"] = True
        return torch.optim.SGD(model.parameters(), **kwargs)
    if cfg["factored"]:  # Linear/Conv2d weights stepped from their captured factors
        return DecaySGD(model.parameters(), backend=cfg["backend"], factored=True, model=model,
                        **kwargs)
    return DecaySGD(model.parameters(), backend=cfg["backend"], **kwargs)


def model_options(cfg: dict) -> dict:
    return {key: cfg[key] for key in ("depth", "width", "batchnorm") if cfg[key] is not None}


# ------------------------------------------------------------------------------------ outputs
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


def write_plots(run_dir: Path, tracker: RankTracker, records: list[dict], rank_names: list[str],
                title: str, synthetic: bool, log: Callable[[str], None]) -> list[Path]:
    """Rank and accuracy curves, singular-value evolution and the effective-rank heat map."""
    if importlib.util.find_spec("matplotlib") is None:
        log("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    banner = title + ("  [SYNTHETIC DATA, not CIFAR-10]" if synthetic else "")
    written = []

    def save(fig, name):
        fig.suptitle(banner, fontsize=9)
        fig.tight_layout()
        path = plot_dir / name
        fig.savefig(path, dpi=110)
        written.append(path)

    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(13, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 3, 1)
    ax.plot(epochs, [r["avg_threshold_rank"] for r in records], marker="o", ms=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"average threshold rank (eps={tracker.eps:g})")
    ax.set_title(f"rank over {len(rank_names)} layers")
    for panel, (metric, ylabel) in enumerate((("acc", "accuracy"), ("loss", "cross-entropy loss")), 2):
        ax = fig.add_subplot(1, 3, panel)
        for split in ("train", "test"):
            key = f"{split}_{metric}"
            ax.plot(epochs, [np.nan if r[key] is None else r[key] for r in records], marker="o", ms=3,
                    label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend()
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    save(fig, "curves.png")

    save(tracker.plot("average_rank", average_over=rank_names), "average_rank.png")
    save(tracker.plot("effective_rank_heatmap"), "effective_rank_heatmap.png")
    picks = list(dict.fromkeys([rank_names[0], rank_names[len(rank_names) // 2], rank_names[-1]]))
    for layer in picks:
        save(tracker.plot("singular_values", layer=layer), f"singular_values_{layer.replace('.', '_')}.png")
    return written


# ------------------------------------------------------------------------------------ training
def _broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics (each rank's last forward updated its own)."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


@torch.no_grad()
def evaluate(model: nn.Module, loader: data_mod.DeviceLoader, autocast, distributed: Distributed,
             device: torch.device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over the whole test set, summed across ranks."""
    model.eval()
    # Sums stay on the device (no per-batch synchronisation); the count is known on the host.
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    count = 0
    for x, y in loader.epoch(0):
        with autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        totals += torch.stack([loss.double(), (logits.argmax(1) == y).sum().double()])
        count += y.numel()
    loss_sum, correct, count = _sum_over_ranks(totals, count, distributed)
    return loss_sum / count, correct / count


def _sum_over_ranks(totals: torch.Tensor, count: int, distributed: Distributed) -> tuple[float, float, int]:
    """(loss sum, correct, examples) over every process."""
    values = torch.cat([totals, torch.tensor([float(count)], dtype=torch.float64, device=totals.device)])
    if distributed.active:
        dist.all_reduce(values)
    loss_sum, correct, count = values.tolist()
    return loss_sum, correct, int(count)


def _layer_measures(records: list[dict], measures) -> dict:
    return {rec["layer"]: {m: rec[m] for m in measures} for rec in records}


def _tracker_state(tracker: RankTracker) -> dict:
    return {"history": tracker.history,
            "spectra": {name: [(step, torch.from_numpy(np.asarray(s)).clone()) for step, s in series]
                        for name, series in tracker.spectra.items()},
            "last_method": tracker.last_method}


def _restore_tracker(tracker: RankTracker, state: dict) -> None:
    tracker.history = list(state["history"])
    tracker.spectra = {name: [] for name in tracker.layer_names}
    for name, series in state["spectra"].items():
        tracker.spectra[name] = [(int(step), s.numpy()) for step, s in series]
    tracker.last_method = state.get("last_method")


def default_run_dir(cfg: dict, dataset_name: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{cfg['model']}-{dataset_name}-{stamp}"
    candidate, n = base, 1
    while candidate.exists():
        candidate = base.with_name(f"{base.name}-{n}")
        n += 1
    return candidate


RUN_MARKERS = ("config.json", "metrics.jsonl", "summary.json", ckpt.CHECKPOINT_DIR)


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_MARKERS)


def _versions() -> dict:
    import lowrank_kernels
    return {"python": sys.version.split()[0], "torch": str(torch.__version__),
            "lowrank_kernels": str(lowrank_kernels.__version__), "cuda": torch.version.cuda}


def main(argv: list[str] | None = None, *, epoch_callback: Callable[[dict], Any] | None = None) -> Path:
    """Train as the command line ``argv`` says; returns the run directory.

    ``epoch_callback(record)`` is called after every epoch's record and checkpoint are written
    (an exception raised there stops the run, as a kill would)."""
    cfg, explicit = parse_settings(argv)
    distributed, device = init_distributed(cfg["device"])
    try:
        return _run(cfg, explicit, distributed, device, epoch_callback)
    finally:
        if distributed.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def import_model_module(name: str) -> None:
    """Import a module (dotted name, looked up from the current directory too) or a .py file, for
    the models it registers."""
    try:
        if name.endswith(".py"):
            path = Path(name).resolve()
            if not path.is_file():
                raise ConfigError(f"--model-module {name}: no such file")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.append(os.getcwd())
            importlib.import_module(name)
    except ImportError as err:
        raise ConfigError(f"--model-module {name}: {err}") from err


def _merge_resumed(saved: dict, cfg: dict, explicit: set[str]) -> dict:
    changed = sorted(k for k in explicit if k not in RESUME_CHANGEABLE and k in saved and cfg[k] != saved[k])
    if changed:
        details = ", ".join(f"{k}: {saved[k]!r} -> {cfg[k]!r}" for k in changed)
        raise ConfigError(f"cannot change {details} when resuming (the run would no longer be the same); "
                          "start a new run instead")
    merged = dict(saved)
    for key in INVOCATION_SETTINGS:
        merged[key] = cfg[key]
    for key in RESUME_CHANGEABLE - INVOCATION_SETTINGS:
        if key in explicit:
            merged[key] = cfg[key]
    for key, value in cfg.items():  # settings newer than the checkpoint
        merged.setdefault(key, value)
    return merged


def _run(cfg: dict, explicit: set[str], distributed: Distributed, device: torch.device,
         epoch_callback) -> Path:
    is_main = distributed.is_main
    quiet = cfg["quiet"]

    def log(message: str, always: bool = False):
        if is_main and (always or not quiet):
            print(message, flush=True)

    # ---- where the run lives, and whether it continues an earlier one
    state = None
    run_dir = Path(cfg["out"]) if cfg["out"] else None
    if cfg["resume"] is not None:
        if cfg["resume"] == "auto":
            if run_dir is None:
                raise ConfigError("--resume auto needs --out (the run directory to continue)")
            if (run_dir / "summary.json").exists():
                log(f"{run_dir} holds a finished run (summary.json exists); nothing to do", always=True)
                return run_dir
            latest = ckpt.latest_checkpoint(run_dir)
            if latest is not None:
                state = ckpt.load_checkpoint(latest, map_location="cpu")
        else:
            try:
                path = ckpt.resolve_resume(cfg["resume"])
            except ckpt.CheckpointError as err:
                raise ConfigError(str(err)) from None
            state = ckpt.load_checkpoint(path, map_location="cpu")
            run_dir = run_dir or ckpt.run_dir_of(path)
        if state is not None:
            cfg = _merge_resumed(state["config"], cfg, explicit)
            cfg["out"] = str(run_dir)
    validate(cfg)
    if cfg["model_module"]:
        import_model_module(cfg["model_module"])
    if state is None and run_dir is not None and holds_run(run_dir) and cfg["resume"] != "auto":
        raise ConfigError(f"{run_dir} already holds a run; pass --resume auto to continue it, "
                          "or choose another --out")
    if distributed.active:  # every rank has looked at the run directory before rank 0 writes to it
        dist.barrier()

    set_determinism(cfg["deterministic"], device)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cfg["sync_bn"] and (not distributed.active or device.type != "cuda"):
        raise ConfigError("--sync-bn needs several CUDA processes (torchrun on GPUs)")

    # ---- the model first: a wrong name or option fails before any data is read
    seed_everything(cfg["seed"])
    try:
        raw_model = models.build_model(cfg["model"], **model_options(cfg))
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None

    # ---- data
    resolved = state["resolved"] if state is not None else {}
    kind = resolved.get("dataset", cfg["dataset"])
    data_path = cfg["data"] if "data" in explicit or state is None else resolved.get("data_path")
    dataset = data_mod.load_dataset(kind, data_path, device, cfg["train_subset"], cfg["test_subset"],
                                    log=lambda m: log(m, always=True))
    if state is not None and (len(dataset.train), len(dataset.test)) != (resolved["num_train"], resolved["num_test"]):
        raise ConfigError(f"the data found now ({dataset.describe()}) differ from the run's "
                          f"({resolved['num_train']} train / {resolved['num_test']} test images)")
    log(("Data: " + dataset.describe()), always=dataset.is_synthetic)

    try:
        train_loader = data_mod.DeviceLoader(dataset.train, cfg["batch_size"], shuffle=True,
                                             augment=cfg["augment"], seed=cfg["seed"], mean=dataset.mean,
                                             std=dataset.std, rank=distributed.rank,
                                             world_size=distributed.world_size, channels_last=cfg["channels_last"])
        test_loader = data_mod.DeviceLoader(dataset.test, cfg["eval_batch_size"], shuffle=False,
                                            mean=dataset.mean, std=dataset.std, rank=distributed.rank,
                                            world_size=distributed.world_size, channels_last=cfg["channels_last"])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    steps_per_epoch = len(train_loader)

    # ---- model on the device, optimizer, schedule
    raw_model.to(device)
    if cfg["channels_last"]:
        raw_model.to(memory_format=torch.channels_last)
    if cfg["sync_bn"]:
        raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    rank_names = models.rank_layers(cfg["model"], raw_model)
    optimizer = make_optimizer(cfg, raw_model, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(cfg, steps_per_epoch))
    tracker = RankTracker(raw_model, every=1, method=cfg["spectra"], eps=cfg["eps"],
                          average_over=rank_names) if is_main else None

    records: list[dict] = []
    start_epoch, step = 0, 0
    if state is not None:
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])  # DecaySGD keeps this run's --backend
        # The schedule function is not in the state (LambdaLR saves only callable objects): the
        # one built above from this run's --epochs stays.
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        records = list(state["metrics"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        if tracker is not None:
            _restore_tracker(tracker, state["tracker"])
        log(f"Resuming {run_dir} after epoch {start_epoch} (step {step})", always=True)

    train_model: nn.Module = raw_model
    if distributed.active:
        from torch.nn.parallel import DistributedDataParallel
        train_model = DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:
        train_model = torch.compile(train_model)
    eval_model = torch.compile(raw_model) if cfg["compile"] else raw_model

    amp_dtype = torch.bfloat16 if cfg["amp"] == "bf16" else None

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    # ---- run directory (rank 0 names it, the others learn it)
    if run_dir is None:
        run_dir = default_run_dir(cfg, dataset.name) if is_main else None
    if distributed.active:
        holder = [str(run_dir) if run_dir is not None else None]
        dist.broadcast_object_list(holder, src=0)
        run_dir = Path(holder[0])
    cfg["out"] = str(run_dir)
    resolved = {
        "dataset": dataset.name, "data_path": None if dataset.is_synthetic else dataset.source,
        "dataset_note": dataset.note or dataset.describe(), "num_train": len(dataset.train),
        "num_test": len(dataset.test), "steps_per_epoch": steps_per_epoch, "device": str(device),
        "world_size": distributed.world_size, "per_process_batch": cfg["batch_size"] // distributed.world_size,
        "rank_layers": rank_names, "optimizer_class": type(optimizer).__name__, "versions": _versions(),
    }
    saved_cfg = {k: v for k, v in cfg.items() if k not in NOT_SAVED}
    tb = None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_json(run_dir / "config.json", {**saved_cfg, "resolved": resolved})
        (run_dir / "summary.json").unlink(missing_ok=True)
        write_metrics(run_dir, records)
        tb = open_tensorboard(run_dir, purge_step=start_epoch + 1 if state is not None else None)
        log(f"Run directory: {run_dir}")
        log(f"Model {cfg['model']} ({sum(p.numel() for p in raw_model.parameters()):,} parameters), "
            f"{type(optimizer).__name__} lr {cfg['lr']:g} momentum {cfg['momentum']:g} weight decay "
            f"{cfg['weight_decay']:g}, batch {cfg['batch_size']}"
            + (f" over {distributed.world_size} processes" if distributed.active else "")
            + f", {steps_per_epoch} steps/epoch, device {device}; average rank over {len(rank_names)} layers")

    measures = tracker.measures if tracker is not None else ()
    synthetic = dataset.is_synthetic
    started = time.perf_counter()
    status = "finished"
    progress_factory = _progress_factory() if is_main and not quiet else None

    latest_ranks: dict[int, list[dict]] = {}  # the newest tracker record, by step

    def track(at_step: int) -> list[dict]:
        new = tracker.record(step=at_step)
        write_rank_records(run_dir, new)
        latest_ranks.clear()
        latest_ranks[at_step] = new
        return new

    def rank_record(at_step: int) -> tuple[float | None, dict]:
        """(average threshold rank, per-layer measures) now, on rank 0 (None, {} elsewhere)."""
        if tracker is None:
            return None, {}
        new = latest_ranks.get(at_step) or track(at_step)
        return dict(tracker.average_threshold_rank())[at_step], _layer_measures(new, measures)

    def checkpoint_state(epoch: int) -> dict:
        return {"epoch": epoch, "step": step, "config": saved_cfg, "resolved": resolved,
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": ckpt.rng_state(), "data": {"seed": cfg["seed"], "next_epoch": epoch},
                "metrics": records, "tracker": _tracker_state(tracker) if tracker is not None else None}

    try:
        if is_main:
            if state is not None:
                write_rank_records(run_dir, tracker.history, rewrite=True)
            else:
                (run_dir / "ranks.jsonl").unlink(missing_ok=True)
        if state is None:  # epoch 0: the initial model, before any step
            t0 = time.perf_counter()
            test_loss, test_acc = evaluate(eval_model, test_loader, autocast, distributed, device)
            eval_time = time.perf_counter() - t0
            avg_rank, layers = rank_record(0)
            records.append({"epoch": 0, "step": 0, "lr": optimizer.param_groups[0]["lr"], "train_loss": None,
                            "train_acc": None, "test_loss": test_loss, "test_acc": test_acc,
                            "avg_threshold_rank": avg_rank, "epoch_time_s": None, "eval_time_s": eval_time,
                            "images_per_s": None, "dataset": dataset.name, "layers": layers})
            if is_main:
                write_metrics(run_dir, records)
                log(format_epoch_line(records[-1], cfg["epochs"], synthetic))

        for epoch in range(start_epoch, cfg["epochs"]):
            train_model.train()
            lr_at_start = float(optimizer.param_groups[0]["lr"])
            totals = torch.zeros(2, dtype=torch.float64, device=device)
            seen = 0
            bar = progress_factory(steps_per_epoch, f"epoch {epoch + 1}/{cfg['epochs']}") if progress_factory else None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for i, (x, y) in enumerate(train_loader.epoch(epoch)):
                with autocast():
                    logits = train_model(x)
                    loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                with torch.no_grad():
                    totals += torch.stack([loss.detach().double() * y.numel(),
                                           (logits.argmax(1) == y).sum().double()])
                seen += y.numel()
                if tracker is not None and cfg["track_every"] and step % cfg["track_every"] == 0:
                    track(step)
                if bar is not None:
                    bar.update(1)
                    if i % 20 == 0 or i == steps_per_epoch - 1:  # .tolist() waits for the device
                        loss_sum, correct = totals.tolist()
                        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
            if bar is not None:
                bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time = time.perf_counter() - t0
            loss_sum, correct, count = _sum_over_ranks(totals, seen, distributed)
            if distributed.active:
                _broadcast_buffers(raw_model)
            train_loss, train_acc = loss_sum / count, correct / count

            t0 = time.perf_counter()
            diverged = not math.isfinite(train_loss)
            if diverged:
                test_loss, test_acc, avg_rank, layers = None, None, None, {}
            else:
                test_loss, test_acc = evaluate(eval_model, test_loader, autocast, distributed, device)
                avg_rank, layers = rank_record(step)
            eval_time = time.perf_counter() - t0
            record = {"epoch": epoch + 1, "step": step, "lr": lr_at_start, "train_loss": train_loss,
                      "train_acc": train_acc, "test_loss": test_loss, "test_acc": test_acc,
                      "avg_threshold_rank": avg_rank, "epoch_time_s": train_time, "eval_time_s": eval_time,
                      "images_per_s": count / train_time if train_time > 0 else None,
                      "dataset": dataset.name, "layers": layers}
            records.append(record)
            if is_main:
                write_metrics(run_dir, records)
                if tb is not None:
                    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "avg_threshold_rank", "lr"):
                        if _is_number(record[key]) and math.isfinite(record[key]):
                            tb.add_scalar(key, record[key], epoch + 1)
                    tb.flush()
                log(format_epoch_line(record, cfg["epochs"], synthetic))
            if diverged:
                status = "diverged"
                log(f"Training diverged at epoch {epoch + 1} (train loss {train_loss}); stopping. "
                    "Lower --lr or raise --warmup-epochs.", always=True)
                break
            last = epoch + 1 == cfg["epochs"]
            if is_main and (last or (cfg["checkpoint_every"] and (epoch + 1) % cfg["checkpoint_every"] == 0)):
                ckpt.save_checkpoint(run_dir, epoch + 1, checkpoint_state(epoch + 1), keep=cfg["keep_checkpoints"])
            if epoch_callback is not None:
                epoch_callback(record)
    finally:
        if tb is not None:
            tb.close()

    if distributed.active:
        dist.barrier()
    if is_main:
        final = records[-1]
        if cfg["plots"] and tracker is not None and tracker.history:
            try:
                paths = write_plots(run_dir, tracker, [r for r in records if r["avg_threshold_rank"] is not None],
                                    rank_names, f"{cfg['model']}  lr {cfg['lr']:g}  wd {cfg['weight_decay']:g}  "
                                    f"batch {cfg['batch_size']}  seed {cfg['seed']}", synthetic, log)
                if paths:
                    log(f"Plots: {', '.join(str(p.relative_to(run_dir)) for p in paths)}")
            except Exception as err:  # a plotting failure must not lose the finished run's summary
                log(f"plots failed ({type(err).__name__}: {err})", always=True)
        trained = [r for r in records if r["epoch"] > 0]
        summary = {
            "status": status,
            "dataset": dataset.name,
            "dataset_note": resolved["dataset_note"],
            "epochs_completed": final["epoch"],
            "final": final,
            "initial_avg_threshold_rank": records[0]["avg_threshold_rank"],
            "best_test_acc": max((r["test_acc"] for r in trained if r["test_acc"] is not None), default=None),
            "train_time_s": sum(r["epoch_time_s"] or 0.0 for r in trained),
            "elapsed_s": time.perf_counter() - started,
            "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
            "config": saved_cfg,
            "resolved": resolved,
        }
        ckpt.atomic_write_json(run_dir / "summary.json", ckpt.json_safe(summary))
        if final["avg_threshold_rank"] is not None and records[0]["avg_threshold_rank"] is not None:
            log(f"Average threshold rank {records[0]['avg_threshold_rank']:.2f} -> {final['avg_threshold_rank']:.2f}"
                f"; test accuracy {100 * (final['test_acc'] or 0):.1f}%. Outputs in {run_dir}"
                + ("  [SYNTHETIC DATA]" if synthetic else ""), always=True)
    if distributed.active:  # no rank leaves the process group while rank 0 still writes
        dist.barrier()
    return run_dir


def _progress_factory():
    """A tqdm bar per epoch when tqdm is installed and the output is a terminal, else nothing
    (the per-epoch line is printed either way)."""
    if importlib.util.find_spec("tqdm") is None or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return lambda total, desc: tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def cli(argv: list[str] | None = None) -> int:
    try:
        main(argv)
    except (ConfigError, data_mod.DatasetError, ckpt.CheckpointError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train.py: interrupted; continue with --resume auto --out RUN_DIR", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
