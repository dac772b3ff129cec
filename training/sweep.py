"""Grid sweeps of ``training/train.py`` over (learning rate, weight decay, batch size), and the
pictures of Galanti et al., "SGD and Weight Decay Secretly Minimize the Rank of Your Neural
Network": the average rank at the end of training over pairs of hyper-parameters (their Fig. 1)
and the average rank and accuracy against each hyper-parameter (their Figs. 2-4).

    python training/sweep.py --preset mlp-cpu --out runs/sweep-mlp
    python training/sweep.py --lr 0.01 0.05 0.1 --weight-decay 0 5e-4 2e-3 --batch-size 64 128 \\
        --out runs/sweep --jobs 2 -- --model resnet18 --epochs 30 --amp bf16
    python training/sweep.py --out runs/sweep --plot-only        # redraw from the runs on disk

Every grid point is one ``train.py`` process whose run directory is ``<out>/lr<lr>_wd<wd>_bs<bs>``
(e.g. ``lr0.05_wd0.0005_bs128``); arguments after ``--`` go to every run unchanged. ``--jobs N``
runs N processes at a time (``--devices cuda:0 cuda:1`` spreads them over GPUs; on the CPU each
gets ``--threads cpu_count/N`` unless ``--threads`` is passed after ``--``).

Resuming: run the same command again. A run with ``summary.json`` (train.py writes it last) is
finished and skipped; any other run is launched with ``--resume auto``, which continues from its
newest checkpoint, or starts it when there is none. Before anything is launched, the settings of
every existing run are compared with the ones asked for now; a finished run trained with other
settings (say another ``--epochs``) is an error rather than a silent mix in the table.

Outputs in ``<out>``:

* ``sweep.csv`` and ``sweep.jsonl``: one row per finished run in the directory: ``run, status,
  lr, weight_decay, batch_size, epochs, avg_threshold_rank, initial_avg_threshold_rank,
  train_acc, test_acc, train_loss, test_loss, best_test_acc, train_time_s, elapsed_s, model,
  dataset`` (the JSONL rows add the final per-layer measures ``layers`` and the run's config);
* ``plots/heatmap_rank_<x>_<y>.png``: final average threshold rank over each pair of
  hyper-parameters with one varying, annotated, one panel per value of the third (a slice, not
  an average), a shared colour scale; grey cells: no finished run;
* ``plots/curves.png``: average rank and train/test accuracy against each varying
  hyper-parameter, one line per combination of the others;
* ``plots/rank_history.png``: average rank against the epoch for every run;
* ``sweep.log`` (what was skipped, started, resumed, finished or failed, with times),
  ``logs/<run>.log`` (each run's output) and ``sweep.json`` (the grid and the train arguments).

Presets (a list given on the command line replaces the preset's list; arguments after ``--``
are appended to the preset's and win over them):

* ``mlp-cpu``: MLP-BN-10-100 on the CIFAR-10 images found by train.py (``--dataset cifar10``:
  ``--data``, ``$LOWRANK_CIFAR10``, or the 5,085 / 1,017-image subset in ``../shared/data``), 20
  epochs, constant lr, momentum 0.9, grid lr {0.01, 0.03, 0.1} x weight decay {0, 2e-3, 5e-3} x
  batch size {32, 128}: 18 runs, 2 processes at a time, each with half the CPU's threads. Scale:
  a batch-32 run takes about 25 s of CPU time, a batch-128 run less; on a 2-core machine shared
  with other work (load average 5-8) two runs side by side took 85-115 s, so the preset takes
  about a quarter of an hour there and a few minutes on an idle one. At lr 0.1 the average rank
  of the 10 hidden layers fell from 99.5 to 15.8 with weight decay 5e-3 (batch 32) over the 20
  epochs and only to 95.9 with 1e-3; test accuracy 18% and 25%: at this scale the pictures show
  the rank's dependence on the hyper-parameters, not a well-trained classifier.
* ``resnet18-cpu`` and ``vgg16bn-cpu``: ResNet-18 / VGG-16-BN at width 16 (16-32-64-128
  channels) on the CIFAR-10 images found, as Galanti et al. train them (momentum 0, no
  augmentation, constant lr), 12 epochs, grid lr {0.1, 0.2} x weight decay {0, 2e-2, 5e-2} x batch
  size {32, 128}: 12 runs each, 2 processes at a time with one thread each. The average rank is
  over Galanti et al.'s 17 ResNet-18 matrices (stem and block convs) or VGG's 13 convs. On the
  5,085-image subset an idle core trains a ResNet-18 epoch in about 10 s (VGG about 6 s); timings
  of the whole grid are in docs/reproduction.md.
* ``resnet18-gpu``: ResNet-18 on CIFAR-10 (``--dataset cifar10``: point ``--data`` or
  ``$LOWRANK_CIFAR10`` at the full data set; otherwise the subset is used), bf16 autocast, 30
  epochs, constant lr, momentum 0.9, grid lr {0.02, 0.05, 0.1} x weight decay {0, 5e-4, 2e-3} x
  batch size {64, 128, 256}: 27 runs, one at a time (``--jobs 2`` shares one GPU between two).
  Budget about 27 x 30 epoch times; the training benchmark (benchmarks/training_step/section.py)
  estimates an epoch's training time on the machine at hand.
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
import csv  # noqa: E402
import datetime  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections import deque  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

from lowrank_kernels.tracker import format_table as tracker_table  # noqa: E402
from training import sweep_plots  # noqa: E402
from training.checkpoint import atomic_write_text, json_safe  # noqa: E402

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
SUMMARY = "summary.json"
GRID_FLAGS = {"lr": "--lr", "weight_decay": "--weight-decay", "batch_size": "--batch-size"}
# Set by the sweep for every run; passing them after "--" would fight the grid.
SWEEP_OWNED = {*GRID_FLAGS, "out", "resume"}
TABLE_COLUMNS = ("run", "status", "lr", "weight_decay", "batch_size", "epochs", "avg_threshold_rank",
                 "initial_avg_threshold_rank", "avg_normalized_effective_rank", "avg_alignment", "train_acc", "test_acc", "train_loss", "test_loss",
                 "best_test_acc", "train_time_s", "elapsed_s", "model", "dataset")


class SweepError(ValueError):
    """A bad grid, a conflicting argument or a run directory that does not fit the sweep."""


@dataclass(frozen=True)
class Preset:
    description: str
    grid: dict[str, tuple]
    train_args: tuple[str, ...]
    jobs: int = 1


def _cpu_conv_preset(model: str, label: str) -> Preset:
    """Galanti et al.'s convolutional setting at a 2-core CPU's scale: momentum 0 and no
    augmentation as in their runs, width 16, the CIFAR-10 images found (the shared subset here),
    12 epochs. The weight decays are large because the runs are short: the rank moves once the
    shrink (1 - lr*wd)^steps has had time to act, see docs/reproduction.md."""
    return Preset(
        f"{label} (width 16) on the CIFAR-10 images found, momentum 0, no augmentation, "
        "12 epochs, 12 runs, 2 processes at a time",
        {"lr": (0.1, 0.2), "weight_decay": (0.0, 2e-2, 5e-2), "batch_size": (32, 128)},
        ("--model", model, "--width", "16", "--dataset", "cifar10", "--no-augment",
         "--epochs", "12", "--schedule", "constant", "--momentum", "0"),
        jobs=2)


PRESETS = {
    "mlp-cpu": Preset(
        "MLP-BN-10-100 on the CIFAR-10 images found (the shared 5,085-image subset here), "
        "20 epochs, 18 runs, 2 processes at a time",
        {"lr": (0.01, 0.03, 0.1), "weight_decay": (0.0, 2e-3, 5e-3), "batch_size": (32, 128)},
        ("--model", "mlp", "--depth", "10", "--width", "100", "--batchnorm", "--dataset", "cifar10",
         "--epochs", "20", "--schedule", "constant", "--momentum", "0.9"),
        jobs=2),
    "resnet18-cpu": _cpu_conv_preset("resnet18", "ResNet-18"),
    "vgg16bn-cpu": _cpu_conv_preset("vgg16_bn", "VGG-16-BN"),
    "resnet18-gpu": Preset(
        "ResNet-18 on CIFAR-10, bf16, 30 epochs, 27 runs",
        {"lr": (0.02, 0.05, 0.1), "weight_decay": (0.0, 5e-4, 2e-3), "batch_size": (64, 128, 256)},
        ("--model", "resnet18", "--dataset", "cifar10", "--epochs", "30", "--schedule", "constant",
         "--momentum", "0.9", "--amp", "bf16"),
        jobs=1),
}


# ------------------------------------------------------------------------------------ the grid
@dataclass(frozen=True)
class RunSpec:
    """One grid point."""

    lr: float
    weight_decay: float
    batch_size: int

    @property
    def name(self) -> str:
        f = sweep_plots.format_value
        return f"lr{f(self.lr)}_wd{f(self.weight_decay)}_bs{self.batch_size}"

    def argv(self) -> list[str]:
        # repr keeps every digit: the directory name may round, the run must not.
        return ["--lr", repr(float(self.lr)), "--weight-decay", repr(float(self.weight_decay)),
                "--batch-size", str(self.batch_size)]


def make_grid(lrs: Sequence[float], weight_decays: Sequence[float], batch_sizes: Sequence[int]) -> list[RunSpec]:
    """Every (lr, weight decay, batch size) combination, in that nesting order, validated."""
    def check(name, values, ok, what):
        if not values:
            raise SweepError(f"--{name} needs at least one value")
        for v in values:
            if isinstance(v, bool) or not ok(v):
                raise SweepError(f"--{name} values must be {what}, got {v!r}")
        seen = {}
        for v in values:
            key = sweep_plots.format_value(v)
            if key in seen:
                raise SweepError(f"--{name} lists {v!r} twice" + ("" if seen[key] == v else
                                 f" (it and {seen[key]!r} both read {key} in run names)"))
            seen[key] = v

    check("lr", lrs, lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > 0,
          "finite numbers > 0")
    check("weight-decay", weight_decays, lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
          "finite numbers >= 0")
    check("batch-size", batch_sizes, lambda v: isinstance(v, int) and v >= 1, "integers >= 1")
    return [RunSpec(float(lr), float(wd), int(bs)) for lr in lrs for wd in weight_decays for bs in batch_sizes]


# ------------------------------------------------------------------------------------ run state
def is_finished(run_dir: Path) -> bool:
    return (run_dir / SUMMARY).is_file()


def checkpoint_epoch(run_dir: Path) -> int | None:
    """The epoch of the run's newest checkpoint, or None."""
    from training import checkpoint as ckpt

    found = ckpt.list_checkpoints(run_dir)
    return found[-1][0] if found else None


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SweepError(f"cannot read {path}: {err.strerror or err}") from err
    except ValueError as err:
        raise SweepError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(obj, dict):
        raise SweepError(f"{path} holds a {type(obj).__name__}, expected a JSON object")
    return obj


def saved_settings(run_dir: Path) -> dict | None:
    """The settings a run was trained with: ``summary.json``'s config when finished, else
    ``config.json`` (written when a run starts), else None."""
    if is_finished(run_dir):
        config = _read_json(run_dir / SUMMARY).get("config")
        if not isinstance(config, dict):
            raise SweepError(f"{run_dir / SUMMARY} has no 'config' object: not a train.py summary")
        return config
    if (run_dir / "config.json").is_file():
        config = _read_json(run_dir / "config.json")
        config.pop("resolved", None)
        return config
    return None


def _settings_ignored(finished: bool) -> set[str]:
    """Settings that may differ between an existing run and the sweep's request: those train.py
    lets a resume change, except ``epochs`` for a finished run (train.py does not extend a run
    that has its summary)."""
    from training import train as train_mod

    ignored = set(train_mod.RESUME_CHANGEABLE) | set(train_mod.NOT_SAVED)
    if finished:
        ignored.discard("epochs")
    return ignored


def setting_differences(saved: dict, wanted: dict, ignored: set[str]) -> list[str]:
    """``key: saved -> wanted`` for every compared setting that differs."""
    out = []
    for key in sorted(wanted):
        if key in ignored or key not in saved:
            continue
        if saved[key] != wanted[key] and not _same_number(saved[key], wanted[key]):
            out.append(f"{key}: {saved[key]!r} -> {wanted[key]!r}")
    return out


def _same_number(a, b) -> bool:
    numbers = (int, float)
    return (isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool)
            and not isinstance(b, bool) and float(a) == float(b))


# ------------------------------------------------------------------------------------ launching
def default_launcher(command: list[str], log_file, env: dict) -> subprocess.Popen:
    """Start one training process, its output appended to ``log_file``."""
    return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                            stdin=subprocess.DEVNULL)


@dataclass
class SweepResult:
    """What one call of ``run_sweep`` did, by run name."""

    skipped: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    failed: dict[str, int] = field(default_factory=dict)   # name -> exit status
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted


class SweepLog:
    """Lines to the console and, time-stamped, to ``sweep.log``."""

    def __init__(self, path: Path | None, echo: Callable[[str], None] | None = print):
        self.path, self.echo = path, echo

    def __call__(self, message: str) -> None:
        if self.echo is not None:
            self.echo(message)
        if self.path is not None:
            stamp = datetime.datetime.now().isoformat(timespec="seconds")
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(f"{stamp} {message}\n")


def check_train_args(train_args: Sequence[str]) -> set[str]:
    """Parse the arguments every run gets with train.py's own parser; returns the names of the
    settings they give. Raises SweepError when they set what the sweep sets or when train.py
    rejects them."""
    from training import train as train_mod

    train_args = list(train_args)
    try:
        _, explicit = train_mod.parse_settings(train_args)
    except SystemExit as exit_:  # argparse has printed the reason
        raise SweepError(f"train.py does not accept the arguments {train_args}") from exit_
    except train_mod.ConfigError as err:
        raise SweepError(f"train.py arguments: {err}") from err
    clash = sorted(explicit & SWEEP_OWNED)
    if clash:
        flags = ", ".join("--" + k.replace("_", "-") for k in clash)
        raise SweepError(f"{flags} must not be given to the runs (after '--' or in a --config file): "
                         "the sweep sets them; give the grid as the sweep's own --lr/--weight-decay/"
                         "--batch-size and the sweep directory as --out")
    return explicit


def run_settings(train_args: Sequence[str], spec: RunSpec) -> dict:
    """train.py's settings for one run of the grid (validated by train.py)."""
    from training import train as train_mod

    try:
        settings, _ = train_mod.parse_settings([*train_args, *spec.argv()])
        train_mod.validate(settings)
    except train_mod.ConfigError as err:
        raise SweepError(f"run {spec.name}: {err}") from err
    return settings


def check_shared_preconditions(train_args: Sequence[str], spec: RunSpec, devices: Sequence[str] | None) -> None:
    """Once for the whole sweep: what every run needs from the machine (the device, the data),
    which no grid value changes. One SweepError instead of every run failing alike."""
    from training import train as train_mod

    settings = run_settings(train_args, spec)
    try:
        for device in devices or [settings["device"]]:
            train_mod.check_preconditions({**settings, "device": device})
    except (train_mod.ConfigError, train_mod.data_mod.DatasetError) as err:
        raise SweepError(f"every run would fail, so none was started: {err}") from None


def run_sweep(out: str | os.PathLike, grid: Sequence[RunSpec], train_args: Sequence[str] = (), *,
              jobs: int = 1, devices: Sequence[str] | None = None, threads: int | None = None,
              log: Callable[[str], None] | None = print, launcher=default_launcher,
              poll_s: float = 0.2, dry_run: bool = False) -> SweepResult:
    """Train every grid point under ``out`` that is not finished yet, ``jobs`` processes at a time.

    ``train_args`` go to every run (before the grid's own flags). ``devices``: one ``--device``
    per process slot, round robin. ``threads``: ``--threads`` for every run unless ``train_args``
    set it. ``launcher(command, log_file, env)`` starts a process (``subprocess.Popen`` by
    default; tests substitute it). Returns what was skipped, started, resumed, completed and
    failed; a KeyboardInterrupt stops the running processes (each resumes later from its last
    checkpoint) and is reported as ``interrupted``.
    """
    out = Path(out).resolve()
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise SweepError(f"--jobs must be an integer >= 1, got {jobs!r}")
    if not grid:
        raise SweepError("the grid is empty")
    names = [spec.name for spec in grid]
    if len(set(names)) != len(names):
        raise SweepError(f"the grid names a run twice: {sorted(n for n in names if names.count(n) > 1)}")
    train_args = list(train_args)
    explicit = check_train_args(train_args)
    if devices and "device" in explicit:
        raise SweepError("--devices and --device (after '--') both given; keep one")
    if threads is not None and "threads" not in explicit:
        train_args += ["--threads", str(threads)]

    # ---- classify every run and check the existing ones before launching anything
    todo: list[tuple[RunSpec, str]] = []
    result = SweepResult()
    mismatched = []
    for spec in grid:
        run_dir = out / spec.name
        wanted = run_settings(train_args, spec)
        finished = is_finished(run_dir)
        saved = saved_settings(run_dir) if run_dir.exists() else None
        if saved is not None:
            diffs = setting_differences(saved, wanted, _settings_ignored(finished))
            if diffs:
                mismatched.append(f"  {spec.name} ({'finished' if finished else 'unfinished'}): "
                                  + "; ".join(diffs))
        if finished:
            result.skipped.append(spec.name)
        else:
            has_run = run_dir.exists() and any(run_dir.iterdir())
            todo.append((spec, "resume" if has_run else "start"))
    if mismatched:
        raise SweepError(f"runs in {out} were trained with other settings than the ones asked "
                         "for now (saved -> asked):\n" + "\n".join(mismatched)
                         + "\nUse another --out, pass the same settings, or delete those run directories.")
    if todo:
        check_shared_preconditions(train_args, todo[0][0], devices)

    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
    log = SweepLog(None if dry_run else out / "sweep.log", log)
    for name in result.skipped:
        log(f"skip    {name} (finished: {SUMMARY} exists)")
    commands = {spec.name: [sys.executable, str(TRAIN_SCRIPT), *train_args, *spec.argv(),
                            "--out", str(out / spec.name), "--resume", "auto"] for spec, _ in todo}
    if dry_run:
        for spec, kind in todo:
            log(f"{kind:<7} {spec.name}: {subprocess.list2cmdline(commands[spec.name])}")
        return result
    if not todo:
        return result
    (out / "logs").mkdir(exist_ok=True)

    pending = deque(todo)
    # slot -> (process, run, its log file, start time, where this launch's output begins)
    active: dict[int, tuple[Any, RunSpec, Any, float, int]] = {}
    free_slots = list(range(jobs))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        while pending or active:
            while pending and free_slots:
                slot = free_slots.pop(0)
                spec, kind = pending.popleft()
                command = list(commands[spec.name])
                if devices:
                    command += ["--device", devices[slot % len(devices)]]
                run_dir = out / spec.name
                if kind == "resume":
                    epoch = checkpoint_epoch(run_dir)
                    where = f"from the epoch-{epoch} checkpoint" if epoch is not None else \
                        "from the start: no checkpoint yet"
                    log(f"resume  {spec.name} ({where})")
                    result.resumed.append(spec.name)
                else:
                    log(f"start   {spec.name}")
                    result.started.append(spec.name)
                log_file = open(out / "logs" / f"{spec.name}.log", "a", encoding="utf-8")
                log_file.write(f"=== {datetime.datetime.now().isoformat(timespec='seconds')} {kind}: "
                               f"{subprocess.list2cmdline(command)}\n")
                log_file.flush()
                try:
                    process = launcher(command, log_file, env)
                except BaseException:
                    log_file.close()
                    raise
                active[slot] = (process, spec, log_file, time.perf_counter(), log_file.tell())
            done = [slot for slot, (process, *_) in active.items() if process.poll() is not None]
            for slot in done:
                process, spec, log_file, t0, output_start = active.pop(slot)
                log_file.close()
                free_slots.append(slot)
                seconds = time.perf_counter() - t0
                run_dir = out / spec.name
                if process.returncode == 0 and is_finished(run_dir):
                    result.completed.append(spec.name)
                    log(f"done    {spec.name} in {seconds:.1f} s ({_status_of(run_dir)})")
                else:
                    code = process.returncode if process.returncode != 0 else -1
                    result.failed[spec.name] = code
                    why = (f"exit status {process.returncode}" if process.returncode != 0
                           else f"exit status 0 but no {SUMMARY}")
                    run_log = out / "logs" / f"{spec.name}.log"
                    log(f"FAILED  {spec.name} after {seconds:.1f} s ({why}); its output: {run_log}\n"
                        + _tail(run_log, output_start))
            if not done:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        result.interrupted = True
        log(f"interrupted: stopping {len(active)} running process(es); run the same command again "
            "to resume them from their last checkpoints")
        _stop(active.values())
    finally:
        for process, _, log_file, *_ in active.values():
            if process.poll() is None:
                process.kill()
            log_file.close()
    return result


def _status_of(run_dir: Path) -> str:
    try:
        summary = _read_json(run_dir / SUMMARY)
    except SweepError:
        return "unreadable summary"
    final = summary.get("final") or {}
    rank, acc = final.get("avg_threshold_rank"), final.get("test_acc")
    text = str(summary.get("status", "finished"))
    if rank is not None:
        text += f", avg rank {rank:.2f}"
    if acc is not None:
        text += f", test acc {100 * acc:.1f}%"
    return text


def _tail(path: Path, start: int = 0, lines: int = 8) -> str:
    """The last ``lines`` lines written to ``path`` from byte ``start`` on, indented."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("        | " + line for line in text[-lines:])


def _stop(active, grace_s: float = 20.0) -> None:
    """SIGINT to each process (train.py stops cleanly, keeping its checkpoints), then
    termination of those still running after ``grace_s``."""
    active = list(active)
    for process, *_ in active:
        if process.poll() is None:
            try:
                process.send_signal(signal.SIGINT)
            except (OSError, ValueError):
                pass
    deadline = time.monotonic() + grace_s
    for process, *_ in active:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            process.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()


# ------------------------------------------------------------------------------------ the table
def _row(run_dir: Path, summary: dict) -> dict:
    config = summary.get("config")
    final = summary.get("final")
    if not isinstance(config, dict) or not isinstance(final, dict):
        raise SweepError(f"{run_dir / SUMMARY} lacks the 'config' or 'final' object of a train.py summary")
    missing = [k for k in GRID_FLAGS if config.get(k) is None]
    if missing:
        raise SweepError(f"{run_dir / SUMMARY}: config has no {missing}")
    row = {
        "run": run_dir.name,
        "status": summary.get("status", "finished"),
        "lr": config["lr"],
        "weight_decay": config["weight_decay"],
        "batch_size": config["batch_size"],
        "epochs": summary.get("epochs_completed", final.get("epoch")),
        "avg_threshold_rank": final.get("avg_threshold_rank"),
        "initial_avg_threshold_rank": summary.get("initial_avg_threshold_rank"),
        **sweep_plots.layer_averages(final, _rank_layers(summary)),
        "train_acc": final.get("train_acc"),
        "test_acc": final.get("test_acc"),
        "train_loss": final.get("train_loss"),
        "test_loss": final.get("test_loss"),
        "best_test_acc": summary.get("best_test_acc"),
        "train_time_s": summary.get("train_time_s"),
        "elapsed_s": summary.get("elapsed_s"),
        "model": config.get("model"),
        "dataset": summary.get("dataset", final.get("dataset")),
    }
    return row


def _rank_layers(summary: dict) -> list[str] | None:
    """The layers of the run's average rank (train.py's ``resolved.rank_layers``), None if absent."""
    names = (summary.get("resolved") or {}).get("rank_layers")
    return list(names) if isinstance(names, list) else None


def read_history(run_dir: Path) -> list[dict]:
    """The run's per-epoch records (``metrics.jsonl``); [] when absent. Unparseable lines are
    an error naming the file and line."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as err:
            raise SweepError(f"{path} line {number} is not JSON ({err})") from err
    return records


def collect(out: str | os.PathLike, log: Callable[[str], None] | None = print
            ) -> tuple[list[dict], list[dict], dict[str, list[dict]]]:
    """Every finished run directly under ``out``: (table rows, full JSONL rows, histories).

    Runs whose settings differ in more than (lr, weight decay, batch size) and practical flags
    still go in the table, with a warning through ``log`` naming the differing settings."""
    out = Path(out)
    if not out.is_dir():
        raise SweepError(f"sweep directory {out} does not exist")
    rows, full, histories, configs = [], [], {}, {}
    for run_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        if not is_finished(run_dir):
            continue
        summary = _read_json(run_dir / SUMMARY)
        row = _row(run_dir, summary)
        rows.append(row)
        final = summary["final"]
        full.append({**row, "layers": final.get("layers"), "config": summary["config"]})
        names = _rank_layers(summary)
        histories[row["run"]] = [{**rec, **sweep_plots.layer_averages(rec, names)}
                                 for rec in read_history(run_dir)]
        configs[row["run"]] = summary["config"]
    if log is not None and len(configs) > 1:
        differing = _differing_settings(configs)
        if differing:
            log("warning: the runs in " + str(out) + " differ in more than the grid: "
                + ", ".join(differing) + "; the table and pictures mix them")
    rows.sort(key=lambda r: (r["lr"], r["weight_decay"], r["batch_size"], r["run"]))
    order = {r["run"]: i for i, r in enumerate(rows)}
    full.sort(key=lambda r: order[r["run"]])
    return rows, full, histories


def _differing_settings(configs: dict[str, dict]) -> list[str]:
    # The grid and what may differ between runs of one setting (train.py's resume rules).
    keys = set().union(*configs.values()) - set(GRID_FLAGS) - _settings_ignored(finished=True)
    differing = []
    for key in sorted(keys):
        values = {json.dumps(c.get(key), sort_keys=True) for c in configs.values()}
        if len(values) > 1:
            differing.append(f"{key} ({', '.join(sorted(values))})")
    return differing


def write_table(out: str | os.PathLike, rows: Sequence[dict], full_rows: Sequence[dict]) -> tuple[Path, Path]:
    """``sweep.csv`` (TABLE_COLUMNS) and ``sweep.jsonl`` (one full row per line), atomically."""
    out = Path(out)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TABLE_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in TABLE_COLUMNS})
    csv_path, jsonl_path = out / "sweep.csv", out / "sweep.jsonl"
    atomic_write_text(csv_path, buffer.getvalue())
    atomic_write_text(jsonl_path, "".join(json.dumps(json_safe(r)) + "\n" for r in full_rows))
    return csv_path, jsonl_path


CONSOLE_COLUMNS = ("run", "status", "epochs", "avg_threshold_rank", "train_acc", "test_acc")


def format_table(rows: Sequence[dict]) -> str:
    """The table as aligned text for the console (the tracker's table format)."""
    return tracker_table(rows, CONSOLE_COLUMNS)


def report(out: Path, log: Callable[[str], None] | None = print, plots: bool = True) -> tuple[list[dict], list[Path]]:
    """Collect the finished runs of ``out``, write the table and (``plots``) the pictures."""
    rows, full, histories = collect(out, log)
    if not rows:
        raise SweepError(f"no finished run (a subdirectory with {SUMMARY}) in {out}")
    paths = list(write_table(out, rows, full))
    if plots:
        if any(r.get("avg_threshold_rank") is not None for r in rows):
            paths += sweep_plots.plot_sweep(rows, histories, out / "plots")
        elif log is not None:
            log("no finished run has a final average rank (all diverged?): no pictures drawn")
    return rows, paths


# ------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sweep.py", description=__doc__.split("\n\n")[0],
        usage="%(prog)s [options] [-- train.py arguments]",
        epilog="Arguments after '--' are passed to every train.py run. Presets: "
               + "; ".join(f"{name}: {p.description}" for name, p in PRESETS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="fill the grid, model, epochs and data")
    parser.add_argument("--lr", type=float, nargs="+", help="learning rates")
    parser.add_argument("--weight-decay", type=float, nargs="+",
                        help="weight decays (torch convention: the papers' lambda is wd/2)")
    parser.add_argument("--batch-size", type=int, nargs="+", help="batch sizes")
    parser.add_argument("--out", type=Path, help="sweep directory (default runs/sweep-<preset>)")
    parser.add_argument("--jobs", type=int, help="training processes at a time (default 1, or the preset's)")
    parser.add_argument("--devices", nargs="+", metavar="DEVICE",
                        help="devices given to the processes in turn, e.g. cuda:0 cuda:1")
    parser.add_argument("--plot-only", action="store_true",
                        help="train nothing: rebuild the table and pictures from the finished runs in --out")
    parser.add_argument("--no-plots", action="store_true",
                        help="write the table but draw no sweep pictures (per-run plots: "
                             "pass --no-plots after '--')")
    parser.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None:
        if args.preset is None:
            parser.error("--out is required (or pick a --preset, whose default is runs/sweep-<preset>)")
        args.out = Path("runs") / f"sweep-{args.preset}"
    if args.plot_only and extra:
        parser.error("--plot-only trains nothing: drop the train.py arguments after '--'")
    return args, extra


def grid_from_args(args: argparse.Namespace) -> tuple[list[RunSpec], list[str]]:
    """The grid and the train.py arguments of the preset (if any), before the user's."""
    preset = PRESETS[args.preset] if args.preset else None
    lists = {}
    for key in GRID_FLAGS:
        given = getattr(args, key)
        if given is not None:
            lists[key] = given
        elif preset is not None:
            lists[key] = list(preset.grid[key])
        else:
            lists[key] = None
    if all(v is None for v in lists.values()):
        raise SweepError("nothing to sweep: give --lr, --weight-decay and/or --batch-size lists, or a --preset")
    if any(v is None for v in lists.values()):
        # A list not given takes train.py's default: one value.
        from training import train as train_mod

        defaults = vars(train_mod.build_parser().parse_args([]))
        for key, value in lists.items():
            if value is None:
                lists[key] = [defaults[key]]
    grid = make_grid(lists["lr"], lists["weight_decay"], lists["batch_size"])
    return grid, list(preset.train_args) if preset else []


def write_manifest(out: Path, args: argparse.Namespace, grid: Sequence[RunSpec], train_args: Sequence[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "preset": args.preset,
        "grid": {key: sorted({getattr(spec, key) for spec in grid}) for key in GRID_FLAGS},
        "runs": [spec.name for spec in grid],
        "train_args": list(train_args),
        "train_script": str(TRAIN_SCRIPT),
        "updated": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    atomic_write_text(out / "sweep.json", json.dumps(manifest, indent=2) + "\n")


def main(argv: Sequence[str] | None = None, *, launcher=default_launcher, log: Callable[[str], None] | None = print) -> int:
    """The command line; returns the exit status (0: every run finished and the outputs are written)."""
    args, extra = parse_args(argv)
    out = args.out.resolve()
    if args.plot_only:
        rows, paths = report(out, log, plots=not args.no_plots)
        if log is not None:
            log(format_table(rows))
            log("wrote " + ", ".join(str(p.relative_to(out)) for p in paths) + f" in {out}")
        return 0

    grid, preset_args = grid_from_args(args)
    train_args = preset_args + extra
    preset = PRESETS.get(args.preset)
    jobs = args.jobs if args.jobs is not None else (preset.jobs if preset else 1)
    # Processes sharing the CPU: split its cores between them instead of oversubscribing it.
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    if log is not None:
        log(f"sweep of {len(grid)} run(s) in {out}, {jobs} at a time"
            + (f" (preset {args.preset})" if args.preset else ""))
    result = run_sweep(out, grid, train_args, jobs=jobs, devices=args.devices, threads=threads,
                       log=log, launcher=launcher, dry_run=args.dry_run)
    if args.dry_run:
        return 0
    write_manifest(out, args, grid, train_args)
    status = 0 if result.ok else 1
    try:
        rows, paths = report(out, log, plots=not args.no_plots)
    except SweepError as err:  # nothing finished yet
        if log is not None:
            log(str(err))
        return 1
    if log is not None:
        log(format_table(rows))
        log("wrote " + ", ".join(str(p.relative_to(out)) for p in paths) + f" in {out}")
        if result.failed:
            log(f"{len(result.failed)} run(s) failed: {', '.join(sorted(result.failed))}; see "
                f"{out / 'logs'}; run the same command again to retry them")
        if result.interrupted:
            log("interrupted: run the same command again to resume")
    return status


def cli(argv: Sequence[str] | None = None) -> int:
    # A SIGTERM (a batch system's stop) ends the sweep like Ctrl-C: the runs are stopped cleanly.
    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return main(argv)
    except SweepError as err:
        print(f"sweep.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sweep.py: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(cli())
