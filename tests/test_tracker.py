"""RankTracker end to end on a small conv + linear model: history, values, files, plots, hooks."""
import csv
import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from lowrank_kernels.spectral import MEASURES, all_measures, alignment, tracked_matrices
from lowrank_kernels.tracker import (DEFAULT_MEASURES, PLOT_KINDS, RankTracker, format_table,
                                     galanti_resnet18_layers)

HAS_EIGH = importlib.util.find_spec("lowrank_kernels.ops.symmetric_eig") is not None
needs_eigh = pytest.mark.skipif(not HAS_EIGH, reason="lowrank_kernels.ops.symmetric_eig (batched_eigh, used by "
                                                     "singular vectors and the randomized tier) is not there yet")
LAYERS = ["0.weight", "2.weight", "5.weight"]


def small_model(device="cpu"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10)).to(device)


def train_step(model, optimizer, device="cpu"):
    x = torch.randn(4, 3, 8, 8, device=device)
    y = torch.randint(0, 10, (4,), device=device)
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def expected_measures(model, measures=DEFAULT_MEASURES, eps=1e-3):
    matrices = [t.matrix() for t in tracked_matrices(model)]
    return all_measures(matrices, measures, eps=eps)


@pytest.fixture
def trained(device):
    """A tracker (every=2) driven by hand through 5 SGD steps, with the expected values per record."""
    model = small_model(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    tracker = RankTracker(model, every=2)
    expected = {}
    for _ in range(5):
        train_step(model, optimizer, device)
        records = tracker.step()
        if records is not None:
            expected[records[0]["step"]] = expected_measures(model)
    return tracker, expected


def test_history_steps_and_values(trained):
    tracker, expected = trained
    assert tracker.steps == [0, 2, 4]
    assert len(tracker.history) == 3 * len(LAYERS)
    assert tracker.layer_names == LAYERS
    for step, values in expected.items():
        records = [r for r in tracker.history if r["step"] == step]
        assert [r["layer"] for r in records] == LAYERS
        for i, record in enumerate(records):
            assert set(record) == {"step", "layer", *DEFAULT_MEASURES}
            assert isinstance(record["threshold_rank"], int)
            for measure in DEFAULT_MEASURES:
                assert record[measure] == pytest.approx(values[measure][i].item(), rel=1e-12, abs=1e-12)


def test_spectra_kept(trained):
    tracker, _ = trained
    for tracked in tracked_matrices(tracker.model):
        series = tracker.spectra[tracked.name]
        assert [step for step, _ in series] == [0, 2, 4]
        step, values = series[-1]
        assert isinstance(values, np.ndarray) and values.shape == (min(tracked.matrix().shape),)
        reference = torch.linalg.svdvals(tracked.matrix().double().cpu()).numpy()
        np.testing.assert_allclose(values, reference, rtol=1e-8, atol=1e-10)


def test_average_threshold_rank(trained):
    tracker, _ = trained
    averages = tracker.average_threshold_rank()
    assert [step for step, _ in averages] == [0, 2, 4]
    for step, value in averages:
        ranks = [r["threshold_rank"] for r in tracker.history if r["step"] == step]
        assert value == pytest.approx(np.mean(ranks))
    convs = dict(tracker.average_threshold_rank(["0.weight", "2.weight"]))
    last = {r["layer"]: r["threshold_rank"] for r in tracker.history if r["step"] == 4}
    assert convs[4] == pytest.approx((last["0.weight"] + last["2.weight"]) / 2)
    assert dict(tracker.average_threshold_rank("5."))[4] == last["5.weight"]
    assert dict(tracker.average_threshold_rank(lambda name: name.startswith("2")))[4] == last["2.weight"]
    with pytest.raises(ValueError, match="not tracked"):
        tracker.average_threshold_rank(["fc.weight"])
    with pytest.raises(ValueError, match="selects no tracked layer"):
        tracker.average_threshold_rank("nope")


def test_summary_table(trained):
    tracker, _ = trained
    rows = tracker.summary()
    assert [row["layer"] for row in rows] == LAYERS
    assert rows[0]["shape"] == (8, 3, 3, 3) and rows[2]["shape"] == (10, 16)
    assert rows == tracker.summary(4)
    last = [r for r in tracker.history if r["step"] == 4]
    assert rows[1]["threshold_rank"] == last[1]["threshold_rank"]
    assert tracker.summary(0)[0]["spectral_norm"] == tracker.history[0]["spectral_norm"]
    text = tracker.format_summary()
    lines = text.splitlines()
    assert lines[0].startswith("step 4")
    assert all(m in lines[1] for m in ("layer", "shape", *DEFAULT_MEASURES))
    assert "8x3x3x3" in text and "16x8x3x3" in text and "10x16" in text
    row = next(line for line in lines if line.startswith("5.weight"))
    assert str(rows[2]["threshold_rank"]) in row.split()
    assert "average threshold_rank over 3 layers" in lines[-1]
    with pytest.raises(KeyError, match="not recorded"):
        tracker.summary(3)


def test_attach_records_automatically(device):
    model = small_model(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = RankTracker(model, every=2)
    handle = tracker.attach(optimizer)
    for _ in range(4):
        train_step(model, optimizer, device)
    assert tracker.steps == [0, 2]
    assert len(tracker.history) == 2 * len(LAYERS)
    handle.remove()
    for _ in range(4):
        train_step(model, optimizer, device)
    assert tracker.steps == [0, 2]
    tracker.record()  # forced: under the step count so far
    assert tracker.steps == [0, 2, 4]
    tracker.record(step=100)
    assert tracker.steps[-1] == 100
    tracker.record(step=100)  # the same step again: summaries and averages use the latest values
    assert len(tracker.summary()) == len(LAYERS)
    assert len(tracker.average_threshold_rank()) == 4


def test_files_written(tmp_path, device):
    model = small_model(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = RankTracker(model, every=2, log_dir=tmp_path / "run")
    tracker.attach(optimizer)
    for _ in range(3):
        train_step(model, optimizer, device)
    tracker.close()
    lines = (tmp_path / "run" / "ranks.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == tracker.history
    with open(tmp_path / "run" / "ranks.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "layer", *DEFAULT_MEASURES]
    assert len(rows) == 1 + len(tracker.history)
    assert [row[:2] for row in rows[1:4]] == [["0", name] for name in LAYERS]
    assert float(rows[1][5]) == pytest.approx(tracker.history[0]["stable_rank"])

    # A second tracker on the same directory appends, with no second header.
    again = RankTracker(model, every=2, log_dir=tmp_path / "run")
    again.record()
    with open(tmp_path / "run" / "ranks.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert sum(row[0] == "step" for row in rows) == 1
    assert len(rows) == 1 + len(tracker.history) + len(LAYERS)
    with pytest.raises(ValueError, match="exists with columns"):
        RankTracker(model, measures=("stable_rank",), log_dir=tmp_path / "run")


def test_tensorboard_when_available(tmp_path, monkeypatch):
    scalars = []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    tracker = RankTracker(small_model(), measures=("threshold_rank",), log_dir=tmp_path)
    tracker.record()
    tags = {tag for tag, _, _ in scalars}
    assert tags == {"threshold_rank/0.weight", "threshold_rank/2.weight", "threshold_rank/5.weight",
                    "average_threshold_rank"}


def test_no_tensorboard_is_silent(tmp_path, monkeypatch, recwarn):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    tracker = RankTracker(small_model(), log_dir=tmp_path)
    tracker.record()
    assert tracker._writer is None
    assert not [w for w in recwarn if "TensorBoard" in str(w.message)]
    assert (tmp_path / "ranks.csv").exists()


def test_plots_render_headless(trained, tmp_path):
    tracker, _ = trained
    outputs = {kind: tmp_path / f"{kind}.png" for kind in PLOT_KINDS if kind != "alignment"}
    for kind, path in outputs.items():
        figure = tracker.plot(kind, path)
        assert figure is not None and hasattr(figure, "savefig")
        assert path.exists() and path.stat().st_size > 1000
    by_index = tmp_path / "by_index.png"
    tracker.plot("singular_values", by_index, layer="2.weight", by="index", top=4)
    assert by_index.stat().st_size > 1000
    assert tracker.plot("average_rank", average_over=["0.weight"]) is not None
    with pytest.raises(ValueError, match="unknown layer"):
        tracker.plot("singular_values", layer="missing.weight")
    with pytest.raises(ValueError, match="alignment=True"):
        tracker.plot("alignment")


@needs_eigh
def test_alignment_records_and_plot(tmp_path, device):
    model = small_model(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = RankTracker(model, every=2, alignment=True, log_dir=tmp_path)
    tracker.attach(optimizer)
    for _ in range(3):
        train_step(model, optimizer, device)
    # conv(3->8) -> conv(8->16) -> linear(16->10): both pairs chain.
    assert [(LAYERS[i], LAYERS[j]) for i, j in tracker.pairs] == [(LAYERS[0], LAYERS[1]), (LAYERS[1], LAYERS[2])]
    weights = [model[0].weight, model[2].weight, model[5].weight]
    last = [r for r in tracker.history if r["step"] == 2]
    tracker.record()  # the weights as they are now, to compare with the direct computation
    now = [r for r in tracker.history if r["step"] == tracker.steps[-1]]
    for i in range(2):
        assert now[i]["next_layer"] == LAYERS[i + 1]
        direct = alignment(weights[i].detach(), weights[i + 1].detach()).item()
        assert now[i]["alignment"] == pytest.approx(direct, abs=1e-8)
        assert 0.0 <= last[i]["alignment"] <= 1.0 + 1e-9
    assert "alignment" not in now[2]
    header = (tmp_path / "ranks.csv").read_text().splitlines()[0]
    assert header.endswith("alignment,next_layer")
    path = tmp_path / "alignment.png"
    tracker.plot("alignment", path)
    assert path.stat().st_size > 1000
    assert "alignment" in tracker.format_summary()


def test_alignment_skips_pairs_that_do_not_chain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(7, 4), nn.Linear(4, 3))
    tracker = RankTracker(model, alignment=True)
    assert tracker.pairs == [(1, 2)]


def test_method_auto_and_explicit():
    model = small_model()
    assert RankTracker(model).resolve_method() == "exact"  # CPU
    assert RankTracker(model, method="randomized").resolve_method() == "randomized"
    with pytest.raises(ValueError, match="method"):
        RankTracker(model, method="svd")


@needs_eigh
def test_randomized_threshold_rank_matches_exact():
    torch.manual_seed(0)
    # Rank-5 layers larger than k + oversample, so the randomized tier really runs.
    model = nn.Sequential(nn.Linear(120, 100), nn.Linear(100, 90))
    with torch.no_grad():
        for layer in model:
            layer.weight.copy_(torch.randn(layer.weight.shape[0], 5) @ torch.randn(5, layer.weight.shape[1]))
    exact = RankTracker(model, method="exact", k=8)
    randomized = RankTracker(model, method="randomized", k=8)
    exact.record()
    randomized.record()
    for a, b in zip(exact.history, randomized.history):
        assert a["threshold_rank"] == b["threshold_rank"] == 5
        assert a["spectral_norm"] == pytest.approx(b["spectral_norm"], rel=1e-4)
    assert randomized.last_method == "randomized"


def test_bad_inputs():
    model = small_model()
    with pytest.raises(ValueError, match="unknown measure"):
        RankTracker(model, measures=("threshold_rank", "rank_of_doom"))
    for every in (0, -3, 1.5):
        with pytest.raises(ValueError, match="every"):
            RankTracker(model, every=every)
    with pytest.raises(ValueError, match="no trackable"):
        RankTracker(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4)))
    with pytest.raises(ValueError, match="no trackable"):
        RankTracker(model, include="nothing-matches")
    with pytest.raises(TypeError, match="nn.Module"):
        RankTracker(torch.randn(3, 3))
    with pytest.raises(ValueError, match="not tracked"):
        RankTracker(model, average_over=["layer1.0.conv1.weight"])
    tracker = RankTracker(model)
    with pytest.raises(RuntimeError, match="nothing recorded"):
        tracker.plot("average_rank")
    with pytest.raises(RuntimeError, match="nothing recorded"):
        tracker.summary()
    tracker.record()
    with pytest.raises(ValueError, match="unknown plot kind"):
        tracker.plot("histogram")
    no_threshold = RankTracker(model, measures=("stable_rank",))
    no_threshold.record()
    with pytest.raises(ValueError, match="threshold_rank"):
        no_threshold.average_threshold_rank()
    with pytest.raises(ValueError, match="normalized_effective_rank"):
        no_threshold.plot("effective_rank_heatmap")
    with pytest.raises(ValueError, match="keep_spectra"):
        no_spectra = RankTracker(model, keep_spectra=False)
        no_spectra.record()
        no_spectra.plot("singular_values")


def test_all_measures_can_be_tracked():
    tracker = RankTracker(small_model(), measures=MEASURES)
    records = tracker.record()
    assert set(records[0]) == {"step", "layer", *MEASURES}


def test_galanti_resnet18_layers():
    names = ["conv1.weight", "bn1.weight", "bn1.bias"]
    for stage in range(1, 5):
        for block in range(2):
            names += [f"layer{stage}.{block}.conv1.weight", f"layer{stage}.{block}.bn1.weight",
                      f"layer{stage}.{block}.conv2.weight"]
            if stage > 1 and block == 0:
                names += [f"layer{stage}.{block}.shortcut.0.weight", f"layer{stage}.{block}.downsample.0.weight"]
    names += ["fc.weight", "fc.bias"]
    picked = galanti_resnet18_layers(names)
    assert len(picked) == 17
    assert picked[0] == "conv1.weight" and "layer4.1.conv2.weight" in picked
    assert not any("shortcut" in n or "downsample" in n or "fc" in n or "bn" in n for n in picked)
    assert len(galanti_resnet18_layers(["module." + n for n in names])) == 17
    with pytest.raises(ValueError, match="no ResNet layer"):
        galanti_resnet18_layers(["0.weight", "2.weight"])


def test_format_table_alignment():
    text = format_table([{"layer": "a", "rank": 3, "norm": 1.5}, {"layer": "longer.name", "rank": 12, "norm": None}])
    header, rule, first, second = text.splitlines()
    assert header.split() == ["layer", "rank", "norm"]
    assert first.startswith("a ") and first.endswith("1.5000")
    assert len(header) == len(rule) and second.split() == ["longer.name", "12"]


def test_attach_records_the_final_step_when_the_run_is_not_a_multiple_of_every():
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with RankTracker(model, every=3) as tracker:
        tracker.attach(optimizer)
        for _ in range(7):  # counts 0..6; every=3 records 0, 3, 6 -- and 8 steps would end at 7
            train_step(model, optimizer)
        train_step(model, optimizer)
    assert tracker.steps == [0, 3, 6, 7]
    final = {rec["layer"]: rec for rec in tracker.history if rec["step"] == 7}
    expected = expected_measures(model)
    for i, name in enumerate(LAYERS):
        assert final[name]["threshold_rank"] == int(expected["threshold_rank"][i])
    assert tracker.finish() is None  # already recorded: nothing twice


def test_state_dict_round_trip_continues_the_same_history(tmp_path):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = RankTracker(model, every=2)
    tracker.attach(optimizer)
    for _ in range(3):
        train_step(model, optimizer)
    path = tmp_path / "tracker.pt"
    torch.save(tracker.state_dict(), path)
    restored = RankTracker(model, every=2)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.history == tracker.history and restored.steps == [0, 2]
    for name in LAYERS:
        for (sa, a), (sb, b) in zip(tracker.spectra[name], restored.spectra[name]):
            assert sa == sb and np.array_equal(a, b)
    restored.attach(optimizer)
    train_step(model, optimizer)  # the 4th step: count 3, not recorded with every=2
    train_step(model, optimizer)  # count 4: recorded, as the original tracker would have
    assert restored.steps == [0, 2, 4]
    other = RankTracker(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="does not track"):
        other.load_state_dict(tracker.state_dict())


def test_a_nan_weight_is_reported_by_layer_name():
    model = small_model()
    with torch.no_grad():
        model[2].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^2\.weight \(matrix 1, shape \(16, 72\)\) contains NaN"):
        RankTracker(model).record()


def test_singular_values_of_a_wide_layer_show_its_edges_and_the_threshold():
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 200))
    tracker = RankTracker(model, every=1)
    tracker.record(0)
    with torch.no_grad():
        model[0].weight.mul_(torch.logspace(0, -5, 200)[:, None])  # half the values under the cut
    tracker.record(1)
    ax = tracker.plot("singular_values").axes[0]
    lines = ax.get_lines()
    assert len(lines) == 2 * 32 + 1  # top 32, bottom 32, and the eps * ||W||_F line
    threshold = lines[-1]
    frobenius = [rec["frobenius_norm"] for rec in tracker.history]
    assert np.allclose(threshold.get_ydata(), [1e-3 * f for f in frobenius])
    assert "top 32 and bottom 32 of 200" in ax.get_title()
    assert len(tracker.plot("singular_values", top=10).axes[0].get_lines()) == 10 + 1
