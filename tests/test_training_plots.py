"""What train.py's pictures and titles say: the loss panel on a log scale (a diverging test loss
does not flatten the rest), the data set named in every title, and the ResNet-18 CPU preset."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training import outputs, settings, train  # noqa: E402

CPU_PRESET = ROOT / "training" / "configs" / "resnet18-cpu.toml"


def record(epoch, train_loss, test_loss):
    return {"epoch": epoch, "avg_threshold_rank": 10.0 - epoch, "train_acc": 0.5, "test_acc": 0.4,
            "train_loss": train_loss, "test_loss": test_loss}


def test_the_loss_panel_is_logarithmic():
    pytest.importorskip("matplotlib")
    fig = outputs.curves_figure([record(0, None, 2.3), record(1, 0.9, 3012.0), record(2, 0.02, 1.5)], 1e-3, 3)
    rank, accuracy, loss = fig.axes
    assert loss.get_yscale() == "log" and accuracy.get_yscale() == "linear"
    low, high = loss.get_ylim()
    assert low < 0.02 and high > 3012  # both ends readable, none flattened to the axis


@pytest.mark.parametrize("resolved, label", [
    ({"dataset": "cifar10", "num_train": 50_000, "num_test": 10_000}, "CIFAR-10 (50,000 train / 10,000 test images)"),
    ({"dataset": "cifar10", "num_train": 2_000, "num_test": 1_000}, "CIFAR-10 subset (2,000 train / 1,000 test images)"),
    ({"dataset": "synthetic", "num_train": 128, "num_test": 64}, "SYNTHETIC data, not CIFAR-10"),
])
def test_titles_name_the_data_set(resolved, label):
    assert outputs.dataset_label(resolved) == label


def test_every_plot_of_a_run_is_titled_with_its_data(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    titles = []
    real = outputs.write_plots

    def capture(run_dir, tracker, records, rank_names, title):
        titles.append(title)
        return real(run_dir, tracker, records, rank_names, title)

    monkeypatch.setattr(outputs, "write_plots", capture)
    run = train.main(["--model", "mlp", "--depth", "2", "--width", "16", "--dataset", "synthetic",
                      "--train-subset", "64", "--test-subset", "32", "--epochs", "1", "--batch-size", "32",
                      "--threads", "1", "--quiet", "--out", str(tmp_path / "run")])
    assert titles and titles[0].endswith("|  SYNTHETIC data, not CIFAR-10")
    assert (run / "plots" / "curves.png").stat().st_size > 0


def test_the_resnet18_cpu_preset_is_small_and_trains(tmp_path):
    cfg = settings.read_config_file(CPU_PRESET)
    assert cfg["model"] == "resnet18" and cfg["width"] in (16, 32) and cfg["train_subset"] <= 5000
    assert cfg["device"] == "cpu" and cfg["weight_decay"] > 0
    # One short epoch of the preset as it is (on the data found, or the synthetic stand-in).
    run = train.main(["--config", str(CPU_PRESET), "--train-subset", "64", "--test-subset", "32",
                      "--epochs", "1", "--no-plots", "--quiet", "--out", str(tmp_path / "r18")])
    config = json.loads((run / "config.json").read_text())
    assert len(config["resolved"]["rank_layers"]) == 17 and config["width"] == cfg["width"]


@pytest.mark.skipif(os.environ.get("LOWRANK_LONG_TESTS") != "1",
                    reason="about 5 minutes of CPU per run; set LOWRANK_LONG_TESTS=1 to run it")
def test_the_resnet18_cpu_preset_lowers_the_conv_rank_with_weight_decay(tmp_path):
    def final_rank(*extra):
        run = train.main(["--config", str(CPU_PRESET), "--no-plots", "--quiet", "--out",
                          str(tmp_path / f"run{len(extra)}"), *extra])
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return records[0]["avg_threshold_rank"], records[-1]["avg_threshold_rank"]

    start, with_wd = final_rank()
    _, without_wd = final_rank("--weight-decay", "0")
    assert without_wd == start  # full rank without decay
    assert with_wd < 0.75 * start
