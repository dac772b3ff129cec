"""train.py's run directory, resume and command line: a kill -9 followed by ``--resume auto --out
RUN`` alone continues bit-identically (the thread count and the other execution settings are
restored), a truncated newest checkpoint falls back to an older one, a bad ``--out`` is a clean
error, a finished run names the settings it ignores, ``--help`` shows the defaults, a run without
matplotlib says how to get its plots, and a failing torchrun prints its error once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training import checkpoint as ckpt  # noqa: E402
from training import train  # noqa: E402
from training_runs import assert_same_run  # noqa: E402

# Wide enough that one and two threads sum the matrix products in different orders.
SMALL = ["--model", "mlp", "--depth", "3", "--width", "256", "--dataset", "synthetic", "--train-subset", "512",
         "--test-subset", "64", "--batch-size", "64", "--lr", "0.05", "--momentum", "0.9", "--schedule", "cosine",
         "--track-every", "3", "--checkpoint-every", "1", "--keep-checkpoints", "0", "--no-plots", "--quiet"]


def test_kill_9_then_resume_auto_alone_is_bit_identical(tmp_path):
    """The first run uses one thread; the resumed process would use two by default
    (OMP_NUM_THREADS=2) and sum differently from its first step unless the run's thread count
    comes back from the checkpoint."""
    args = [*SMALL, "--epochs", "3", "--threads", "1"]
    whole = train.main([*args, "--out", str(tmp_path / "whole")])
    parts = tmp_path / "parts"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    # SIGKILL from inside, right after the epoch-2 checkpoint is on disk: no clean-up runs.
    killer = ("import os, signal, sys; from training import train; "
              "train.main(sys.argv[1:], epoch_callback=lambda r: r['epoch'] == 2 and "
              "os.kill(os.getpid(), signal.SIGKILL))")
    proc = subprocess.run([sys.executable, "-c", killer, *args, "--out", str(parts)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (parts / "summary.json").exists() and ckpt.latest_checkpoint(parts).name == "epoch_0002.pt"

    proc = subprocess.run([sys.executable, str(ROOT / "training" / "train.py"), "--resume", "auto",
                           "--out", str(parts)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning" not in proc.stdout + proc.stderr
    assert json.loads((parts / "config.json").read_text())["threads"] == 1
    assert_same_run(whole, parts)


def test_an_explicit_other_thread_count_on_resume_is_warned_about(tmp_path, capsys):
    class Killed(Exception):
        pass

    def stop(record):
        if record["epoch"] == 1:
            raise Killed

    run = tmp_path / "run"
    args = [*SMALL, "--width", "16", "--train-subset", "128", "--epochs", "2", "--out", str(run)]
    with pytest.raises(Killed):
        train.main([*args, "--threads", "1"], epoch_callback=stop)
    train.main([*args, "--threads", "2", "--resume", "auto"])
    err = capsys.readouterr().out
    assert "warning: resuming with --threads 2 where the run was trained with 1" in err
    assert json.loads((run / "summary.json").read_text())["config"]["threads"] == 2


def test_a_truncated_newest_checkpoint_falls_back_to_the_newest_readable_one(tmp_path, capsys):
    class Killed(Exception):
        pass

    def stop(record):
        if record["epoch"] == 2:
            raise Killed

    args = [*SMALL, "--width", "16", "--train-subset", "128", "--epochs", "3", "--threads", "1"]
    whole = train.main([*args, "--out", str(tmp_path / "whole")])
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train.main([*args, "--out", str(run)], epoch_callback=stop)
    newest = ckpt.checkpoint_path(run, 2)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    capsys.readouterr()
    train.main(["--resume", "auto", "--out", str(run)])
    out = capsys.readouterr().out
    assert "skipped 1 unreadable checkpoint" in out and "epoch_0002.pt" in out
    assert "newest readable one, epoch_0001.pt" in out and "after epoch 1" in out
    assert_same_run(whole, run)

    for _, path in ckpt.list_checkpoints(run):  # none readable: a clear error, no traceback
        path.write_bytes(b"")
    (run / "summary.json").unlink()
    assert train.cli(["--resume", "auto", "--out", str(run)]) == 2
    assert "train.py: error: no checkpoint of" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_out_at_or_under_a_file_is_a_clean_error_before_any_data_is_read(tmp_path, capsys, monkeypatch, where):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file\n")
    out = blocker if where == "file" else blocker / "run"

    def no_data(*args, **kwargs):
        raise AssertionError("the data were loaded before --out was checked")

    monkeypatch.setattr(train.data_mod, "load_dataset", no_data)
    assert train.cli([*SMALL, "--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: --out") and "is a file, not a directory" in err


def test_a_finished_run_names_the_settings_it_ignores(tmp_path, capsys):
    run = tmp_path / "run"
    args = [*SMALL, "--width", "16", "--train-subset", "128", "--epochs", "1", "--threads", "1", "--out", str(run)]
    train.main(args)
    before = (run / "summary.json").read_text()
    capsys.readouterr()
    assert train.cli([*args, "--resume", "auto", "--lr", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and "Ignored: lr: 0.05 -> 0.2" in out
    assert (run / "summary.json").read_text() == before
    assert train.cli([*args, "--resume", "auto"]) == 0
    assert "Ignored" not in capsys.readouterr().out


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        train.cli(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: resnet18)", "(default: 200)", "(default: 0.1)", "(default: 0.0005)",
                    "(default: 128)", "(default: multistep)", "(default: [60, 100, 200])", "(default: auto)"):
        assert default in text, default
    assert "(default: None)" not in text


def test_without_matplotlib_the_last_line_says_how_to_get_the_plots(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name.split(".")[0] == "matplotlib" else real(name, *a, **k))
    args = [a for a in SMALL if a != "--no-plots"]
    train.main([*args, "--width", "16", "--train-subset", "128", "--epochs", "1", "--threads", "1",
                "--out", str(tmp_path / "run")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("Average threshold rank") and "pip install -e '.[plots]'" in last
    assert not (tmp_path / "run" / "plots").exists()


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_under_torchrun_only_rank_0_prints_a_shared_error(tmp_path, capsys, monkeypatch, rank, printed):
    monkeypatch.setenv("RANK", rank)
    code = train.cli(["--model", "mlp", "--dataset", "cifar10", "--data", str(tmp_path / "absent"),
                      "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert (err.count("train.py: error:") == 1) if printed else err == ""


def test_a_backend_that_cannot_run_here_is_a_clean_error_before_any_data_is_read(tmp_path, capsys,
                                                                                 monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("the data were loaded before --backend was checked")

    monkeypatch.setattr(train.data_mod, "load_dataset", no_data)
    assert train.cli([*SMALL, "--epochs", "1", "--device", "cpu", "--backend", "cuda",
                      "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: --backend cuda cannot run on cpu"), err
