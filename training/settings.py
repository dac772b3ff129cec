"""The settings of a training run: the command line, config files, their validation, and what a
resumed run keeps from its checkpoint.

* ``build_parser()``: every flag with its default (``train.py --help`` shows them all).
* ``parse_settings(argv)``: (settings, the names given explicitly on the command line or in the
  ``--config`` file); flags win over the file.
* ``validate(cfg)``: ranges and combinations, as ``ConfigError`` naming the flag.
* ``merge_resumed(saved, resolved, cfg, explicit)``: the settings a resumed run continues with.
  Everything that changes the numbers (model, data, optimizer, schedule, seed, dtype/amp,
  deterministic algorithms, and the device kind, thread count, backend and compilation a run was
  trained with) is restored from the checkpoint, so ``--resume auto --out RUN`` alone continues
  bit-identically; passing another value of the last four is allowed but warned about.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from training import data as data_mod

PAPER_MILESTONES = [60, 100, 200]  # Galanti et al.'s code: lr x 0.2 at these epochs
PAPER_GAMMA = 0.2
DESCRIPTION = ("Train a CIFAR-10 model with DecaySGD (or torch.optim.SGD) and track the rank of "
               "its weights.")
# Settings of the invocation: always the current command line's value (or default).
INVOCATION_SETTINGS = {"quiet", "plots", "out", "resume", "config"}
# Settings that change the floating-point results (reduction order, kernels, fusion) without
# changing the model or the data: restored from the checkpoint unless given, and a warning when
# given with another value, since the resumed run then differs from an uninterrupted one.
EXECUTION_SETTINGS = {"device", "threads", "compile", "backend"}
# Settings a resumed run may have differently from its checkpoint; every other one must stay the
# same. Those outside the invocation keep the checkpoint's value unless given.
RESUME_CHANGEABLE = INVOCATION_SETTINGS | EXECUTION_SETTINGS | {
    "epochs", "checkpoint_every", "keep_checkpoints", "data", "eval_batch_size", "track_every",
    "model_module"}
NOT_SAVED = ("config", "resume")


class ConfigError(ValueError):
    """A bad flag, config file or combination of settings; the message says which."""


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default except None (those flags' help says what happens when absent)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


# ------------------------------------------------------------------------------------ arguments
def build_parser(with_defaults: bool = True) -> argparse.ArgumentParser:
    """The command line. ``with_defaults=False`` gives the same parser with every default
    suppressed, to tell which settings were given explicitly."""
    parser = argparse.ArgumentParser(
        prog="train.py", description=DESCRIPTION,
        formatter_class=_DefaultsHelpFormatter if with_defaults else argparse.HelpFormatter,
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
    add(g, "--train-subset", type=int, help="use the first N training images (default: all)")
    add(g, "--test-subset", type=int, help="use the first N test images (default: all)")
    add(g, "--augment", default=True, action=argparse.BooleanOptionalAction,
        help="random crop (padding 4) and horizontal flip, on the device")
    add(g, "--eval-batch-size", type=int, default=500, help="test-set batch size")

    g = parser.add_argument_group("optimization")
    add(g, "--epochs", type=int, default=200, help="training epochs")
    add(g, "--batch-size", type=int, default=128, help="global batch size (split across processes)")
    add(g, "--lr", type=float, default=0.1, help="base learning rate")
    add(g, "--momentum", type=float, default=0.9, help="SGD momentum")
    add(g, "--weight-decay", type=float, default=5e-4,
        help="torch convention: adds wd*W to the gradient (the papers' lambda is wd/2)")
    add(g, "--nesterov", default=False, action="store_true", help="Nesterov momentum")
    add(g, "--optimizer", default="decaysgd", choices=("decaysgd", "sgd"),
        help="DecaySGD (fused) or torch.optim.SGD as the baseline")
    add(g, "--factored", default=False, action="store_true", help="DecaySGD factored mode")
    add(g, "--backend", default="auto", choices=("auto", "torch", "triton", "cuda"), help="DecaySGD backend")
    add(g, "--schedule", default="multistep", choices=("constant", "multistep", "cosine"),
        help="learning-rate schedule, applied per step")
    add(g, "--milestones", type=int, nargs="+", default=list(PAPER_MILESTONES),
        help="multistep: epochs after which the lr is multiplied by --gamma")
    add(g, "--gamma", type=float, default=PAPER_GAMMA, help="multistep: lr factor at each milestone")
    add(g, "--warmup-epochs", type=float, default=0.0, help="linear warm-up from lr/steps to lr")

    g = parser.add_argument_group("rank tracking")
    add(g, "--track-every", type=int, default=0, help="also record ranks every N optimizer steps (0: epoch ends only)")
    add(g, "--eps", type=float, default=1e-3, help="threshold rank: #{s_i / ||W||_F > eps}")
    add(g, "--alignment", default=True, action=argparse.BooleanOptionalAction,
        help="also record Yunis et al.'s alignment of each tracked layer with the next one it feeds")
    add(g, "--spectra", default="auto", choices=("auto", "exact", "randomized"),
        help="RankTracker method (auto: exact on the CPU and for small matrices)")

    g = parser.add_argument_group("practical")
    add(g, "--amp", default="none", choices=("none", "bf16"), help="autocast mixed precision")
    add(g, "--channels-last", default=False, action="store_true", help="channels-last memory format")
    add(g, "--compile", default=False, action="store_true", help="torch.compile the model")
    add(g, "--sync-bn", default=False, action="store_true",
        help="under torchrun: BatchNorm statistics over the global batch (CUDA only)")
    add(g, "--seed", type=int, default=0, help="seed of the weights, the data order and the augmentation")
    add(g, "--deterministic", default=False, action="store_true", help="deterministic algorithms only")
    add(g, "--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add(g, "--threads", type=int, help="CPU threads for torch (default: torch's choice, saved with the "
        "run; 1 is fastest for small models on a busy machine)")
    add(g, "--checkpoint-every", type=int, default=1, help="epochs between checkpoints (0: only the last)")
    add(g, "--keep-checkpoints", type=int, default=1, help="newest checkpoints kept (0: all)")
    add(g, "--resume", nargs="?", const="auto", metavar="PATH|auto",
        help="continue from a checkpoint file or run directory with the run's own settings; "
             "'auto': from --out's latest readable checkpoint if any (a finished run is left as "
             "it is), else start there")
    add(g, "--out", help="run directory (default: runs/<model>-<dataset>-<time>)")
    add(g, "--plots", default=True, action=argparse.BooleanOptionalAction,
        help="write plots at the end (needs matplotlib: pip install -e '.[plots]')")
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
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config_path = pre.parse_known_args(argv)[0].config
    from_file = read_config_file(config_path, parser) if config_path else {}
    parser.set_defaults(**from_file)
    settings = vars(parser.parse_args(argv))  # answers --help, with the defaults shown
    explicit = set(vars(build_parser(with_defaults=False).parse_args(argv))) | set(from_file)
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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def changed_settings(saved: dict, cfg: dict, explicit: set[str], allowed: set[str]) -> list[str]:
    """``name: saved -> now`` for every explicitly given setting outside ``allowed`` that differs
    from the saved run's."""
    return [f"{k}: {saved[k]!r} -> {cfg[k]!r}" for k in sorted(explicit)
            if k not in allowed and k in saved and cfg[k] != saved[k]]


def merge_resumed(saved: dict, resolved: dict, cfg: dict, explicit: set[str],
                  warn=lambda message: print(message, file=sys.stderr)) -> dict:
    """The settings of a resumed run: the checkpoint's ``saved`` settings (and, for the device
    kind and thread count, what ``resolved`` says the run actually used), with the invocation's
    settings and the explicitly given changeable ones from ``cfg``. ConfigError when an explicit
    setting that defines the run differs; ``warn`` when an execution setting does."""
    changed = changed_settings(saved, cfg, explicit, RESUME_CHANGEABLE)
    if changed:
        raise ConfigError(f"cannot change {', '.join(changed)} when resuming (the run would no longer be "
                          "the same); start a new run instead")
    merged = dict(saved)
    # What the run ran on, not what its flags asked for ("auto", torch's thread default).
    if resolved.get("device"):
        merged["device"] = resolved["device"].split(":")[0]
    if saved.get("threads") is None and resolved.get("threads"):
        merged["threads"] = resolved["threads"]
    for key in INVOCATION_SETTINGS:
        merged[key] = cfg[key]
    for key in RESUME_CHANGEABLE - INVOCATION_SETTINGS:
        if key in explicit:
            if key in EXECUTION_SETTINGS and key in merged and cfg[key] != merged[key]:
                warn(f"warning: resuming with {_flag(key)} {cfg[key]} where the run was trained with "
                     f"{merged[key]}: the floating-point results will differ from an uninterrupted "
                     f"run (leave {_flag(key)} out to continue exactly)")
            merged[key] = cfg[key]
    for key, value in cfg.items():  # settings newer than the checkpoint
        merged.setdefault(key, value)
    if merged.get("threads") is None:
        warn("warning: the checkpoint does not record the thread count the run used; resuming with "
             "torch's default, so the floating-point results may differ from an uninterrupted run")
    return merged
