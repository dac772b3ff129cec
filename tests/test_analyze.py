"""The checkpoint CLI: python -m lowrank_kernels.analyze CHECKPOINT."""
import csv
import importlib.util

import pytest
import torch
from torch import nn

from lowrank_kernels.analyze import main
from lowrank_kernels.spectral import all_measures

HAS_EIGH = importlib.util.find_spec("lowrank_kernels.ops.symmetric_eig") is not None


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


def expected_ranks(model, eps=1e-3):
    matrices = [model[0].weight.detach().reshape(8, -1), model[4].weight.detach()]
    return all_measures(matrices, ("threshold_rank",), eps=eps)["threshold_rank"].tolist()


def table_rows(out):
    """{layer: whitespace-split row} from the printed table."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    rows = {}
    for line in lines[start + 2:]:
        if line.startswith("average"):
            break
        cells = line.split()
        rows[cells[0]] = cells
    return rows


def check_output(out, model):
    rows = table_rows(out)
    assert list(rows) == ["0.weight", "4.weight"]  # BatchNorm weight (1-D) and biases left out
    assert rows["0.weight"][1] == "8x3x3x3" and rows["4.weight"][1] == "10x288"
    ranks = expected_ranks(model)
    assert [int(rows[name][2]) for name in ("0.weight", "4.weight")] == ranks
    assert f"average threshold_rank, all matrices (2): {sum(ranks) / 2:.4f}" in out
    header = next(line for line in out.splitlines() if line.startswith("layer "))
    assert header.split() == ["layer", "shape", "threshold_rank", "effective_rank", "normalized_effective_rank",
                              "stable_rank", "spectral_norm", "frobenius_norm"]


def test_state_dict(tmp_path, capsys):
    model = small_model()
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    assert main([str(path)]) == 0
    captured = capsys.readouterr()
    check_output(captured.out, model)
    assert "warning" not in captured.err  # weights-only load


def test_full_model(tmp_path, capsys):
    model = small_model()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    assert main([str(path), "--eps", "1e-3"]) == 0
    captured = capsys.readouterr()
    check_output(captured.out, model)
    assert "fully unpickled" in captured.err
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), "--weights-only"])
    assert exit_info.value.code == 2
    assert "weights_only" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["model", "state_dict", "model_state_dict"])
def test_training_checkpoint(tmp_path, capsys, key):
    model = small_model()
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 7, key: model.state_dict(), "optimizer": {"lr": 0.1}}, path)
    assert main([str(path)]) == 0
    check_output(capsys.readouterr().out, model)


def test_csv_output(tmp_path, capsys):
    model = small_model()
    path, out = tmp_path / "weights.pt", tmp_path / "ranks.csv"
    torch.save(model.state_dict(), path)
    assert main([str(path), "--csv", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["layer"] for row in rows] == ["0.weight", "4.weight"]
    assert [int(row["threshold_rank"]) for row in rows] == expected_ranks(model)
    assert rows[0]["shape"] == "8x3x3x3"


def test_eps_changes_the_rank(tmp_path, capsys):
    torch.manual_seed(0)
    weight = torch.randn(6, 2) @ torch.randn(2, 6) + 1e-4 * torch.randn(6, 6)  # rank 2 plus noise
    path = tmp_path / "weights.pt"
    torch.save({"proj.weight": weight}, path)
    main([str(path), "--eps", "1e-2"])
    assert table_rows(capsys.readouterr().out)["proj.weight"][2] == "2"
    main([str(path), "--eps", "1e-7"])
    assert table_rows(capsys.readouterr().out)["proj.weight"][2] == "6"


def test_resnet18_average_line(tmp_path, capsys):
    torch.manual_seed(0)
    state = {"conv1.weight": torch.randn(4, 3, 3, 3), "fc.weight": torch.randn(10, 4)}
    for stage in range(1, 5):
        for block in range(2):
            for conv in (1, 2):
                state[f"layer{stage}.{block}.conv{conv}.weight"] = torch.randn(4, 4, 3, 3)
        if stage > 1:
            state[f"layer{stage}.0.downsample.0.weight"] = torch.randn(4, 4, 1, 1)
    path = tmp_path / "resnet.pt"
    torch.save(state, path)
    main([str(path)])
    out = capsys.readouterr().out
    assert "Galanti" in out and "(17)" in out


@pytest.mark.skipif(not HAS_EIGH, reason="lowrank_kernels.ops.symmetric_eig is not there yet")
def test_randomized_method(tmp_path, capsys):
    model = small_model()
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    assert main([str(path), "--method", "randomized"]) == 0
    check_output(capsys.readouterr().out, model)


def test_missing_file(tmp_path, capsys):
    path = tmp_path / "nope.pt"
    with pytest.raises(SystemExit) as exit_info:
        main([str(path)])
    assert exit_info.value.code == 2
    assert str(path) in capsys.readouterr().err


def test_not_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("these are not weights\n")
    with pytest.raises(SystemExit):
        main([str(path)])
    err = capsys.readouterr().err
    assert str(path) in err and "not a PyTorch checkpoint" in err


def test_checkpoint_without_weights(tmp_path, capsys):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "bias": torch.zeros(4)}, path)
    with pytest.raises(SystemExit):
        main([str(path)])
    assert "no weight matrices" in capsys.readouterr().err
    torch.save([1, 2, 3], path)
    with pytest.raises(SystemExit):
        main([str(path)])
    assert "holds a list" in capsys.readouterr().err


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x.pt"), "--method", "lapack"])
    if not torch.cuda.is_available():
        path = tmp_path / "weights.pt"
        torch.save(small_model().state_dict(), path)
        with pytest.raises(SystemExit):
            main([str(path), "--device", "cuda"])
        assert "no CUDA device" in capsys.readouterr().err


def test_text_and_garbage_files_are_named_for_what_they_are(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello world\nsecond line\n")
    garbage = tmp_path / "noise.bin"
    garbage.write_bytes(bytes(range(7, 107)))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path, what in ((text, "is a text file (it begins 'hello world'), not a PyTorch checkpoint"),
                       (garbage, "is not a PyTorch checkpoint: it is neither a zip archive"),
                       (empty, "is empty, not a PyTorch checkpoint")):
        with pytest.raises(SystemExit) as exit_:
            main([str(path)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and what in err, err
        assert "IndexError" not in err and "KeyError" not in err and "unpickled" not in err


def test_a_nan_weight_is_named_by_its_layer(tmp_path, capsys):
    state = {"0.weight": torch.randn(4, 3), "2.weight": torch.full((6, 5), float("nan"))}
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    with pytest.raises(SystemExit):
        main([str(path)])
    assert "2.weight (matrix 1, shape (6, 5)) contains NaN or Inf" in capsys.readouterr().err


def test_frobenius_norm_is_reported(tmp_path, capsys):
    w = torch.randn(4, 3, dtype=torch.float64)
    path = tmp_path / "one.pt"
    torch.save({"fc.weight": w}, path)
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "frobenius_norm" in out.splitlines()[1]
    assert f"{torch.linalg.matrix_norm(w).item():.4f}" in out
