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
  the end; ``--resume auto --out RUN`` (or ``--resume PATH``), with no other flag, continues
  exactly where one left off: every setting that changes the numbers is restored from it.
* ``plots/``: rank and accuracy curves, singular-value evolution, effective-rank heat map.
* ``tensorboard/``: scalars, when the tensorboard package is installed.
* ``summary.json``: written last, atomically, when the run ends; its presence means "finished".

When no CIFAR-10 directory is given or found, the synthetic stand-in is used and every output
says so (``dataset: "synthetic"``). Average threshold rank: the mean, over the model's rank layer
set (``training.models.rank_layers``), of #{i: s_i / ||W||_F > eps}, as in Galanti et al.,
"SGD and Weight Decay Secretly Minimize the Rank of Your Neural Network".

The pieces: ``training.settings`` (flags, config files, what a resume keeps), ``training.runtime``
(devices, seeds, optimizer, schedule), ``training.evaluation``, ``training.outputs`` (files,
plots, summary); this module holds the training loop.
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

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lowrank_kernels import RankTracker  # noqa: E402
from lowrank_kernels.backends import why_unavailable  # noqa: E402
from training import checkpoint as ckpt  # noqa: E402
from training import data as data_mod  # noqa: E402
from training import models  # noqa: E402
from training import outputs  # noqa: E402
from training.evaluation import broadcast_buffers, evaluate, layer_measures, sum_over_ranks  # noqa: E402
from training.outputs import TIMING_FIELDS, SCALAR_FIELDS  # noqa: E402,F401  (part of this module's API)
from training.runtime import (Distributed, check_preconditions, import_model_module,  # noqa: E402,F401
                              init_distributed, lr_factor_fn, make_optimizer, model_options,
                              process_rank, seed_everything, set_determinism)
from training.settings import (EXECUTION_SETTINGS, INVOCATION_SETTINGS, NOT_SAVED,  # noqa: E402,F401
                               RESUME_CHANGEABLE, ConfigError, build_parser, changed_settings,
                               merge_resumed, parse_settings, read_config_file, validate)


# ------------------------------------------------------------------------------------ the run's start
@dataclass
class RunStart:
    """Where a run lives, its settings, and the checkpoint it continues (None: a new run)."""

    cfg: dict
    explicit: set[str]
    run_dir: Path | None
    state: dict | None
    finished: bool = False


def open_run(cfg: dict, explicit: set[str], log: Callable[..., None]) -> RunStart:
    """Resolve ``--out``/``--resume`` before anything is loaded: the run directory is checked, the
    checkpoint read and the run's settings restored from it."""
    state = None
    run_dir = Path(cfg["out"]) if cfg["out"] else None
    if run_dir is not None:
        outputs.check_run_dir(run_dir)
    if cfg["resume"] == "auto":
        if run_dir is None:
            raise ConfigError("--resume auto needs --out (the run directory to continue)")
        if (run_dir / "summary.json").exists():
            log(finished_run_message(run_dir, cfg, explicit), always=True)
            return RunStart(cfg, explicit, run_dir, None, finished=True)
        state = ckpt.load_latest_readable(run_dir, log=lambda m: log(m, always=True))
    elif cfg["resume"] is not None:
        try:
            path = ckpt.resolve_resume(cfg["resume"])
        except ckpt.CheckpointError as err:
            raise ConfigError(str(err)) from None
        state = ckpt.load_checkpoint(path, map_location="cpu")
        run_dir = run_dir or ckpt.run_dir_of(path)
    if state is not None:
        cfg = merge_resumed(state["config"], state.get("resolved") or {}, cfg, explicit,
                            warn=lambda m: log(m, always=True))
        cfg["out"] = str(run_dir)
    validate(cfg)
    if cfg["model_module"]:
        import_model_module(cfg["model_module"])
    if state is None and run_dir is not None and outputs.holds_run(run_dir) and cfg["resume"] != "auto":
        raise ConfigError(f"{run_dir} already holds a run; pass --resume auto to continue it, "
                          "or choose another --out")
    return RunStart(cfg, explicit, run_dir, state)


def finished_run_message(run_dir: Path, cfg: dict, explicit: set[str]) -> str:
    """"Nothing to do", naming the settings given now that the finished run does not take."""
    message = f"{run_dir} holds a finished run (summary.json exists); nothing to do"
    try:
        saved = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return message
    ignored = changed_settings(saved, cfg, explicit, INVOCATION_SETTINGS)
    if ignored:
        message += (f". Ignored: {', '.join(ignored)} (a finished run is not continued or changed; "
                    "use another --out for a new run)")
    return message


# ------------------------------------------------------------------------------------ the session
@dataclass
class Session:
    """Everything the training loop works with, built by ``prepare``."""

    cfg: dict
    distributed: Distributed
    device: torch.device
    log: Callable[..., None]
    dataset: Any
    train_loader: data_mod.DeviceLoader
    test_loader: data_mod.DeviceLoader
    raw_model: nn.Module
    train_model: nn.Module
    eval_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    tracker: RankTracker | None
    rank_names: list[str]
    run_dir: Path
    resolved: dict
    saved_cfg: dict
    records: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    step: int = 0
    resumed: bool = False
    tb: Any = None
    latest_ranks: dict = field(default_factory=dict)  # the newest tracker record, by step

    @property
    def is_main(self) -> bool:
        return self.distributed.is_main

    def autocast(self):
        if self.cfg["amp"] != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def track(self, at_step: int) -> list[dict]:
        new = self.tracker.record(step=at_step)
        outputs.write_rank_records(self.run_dir, new)
        self.latest_ranks = {at_step: new}
        return new

    def rank_record(self, at_step: int) -> tuple[float | None, dict]:
        """(average threshold rank, per-layer measures) now, on rank 0 (None, {} elsewhere)."""
        if self.tracker is None:
            return None, {}
        new = self.latest_ranks.get(at_step) or self.track(at_step)
        return dict(self.tracker.average_threshold_rank())[at_step], layer_measures(new, self.tracker.measures)

    def evaluation(self) -> tuple[float, float, float]:
        """(test loss, test accuracy, seconds)."""
        t0 = time.perf_counter()
        loss, acc = evaluate(self.eval_model, self.test_loader, self.autocast, self.distributed, self.device)
        return loss, acc, time.perf_counter() - t0

    def publish(self, record: dict) -> None:
        """Append an epoch's record and write it out (metrics files, TensorBoard, console)."""
        self.records.append(record)
        if self.is_main:
            outputs.write_metrics(self.run_dir, self.records)
            outputs.log_scalars(self.tb if record["epoch"] > 0 else None, record)
            self.log(outputs.format_epoch_line(record, self.cfg["epochs"], self.dataset.is_synthetic))

    def checkpoint_state(self, epoch: int) -> dict:
        return {"epoch": epoch, "step": self.step, "config": self.saved_cfg, "resolved": self.resolved,
                "model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": ckpt.rng_state(), "data": {"seed": self.cfg["seed"], "next_epoch": epoch},
                "metrics": self.records,
                "tracker": self.tracker.state_dict() if self.tracker is not None else None}

    def checkpoint_due(self, epoch: int) -> bool:
        every = self.cfg["checkpoint_every"]
        return self.is_main and (epoch == self.cfg["epochs"] or (every and epoch % every == 0))


def prepare(start: RunStart, distributed: Distributed, device: torch.device, log) -> Session:
    """Model, data, optimizer, schedule, tracker and run directory, restored from the checkpoint
    when the run continues one."""
    cfg, state, run_dir = start.cfg, start.state, start.run_dir
    # ---- the model first: a wrong name or option fails before any data is read
    seed_everything(cfg["seed"])
    try:
        raw_model = models.build_model(cfg["model"], **model_options(cfg))
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None

    # ---- data
    resolved = state["resolved"] if state is not None else {}
    kind = resolved.get("dataset", cfg["dataset"])
    data_path = cfg["data"] if state is None or "data" in start.explicit else resolved.get("data_path")
    dataset = data_mod.load_dataset(kind, data_path, device, cfg["train_subset"], cfg["test_subset"],
                                    log=lambda m: log(m, always=True))
    if state is not None and (len(dataset.train), len(dataset.test)) != (resolved["num_train"], resolved["num_test"]):
        raise ConfigError(f"the data found now ({dataset.describe()}) differ from the run's "
                          f"({resolved['num_train']} train / {resolved['num_test']} test images)")
    log(("Data: " + dataset.describe()), always=dataset.is_synthetic)
    loader_args = dict(mean=dataset.mean, std=dataset.std, rank=distributed.rank,
                       world_size=distributed.world_size, channels_last=cfg["channels_last"])
    try:
        train_loader = data_mod.DeviceLoader(dataset.train, cfg["batch_size"], shuffle=True,
                                             augment=cfg["augment"], seed=cfg["seed"], **loader_args)
        test_loader = data_mod.DeviceLoader(dataset.test, cfg["eval_batch_size"], shuffle=False, **loader_args)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    steps_per_epoch = len(train_loader)

    # ---- model on the device, optimizer, schedule, tracker
    raw_model.to(device)
    if cfg["channels_last"]:
        raw_model.to(memory_format=torch.channels_last)
    if cfg["sync_bn"]:
        raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    rank_names = models.rank_layers(cfg["model"], raw_model)
    optimizer = make_optimizer(cfg, raw_model, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(cfg, steps_per_epoch))
    tracker = RankTracker(raw_model, every=1, method=cfg["spectra"], eps=cfg["eps"],
                          alignment=cfg["alignment"], average_over=rank_names) if distributed.is_main else None
    records, start_epoch, step = [], 0, 0
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
            tracker.load_state_dict(state["tracker"])
        log(f"Resuming {run_dir} after epoch {start_epoch} (step {step})", always=True)

    train_model: nn.Module = raw_model
    if distributed.active:
        from torch.nn.parallel import DistributedDataParallel
        train_model = DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:
        train_model = torch.compile(train_model)
    eval_model = torch.compile(raw_model) if cfg["compile"] else raw_model

    # ---- run directory (rank 0 names it, the others learn it)
    if run_dir is None:
        run_dir = outputs.default_run_dir(cfg, dataset.name) if distributed.is_main else None
    if distributed.active:
        holder = [str(run_dir) if run_dir is not None else None]
        dist.broadcast_object_list(holder, src=0)
        run_dir = Path(holder[0])
    cfg["out"] = str(run_dir)
    resolved = {
        "dataset": dataset.name, "data_path": None if dataset.is_synthetic else dataset.source,
        "dataset_note": dataset.note or dataset.describe(), "num_train": len(dataset.train),
        "num_test": len(dataset.test), "steps_per_epoch": steps_per_epoch, "device": str(device),
        "threads": torch.get_num_threads(), "world_size": distributed.world_size,
        "per_process_batch": cfg["batch_size"] // distributed.world_size, "rank_layers": rank_names,
        "optimizer_class": type(optimizer).__name__, "versions": outputs.versions(),
    }
    saved_cfg = {k: v for k, v in cfg.items() if k not in NOT_SAVED}
    return Session(cfg, distributed, device, log, dataset, train_loader, test_loader, raw_model, train_model,
                   eval_model, optimizer, scheduler, tracker, rank_names, run_dir, resolved, saved_cfg,
                   records, start_epoch, step, resumed=state is not None)


def open_outputs(s: Session) -> None:
    """config.json, the metrics so far, ranks.jsonl and TensorBoard (rank 0)."""
    if not s.is_main:
        return
    s.run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_json(s.run_dir / "config.json", {**s.saved_cfg, "resolved": s.resolved})
    (s.run_dir / "summary.json").unlink(missing_ok=True)
    outputs.write_metrics(s.run_dir, s.records)
    if s.resumed:
        outputs.write_rank_records(s.run_dir, s.tracker.history, rewrite=True)
    else:
        (s.run_dir / "ranks.jsonl").unlink(missing_ok=True)
    s.tb = outputs.open_tensorboard(s.run_dir, purge_step=s.start_epoch + 1 if s.resumed else None)
    cfg, world = s.cfg, s.distributed.world_size
    s.log(f"Run directory: {s.run_dir}")
    s.log(f"Model {cfg['model']} ({sum(p.numel() for p in s.raw_model.parameters()):,} parameters), "
          f"{type(s.optimizer).__name__} lr {cfg['lr']:g} momentum {cfg['momentum']:g} weight decay "
          f"{cfg['weight_decay']:g}, batch {cfg['batch_size']}" + (f" over {world} processes" if world > 1 else "")
          + f", {len(s.train_loader)} steps/epoch, device {s.device}; average rank over {len(s.rank_names)} layers")


# ------------------------------------------------------------------------------------ training
def train_one_epoch(s: Session, epoch: int, progress) -> tuple[float, float, int, float]:
    """One pass over the training set: (mean loss, accuracy, examples, seconds)."""
    s.train_model.train()
    totals = torch.zeros(2, dtype=torch.float64, device=s.device)
    seen = 0
    bar = progress(len(s.train_loader), f"epoch {epoch + 1}/{s.cfg['epochs']}") if progress else None
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(s.train_loader.epoch(epoch)):
        with s.autocast():
            logits = s.train_model(x)
            loss = F.cross_entropy(logits, y)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.optimizer.step()
        s.scheduler.step()
        s.step += 1
        with torch.no_grad():
            totals += torch.stack([loss.detach().double() * y.numel(), (logits.argmax(1) == y).sum().double()])
        seen += y.numel()
        if s.tracker is not None and s.cfg["track_every"] and s.step % s.cfg["track_every"] == 0:
            s.track(s.step)
        if bar is not None:
            bar.update(1)
            if i % 20 == 0 or i == len(s.train_loader) - 1:  # .tolist() waits for the device
                loss_sum, correct = totals.tolist()
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
    if bar is not None:
        bar.close()
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)
    seconds = time.perf_counter() - t0
    loss_sum, correct, count = sum_over_ranks(totals, seen, s.distributed)
    if s.distributed.active:
        broadcast_buffers(s.raw_model)
    return loss_sum / count, correct / count, count, seconds


def epoch_record(s: Session, epoch: int, lr: float, train: tuple | None) -> dict:
    """The record of the model after ``epoch`` epochs (0: the initial model); ``train`` is
    ``train_one_epoch``'s result. A diverged epoch is not evaluated."""
    train_loss, train_acc, count, seconds = train if train is not None else (None, None, None, None)
    if train is not None and not math.isfinite(train_loss):
        test_loss, test_acc, eval_time, avg_rank, layers = None, None, 0.0, None, {}
    else:
        test_loss, test_acc, eval_time = s.evaluation()
        t0 = time.perf_counter()
        avg_rank, layers = s.rank_record(s.step)
        eval_time += time.perf_counter() - t0
    return {"epoch": epoch, "step": s.step, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
            "test_loss": test_loss, "test_acc": test_acc, "avg_threshold_rank": avg_rank,
            "epoch_time_s": seconds, "eval_time_s": eval_time,
            "images_per_s": count / seconds if seconds else None, "dataset": s.dataset.name, "layers": layers}


def train_epochs(s: Session, epoch_callback=None) -> str:
    """The training loop, from the run's start or its checkpoint; returns the run's status."""
    progress = _progress_factory() if s.is_main and not s.cfg["quiet"] else None
    if not s.resumed:
        s.publish(epoch_record(s, 0, s.optimizer.param_groups[0]["lr"], None))
    for epoch in range(s.start_epoch + 1, s.cfg["epochs"] + 1):
        lr = float(s.optimizer.param_groups[0]["lr"])
        record = epoch_record(s, epoch, lr, train_one_epoch(s, epoch - 1, progress))
        s.publish(record)
        if record["test_loss"] is None:
            s.log(f"Training diverged at epoch {epoch} (train loss {record['train_loss']}); stopping. "
                  "Lower --lr or raise --warmup-epochs.", always=True)
            return "diverged"
        if s.checkpoint_due(epoch):
            ckpt.save_checkpoint(s.run_dir, epoch, s.checkpoint_state(epoch), keep=s.cfg["keep_checkpoints"])
        if epoch_callback is not None:
            epoch_callback(record)
    return "finished"


def finish(s: Session, status: str, started: float) -> None:
    """Plots, summary.json and the closing line (rank 0)."""
    cfg, synthetic = s.cfg, s.dataset.is_synthetic
    plots_missing = cfg["plots"] and not outputs.plots_available()
    if cfg["plots"] and not plots_missing and s.tracker is not None and s.tracker.history:
        title = (f"{cfg['model']}  lr {cfg['lr']:g}  wd {cfg['weight_decay']:g}  batch {cfg['batch_size']}  "
                 f"seed {cfg['seed']}  |  {outputs.dataset_label(s.resolved)}")
        try:
            paths = outputs.write_plots(s.run_dir, s.tracker, [r for r in s.records if r["avg_threshold_rank"] is not None],
                                        s.rank_names, title)
            s.log(f"Plots: {', '.join(str(p.relative_to(s.run_dir)) for p in paths)}")
        except Exception as err:  # a plotting failure must not lose the finished run's summary
            s.log(f"plots failed ({type(err).__name__}: {err})", always=True)
    outputs.write_summary(s.run_dir, status, s.records, s.resolved, s.saved_cfg, time.perf_counter() - started)
    line = outputs.closing_line(s.records, s.run_dir, synthetic, plots_missing)
    if line is not None:
        s.log(line, always=True)


def _progress_factory():
    """A tqdm bar per epoch when tqdm is installed and the output is a terminal, else nothing
    (the per-epoch line is printed either way)."""
    if importlib.util.find_spec("tqdm") is None or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return lambda total, desc: tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------------------------ entry points
def _logger(is_main: bool, quiet: bool) -> Callable[..., None]:
    def log(message: str, always: bool = False):
        if is_main and (always or not quiet):
            print(message, flush=True)
    return log


def main(argv: list[str] | None = None, *, epoch_callback: Callable[[dict], Any] | None = None) -> Path:
    """Train as the command line ``argv`` says; returns the run directory.

    ``epoch_callback(record)`` is called after every epoch's record and checkpoint are written
    (an exception raised there stops the run, as a kill would)."""
    cfg, explicit = parse_settings(argv)
    start = open_run(cfg, explicit, _logger(process_rank() == 0, cfg["quiet"]))
    if start.finished:
        return start.run_dir
    cfg = start.cfg
    try:
        distributed, device = init_distributed(cfg["device"])
    except ConfigError as err:
        if start.state is None:
            raise
        raise ConfigError(f"{err}. The run was trained on {start.state['resolved']['device']}; pass "
                          "--device to continue elsewhere (the results will then differ from an "
                          "uninterrupted run)") from None
    _check_backend(cfg, device)
    try:
        return _run(start, distributed, device, epoch_callback)
    finally:
        if distributed.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _check_backend(cfg: dict, device: torch.device) -> None:
    """--backend must run on the device before any data or model is loaded (DecaySGD would
    refuse it at construction, as a traceback)."""
    if cfg["optimizer"] == "sgd":
        return
    reason = why_unavailable(cfg["backend"], device) if cfg["backend"] != "auto" else None
    if reason is not None:
        raise ConfigError(f"--backend {cfg['backend']} cannot run on {device}: {reason}")


def _run(start: RunStart, distributed: Distributed, device: torch.device, epoch_callback) -> Path:
    cfg = start.cfg
    log = _logger(distributed.is_main, cfg["quiet"])
    if distributed.active:  # every rank has looked at the run directory before rank 0 writes to it
        dist.barrier()
    set_determinism(cfg["deterministic"], device)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cfg["sync_bn"] and (not distributed.active or device.type != "cuda"):
        raise ConfigError("--sync-bn needs several CUDA processes (torchrun on GPUs)")
    started = time.perf_counter()
    session = prepare(start, distributed, device, log)
    try:
        open_outputs(session)
        status = train_epochs(session, epoch_callback)
    finally:
        if session.tb is not None:
            session.tb.close()
    if distributed.active:
        dist.barrier()
    if distributed.is_main:
        finish(session, status, started)
    if distributed.active:  # no rank leaves the process group while rank 0 still writes
        dist.barrier()
    return session.run_dir


def cli(argv: list[str] | None = None) -> int:
    try:
        main(argv)
    except (ConfigError, data_mod.DatasetError, ckpt.CheckpointError) as err:
        if process_rank() == 0:  # under torchrun every process fails alike: one message
            print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train.py: interrupted; continue with --resume auto --out RUN_DIR", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
