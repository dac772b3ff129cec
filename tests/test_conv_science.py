"""The convolutional reproduction: the ``resnet18-cpu`` and ``vgg16bn-cpu`` sweep presets (one tiny
run each), the alignment of consecutive layers recorded at every record, the rank-vs-bound table of
a run (training/rank_bound.py) and the GPU cost projection (training/gpu_cost.py)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from lowrank_kernels.spectral.alignment import alignment  # noqa: E402
from training import checkpoint as ckpt  # noqa: E402
from training import gpu_cost, rank_bound, sweep, sweep_plots  # noqa: E402

CPU_PRESETS = {"resnet18-cpu": ("resnet18", 17), "vgg16bn-cpu": ("vgg16_bn", 13)}
TINY_RUN = ["--dataset", "synthetic", "--train-subset", "64", "--test-subset", "32", "--epochs", "1", "--no-plots", "--quiet"]


@pytest.mark.parametrize("name", sorted(CPU_PRESETS))
def test_the_cpu_conv_presets_cover_the_papers_axes(name):
    preset = sweep.PRESETS[name]
    grid = preset.grid
    assert len(grid["weight_decay"]) == 3 and 0.0 in grid["weight_decay"]
    assert len(grid["lr"]) == 2 and len(grid["batch_size"]) == 2
    args = list(preset.train_args)
    # Galanti et al.'s runs: plain SGD, no augmentation; a width this machine can train.
    assert args[args.index("--momentum") + 1] == "0" and "--no-augment" in args
    assert args[args.index("--width") + 1] == "16" and args[args.index("--model") + 1] == CPU_PRESETS[name][0]
    assert preset.jobs == 2


@pytest.fixture(scope="module", params=sorted(CPU_PRESETS))
def tiny_preset_sweep(request, tmp_path_factory):
    """One grid point of the preset, one epoch on 64 images, through the sweep's command line."""
    out = tmp_path_factory.mktemp(request.param)
    code = sweep.main(["--preset", request.param, "--out", str(out), "--lr", "0.2", "--weight-decay", "0.05",
                       "--batch-size", "32", "--", *TINY_RUN], log=None)
    assert code == 0
    return request.param, out


def test_a_tiny_run_of_each_preset_records_rank_effective_rank_and_alignment(tiny_preset_sweep):
    name, out = tiny_preset_sweep
    model, rank_layers = CPU_PRESETS[name]
    rows, _, histories = sweep.collect(out, log=None)
    assert len(rows) == 1
    row = rows[0]
    assert row["model"] == model and row["epochs"] == 1
    assert 0 < row["avg_normalized_effective_rank"] <= 1
    assert 0 <= row["avg_alignment"] <= 1
    summary = json.loads((out / row["run"] / "summary.json").read_text())
    assert len(summary["resolved"]["rank_layers"]) == rank_layers
    # The per-epoch history carries the averages the pictures draw (epoch 0 and epoch 1).
    history = histories[row["run"]]
    assert [r["epoch"] for r in history] == [0, 1]
    assert all(r["avg_alignment"] is not None for r in history)
    _, paths = sweep.report(out, log=None)
    assert {"alignment_history.png", "effective_rank_history.png"} <= {p.name for p in paths}


def test_alignment_is_recorded_at_every_record_and_is_the_papers_score(tiny_preset_sweep):
    name, out = tiny_preset_sweep
    run_dir = next(p for p in out.iterdir() if p.is_dir() and (p / "summary.json").exists())
    records = [json.loads(line) for line in (run_dir / "ranks.jsonl").read_text().splitlines()]
    steps = sorted({r["step"] for r in records})
    assert len(steps) == 2  # initialisation and the end of the epoch
    pairs = {(r["layer"], r["next_layer"]) for r in records if "alignment" in r}
    assert pairs
    for step in steps:
        assert {(r["layer"], r["next_layer"]) for r in records if r["step"] == step and "alignment" in r} == pairs
    # The last record's value is Yunis et al.'s score of the saved weights.
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))["model"]
    layer, nxt = sorted(pairs)[0]
    recorded = next(r["alignment"] for r in records if r["step"] == steps[-1] and r["layer"] == layer)
    expected = float(alignment(state[layer].float(), state[nxt].float()))
    assert recorded == pytest.approx(expected, abs=1e-5)


def test_the_bound_table_of_a_run(tiny_preset_sweep, tmp_path):
    name, out = tiny_preset_sweep
    run_dir = next(p for p in out.iterdir() if p.is_dir() and (p / "summary.json").exists())
    summary = rank_bound.read_run(run_dir)
    rows = rank_bound.bound_rows(summary)
    by_layer = {r["layer"]: r for r in rows}
    first = by_layer["conv1.weight"] if name == "resnet18-cpu" else rows[0]
    assert first["R"] == 32 * 32  # a stride-1 3x3 conv on a 32x32 image: every position
    for row in rows:
        expected = row["B"] * row["R"] * math.log(1 / row["eps"]) / (row["mu"] * row["lam"])
        assert row["window"] == pytest.approx(expected)
        assert row["lam"] == pytest.approx(0.05 / 2) and row["mu"] == pytest.approx(0.2)
        assert row["bound"] == min(row["d_out"], row["d_in"], row["window"])
        assert row["predicts"] == (row["window"] < min(row["d_out"], row["d_in"]))
        assert 0 < row["measured"] <= min(row["d_out"], row["d_in"])
    linear = [r for r in rows if r["R"] == 1]
    assert linear, "the classifier (a Linear layer, applied once per example) is in the table"
    assert rank_bound.main([str(run_dir), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "rank_bound.md").read_text()
    assert "no (bound = full rank)" in text and "Memory window" in text
    assert (tmp_path / "rank_bound.png").stat().st_size > 0


def test_the_bound_predicts_where_the_window_is_short():
    summary = {"config": {"model": "mlp", "depth": 1, "width": 64, "batchnorm": False, "lr": 0.5,
                          "weight_decay": 0.4, "batch_size": 1, "eps": 1e-3},
               "final": {"layers": {"layers.0.weight": {"threshold_rank": 30}}}}
    row = rank_bound.bound_rows(summary)[0]
    # window = 1 * 1 * log(1000) / (0.5 * 0.2) = 69.1 > 64 = min(64, 3072): nothing predicted ...
    assert (row["d_out"], row["d_in"], row["R"]) == (64, 3 * 32 * 32, 1)
    assert row["window"] == pytest.approx(math.log(1000) / 0.1) and not row["predicts"]
    # ... while a larger decay brings the window below the matrix's rank.
    summary["config"]["weight_decay"] = 0.8
    row = rank_bound.bound_rows(summary)[0]
    assert row["predicts"] and row["bound"] == pytest.approx(math.log(1000) / 0.2)
    summary["config"]["weight_decay"] = 0.0
    assert math.isinf(rank_bound.bound_rows(summary)[0]["window"])


def test_the_bound_tool_refuses_what_is_not_a_finished_run(tmp_path):
    with pytest.raises(rank_bound.RunError, match="no summary.json"):
        rank_bound.read_run(tmp_path)
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(rank_bound.RunError, match="not valid JSON"):
        rank_bound.read_run(tmp_path)


def test_layer_averages_skip_what_is_not_recorded():
    record = {"layers": {"a": {"normalized_effective_rank": 0.5, "alignment": 0.2},
                         "b": {"normalized_effective_rank": 0.7}, "c": {"normalized_effective_rank": 0.1}}}
    averages = sweep_plots.layer_averages(record, ["a", "b"])
    assert averages["avg_normalized_effective_rank"] == pytest.approx(0.6)
    assert averages["avg_alignment"] == pytest.approx(0.2)
    assert sweep_plots.layer_averages({"layers": {}}) == {"avg_normalized_effective_rank": None,
                                                          "avg_alignment": None}


def test_gpu_cost_counts_a_real_step():
    flops_2, seconds = gpu_cost.step_cost(batch_size=2, steps=1, width=8)
    flops_4, _ = gpu_cost.step_cost(batch_size=4, steps=1, width=8)
    assert seconds > 0
    # Convolutions dominate and scale with the batch; the optimizer's share does not.
    assert 1.8 < flops_4 / flops_2 < 2.05
    assert torch.get_num_threads() >= 1
