"""Spectra and measures against numpy float64 LAPACK; matricization; alignment; truncation."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from lowrank_kernels import spectral as S


def with_spectrum(m, n, s, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return ((u * s) @ v.T).to(dtype)


def low_rank_plus_noise(m, n, rank, noise=1e-4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / rank ** 0.5
            + noise * torch.randn(m, n, generator=g))


def power_law(m, n, alpha=1.0, seed=0):
    r = min(m, n)
    return with_spectrum(m, n, torch.arange(1, r + 1, dtype=torch.float64) ** -alpha, seed)


def numpy_measures(w: torch.Tensor, eps=1e-3):
    s = np.linalg.svd(w.double().numpy(), compute_uv=False) if w.numel() else np.zeros(0)
    fro = math.sqrt(float((s ** 2).sum()))
    r = min(w.shape)
    if fro == 0:
        return dict(threshold_rank=0, relative_rank=0, effective_rank=0.0, normalized_effective_rank=0.0,
                    stable_rank=0.0, spectral_norm=0.0, frobenius_norm=0.0, nuclear_norm=0.0)
    p = s / s.sum()
    p = p[p > 0]
    eff = float(np.exp(-(p * np.log(p)).sum()))
    return dict(threshold_rank=int((s / fro > eps).sum()), relative_rank=int((s / s[0] > eps).sum()),
                effective_rank=eff, normalized_effective_rank=eff / r, stable_rank=fro ** 2 / s[0] ** 2,
                spectral_norm=float(s[0]), frobenius_norm=fro, nuclear_norm=float(s.sum()))


MATRICES = {
    "random": lambda: torch.randn(64, 300, generator=torch.Generator().manual_seed(1)),
    "low_rank_plus_noise": lambda: low_rank_plus_noise(128, 96, 10),
    "power_law": lambda: power_law(200, 120),
    "tall_power_law": lambda: power_law(150, 40, alpha=1.5, seed=3),
    "one_row": lambda: torch.randn(1, 9, generator=torch.Generator().manual_seed(2)),
    "zero": lambda: torch.zeros(5, 7),
}


@pytest.mark.parametrize("name", list(MATRICES))
def test_exact_measures_match_numpy(name):
    w = MATRICES[name]()
    expected = numpy_measures(w)
    got = S.all_measures(w)
    for measure, value in expected.items():
        if measure in ("threshold_rank", "relative_rank"):
            assert int(got[measure]) == value, (measure, int(got[measure]), value)
        elif value == 0:
            assert float(got[measure]) == 0.0, measure
        else:
            rel = abs(float(got[measure]) - value) / abs(value)
            tol = 1e-6 if measure in ("effective_rank", "normalized_effective_rank") else 1e-8
            assert rel < tol, (measure, float(got[measure]), value, rel)


def test_mixed_list_equals_per_matrix_and_batch():
    mats = [f() for f in MATRICES.values()]
    together = S.all_measures(mats)
    for i, w in enumerate(mats):
        alone = S.all_measures(w)
        for name in S.MEASURES:
            assert together[name][i].item() == pytest.approx(alone[name].item(), rel=1e-10, abs=1e-12)
    batch = torch.stack([power_law(40, 30, seed=s) for s in range(4)])
    batched = S.threshold_rank(batch)
    assert batched.shape == (4,)
    assert batched.tolist() == [int(S.threshold_rank(w)) for w in batch]


def test_threshold_rank_matches_lapack_on_trained_like_spectra():
    # Spectra with values on both sides of the cut, as trained layers have: a decaying bulk plus
    # a noise floor around eps * ||W||_F.
    for seed in range(5):
        r = 96
        s = torch.cat([torch.logspace(0, -2.5, 40, dtype=torch.float64),
                       torch.full((r - 40,), 1e-5, dtype=torch.float64)])
        w = with_spectrum(128, r, s, seed=seed, dtype=torch.float32)
        ref = np.linalg.svd(w.double().numpy(), compute_uv=False)
        expected = int((ref / np.sqrt((ref ** 2).sum()) > 1e-3).sum())
        assert int(S.threshold_rank(w)) == expected


@pytest.mark.parametrize("spectrum", ["geometric", "power2"])
def test_randomized_top_k_accuracy(spectrum):
    r = 128
    idx = torch.arange(r, dtype=torch.float64)
    s = 0.9 ** idx if spectrum == "geometric" else (idx + 1) ** -2.0
    w = with_spectrum(256, r, s, seed=4)
    k = 16
    sp = S.singular_values(w, method="randomized", k=k, power_iters=2)
    rel = ((sp.values[0, :k] - s[:k]) / s[:k]).abs().max().item()
    assert rel < 1e-3, rel
    # The a-posteriori error is the exact Frobenius norm of the part Q misses, at least the tail.
    assert sp.residual[0].item() >= s[k + 16:].pow(2).sum().sqrt().item() * 0.99


def test_randomized_vectors_are_singular_vectors():
    w = with_spectrum(80, 60, 0.8 ** torch.arange(60, dtype=torch.float64), seed=5)
    sp = S.singular_values(w, method="randomized", k=8, return_vectors=True)
    u, v = sp.vectors[0]
    assert u.shape == (80, 8) and v.shape == (60, 8)
    recon = (w.double() @ v) - u * sp.values[0, :8]
    assert recon.abs().max().item() < 1e-4


def test_adaptive_randomized_threshold_rank_is_exact_for_low_rank():
    mats = [low_rank_plus_noise(300, 200, 7, noise=1e-6, seed=s) for s in range(3)] + [
        low_rank_plus_noise(256, 512, 20, noise=1e-6, seed=9)]
    sp = S.singular_values(mats, method="randomized", k=4, adaptive=True)
    assert bool(sp.complete.all())
    assert S.threshold_rank(sp).tolist() == S.threshold_rank(mats).tolist() == [7, 7, 7, 20]


def test_orthonormalize_handles_rank_deficient_input():
    y = torch.randn(3, 50, 4) @ torch.randn(3, 4, 12)  # rank 4 in 12 columns
    q = S.orthonormalize(y)
    eye = torch.eye(12).expand(3, 12, 12)
    assert (q.transpose(1, 2) @ q - eye).abs().max().item() < 1e-4
    # The basis still spans y's columns.
    assert (y - q @ (q.transpose(1, 2) @ y)).norm().item() < 1e-3 * y.norm().item()


def test_matricize_rules():
    conv = nn.Conv2d(3, 8, 5)
    assert S.matricize(conv.weight, "conv").shape == (8, 75)
    convt = nn.ConvTranspose2d(6, 4, 3)  # weight (c_in=6, c_out=4, 3, 3)
    m = S.matricize(convt.weight, "conv_transpose")
    assert m.shape == (4, 54)
    assert torch.equal(m[1, :9], convt.weight[0, 1].reshape(-1))
    with pytest.raises(ValueError, match="unknown"):
        S.matricize(conv.weight, "bogus")


def test_tracked_matrices_and_filters():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 5), nn.Embedding(10, 3),
                          nn.MultiheadAttention(6, 2), nn.ConvTranspose1d(2, 3, 3), nn.BatchNorm1d(5))
    tracked = S.tracked_matrices(model)
    kinds = [(t.name, t.kind, tuple(t.matrix().shape)) for t in tracked]
    assert kinds == [("0.weight", "conv", (4, 27)), ("2.weight", "linear", (5, 4)),
                     ("3.weight", "embedding", (10, 3)), ("4.in_proj_weight", "attention_in_proj", (18, 6)),
                     ("4.out_proj.weight", "linear", (6, 6)), ("5.weight", "conv_transpose", (3, 6))]
    assert [t.name for t in S.tracked_matrices(model, include="weight", exclude=["4.", "5."])] == [
        "0.weight", "2.weight", "3.weight"]
    only_linear = S.tracked_matrices(model, include=lambda name, mod: isinstance(mod, nn.Linear))
    assert [t.name for t in only_linear] == ["2.weight", "4.out_proj.weight"]


def test_alignment_linear_and_conv():
    g = torch.Generator().manual_seed(0)
    # A next layer built to read exactly this layer's top output directions: alignment 1.
    w1 = torch.randn(32, 16, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w1, full_matrices=False)
    w2 = (torch.linspace(5, 1, 16, dtype=torch.float64)[:, None] * u.T)  # (16, 32): V(w2) = U(w1)
    assert S.alignment(w1, w2).item() == pytest.approx(1.0, abs=1e-6)
    a = S.alignment_matrix(torch.randn(16, 3, 3, 3, generator=g), torch.randn(32, 16, 3, 3, generator=g))
    assert a.shape == (10, 10) and bool(((a >= 0) & (a <= 1 + 1e-6)).all())
    with pytest.raises(ValueError, match="do not chain"):
        S.alignment(torch.randn(8, 4), torch.randn(3, 5))


def test_truncate_spectrum_keeps_top_or_bottom_half():
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Conv1d(1, 1, 1))
    original = model[0].weight.detach().clone()
    top = S.truncate_spectrum(model, "top")
    bottom = S.truncate_spectrum(model, "bottom")
    assert torch.equal(model[0].weight, original)
    s = torch.linalg.svdvals(original.double())
    assert torch.linalg.svdvals(top[0].weight.detach().double()).tolist()[:4] == pytest.approx(s[:4].tolist(), rel=1e-5)
    assert int(S.threshold_rank(top[0].weight, eps=1e-5)) == 4
    assert torch.linalg.svdvals(bottom[0].weight.detach().double()).tolist()[:4] == pytest.approx(s[4:].tolist(), rel=1e-5)
    assert torch.allclose((top[0].weight + bottom[0].weight).detach(), original, atol=1e-5)
    with pytest.raises(ValueError):
        S.truncate_spectrum(model, "middle")


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="NaN or Inf"):
        S.threshold_rank(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(TypeError, match="complex"):
        S.effective_rank(torch.randn(3, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="sparse"):
        S.stable_rank(torch.eye(3).to_sparse())
    with pytest.raises(TypeError, match="floating"):
        S.spectral_norm(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="2-D"):
        S.threshold_rank([torch.randn(2, 3, 4)])
    with pytest.raises(ValueError, match="method"):
        S.singular_values(torch.randn(3, 3), method="magic")
    with pytest.raises(ValueError, match="unknown measures"):
        S.all_measures(torch.randn(3, 3), measures=("rank_of_doom",))
    with pytest.raises(ValueError, match="eps"):
        S.threshold_rank(torch.randn(3, 3), eps=-1.0)
    empty = S.all_measures(torch.zeros(0, 4))
    assert all(float(v) == 0 for v in empty.values())


def test_randomized_tier_on_every_backend(backend):
    # The small eigenproblems of the randomized tier run on the chosen backend's eigensolver.
    mats = [power_law(60, 40, alpha=2.0, seed=s) for s in range(2)] + [low_rank_plus_noise(50, 70, 6)]
    reference = S.singular_values(mats, method="randomized", k=8, backend="torch")
    got = S.singular_values(mats, method="randomized", k=8, backend=backend)
    assert torch.allclose(got.values, reference.values, rtol=1e-6, atol=1e-9)
    assert S.threshold_rank(got).tolist() == S.threshold_rank(reference).tolist()


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_extreme_magnitudes_are_scaled_exactly(method, scale):
    """float64 inputs far outside float32's range: the values scale with the input, no Inf/0."""
    torch.manual_seed(0)
    w = torch.randn(12, 20, dtype=torch.float64)
    ref = torch.linalg.svdvals(w)
    sp = S.singular_values((w * scale), method=method, k=12)
    got = sp.values[0, :12].double()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got / scale, ref, rtol=1e-5, atol=0)
    assert int(S.threshold_rank(w * scale, method=method, k=12)) == 12


def test_nan_in_a_later_matrix_is_named():
    good = torch.randn(4, 5)
    bad = torch.randn(3, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"matrix 1 \(shape \(3, 3\)\) contains NaN or Inf"):
        S.singular_values([good, bad])
