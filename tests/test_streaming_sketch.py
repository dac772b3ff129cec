"""The streaming randomized sketch: it follows the weights over many steps (every momentum form,
conv and Linear, factored and dense), its top-k values match the exact tier, its error estimate
bounds the true error, and what it cannot follow is reported."""
import copy
import math
import types

import pytest
import torch
from torch import nn

from helpers import assert_close_verbose
from lowrank_kernels import DecaySGD, fused_sgd_step_
from lowrank_kernels.optim.factored_step import factored_update_, sketch_factors
from lowrank_kernels.spectral import singular_values
from lowrank_kernels.spectral import streaming_sketch
from lowrank_kernels.spectral.streaming_sketch import HMT_FACTOR, StreamingSketch

FORMS = {
    "plain": dict(momentum=0.0, weight_decay=0.0),
    "weight_decay": dict(momentum=0.0, weight_decay=5e-3),
    "momentum": dict(momentum=0.9, weight_decay=5e-3),
    "nesterov": dict(momentum=0.9, nesterov=True, weight_decay=5e-3),
    "decoupled": dict(momentum=0.9, decoupled_weight_decay=True, weight_decay=5e-3),
    "dampening_maximize": dict(momentum=0.9, dampening=0.3, maximize=True, weight_decay=5e-3),
}

# Relative Frobenius drift ||Y - W Omega|| / ||W Omega|| allowed after 1,000 float32 steps. Each
# step rounds W, the buffer and their sketches at float32's unit roundoff (6e-8, times a few for
# the sums inside each product); over T = 1000 steps those errors add up (about sqrt(T) as a
# random walk, T at worst), momentum carries each for ~1/(1 - m) = 10 steps, and a buffer's norm
# is below the sum of its increments, so its relative drift is larger. Seen (six forms, three
# seeds): up to 1.2e-5 for the weights, 3.7e-5 for the buffers. A wrong rule drifts far more
# (test_drift_check_catches_a_broken_update): factors scaled by 1.001, 5e-4 after 200 steps; the
# weight decay left out, 0.5.
WEIGHT_DRIFT = 1e-4
BUFFER_DRIFT = 3e-4


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices: BLAS threads only contend with each other (and with whatever else runs).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def convnet(padding_mode="zeros"):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode=padding_mode), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 24), nn.Tanh(), nn.Linear(24, 3))


def _data(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train(model, opt, steps, batch=8, seed=1):
    x, y = _data(seed=seed)
    n = x.shape[0]
    for i in range(steps):
        j = (i * batch) % n
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[j:j + batch]), y[j:j + batch]).backward()
        opt.step()


def _setup(form="momentum", factored=True, backend="torch", lr=0.05, padding_mode="zeros",
           k=4, seed=0, **sketch_kw):
    torch.manual_seed(seed)
    model = convnet(padding_mode)
    kw = dict(FORMS[form])
    if form == "dampening_maximize":
        lr = 0.02
    opt = DecaySGD(model.parameters(), lr=lr, factored=factored,
                   model=model if factored else None, backend=backend, **kw)
    weights = {"conv": model[0].weight, "fc": model[3].weight}  # the head (3 x 24) is under k
    sketch = StreamingSketch(opt, weights, k=k, oversample=2, probes=3, **sketch_kw)
    return model, opt, sketch


def _assert_follows(sketch, weight_tol=WEIGHT_DRIFT, buffer_tol=BUFFER_DRIFT):
    for name, d in sketch.drift().items():
        assert d.weight < weight_tol, f"{name}: sketch drift {d.weight:.3g}"
        if d.momentum_buffer is not None:
            assert d.momentum_buffer < buffer_tol, f"{name}: buffer drift {d.momentum_buffer:.3g}"


# ------------------------------------------------------------------------------------------------
# The sketch follows the weights
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", list(FORMS))
def test_factored_update_on_the_sketch_is_exact_in_float64(form):
    """The linearity the sketch rests on, without rounding in the way: factored_update_ on
    (W Omega, buf Omega) with (D, F Omega) equals (W' Omega, buf' Omega) to float64 rounding."""
    g = torch.Generator().manual_seed(3)
    d_out, d_in, K, width = 9, 13, 5, 4
    kw = dict(FORMS[form], lr=0.1, dampening=FORMS[form].get("dampening", 0.0),
              nesterov=FORMS[form].get("nesterov", False),
              maximize=FORMS[form].get("maximize", False),
              decoupled_weight_decay=FORMS[form].get("decoupled_weight_decay", False))
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    buf = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    omega = torch.randn(d_in, width, generator=g, dtype=torch.float64)
    y, yb = w @ omega, buf @ omega
    for step in range(4):
        factors = None if step == 2 else (torch.randn(K, d_out, generator=g, dtype=torch.float64),
                                          torch.randn(K, d_in, generator=g, dtype=torch.float64))
        first = step == 0
        factored_update_(w, factors, buf, first_step=first, **kw)
        factored_update_(y, sketch_factors(factors, omega), yb, first_step=first, **kw)
        assert_close_verbose(y, w @ omega, 1e-12, 1e-12, name=f"Y after step {step}")
        if kw["momentum"] != 0:
            assert_close_verbose(yb, buf @ omega, 1e-12, 1e-12, name=f"Yb after step {step}")


@pytest.mark.parametrize("form", ["plain", "weight_decay", "momentum", "nesterov", "decoupled",
                                  "dampening_maximize"])
def test_sketch_follows_1000_factored_steps(form):
    model, opt, sketch = _setup(form)
    assert sorted(p.shape for p in sketch.factored_weights()) == sorted(
        [model[0].weight.shape, model[3].weight.shape])
    _train(model, opt, 1000)
    _assert_follows(sketch)


def test_drift_check_catches_a_broken_update(monkeypatch):
    """The agreement test can fail: a sketch update that forgets the weight decay, or scales
    the factors wrongly, drifts far beyond the tolerance."""
    def no_decay(y, factors, yb, **kw):
        kw["weight_decay"] = 0.0
        factored_update_(y, factors, yb, **kw)

    monkeypatch.setattr(streaming_sketch, "factored_update_", no_decay)
    model, opt, sketch = _setup("momentum")
    _train(model, opt, 200)
    with pytest.raises(AssertionError, match="drift"):
        _assert_follows(sketch)

    monkeypatch.undo()
    monkeypatch.setattr(streaming_sketch, "sketch_factors",
                        lambda f, omega: None if f is None else (f[0] * 1.001, f[1] @ omega))
    model, opt, sketch = _setup("plain")
    _train(model, opt, 200)
    with pytest.raises(AssertionError, match="drift"):
        _assert_follows(sketch)


def test_channels_last_conv_weight():
    model, opt, sketch = _setup("nesterov")
    model[0].weight.data = model[0].weight.data.contiguous(memory_format=torch.channels_last)
    sketch.resync()
    _train(model, opt, 100)
    assert not model[0].weight.is_contiguous()
    _assert_follows(sketch)


def test_kernel_backends_update_the_sketch(backend):
    """The Y update goes through decay_outer_ on the group's backend (Triton under the CPU
    interpreter here); Nesterov runs two launches per step."""
    model, opt, sketch = _setup("nesterov", backend=backend)
    ref_model, ref_opt, ref_sketch = _setup("nesterov", backend="torch")
    _train(model, opt, 3)
    _train(ref_model, ref_opt, 3)
    _assert_follows(sketch, 1e-5, 1e-5)
    for name in sketch.names:
        assert_close_verbose(sketch.sketch(name), ref_sketch.sketch(name), 1e-4, 1e-6, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["torch", "triton", "cuda"])
def test_gpu_backends_update_the_sketch(backend_name):
    from lowrank_kernels.backends import available_backends
    if backend_name not in available_backends(torch.device("cuda")):
        pytest.skip(f"backend {backend_name} is not available on this GPU machine")
    torch.manual_seed(0)
    model = convnet().cuda()
    opt = DecaySGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-3,
                   factored=True, model=model, backend=backend_name)
    sketch = StreamingSketch(opt, {"conv": model[0].weight, "fc": model[3].weight}, k=4,
                             oversample=2, probes=3)
    x, y = (t.cuda() for t in _data())
    for i in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
        opt.step()
    _assert_follows(sketch)
    sketch.spectra()


@pytest.mark.parametrize("form", ["momentum", "nesterov"])
def test_dense_path_follows_the_dense_step(form):
    """Weights without factors (a dense DecaySGD) are sketched through G Omega."""
    model, opt, sketch = _setup(form, factored=False)
    assert sketch.factored_weights() == []
    _train(model, opt, 300)
    _assert_follows(sketch)


def test_dense_fallback_weight_of_a_factored_optimizer():
    """A conv the factored mode leaves dense (reflect padding) next to factored weights."""
    with pytest.warns(UserWarning, match="dense step"):
        model, opt, sketch = _setup("momentum", padding_mode="reflect")
    assert [p.shape for p in sketch.factored_weights()] == [model[3].weight.shape]
    _train(model, opt, 300)
    _assert_follows(sketch)


def test_a_dense_gradient_in_place_of_factors():
    """An object with a ``.grad`` (the data-parallel step's all-reduced gradient) steps the
    sketch with the dense rules."""
    model, opt, sketch = _setup("momentum")
    w = model[3].weight
    group = opt.param_groups[0]
    g = torch.randn_like(w)
    for first in (True, False):
        buf = opt.state[w].setdefault("momentum_buffer", torch.zeros_like(w))
        fused_sgd_step_([w], [g], [buf], first_step=[first], lr=0.05, momentum=0.9,
                        weight_decay=5e-3)
        sketch.factored_step_(w, types.SimpleNamespace(grad=g), first_step=first, group=group)
    _assert_follows(sketch, 1e-5, 1e-5)


# ------------------------------------------------------------------------------------------------
# The record
# ------------------------------------------------------------------------------------------------
def _weight_sketch(w, k, oversample=8, probes=5, seed=0):
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    opt = DecaySGD(layer.parameters(), lr=0.1)
    return layer, StreamingSketch(opt, [("w", layer.weight)], k=k, oversample=oversample,
                                  probes=probes, seed=seed)


def _low_rank_plus_noise(m, n, rank, noise, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, -1, rank, dtype=torch.float64)
    w = (u * s) @ v.T + noise * torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    return w.float()


def test_top_k_matches_the_exact_tier_on_low_rank_plus_noise():
    w = _low_rank_plus_noise(96, 64, rank=6, noise=1e-5, seed=5)
    layer, sketch = _weight_sketch(w, k=8)
    sp = sketch.spectra(return_vectors=True)
    exact = singular_values(w, method="exact")
    got, ref = sp.values[0], exact.values[0, :8]
    assert sp.values.shape == (1, 8)
    assert_close_verbose(got[:6], ref[:6], 1e-5, 0, name="top-6 singular values")
    assert ((got - ref).abs() <= sp.error_bound[0]).all()  # Weyl: every value within the bound
    assert abs(float(sp.frobenius[0]) - float(exact.frobenius)) < 1e-6 * float(exact.frobenius)
    assert float(sp.error_bound[0]) < 1e-2  # near the noise (~1e-4), far below s_6 = 0.1
    u, v = sp.vectors[0]
    assert_close_verbose(u.T @ w.double() @ v, torch.diag(got), 1e-4, 1e-5, name="U^T W V")


def test_error_estimate_bounds_the_true_error():
    """HMT sec. 4.3: ||(I - QQ^T) W|| <= 10 sqrt(2/pi) max_i ||(I - QQ^T) W w_i|| (probability
    1 - 10^-5 with 5 probes), on matrices whose spectrum decays slowly past k, where Q misses a
    lot; the bound is also not absurdly loose."""
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        m, n = 60, 80
        s = torch.arange(1, 61, dtype=torch.float64).pow(-0.5 - 0.1 * (seed % 4))
        u = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64)).Q
        w = ((u * s) @ v.T).float()
        layer, sketch = _weight_sketch(w, k=6, oversample=4, seed=seed)
        sp = sketch.spectra()
        q = torch.linalg.qr(sketch.sketch("w")[:, :10].double()).Q
        rest = w.double() - q @ (q.T @ w.double())
        true = float(torch.linalg.matrix_norm(rest, ord=2))
        bound = float(sp.error_bound[0])
        assert true <= bound <= 60 * true, (seed, true, bound)
        assert abs(float(sp.residual[0]) - float(torch.linalg.matrix_norm(rest))) \
            < 1e-4 * float(sp.frobenius[0])
        exact = singular_values(w).values[0, :6]
        assert ((sp.values[0] - exact).abs() <= bound).all()


def test_measures_from_the_sketch():
    from lowrank_kernels.spectral import all_measures
    w = _low_rank_plus_noise(40, 30, rank=3, noise=1e-5, seed=2)
    layer, sketch = _weight_sketch(w, k=6, oversample=4)
    sp = sketch.spectra(eps=1e-3)
    assert bool(sp.complete[0])
    ranks = all_measures(sp, ["threshold_rank", "spectral_norm"], eps=1e-3)
    assert int(ranks["threshold_rank"][0]) == 3
    assert sp.method == "streaming" and sp.names == ["w"]


def test_width_is_capped_by_the_short_side_and_is_then_exact():
    w = _low_rank_plus_noise(12, 30, rank=12, noise=0.0, seed=4)
    layer, sketch = _weight_sketch(w, k=10, oversample=8)  # k + oversample > 12
    assert sketch.sketch("w").shape == (12, 12 + 5)
    sp = sketch.spectra()
    assert_close_verbose(sp.values[0], singular_values(w).values[0, :10], 1e-5, 1e-7, name="s")
    assert float(sp.error_bound[0]) < 1e-5


# ------------------------------------------------------------------------------------------------
# State, resumption, and what the sketch cannot follow
# ------------------------------------------------------------------------------------------------
def test_state_dict_resumes_the_sketch():
    model, opt, sketch = _setup("nesterov")
    _train(model, opt, 30)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sketch.state_dict()))
    _train(model, opt, 30, seed=2)

    model2, opt2, sketch2 = _setup("nesterov", seed=7)  # other initial weights
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sketch2.load_state_dict(saved[2])
    _train(model2, opt2, 30, seed=2)
    for name in sketch.names:
        assert_close_verbose(sketch2.sketch(name), sketch.sketch(name), 1e-6, 1e-7, name=name)
    _assert_follows(sketch2)


def test_load_state_dict_redraws_omega_from_the_saved_seed():
    model, opt, sketch = _setup("plain")
    state = sketch.state_dict()
    state["seed"] = 11
    other = copy.deepcopy(state)
    # Sketches made with seed 11, as a run with that seed would have saved them.
    omega = {}
    for e in sketch._entries:
        gen = torch.Generator().manual_seed(streaming_sketch._omega_seed(11, e.index))
        omega[e.name] = torch.randn(e.omega.shape, generator=gen)
    for s in other["sketches"]:
        s["y"] = sketch._product(sketch._entry(s["name"]).weight, omega[s["name"]])
    sketch.load_state_dict(other)
    assert sketch.seed == 11
    _train(model, opt, 20)
    _assert_follows(sketch)


def test_model_load_state_dict_behind_the_sketch_is_reported():
    model, opt, sketch = _setup("momentum")
    _train(model, opt, 5)
    model.load_state_dict(convnet().state_dict())
    _train(model, opt, 2)
    with pytest.raises(RuntimeError, match=r"conv: it was written outside the optimizer step.*"
                                           r"resync\(\)"):
        sketch.spectra()
    with pytest.raises(RuntimeError, match="no longer follows"):
        sketch.drift()
    sketch.resync()
    _train(model, opt, 5)
    _assert_follows(sketch)
    sketch.spectra()


def test_optimizer_load_state_dict_behind_the_sketch_is_reported():
    model, opt, sketch = _setup("momentum")
    _train(model, opt, 5)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    with pytest.raises(RuntimeError, match="momentum buffer was replaced"):
        sketch.spectra()


def test_weight_moved_to_another_dtype_is_reported():
    model, opt, sketch = _setup("plain")
    model[3].to(torch.float64)
    with pytest.raises(RuntimeError, match=r"fc: it moved from torch.float32 on cpu to "
                                           r"torch.float64 on cpu"):
        sketch.spectra()


@pytest.mark.gpu
def test_weight_moved_to_another_device_is_reported():
    model, opt, sketch = _setup("plain")
    model[0].weight.data = model[0].weight.data.cuda()  # the same Parameter, new storage
    with pytest.raises(RuntimeError, match="conv: it moved from torch.float32 on cpu to "
                                           "torch.float32 on cuda"):
        sketch.drift()


def test_detach_stops_the_updates():
    model, opt, sketch = _setup("plain")
    y0 = sketch.sketch("fc").clone()
    sketch.detach()
    _train(model, opt, 2)
    assert torch.equal(sketch.sketch("fc"), y0)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def test_k_larger_than_the_matrix_is_an_error():
    model = convnet()
    opt = DecaySGD(model.parameters(), lr=0.1, factored=True, model=model)
    with pytest.raises(ValueError, match=r"k = 4 is larger than min\(d_out, d_in\) = 3 of 5.weight"):
        StreamingSketch(opt, k=4)  # the default set includes the 3 x 24 head
    with pytest.raises(ValueError, match=r"k = 30 is larger than min\(d_out, d_in\) = 8 of conv"):
        StreamingSketch(opt, [("conv", model[0].weight)], k=30)  # conv: 8 x 27


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dtype=torch.float64), ValueError, "kept in float32"),
    (dict(dtype=torch.bfloat16), ValueError, "kept in float32"),
    (dict(k=0), ValueError, "k must be an integer >= 1"),
    (dict(oversample=-1), ValueError, "oversample must be"),
    (dict(probes=1.5), ValueError, "probes must be"),
])
def test_bad_arguments(kwargs, error, match):
    model = convnet()
    opt = DecaySGD(model.parameters(), lr=0.1, factored=True, model=model)
    with pytest.raises(error, match=match):
        StreamingSketch(opt, [model[3].weight], **{"k": 2, **kwargs})


def test_bad_weights_and_optimizers():
    model = convnet()
    opt = DecaySGD(model.parameters(), lr=0.1, factored=True, model=model)
    with pytest.raises(ValueError, match=r"has shape \(8,\); a sketch tracks a matrix"):
        StreamingSketch(opt, [model[0].bias], k=1)
    with pytest.raises(TypeError, match="dense real floating-point"):
        StreamingSketch(opt, [("ints", torch.zeros(4, 4, dtype=torch.int32))], k=1)
    with pytest.raises(ValueError, match="not in the optimizer's param groups"):
        StreamingSketch(opt, [("other", nn.Parameter(torch.zeros(4, 4)))], k=1)
    with pytest.raises(TypeError, match="needs a lowrank_kernels.DecaySGD"):
        StreamingSketch(torch.optim.SGD(model.parameters(), lr=0.1), [model[3].weight], k=1)
    dense = DecaySGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="steps no weight in factored form; pass weights="):
        StreamingSketch(dense)
    ct = nn.ConvTranspose2d(4, 6, 3)
    with pytest.warns(UserWarning, match="ConvTranspose2d layers have no factored form"):
        opt_ct = DecaySGD(ct.parameters(), lr=0.1, factored=True, model=ct)
    with pytest.raises(ValueError, match="ConvTranspose weight"):
        StreamingSketch(opt_ct, [ct.weight], k=1)


def test_bad_saved_state():
    model, opt, sketch = _setup("plain")
    state = sketch.state_dict()
    bad = copy.deepcopy(state)
    bad["sketches"][0]["y"] = bad["sketches"][0]["y"].double()
    with pytest.raises(ValueError, match=r"conv's y sketch must be float32 of shape \(8, 9\), "
                                         r"got torch.float64"):
        sketch.load_state_dict(bad)
    bad = copy.deepcopy(state)
    bad["sketches"][1]["y"] = bad["sketches"][1]["y"][:, :3]
    with pytest.raises(ValueError, match=r"fc's y sketch must be float32 of shape \(24, 9\)"):
        sketch.load_state_dict(bad)
    bad = dict(state, k=5)
    with pytest.raises(ValueError, match="saved k = 5, this sketch has 4"):
        sketch.load_state_dict(bad)
    bad = dict(state, sketches=state["sketches"][:1])
    with pytest.raises(ValueError, match="differ from the tracked"):
        sketch.load_state_dict(bad)


def test_nan_in_a_weight_is_named():
    model, opt, sketch = _setup("plain")
    with torch.no_grad():
        model[3].weight[0, 0] = float("nan")
    sketch.resync(["fc"])
    with pytest.raises(ValueError, match="fc .*NaN or Inf"):
        sketch.spectra()
