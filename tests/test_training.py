"""The training harness (training/): data loading and validation, models, checkpoints, the
training loop's outputs, exact resume, DistributedDataParallel on gloo, and the low-rank bias of
SGD + weight decay on MLP-BN-10-100 (Galanti et al.).

CPU only and small: the real CIFAR-10 subset in ../shared/data (tests that need it skip with the
reason when it is absent), tiny subsets of it, one intra-op thread (small models run fastest so,
and a busy machine does not slow them down by thread contention).
"""
from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # training/ is a folder of scripts beside the installed package
    sys.path.insert(0, str(ROOT))

from lowrank_kernels import galanti_resnet18_layers  # noqa: E402
from training import checkpoint as ckpt  # noqa: E402
from training import data, models, train  # noqa: E402
from training_runs import assert_same_run, read_jsonl  # noqa: E402

SUBSET = ROOT.parent / "shared" / "data" / "cifar10-subset" / "cifar-10-batches-py"
needs_subset = pytest.mark.skipif(
    not SUBSET.is_dir(), reason=f"the real CIFAR-10 subset is not at {SUBSET} (it lives in ../shared/data "
                                "beside the checkout and is never committed)")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_args(out, *extra, epochs=2, model=("--model", "mlp", "--depth", "3", "--width", "32")):
    return [*model, "--dataset", "cifar10", "--data", str(SUBSET), "--train-subset", "256",
            "--test-subset", "128", "--epochs", str(epochs), "--batch-size", "32", "--lr", "0.05",
            "--weight-decay", "5e-4", "--schedule", "constant", "--no-plots", "--quiet", "--threads", "1",
            "--out", str(out), *extra]


# ------------------------------------------------------------------------------------ data
def write_batch(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def fake_cifar(directory, n=20, skip=(), **overrides):
    """A well-formed python-batch directory of random images, with per-file overrides."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in data.EXPECTED_FILES:
        if name in skip:
            continue
        obj = overrides.get(name) or {"batch_label": name, "labels": list(rng.integers(0, 10, n)),
                                      "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        write_batch(directory / name, obj)
    return directory


@needs_subset
def test_cifar10_subset_loads_as_the_standard_format_says():
    ds = data.load_cifar10(SUBSET)
    assert ds.name == "cifar10" and not ds.is_synthetic
    assert tuple(ds.train.images.shape) == (5085, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert tuple(ds.test.images.shape) == (1017, 3, 32, 32)
    assert ds.train.labels.dtype == torch.int64 and set(ds.train.labels.tolist()) == set(range(10))
    assert ds.classes[0] == "airplane" and ds.classes[9] == "truck"
    # Independent reading with the plain pickle module: rows are 1024 red, 1024 green, 1024 blue.
    with open(SUBSET / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    i = 1017 + 5  # the sixth image of the second file
    row = raw["data"][5]
    assert ds.train.labels[i].item() == raw["labels"][5]
    for c, h, w in [(0, 0, 0), (1, 7, 30), (2, 31, 31), (2, 16, 3)]:
        assert ds.train.images[i, c, h, w].item() == row[c * 1024 + h * 32 + w]
    # The parent folder works too, and subsets are prefixes.
    small = data.load_cifar10(SUBSET.parent, train_subset=100, test_subset=10)
    assert torch.equal(small.train.images, ds.train.images[:100]) and len(small.test) == 10
    assert "subset" in ds.describe()


@needs_subset
def test_cifar10_found_through_the_environment_variable(monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(SUBSET))
    assert data.find_cifar10() == SUBSET
    monkeypatch.setenv(data.ENV_VAR, "/nonexistent/cifar")
    with pytest.raises(data.DatasetNotFoundError, match=r"\$LOWRANK_CIFAR10=/nonexistent/cifar.*does not exist"):
        data.find_cifar10()


def test_missing_files_are_named(tmp_path):
    with pytest.raises(data.DatasetNotFoundError, match="does not exist"):
        data.load_cifar10(tmp_path / "nowhere")
    broken = fake_cifar(tmp_path / "cifar", skip=("test_batch", "data_batch_3"))
    with pytest.raises(data.DatasetNotFoundError) as err:
        data.load_cifar10(broken)
    assert str(broken) in str(err.value) and "data_batch_3, test_batch" in str(err.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(data.DatasetNotFoundError, match="is a file"):
        data.load_cifar10(tmp_path / "file")


@pytest.mark.parametrize("problem, obj, message", [
    ("keys", {"images": np.zeros((4, 3072), np.uint8), "labels": [0] * 4}, r"lacks key\(s\) \['data'\]"),
    ("cifar100", {"data": np.zeros((4, 3072), np.uint8), "fine_labels": [0] * 4}, "CIFAR-100"),
    ("shape", {"data": np.zeros((4, 3000), np.uint8), "labels": [0] * 4}, r"shape \(4, 3000\), expected \(N, 3072\)"),
    ("dtype", {"data": np.zeros((4, 3072), np.float32), "labels": [0] * 4}, "dtype float32, expected uint8"),
    ("count", {"data": np.zeros((4, 3072), np.uint8), "labels": [0] * 3}, "3 labels for 4 images"),
    ("range", {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 10, 2]}, r"labels must lie in 0..9"),
    ("not a dict", [1, 2, 3], "holds a list"),
])
def test_malformed_batches_get_a_clear_error(tmp_path, problem, obj, message):
    directory = fake_cifar(tmp_path / "cifar", data_batch_4=obj)
    with pytest.raises(data.DatasetError, match=message) as err:
        data.load_cifar10(directory)
    assert "data_batch_4" in str(err.value)


def test_unreadable_and_hostile_pickles_are_refused(tmp_path):
    directory = fake_cifar(tmp_path / "cifar")
    (directory / "test_batch").write_bytes(b"this is not a pickle")
    with pytest.raises(data.DatasetError, match="test_batch is not a readable CIFAR-10 python batch"):
        data.load_cifar10(directory)

    marker = tmp_path / "ran"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    write_batch(directory / "test_batch", {"data": Hostile(), "labels": []})
    with pytest.raises(data.DatasetError, match="refusing to load"):
        data.load_cifar10(directory)
    assert not marker.exists()


def test_dataset_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "default_search_paths", lambda: [tmp_path / "none"])
    with pytest.raises(data.DatasetNotFoundError, match="no CIFAR-10 directory found.*LOWRANK_CIFAR10"):
        data.load_dataset("cifar10")
    said = []
    ds = data.load_dataset("auto", train_subset=30, test_subset=20, log=said.append)
    assert ds.is_synthetic and len(ds.train) == 30 and "SYNTHETIC" in said[0]
    with pytest.raises(data.DatasetError, match="--data .* --dataset synthetic"):
        data.load_dataset("synthetic", path=tmp_path)


def test_synthetic_data_is_deterministic_and_learnable():
    a = data.make_synthetic(train_size=2000, test_size=500, seed=3)
    b = data.make_synthetic(train_size=1100, test_size=10, seed=3)
    assert torch.equal(a.train.images[:1100], b.train.images)      # a prefix, across chunk borders
    assert torch.equal(a.test.images[:10], b.test.images)
    assert not torch.equal(a.train.images[:10], a.test.images[:10])
    assert not torch.equal(a.train.images[:10], data.make_synthetic(train_size=10, test_size=1, seed=4).train.images)
    assert torch.equal(torch.bincount(a.train.labels), torch.full((10,), 200))
    assert 100 < a.train.images.float().mean() < 156 and a.train.images.float().std() > 30
    # Learnable: a least-squares linear read-out (numpy, float64) of 4x4-pooled pixels is far above
    # the 10% of chance.
    def features(images):
        pooled = images.numpy().reshape(len(images), 3, 8, 4, 8, 4).mean(axis=(3, 5)) / 255.0
        return np.hstack([pooled.reshape(len(images), -1), np.ones((len(images), 1))])

    x, xt = features(a.train.images), features(a.test.images)
    w = np.linalg.lstsq(x, np.eye(10)[a.train.labels.numpy()], rcond=None)[0]
    accuracy = np.mean((xt @ w).argmax(1) == a.test.labels.numpy())
    assert accuracy > 0.5, accuracy


def test_crop_flip_matches_a_loop_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 8, 6), generator=g, dtype=torch.uint8)
    offsets = torch.randint(0, 9, (5, 2), generator=g)
    flips = torch.tensor([True, False, True, False, True])
    out = data.crop_flip(images, offsets, flips, padding=4)
    padded = np.zeros((5, 3, 16, 14), np.uint8)
    padded[:, :, 4:12, 4:10] = images.numpy()
    for b in range(5):
        dy, dx = offsets[b].tolist()
        crop = padded[b, :, dy:dy + 8, dx:dx + 6]
        expected = crop[:, :, ::-1] if flips[b] else crop
        np.testing.assert_array_equal(out[b].numpy(), expected)


def test_device_loader_epochs_shards_and_normalisation():
    ds = data.make_synthetic(train_size=100, test_size=30)
    loader = data.DeviceLoader(ds.train, 16, shuffle=True, augment=True, seed=5)
    assert len(loader) == 6  # 100 // 16: the incomplete batch is dropped
    first = list(loader.epoch(0))
    again = list(loader.epoch(0))
    other = list(loader.epoch(1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not torch.equal(first[0][1], other[0][1])
    labels = torch.cat([y for _, y in first])
    assert labels.numel() == 96 and first[0][0].dtype == torch.float32
    # Two ranks see the two halves of every global batch.
    halves = [list(data.DeviceLoader(ds.train, 16, shuffle=True, augment=True, seed=5, rank=r,
                                     world_size=2).epoch(0)) for r in range(2)]
    for (x, y), (x0, y0), (x1, y1) in zip(first, *halves):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    # Evaluation: every example once, in order, normalised with the data set's mean and std.
    test = data.DeviceLoader(ds.test, 8, shuffle=False, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.cat([b for b, _ in test.epoch()])
    expected = (ds.test.images.double() / 255 - 0.5) / 0.25
    torch.testing.assert_close(x.double(), expected, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="divisible by the number of processes 3"):
        data.DeviceLoader(ds.train, 16, world_size=3, rank=0)
    with pytest.raises(ValueError, match="exceeds the 100 training examples"):
        data.DeviceLoader(ds.train, 128)


# ------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("name, options, params, rank_count", [
    ("mlp", {}, 3072 * 100 + 100 + 9 * (100 * 100 + 100) + 10 * 200 + 100 * 10 + 10, 10),
    ("mlp", {"depth": 2, "width": 16, "batchnorm": False}, None, 2),
    ("resnet18", {}, 11_173_962, 17),
    ("vgg16_bn", {"width": 8}, None, 13),
])
def test_model_forward_shapes_and_rank_layers(name, options, params, rank_count):
    model = models.build_model(name, **options)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    if params is not None:
        assert sum(p.numel() for p in model.parameters()) == params
    names = models.rank_layers(name, model)
    assert len(names) == rank_count
    assert all("fc" not in n for n in names)
    if name == "resnet18":
        assert names == galanti_resnet18_layers(model) and all("shortcut" not in n for n in names)
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
        assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())


def test_model_registry():
    @models.register_model("test_tiny", description="a test model")
    def tiny(num_classes=10, width=4):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, width), torch.nn.ReLU(),
                                   torch.nn.Linear(width, num_classes))

    try:
        assert "test_tiny" in models.available_models()
        model = models.build_model("test_tiny", width=6)
        assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
        assert models.rank_layers("test_tiny", model) == ["1.weight"]
        with pytest.raises(ValueError, match="already registered"):
            models.register_model("test_tiny")(tiny)
        with pytest.raises(ValueError, match=r"does not take option\(s\) \['depth'\]"):
            models.build_model("test_tiny", depth=3)
    finally:
        models._REGISTRY.pop("test_tiny", None)
    with pytest.raises(ValueError, match="unknown model 'nope'.*mlp"):
        models.build_model("nope")
    with pytest.raises(ValueError, match="width must be a positive integer"):
        models.build_model("mlp", width=0)


# ------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    first = ckpt.save_checkpoint(tmp_path, 1, {"weights": torch.arange(5.0)}, keep=2)
    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, {"weights": torch.zeros(5)}, keep=1)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch_0001.pt"]  # no temp file left
    assert torch.equal(ckpt.load_checkpoint(first)["weights"], torch.arange(5.0))
    assert ckpt.latest_checkpoint(tmp_path) == first
    # keep=N prunes only after the new file is in place.
    for epoch in (2, 3, 4):
        ckpt.save_checkpoint(tmp_path, epoch, {"weights": torch.full((5,), float(epoch))}, keep=2)
    assert [e for e, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    (tmp_path / "checkpoints" / "epoch_0009.pt").write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="cannot load checkpoint"):
        ckpt.load_checkpoint(tmp_path / "checkpoints" / "epoch_0009.pt")


def test_rng_state_round_trip():
    import random
    state = ckpt.rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(3), draws[2])


# ------------------------------------------------------------------------------------ settings
def test_config_file_and_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "mlp"\nbatch-size = 64\nweight_decay = 0.01\nno-augment = true\nmilestones = [5, 9]\n')
    settings, explicit = train.parse_settings(["--config", str(toml), "--batch-size", "16"])
    assert settings["model"] == "mlp" and settings["batch_size"] == 16 and settings["weight_decay"] == 0.01
    assert settings["augment"] is False and settings["milestones"] == [5, 9]
    assert {"model", "batch_size", "weight_decay", "augment"} <= explicit and "lr" not in explicit
    bad = tmp_path / "bad.json"
    bad.write_text('{"learning_rate": 0.1}')
    with pytest.raises(train.ConfigError, match="unknown setting 'learning_rate'"):
        train.parse_settings(["--config", str(bad)])
    bad.write_text('{"lr": "fast"}')
    with pytest.raises(train.ConfigError, match="'lr' must be a number"):
        train.parse_settings(["--config", str(bad)])
    bad.write_text('{"optimizer": "adam"}')
    with pytest.raises(train.ConfigError, match="must be one of"):
        train.parse_settings(["--config", str(bad)])


@pytest.mark.parametrize("schedule", ["multistep", "cosine", "constant"])
def test_lr_schedule_matches_torch_schedulers(schedule):
    cfg = dict(epochs=10, warmup_epochs=0, schedule=schedule, milestones=[3, 7], gamma=0.2)
    factor = train.lr_factor_fn(cfg, steps_per_epoch=4)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    if schedule == "multistep":  # stepped once per epoch, as the papers' code does
        ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 7], gamma=0.2)
        for step in range(40):
            assert factor(step) == pytest.approx(opt.param_groups[0]["lr"]), step
            if step % 4 == 3:
                opt.step()
                ref.step()
    elif schedule == "cosine":  # stepped per optimizer step over the whole run
        ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
        for step in range(40):
            assert factor(step) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), step
            opt.step()
            ref.step()
    else:
        assert {factor(s) for s in range(40)} == {1.0}
    warm = train.lr_factor_fn({**cfg, "warmup_epochs": 1}, steps_per_epoch=4)
    assert [warm(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


# ------------------------------------------------------------------------------------ runs
@needs_subset
def test_two_epoch_run_writes_every_output(tmp_path):
    run = train.main(tiny_args(tmp_path / "run", "--plots", "--track-every", "4"))
    assert run == tmp_path / "run"
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for rec in records[1:]:
        for key in ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                    "avg_threshold_rank", "epoch_time_s", "dataset", "layers"):
            assert rec[key] is not None, key
        assert rec["dataset"] == "cifar10" and 0 <= rec["test_acc"] <= 1
        assert set(rec["layers"]) == {"layers.0.weight", "layers.3.weight", "layers.6.weight", "fc.weight"}
        assert {"threshold_rank", "effective_rank", "stable_rank"} <= set(rec["layers"]["fc.weight"])
    assert records[0]["train_loss"] is None and records[2]["step"] == 16  # 256 / 32 = 8 steps per epoch
    # The average threshold rank, recomputed from the saved weights with numpy: the 3 hidden layers.
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    ranks = []
    for name in ("layers.0.weight", "layers.3.weight", "layers.6.weight"):
        w = state["model"][name].double().numpy()
        s = np.linalg.svd(w, compute_uv=False)
        ranks.append(int(np.sum(s / np.linalg.norm(w) > 1e-3)))
        assert records[-1]["layers"][name]["threshold_rank"] == ranks[-1]
    assert records[-1]["avg_threshold_rank"] == pytest.approx(np.mean(ranks))

    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and float(rows[2]["test_acc"]) == pytest.approx(records[2]["test_acc"])
    assert float(rows[2]["layers.0.weight/threshold_rank"]) == ranks[0]
    config = json.loads((run / "config.json").read_text())
    assert config["batch_size"] == 32 and config["resolved"]["dataset"] == "cifar10"
    assert config["resolved"]["rank_layers"] == ["layers.0.weight", "layers.3.weight", "layers.6.weight"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["final"]["epoch"] == 2
    assert summary["final"]["test_acc"] == records[-1]["test_acc"] and summary["elapsed_s"] > 0
    assert summary["config"]["weight_decay"] == 5e-4
    assert {r["step"] for r in read_jsonl(run / "ranks.jsonl")} == {0, 4, 8, 12, 16}
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch_0002.pt"]
    plots = {p.name for p in (run / "plots").iterdir()}
    assert {"curves.png", "average_rank.png", "effective_rank_heatmap.png",
            "singular_values_layers_0_weight.png"} <= plots
    # The same directory again is refused; --resume auto on a finished run does nothing.
    with pytest.raises(train.ConfigError, match="already holds a run"):
        train.main(tiny_args(run))
    before = (run / "summary.json").read_text()
    assert train.main(tiny_args(run, "--resume", "auto")) == run
    assert (run / "summary.json").read_text() == before


@needs_subset
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    extra = ("--checkpoint-every", "1", "--track-every", "3", "--momentum", "0.9", "--schedule", "cosine",
             "--warmup-epochs", "0.5")  # momentum buffers and the schedule must carry over too
    whole = train.main(tiny_args(tmp_path / "whole", *extra, epochs=3))

    class Killed(Exception):
        pass

    def kill_after_first_epoch(record):
        if record["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        train.main(tiny_args(tmp_path / "parts", *extra, epochs=3), epoch_callback=kill_after_first_epoch)
    parts = tmp_path / "parts"
    assert not (parts / "summary.json").exists() and ckpt.latest_checkpoint(parts).name == "epoch_0001.pt"
    with pytest.raises(train.ConfigError, match="cannot change lr"):
        train.main(tiny_args(parts, *extra, "--resume", "auto", "--lr", "0.2", epochs=3))
    assert train.main(tiny_args(parts, *extra, "--resume", "auto", epochs=3)) == parts

    assert_same_run(whole, parts)
    assert json.loads((parts / "summary.json").read_text())["final"]["epoch"] == 3


@needs_subset
def test_bf16_channels_last_resnet_and_the_factored_flag(tmp_path):
    run = train.main(tiny_args(tmp_path / "resnet", "--amp", "bf16", "--channels-last", "--train-subset", "64",
                               "--test-subset", "32", epochs=1, model=("--model", "resnet18", "--width", "4")))
    final = read_jsonl(run / "metrics.jsonl")[-1]
    assert np.isfinite(final["train_loss"]) and len(json.loads((run / "config.json").read_text())
                                                       ["resolved"]["rank_layers"]) == 17
    run = train.main(tiny_args(tmp_path / "factored", "--factored", "--train-subset", "64", epochs=1))
    final = read_jsonl(run / "metrics.jsonl")[-1]
    assert np.isfinite(final["train_loss"]) and final["epoch"] == 1


def test_synthetic_runs_say_so_everywhere_and_log_to_tensorboard(tmp_path, capsys, monkeypatch):
    scalars = []

    class FakeWriter:  # stands in for torch.utils.tensorboard.SummaryWriter
        def __init__(self, log_dir, purge_step=None):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    fake = type(sys)("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    run = train.main(["--model", "mlp", "--depth", "2", "--width", "16", "--dataset", "synthetic",
                      "--train-subset", "128", "--test-subset", "64", "--epochs", "2", "--batch-size", "32",
                      "--no-plots", "--threads", "1", "--out", str(tmp_path / "syn")])
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out
    records = read_jsonl(run / "metrics.jsonl")
    assert all(r["dataset"] == "synthetic" for r in records)
    assert ("test_acc", records[2]["test_acc"], 2) in scalars
    assert {tag for tag, _, _ in scalars} >= {"train_loss", "avg_threshold_rank", "lr"}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dataset"] == "synthetic" and "SYNTHETIC" in summary["dataset_note"]
    assert json.loads((run / "config.json").read_text())["resolved"]["dataset"] == "synthetic"


@needs_subset
def test_ddp_on_gloo_with_two_processes_matches_one_process(tmp_path):
    # No BatchNorm: per-process BN statistics would differ from the global batch's by design.
    common = ["--model", "mlp", "--depth", "3", "--width", "32", "--no-batchnorm", "--train-subset", "512",
              "--momentum", "0.9", "--track-every", "0"]
    single = train.main(tiny_args(tmp_path / "single", *common))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "training" / "train.py"), *tiny_args(tmp_path / "ddp", *common)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, (f"torchrun failed:\n{proc.stdout[-2000:]}\n{proc.stderr[:4000]}\n...\n"
                                  f"{proc.stderr[-2000:]}")
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2 and config["resolved"]["per_process_batch"] == 16
    ours, theirs = read_jsonl(tmp_path / "ddp" / "metrics.jsonl"), read_jsonl(single / "metrics.jsonl")
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            if b[key] is not None:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["epoch"], key)
        assert a["avg_threshold_rank"] == b["avg_threshold_rank"]
    a = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "ddp"))["model"]
    b = ckpt.load_checkpoint(ckpt.latest_checkpoint(single))["model"]
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@needs_subset
def test_weight_decay_lowers_the_rank_of_mlp_bn_10_100(tmp_path):
    """Galanti et al.'s MLP-BN-10-100 on real CIFAR-10 images, same seed and batches: with weight
    decay the average threshold rank of the 10 hidden layers falls far below the ~99.5 of the
    initial weights; without it, it stays there."""
    def run(wd, name):
        out = train.main(["--model", "mlp", "--dataset", "cifar10", "--data", str(SUBSET), "--epochs", "6",
                          "--batch-size", "32", "--lr", "0.1", "--momentum", "0.9", "--weight-decay", str(wd),
                          "--schedule", "constant", "--no-augment", "--no-plots", "--quiet", "--threads", "1",
                          "--checkpoint-every", "0", "--out", str(tmp_path / name)])
        return [r["avg_threshold_rank"] for r in read_jsonl(out / "metrics.jsonl")]

    with_wd, without_wd = run(1e-2, "wd"), run(0.0, "no_wd")
    assert with_wd[0] == without_wd[0] > 95  # the same initial weights, full rank
    assert without_wd[-1] > 95, without_wd
    assert with_wd[-1] < 60, with_wd
    assert with_wd[-1] < without_wd[-1] - 30
