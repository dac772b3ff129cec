"""gradient_rank: the rank of a batch's weight gradient never exceeds min(d_out, d_in, B*R)."""
import numpy as np
import pytest
import torch
from torch import nn

from lowrank_kernels import DecaySGD, gradient_rank
from lowrank_kernels.spectral import numerical_rank


def _by_name(rows):
    """Rows by module name ("0" for the layer whose weight is "0.weight")."""
    return {r["layer"].removesuffix(".weight"): r for r in rows}


@pytest.mark.parametrize("batch", [1, 3, 7, 40])
def test_linear_layers_attain_min_of_dims_and_batch(batch):
    torch.manual_seed(batch)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 24), nn.Tanh(),
                          nn.Linear(24, 5))
    x, y = torch.randn(batch, 20), torch.randint(0, 5, (batch,))
    rows = _by_name(gradient_rank(model, x, y))
    for name, (d_out, d_in) in {"0": (32, 20), "2": (24, 32)}.items():
        r = rows[name]
        assert r["rows_per_example"] == 1 and r["batch_size"] == batch
        assert r["bound"] == min(d_out, d_in, batch)
        assert r["rank"] == r["bound"] and r["attained"]
        # independent check: numpy's matrix_rank of the same gradient
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    g = model[2].weight.grad.double().numpy()
    assert rows["2"]["rank"] == np.linalg.matrix_rank(g, tol=rows["2"]["tolerance"])


def test_repeated_examples_lower_the_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(2, 16).repeat(4, 1)  # B = 8 rows, 2 distinct examples
    y = torch.tensor([0, 1]).repeat(4)
    r = _by_name(gradient_rank(model, x, y))["0"]
    assert r["bound"] == 8 and r["rank"] == 2 and not r["attained"]


def test_conv_bound_counts_positions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 40, 3, padding=1), nn.Tanh(),
                          nn.Conv2d(40, 6, 3, stride=2, padding=1))
    x = torch.randn(2, 3, 4, 4)
    # A loss whose output gradients are generic (a classifier head would confine them to the
    # span of its few rows, and the last conv's gradient rank with them).
    weights = torch.randn(2, 6, 2, 2)
    rows = _by_name(gradient_rank(model, x, loss_fn=lambda out: (out.tanh() * weights).sum()))
    assert rows["0"]["rows_per_example"] == 16 and rows["0"]["bound"] == min(40, 27, 32) == 27
    assert rows["2"]["rows_per_example"] == 4 and rows["2"]["bound"] == min(6, 360, 8) == 6
    for name in ("0", "2"):
        assert rows[name]["rank"] <= rows[name]["bound"]
        assert rows[name]["attained"]


def test_tokens_count_for_linear_on_sequences():
    torch.manual_seed(0)
    proj = nn.Linear(32, 32)
    x = torch.randn(2, 5, 32)
    rows = gradient_rank(proj, x, loss_fn=lambda out: out.tanh().sum())
    assert rows[0]["rows_per_example"] == 5 and rows[0]["bound"] == 10 and rows[0]["rank"] == 10


def test_leaves_grads_and_factored_weights_alone():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = DecaySGD(model.parameters(), lr=0.1, factored=True, model=model)
    rows = gradient_rank(model, torch.randn(4, 8), torch.tensor([0, 1, 0, 1]))
    assert len(rows) == 2
    assert all(p.grad is None for p in model.parameters())
    assert not model[0].weight.requires_grad  # still factored
    assert len(opt.factored_parameters()) == 2


def test_include_exclude_and_bad_inputs():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 1])
    assert [r["layer"] for r in gradient_rank(model, x, y, include="2")] == ["2.weight"]
    assert [r["layer"] for r in gradient_rank(model, x, y, exclude=["2"])] == ["0.weight"]
    with pytest.raises(ValueError, match="targets"):
        gradient_rank(model, x)
    with pytest.raises(ValueError, match="at least one example"):
        gradient_rank(model, torch.zeros(0, 4), y[:0])
    with pytest.raises(ValueError, match="no Linear or Conv2d"):
        gradient_rank(nn.Sequential(nn.ReLU()), x, y)
    with pytest.raises(ValueError, match="NaN or Inf"):
        gradient_rank(model, torch.full((3, 4), float("nan")), y)
    with pytest.raises(TypeError, match="nn.Module"):
        gradient_rank(lambda t: t, x, y)


def test_numerical_rank_of_zero_and_exact_low_rank():
    assert numerical_rank(torch.zeros(3, 4)) == (0, 0.0)
    a = torch.randn(6, 2, dtype=torch.float64) @ torch.randn(2, 9, dtype=torch.float64)
    assert numerical_rank(a)[0] == 2


def test_layers_are_named_as_the_tracker_and_analyze_name_them():
    from lowrank_kernels import RankTracker

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    assert [r["layer"] for r in gradient_rank(model, x, y)] == RankTracker(model).layer_names == ["0.weight", "3.weight"]
