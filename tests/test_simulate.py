"""The mechanism simulator: recursion against float64 loops, the rank caps, monotone trends."""
import math

import numpy as np
import pytest
import torch

from lowrank_kernels.simulate import (RECORDED_MEASURES, SimulationResult, format_sweep_table,
                                      plot_sweep, predict, simulate, sweep)

from helpers import assert_close_verbose

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def float64_loop(W0, factors, decay, lr, batch_size):
    """Reference: W <- decay * W - (lr / B) * D^T F in float64, one numpy step at a time; returns
    every W[t], t = 0..steps."""
    W = np.array(W0, dtype=np.float64)
    out = [W.copy()]
    for D, F in factors:
        W = decay * W - (lr / batch_size) * (np.asarray(D, np.float64).T @ np.asarray(F, np.float64))
        out.append(W.copy())
    return out


def relative_close(actual, expected, rtol, name):
    actual = actual.detach().double().cpu()
    expected = torch.as_tensor(expected, dtype=torch.float64)
    scale = float(expected.abs().max()) or 1.0
    assert_close_verbose(actual, expected, rtol=0, atol=rtol * scale, name=name)


def test_recursion_matches_float64_loop_with_given_factors():
    m, n, B, R, lr, lam, steps = 12, 9, 3, 2, 0.07, 0.4, 40
    rng = np.random.default_rng(1)
    given = [(rng.standard_normal((B * R, m)), rng.standard_normal((B * R, n))) for _ in range(steps)]
    W0 = rng.standard_normal((m, n))

    def gradient(step, generator):
        D, F = given[step]
        return (torch.tensor(D, dtype=torch.float32, device=DEVICE),
                torch.tensor(F, dtype=torch.float32, device=DEVICE))

    init = torch.tensor(W0, dtype=torch.float32, device=DEVICE)
    before = init.clone()
    result = simulate(m, n, B, lr, lam, steps, R=R, gradient=gradient, init=init, record_every=5,
                      device=DEVICE)
    reference = float64_loop(W0, given, 1 - 2 * lr * lam, lr, B)
    relative_close(result.W, reference[-1], 2e-5, "final W")
    assert torch.equal(init, before), "the user's init tensor was modified"
    assert result.steps.tolist() == list(range(0, steps + 1, 5))
    # Recorded spectra are those of W at the recorded steps.
    for i, t in enumerate(result.steps.tolist()):
        expected = np.linalg.svd(reference[t], compute_uv=False)
        relative_close(result.singular_values[i], expected, 1e-4, f"singular values at step {t}")


def test_gaussian_stream_is_the_documented_one():
    """Replays the documented random stream (init, then per chunk randn((c,K,m)), randn((c,K,n)))
    and the recursion in float64: the chunking must not change the factors' order."""
    m, n, B, R, lr, lam, steps, seed, chunk = 10, 7, 2, 2, 0.1, 0.3, 20, 5, 7
    result = simulate(m, n, B, lr, lam, steps, R=R, init="gaussian", seed=seed, chunk_steps=chunk,
                      device=DEVICE, record_every=steps)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    W0 = (torch.randn((m, n), generator=g, device=DEVICE) / math.sqrt(n)).cpu().numpy()
    factors = []
    for start in range(0, steps, chunk):
        c = min(chunk, steps - start)
        D = torch.randn((c, B * R, m), generator=g, device=DEVICE).cpu().numpy()
        F = torch.randn((c, B * R, n), generator=g, device=DEVICE).cpu().numpy()
        factors += list(zip(D, F))
    reference = float64_loop(W0, factors, 1 - 2 * lr * lam, lr, B)
    relative_close(result.W, reference[-1], 2e-5, "final W")


def test_dense_gradient_callable_matches_loop():
    m, n, lr, lam, steps = 8, 6, 0.2, 0.25, 12
    rng = np.random.default_rng(3)
    grads = [np.outer(rng.standard_normal(m), rng.standard_normal(n)) for _ in range(steps)]
    result = simulate(m, n, 1, lr, lam, steps, device=DEVICE,
                      gradient=lambda t, g: torch.tensor(grads[t], dtype=torch.float32, device=DEVICE))
    W = np.zeros((m, n))
    for G in grads:
        W = (1 - 2 * lr * lam) * W - lr * G
    relative_close(result.W, W, 2e-5, "final W")


def test_rank_never_exceeds_hard_cap_and_grows_by_BR_per_step():
    m, n, B, R = 24, 40, 2, 2
    result = simulate(m, n, B, 0.05, 0.1, 12, R=R, record_every=1, device=DEVICE, seed=2)
    assert result.hard_cap == min(m, n, 12 * B * R)
    for t, rank in zip(result.steps.tolist(), result.threshold_rank.tolist()):
        assert rank <= min(m, n, t * B * R), f"step {t}: threshold rank {rank} above the hard cap"
        if t * B * R <= m // 2:  # well-conditioned: every new direction is counted
            assert rank == t * B * R, f"step {t}: threshold rank {rank}, expected {t * B * R}"


def test_fixed_basis_caps_rank_at_the_basis_dimension():
    result = simulate(32, 32, 4, 0.05, 0.05, 60, gradient="fixed-basis", basis_dim=5,
                      record_every=3, device=DEVICE)
    assert int(result.threshold_rank.max()) == 5
    assert result.config["basis_dim"] == 5
    # Gaussian factors of the same run would fill the matrix.
    free = simulate(32, 32, 4, 0.05, 0.05, 60, record_every=60, device=DEVICE)
    assert int(free.threshold_rank[-1]) == 32


def test_zero_weight_decay_rank_grows_to_full():
    m, n = 16, 24
    result = simulate(m, n, 1, 0.1, 0.0, 30, record_every=1, device=DEVICE, seed=0)
    assert math.isinf(result.window) and result.bound == min(m, n)
    assert result.threshold_rank.tolist() == [min(t, m) for t in range(31)]
    assert result.decay == 1.0


def test_steady_state_rank_falls_with_lam_and_mu_and_rises_with_B():
    bs, mus, lams = [1, 2, 4], [0.4, 0.6, 0.8], [0.2, 0.35, 0.5]
    rows = sweep(bs, mus, lams, m=64, min_steps=60, records=16, device=DEVICE, seed=0)
    rank = {(r["batch_size"], r["lr"], r["weight_decay_lam"]): r["threshold_rank"] for r in rows}
    for b in bs:
        for mu in mus:
            values = [rank[b, mu, lam] for lam in lams]
            assert values == sorted(values, reverse=True) and len(set(values)) == 3, \
                f"B={b}, mu={mu}: rank not falling with lam: {values}"
        for lam in lams:
            values = [rank[b, mu, lam] for mu in mus]
            assert values == sorted(values, reverse=True) and len(set(values)) == 3, \
                f"B={b}, lam={lam}: rank not falling with mu: {values}"
    for mu in mus:
        for lam in lams:
            values = [rank[b, mu, lam] for b in bs]
            assert values == sorted(values) and len(set(values)) == 3, \
                f"mu={mu}, lam={lam}: rank not rising with B: {values}"
    for r in rows:
        assert r["threshold_rank"] <= r["bound"] + 1e-9, f"measured rank above the bound: {r}"


def test_sweep_table_and_plot(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    rows = sweep([1, 2], [0.5], [0.3, 0.6], m=20, n=30, min_steps=30, records=4, device=DEVICE)
    table = format_sweep_table(rows)
    assert table.count("\n") == 1 + len(rows)
    assert "steady threshold rank" in table
    path = tmp_path / "rank_vs_bound.png"
    fig = plot_sweep(rows, path)
    assert path.exists() and path.stat().st_size > 1000
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].get_yscale() == "log"
    with pytest.raises(ValueError, match="grid point B=1, mu=0.9, lam=0.9"):
        sweep([1], [0.9], [0.9], m=8)


def test_prediction():
    p = predict(100, 200, 4, 0.1, 0.05, eps=1e-3, R=2, steps=3)
    assert p.decay == pytest.approx(0.99)
    assert p.window == pytest.approx(math.log(1e3) / 0.005)
    assert p.exact_window == pytest.approx(math.log(1e3) / -math.log(0.99))
    assert p.bound == 100  # B*R*window = 11052 > min(m, n)
    assert p.hard_cap == 24
    assert predict(1000, 1000, 1, 0.5, 0.5, eps=1e-2).bound == pytest.approx(math.log(100) / 0.25)
    with pytest.raises(ValueError, match=r"1 - 2\*mu\*lam"):
        predict(10, 10, 1, 1.0, 0.5)


def test_result_fields_and_steady_state():
    result = simulate(20, 20, 2, 0.3, 0.3, 50, record_every=7, device=DEVICE)
    assert isinstance(result, SimulationResult)
    assert result.steps.tolist() == [0, 7, 14, 21, 28, 35, 42, 49, 50]
    k = len(result.steps)
    assert result.singular_values.shape == (k, 20)
    for name in RECORDED_MEASURES:
        assert getattr(result, name).shape == (k,)
    assert result.threshold_rank[0] == 0 and result.effective_rank[0] == 0
    assert result.steady_state_rank(fraction=1e-9) == float(result.threshold_rank[-1])
    assert result.steady_state_rank("effective_rank", 1.0) == pytest.approx(
        float(result.effective_rank.double().mean()))
    # The recorded spectrum of the last step is the final W's.
    expected = torch.linalg.svdvals(result.W.double().cpu())
    relative_close(result.singular_values[-1], expected, 1e-9, "last singular values")
    assert "bound" in repr(result)
    with pytest.raises(ValueError, match="measure"):
        result.steady_state_rank("nuclear_norm")


def test_record_start_skips_the_transient():
    result = simulate(10, 10, 1, 0.3, 0.3, 23, record_every=5, record_start=12, device=DEVICE)
    assert result.steps.tolist() == [15, 20, 23]
    full = simulate(10, 10, 1, 0.3, 0.3, 23, record_every=5, device=DEVICE)
    assert torch.equal(result.threshold_rank, full.threshold_rank[-3:])


def test_default_record_every_and_bfloat16():
    assert simulate(6, 6, 1, 0.1, 0.1, 10, device=DEVICE).steps.tolist() == list(range(11))
    result = simulate(6, 6, 1, 0.1, 0.1, 1000, device=DEVICE, dtype=torch.bfloat16)
    assert result.config["record_every"] == 4 and len(result.steps) == 251
    assert result.W.dtype == torch.bfloat16


def test_eps_changes_threshold_rank_only():
    a = simulate(30, 30, 1, 0.2, 0.2, 200, record_every=200, device=DEVICE)
    b = simulate(30, 30, 1, 0.2, 0.2, 200, record_every=200, device=DEVICE, eps=0.1)
    assert int(b.threshold_rank[-1]) < int(a.threshold_rank[-1])
    assert torch.equal(a.effective_rank, b.effective_rank)
    assert b.window < a.window


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(m=0), ValueError, "m must be >= 1"),
    (dict(n=2.5), TypeError, "n must be an integer"),
    (dict(batch_size=True), TypeError, "batch_size must be an integer"),
    (dict(lr=0.0), ValueError, "lr must be > 0"),
    (dict(lr=float("nan")), ValueError, "lr must be finite"),
    (dict(weight_decay_lam=-0.1), ValueError, "weight_decay_lam must be >= 0"),
    (dict(lr=1.0, weight_decay_lam=0.5), ValueError, r"1 - 2\*mu\*lam .* not positive"),
    (dict(steps=-1), ValueError, "steps must be >= 0"),
    (dict(eps=1.0), ValueError, r"eps must be in \(0, 1\)"),
    (dict(eps=0), ValueError, "eps must be > 0"),
    (dict(R=0), ValueError, "R must be >= 1"),
    (dict(record_every=0), ValueError, "record_every must be >= 1"),
    (dict(record_start=4), ValueError, "record_start = 4 is after the last step"),
    (dict(gradient="uniform"), ValueError, "gradient must be one of"),
    (dict(gradient=torch.zeros(8, 8)), ValueError, "gradient must be one of"),
    (dict(basis_dim=3), ValueError, "basis_dim applies to gradient='fixed-basis'"),
    (dict(gradient="fixed-basis", basis_dim=9), ValueError, "exceeds min"),
    (dict(dtype=torch.float64), ValueError, "dtype must be torch.float32 or torch.bfloat16"),
    (dict(init="ones"), ValueError, "init must be one of"),
    (dict(init=torch.zeros(8, 7)), ValueError, r"init tensor has shape \(8, 7\)"),
    (dict(init=torch.full((8, 8), float("inf"))), ValueError, "NaN or Inf"),
    (dict(init=torch.zeros(8, 8, dtype=torch.complex64)), TypeError, "real floating point"),
    (dict(seed=-1), ValueError, "seed must be >= 0"),
])
def test_bad_arguments(kwargs, error, match):
    args = dict(m=8, n=8, batch_size=2, lr=0.1, weight_decay_lam=0.1, steps=3, device="cpu")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        simulate(**args)


@pytest.mark.parametrize("returned, error, match", [
    (lambda: (torch.zeros(3, 5), torch.zeros(3, 4)), ValueError, r"1 <= K <= batch_size\*R = 2"),
    (lambda: (torch.zeros(2, 5), torch.zeros(2, 3)), ValueError, r"F has shape \(2, 3\)"),
    (lambda: torch.zeros(4, 5), ValueError, r"G has shape \(4, 5\)"),
    (lambda: (torch.zeros(2, 5), torch.full((2, 4), float("nan"))), ValueError, "NaN or Inf"),
    (lambda: (torch.zeros(2, 5, dtype=torch.int64), torch.zeros(2, 4)), TypeError, "real floating"),
    (lambda: "G", TypeError, r"must return \(D, F\) or a tensor G"),
])
def test_callable_gradient_checks(returned, error, match):
    with pytest.raises(error, match=match):
        simulate(5, 4, 2, 0.1, 0.1, 2, gradient=lambda t, g: returned(), device="cpu")


@pytest.mark.gpu
def test_large_simulation_on_gpu():
    """4096 x 4096, B = 8 on the GPU kernels (its speed is the report's 'simulate' section)."""
    steps = 200
    result = simulate(4096, 4096, 8, 0.01, 0.005, steps, device="cuda", record_every=steps)
    assert torch.isfinite(result.singular_values).all()
    assert int(result.threshold_rank[-1]) <= result.hard_cap == min(4096, steps * 8)


@pytest.mark.parametrize("gradient", ["gaussian", "fixed-basis"])
def test_drawn_factors_are_checked_once_per_run(gradient, monkeypatch):
    """The loop launches decay_outer_'s update without its per-call checks: they run once, on
    the first draw, and the run equals one through decay_outer_ at every step."""
    import importlib

    from lowrank_kernels.ops import decay_outer as op

    sim = importlib.import_module("lowrank_kernels.simulate")  # the package exports simulate()

    kwargs = dict(steps=30, chunk_steps=7, seed=3, device="cpu", gradient=gradient,
                  backend="torch")
    checks = []
    real_check = sim.check_inputs
    monkeypatch.setattr(sim, "check_inputs", lambda *a, **k: (checks.append(1), real_check(*a, **k)))
    fast = sim.simulate(10, 8, 2, 0.05, 0.3, **kwargs)
    assert len(checks) == 1
    monkeypatch.undo()

    def checked_every_step(backend_name, W, D, F, decay, alpha):
        return op.decay_outer_(W, D, F, decay, alpha, backend=backend_name, check_finite=True)

    monkeypatch.setattr(sim, "_launch", checked_every_step)
    slow = sim.simulate(10, 8, 2, 0.05, 0.3, **kwargs)
    assert torch.equal(fast.W, slow.W)
    assert torch.equal(fast.singular_values, slow.singular_values)
