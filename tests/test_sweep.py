"""training/sweep.py and training/sweep_plots.py: the grid, skipping and resuming runs, the table
and the pictures.

The runs are real train.py processes on a tiny MLP and a tiny synthetic data set (a few seconds
each); the plotting tests use run directories written here by hand.
"""
from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from training import sweep, sweep_plots  # noqa: E402

TINY = ["--model", "mlp", "--depth", "1", "--width", "8", "--dataset", "synthetic", "--train-subset", "64",
        "--test-subset", "32", "--epochs", "2", "--no-plots", "--threads", "1"]
LRS, WDS, BSS = [0.05, 0.1], [1e-3], [16]
PICTURES = {"heatmap_rank_lr_wd.png", "heatmap_rank_lr_bs.png", "heatmap_rank_wd_bs.png", "curves.png",
            "rank_history.png"}


def no_launch(command, log_file, env):
    raise AssertionError(f"nothing should be launched, got {command}")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# ------------------------------------------------------------------------------------ the grid
def test_grid_order_names_and_exact_arguments():
    grid = sweep.make_grid([0.1, 0.0123456789], [0, 5e-4], [32])
    assert [s.name for s in grid] == ["lr0.1_wd0_bs32", "lr0.1_wd0.0005_bs32",
                                      "lr0.0123457_wd0_bs32", "lr0.0123457_wd0.0005_bs32"]
    # The directory name rounds; the value handed to train.py does not.
    assert grid[2].argv() == ["--lr", "0.0123456789", "--weight-decay", "0.0", "--batch-size", "32"]
    assert float(grid[3].argv()[3]) == 5e-4


@pytest.mark.parametrize("lrs, wds, bss, message", [
    ([], [0.0], [8], "--lr needs at least one value"),
    ([-0.1], [0.0], [8], "finite numbers > 0"),
    ([math.nan], [0.0], [8], "finite numbers > 0"),
    ([0.1], [-1e-4], [8], "finite numbers >= 0"),
    ([0.1], [math.inf], [8], "finite numbers >= 0"),
    ([0.1], [0.0], [0], "integers >= 1"),
    ([0.1], [0.0], [True], "integers >= 1"),
    ([0.1, 0.1], [0.0], [8], "lists 0.1 twice"),
    ([0.1, 0.1000000001], [0.0], [8], "both read 0.1 in run names"),
])
def test_bad_grids_are_refused(lrs, wds, bss, message):
    with pytest.raises(sweep.SweepError, match=message):
        sweep.make_grid(lrs, wds, bss)


@pytest.mark.parametrize("extra, flag", [
    (["--lr", "0.1"], "--lr"),
    (["--weight", "0.1"], "--weight-decay"),        # argparse abbreviation of --weight-decay
    (["--out", "elsewhere"], "--out"),
    (["--resume"], "--resume"),
])
def test_train_arguments_may_not_set_what_the_sweep_sets(extra, flag):
    with pytest.raises(sweep.SweepError, match=flag):
        sweep.check_train_args(TINY + extra)


def test_train_arguments_are_checked_by_train_py(tmp_path):
    with pytest.raises(sweep.SweepError, match="does not accept"):
        sweep.check_train_args(["--no-such-flag"])
    with pytest.raises(sweep.SweepError, match="--epochs must be > 0"):
        sweep.run_sweep(tmp_path, sweep.make_grid([0.1], [0.0], [8]), [*TINY, "--epochs", "0"],
                        launcher=no_launch, log=None)


# ------------------------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """A 2 x 1 x 1 sweep whose second run was interrupted after its first epoch beforehand: the
    sweep starts one run and resumes the other, two processes at a time."""
    from training import train

    out = tmp_path_factory.mktemp("sweep")
    grid = sweep.make_grid(LRS, WDS, BSS)
    interrupted = out / grid[1].name

    def stop_after_first_epoch(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.main([*TINY, *grid[1].argv(), "--out", str(interrupted), "--quiet"],
                   epoch_callback=stop_after_first_epoch)
    assert not (interrupted / "summary.json").exists()
    before = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in before] == [0, 1]

    lines = []
    result = sweep.run_sweep(out, grid, TINY, jobs=2, log=lines.append)
    rows, paths = sweep.report(out, log=lines.append)
    return {"out": out, "grid": grid, "result": result, "rows": rows, "paths": paths,
            "lines": lines, "before": before}


def test_sweep_starts_new_runs_and_resumes_interrupted_ones(finished_sweep):
    out, grid, result = finished_sweep["out"], finished_sweep["grid"], finished_sweep["result"]
    assert result.ok, finished_sweep["lines"]
    assert result.started == [grid[0].name]
    assert result.resumed == [grid[1].name]
    assert sorted(result.completed) == sorted(s.name for s in grid)
    assert any(line.startswith(f"resume  {grid[1].name} (from the epoch-1 checkpoint)")
               for line in finished_sweep["lines"])
    resumed = out / grid[1].name
    assert "Resuming" in (out / "logs" / f"{grid[1].name}.log").read_text()
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    # The first epoch was kept from before the interruption, not trained again.
    assert records[1]["train_loss"] == finished_sweep["before"][1]["train_loss"]
    # The per-run settings: the grid's values exactly, the common arguments, the CPU share.
    config = summary_of(out / grid[0].name)["config"]
    assert (config["lr"], config["weight_decay"], config["batch_size"]) == (0.05, 1e-3, 16)
    assert config["epochs"] == 2 and config["model"] == "mlp" and config["threads"] == 1


def test_table_holds_each_runs_final_record(finished_sweep):
    out, grid = finished_sweep["out"], finished_sweep["grid"]
    table = read_csv(out / "sweep.csv")
    assert [r["run"] for r in table] == [s.name for s in grid]
    assert list(table[0]) == list(sweep.TABLE_COLUMNS)
    jsonl = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    for spec, row, full in zip(grid, table, jsonl):
        final = summary_of(out / spec.name)["final"]
        assert float(row["lr"]) == spec.lr and float(row["weight_decay"]) == spec.weight_decay
        assert int(row["batch_size"]) == spec.batch_size and int(row["epochs"]) == 2
        for key in ("avg_threshold_rank", "train_acc", "test_acc", "train_loss", "test_loss"):
            assert float(row[key]) == final[key], key
        # The Yunis et al. averages of the final record: the normalised effective rank over the
        # average-rank layers, the alignment over the layers feeding the next one.
        layers = final["layers"]
        averaged = summary_of(out / spec.name)["resolved"]["rank_layers"]
        aligned = [m["alignment"] for m in layers.values() if "alignment" in m]
        assert aligned and float(row["avg_alignment"]) == pytest.approx(sum(aligned) / len(aligned))
        assert float(row["avg_normalized_effective_rank"]) == pytest.approx(
            sum(layers[n]["normalized_effective_rank"] for n in averaged) / len(averaged))
        assert full["layers"] == final["layers"] and full["config"]["lr"] == spec.lr
    names = {p.name for p in finished_sweep["paths"]}
    # lr varies, the others do not: no heat map of (weight decay, batch size).
    assert names == {"sweep.csv", "sweep.jsonl", "heatmap_rank_lr_wd.png", "heatmap_rank_lr_bs.png",
                     "curves.png", "rank_history.png", "effective_rank_history.png", "alignment_history.png"}
    for path in finished_sweep["paths"]:
        assert path.stat().st_size > 0


def test_second_call_skips_finished_runs(finished_sweep):
    out, grid = finished_sweep["out"], finished_sweep["grid"]
    stamps = {s.name: (out / s.name / "summary.json").stat().st_mtime_ns for s in grid}
    lines = []
    result = sweep.run_sweep(out, grid, TINY, jobs=2, log=lines.append, launcher=no_launch)
    assert result.skipped == [s.name for s in grid]
    assert not result.started and not result.resumed and result.ok
    assert stamps == {s.name: (out / s.name / "summary.json").stat().st_mtime_ns for s in grid}
    log = (out / "sweep.log").read_text()
    assert f"skip    {grid[0].name} (finished: summary.json exists)" in log


def test_changed_settings_are_refused_before_anything_runs(finished_sweep):
    out, grid = finished_sweep["out"], finished_sweep["grid"]
    with pytest.raises(sweep.SweepError, match=r"epochs: 2 -> 3") as err:
        sweep.run_sweep(out, grid, [*TINY, "--epochs", "3"], log=None, launcher=no_launch)
    assert grid[0].name in str(err.value) and grid[1].name in str(err.value)


def test_run_without_summary_is_resumed_from_its_checkpoint(finished_sweep):
    out, grid = finished_sweep["out"], finished_sweep["grid"]
    run_dir = out / grid[0].name
    records = (run_dir / "metrics.jsonl").read_text()
    (run_dir / "summary.json").unlink()  # as if killed after the last checkpoint
    lines = []
    result = sweep.run_sweep(out, grid, TINY, log=lines.append)
    assert result.resumed == [grid[0].name] and result.skipped == [grid[1].name], lines
    assert result.completed == [grid[0].name]
    assert (run_dir / "summary.json").is_file()
    assert (run_dir / "metrics.jsonl").read_text() == records  # nothing was trained again


def test_failed_run_is_reported_with_its_output(tmp_path):
    def failing(message, code):
        def launch(command, log_file, env):
            return subprocess.Popen([sys.executable, "-c", f"print({message!r}); raise SystemExit({code})"],
                                    stdout=log_file, stderr=subprocess.STDOUT)
        return launch

    grid = sweep.make_grid([0.1], [0.0], [8])
    lines = []
    result = sweep.run_sweep(tmp_path, grid, TINY, log=lines.append, launcher=failing("cannot train", 3))
    assert result.failed == {grid[0].name: 3} and not result.ok
    failure = next(line for line in lines if line.startswith("FAILED"))
    assert "exit status 3" in failure and "cannot train" in failure
    # A second attempt reports its own output only; the run's log keeps both.
    lines.clear()
    result = sweep.run_sweep(tmp_path, grid, TINY, log=lines.append, launcher=failing("still broken", 4))
    assert result.failed == {grid[0].name: 4}
    failure = next(line for line in lines if line.startswith("FAILED"))
    assert "still broken" in failure and "cannot train" not in failure
    run_log = (tmp_path / "logs" / f"{grid[0].name}.log").read_text()
    assert "cannot train" in run_log and "still broken" in run_log


class _StuckProcess:
    """A process that never ends by itself; records the signals it gets. ``interrupt`` makes its
    first poll raise KeyboardInterrupt, as Ctrl-C would while the sweep waits."""

    def __init__(self, interrupt=False):
        self.signals, self.returncode, self.interrupt = [], None, interrupt

    def poll(self):
        if self.interrupt:
            self.interrupt = False
            raise KeyboardInterrupt
        return self.returncode

    def send_signal(self, sig):
        self.signals.append(sig)
        self.returncode = -sig

    def wait(self, timeout=None):
        return self.returncode

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def test_interrupt_stops_running_processes_with_sigint(tmp_path):
    processes = []

    def launcher(command, log_file, env):
        processes.append(_StuckProcess(interrupt=len(processes) == 1))
        return processes[-1]

    grid = sweep.make_grid([0.05, 0.1, 0.2], [0.0], [8])
    lines = []
    result = sweep.run_sweep(tmp_path, grid, TINY, jobs=2, log=lines.append, launcher=launcher, poll_s=0.01)
    assert result.interrupted and not result.ok
    assert len(processes) == 2  # the third run never started
    assert [p.signals for p in processes] == [[signal.SIGINT], [signal.SIGINT]]
    assert any(line.startswith("interrupted") for line in lines)


def test_dry_run_lists_commands_and_runs_nothing(tmp_path):
    lines = []
    code = sweep.main(["--lr", "0.1", "0.2", "--weight-decay", "0", "--batch-size", "8", "--out",
                       str(tmp_path / "s"), "--dry-run", "--", *TINY], launcher=no_launch, log=lines.append)
    assert code == 0
    commands = [line for line in lines if line.startswith("start")]
    assert len(commands) == 2 and "--resume auto" in commands[0] and "--lr 0.1" in commands[0]
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------ pictures
def fake_run(out: Path, lr: float, wd: float, bs: int, rank: float, test_acc: float, status="finished"):
    """A finished run directory as train.py leaves it (the files the sweep reads)."""
    spec = sweep.RunSpec(lr, wd, bs)
    run_dir = out / spec.name
    run_dir.mkdir(parents=True)
    history = [{"epoch": e, "avg_threshold_rank": 100 - (100 - rank) * e / 3, "train_acc": None if e == 0 else 0.5,
                "test_acc": test_acc, "layers": {}} for e in range(4)]
    final = {**history[-1], "train_acc": test_acc + 0.1, "train_loss": 1.0, "test_loss": 1.2,
             "layers": {"layers.0.weight": {"threshold_rank": int(rank)}}}
    if status == "diverged":
        final.update(avg_threshold_rank=None, test_acc=None)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history[:-1] + [final]))
    summary = {"status": status, "dataset": "synthetic", "epochs_completed": 3, "final": final,
               "initial_avg_threshold_rank": 100.0, "best_test_acc": test_acc, "train_time_s": 1.0,
               "elapsed_s": 2.0, "config": {"lr": lr, "weight_decay": wd, "batch_size": bs, "epochs": 3,
                                            "model": "mlp"}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def reference_rank(lr, wd, bs):
    return round(80 - 100 * lr - 5000 * wd + bs / 16, 6)


def test_plot_only_draws_every_picture_from_finished_runs(tmp_path):
    out = tmp_path / "sweep"
    values = [(lr, wd, bs) for lr in (0.05, 0.1) for wd in (0.0, 1e-3) for bs in (16, 64)]
    for lr, wd, bs in values:
        fake_run(out, lr, wd, bs, reference_rank(lr, wd, bs), test_acc=0.3 + lr)
    (out / "lr0.2_wd0_bs16").mkdir()  # unfinished: no summary.json, left out
    (out / "lr0.2_wd0_bs16" / "config.json").write_text("{}")
    lines = []
    assert sweep.main(["--out", str(out), "--plot-only"], launcher=no_launch, log=lines.append) == 0
    assert {p.name for p in (out / "plots").iterdir()} == PICTURES
    table = read_csv(out / "sweep.csv")
    assert len(table) == len(values)
    for row in table:
        key = (float(row["lr"]), float(row["weight_decay"]), int(row["batch_size"]))
        assert float(row["avg_threshold_rank"]) == reference_rank(*key)
        assert float(row["test_acc"]) == pytest.approx(0.3 + key[0])
    # Fewer finished runs, only lr varying: the (weight decay, batch size) map is not drawn now,
    # and the old file is gone rather than left to mislead.
    for run_dir in out.iterdir():
        if run_dir.is_dir() and ("_bs64" in run_dir.name or "_wd0.001_" in run_dir.name):
            (run_dir / "summary.json").unlink()
    assert sweep.main(["--out", str(out), "--plot-only"], launcher=no_launch, log=None) == 0
    assert {p.name for p in (out / "plots").iterdir()} == PICTURES - {"heatmap_rank_wd_bs.png"}
    assert len(read_csv(out / "sweep.csv")) == 2


def test_plot_only_needs_finished_runs(tmp_path):
    with pytest.raises(sweep.SweepError, match="does not exist"):
        sweep.main(["--out", str(tmp_path / "missing"), "--plot-only"], log=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(sweep.SweepError, match="no finished run"):
        sweep.main(["--out", str(tmp_path / "empty"), "--plot-only"], log=None)


def test_heatmap_cells_are_the_runs_values():
    rows = []
    for lr in (0.01, 0.05, 0.1):
        for wd in (0.0, 5e-4):
            for bs in (32, 128):
                if (lr, wd, bs) == (0.05, 5e-4, 128):
                    continue  # a missing run
                rows.append({"lr": lr, "weight_decay": wd, "batch_size": bs,
                             "avg_threshold_rank": reference_rank(lr, wd, bs)})
    fig = sweep_plots.heatmap_figure(rows, "lr", "weight_decay")
    panels = [ax for ax in fig.axes if ax.images and ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["batch size = 32", "batch size = 128"]
    for ax, bs in zip(panels, (32, 128)):
        image = ax.images[0].get_array()
        expected = np.array([[reference_rank(lr, wd, bs) for lr in (0.01, 0.05, 0.1)] for wd in (0.0, 5e-4)])
        missing = np.zeros_like(expected, dtype=bool)
        if bs == 128:
            missing[1, 1] = True
        assert np.array_equal(np.ma.getmaskarray(image), missing)
        np.testing.assert_allclose(image.filled(np.nan)[~missing], expected[~missing])
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0.01", "0.05", "0.1"]
    # The panels share the y axis: its labels are on the first.
    assert [t.get_text() for t in panels[0].get_yticklabels()] == ["0", "0.0005"]


def test_diverged_runs_are_marked_not_plotted(tmp_path):
    out = tmp_path / "sweep"
    fake_run(out, 0.05, 0.0, 16, 40.0, 0.4)
    fake_run(out, 0.5, 0.0, 16, 0.0, 0.0, status="diverged")
    rows, _ = sweep.report(out, log=None)
    assert [r["status"] for r in rows] == ["finished", "diverged"]
    fig = sweep_plots.heatmap_figure(rows, "lr", "weight_decay")
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "diverged" in texts and "40" in texts


def test_heatmap_needs_two_hyperparameters():
    rows = [{"lr": 0.1, "weight_decay": 0.0, "batch_size": 8, "avg_threshold_rank": 3.0}]
    with pytest.raises(ValueError, match="two different"):
        sweep_plots.heatmap_figure(rows, "lr", "lr")
    with pytest.raises(ValueError, match="no hyper-parameter"):
        sweep_plots.curves_figure(rows)
    with pytest.raises(ValueError, match="empty"):
        sweep_plots.heatmap_figure([], "lr", "weight_decay")


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "cifar10", "--data", "/nonexistent/cifar"], "every run would fail, so none was started: "),
    (["--device", "cuda:0"], "CUDA is not available"),
])
def test_shared_preconditions_are_checked_once_before_any_launch(tmp_path, extra, message):
    if "--device" in extra and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    at = TINY.index("--dataset")
    args = TINY[:at] + TINY[at + 2:] + extra  # TINY without its "--dataset synthetic"
    if "--dataset" not in extra:
        args += ["--dataset", "synthetic"]
    with pytest.raises(sweep.SweepError, match=message) as err:
        sweep.run_sweep(tmp_path / "sweep", sweep.make_grid(LRS, WDS, BSS), args, launcher=no_launch, log=None)
    assert str(err.value).count("every run would fail") == 1
    assert not (tmp_path / "sweep").exists()


def test_console_table_and_setting_rules_come_from_the_tracker_and_train():
    from lowrank_kernels.tracker import format_table
    from training import train

    rows = [{"run": "lr0.1_wd0_bs16", "status": "finished", "epochs": 2, "avg_threshold_rank": 7.5,
             "train_acc": 0.25, "test_acc": None}]
    assert sweep.format_table(rows) == format_table(rows, sweep.CONSOLE_COLUMNS)
    # Runs differing only in what train.py lets a resume change are one setting; epochs is not.
    base = {"lr": 0.1, "weight_decay": 0.0, "batch_size": 16, "epochs": 2, "momentum": 0.9}
    changeable = sorted(train.RESUME_CHANGEABLE - {"epochs"})
    configs = {"a": {**base, **{k: 1 for k in changeable}}, "b": {**base, **{k: 2 for k in changeable}}}
    assert sweep._differing_settings(configs) == []
    configs["b"]["epochs"] = 3
    assert sweep._differing_settings(configs) == ["epochs (2, 3)"]
