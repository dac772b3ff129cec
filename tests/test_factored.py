"""DecaySGD's factored mode: equal to the dense step, no weight gradient, clear limits."""
import copy
import warnings

import pytest
import torch
from torch import nn

from lowrank_kernels import DecaySGD
from lowrank_kernels.optim.factor_capture import FactorCapture, why_not_capturable

MOMENTUM_FORMS = {
    "plain": dict(momentum=0.0),
    "momentum": dict(momentum=0.9),
    "dampening": dict(momentum=0.9, dampening=0.3),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "decoupled": dict(momentum=0.9, decoupled_weight_decay=True),
    "decoupled_nesterov": dict(momentum=0.9, nesterov=True, decoupled_weight_decay=True),
    "decoupled_plain": dict(momentum=0.0, decoupled_weight_decay=True),
    "maximize": dict(momentum=0.9, maximize=True),
}


class TinyAttention(nn.Module):
    """Single-head self-attention from Linear projections, on (B, T, d): R = T tokens."""

    def __init__(self, d=8, classes=3):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / x.shape[-1] ** 0.5, dim=-1)
        return self.head(self.o(a @ self.v(x)).mean(dim=1))


def mlp():
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(inplace=True), nn.Linear(16, 16, bias=False),
                         nn.Tanh(), nn.Linear(16, 3))


def convnet():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU(inplace=True),
                         nn.Conv2d(6, 4, 3, stride=2, dilation=1, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 3))


MODELS = {
    "mlp": (mlp, lambda g: torch.randn(5, 12, generator=g)),
    "conv": (convnet, lambda g: torch.randn(4, 3, 6, 6, generator=g)),
    "attention": (TinyAttention, lambda g: torch.randn(3, 5, 8, generator=g)),
}


def _twins(kind, seed=0):
    build, _ = MODELS[kind]
    torch.manual_seed(seed)
    dense = build()
    return dense, copy.deepcopy(dense)


def _batches(kind, n, seed=1):
    _, data = MODELS[kind]
    g = torch.Generator().manual_seed(seed)
    return [(data(g), torch.randint(0, 3, (data(g).shape[0],), generator=g)) for _ in range(n)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _max_rel_diff(a, b):
    return max(((p - q).abs().max() / q.abs().max().clamp_min(1e-12)).item()
               for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("form", list(MOMENTUM_FORMS))
def test_factored_equals_dense_over_many_steps(kind, form):
    kw = dict(lr=0.02 if form == "maximize" else 0.1, weight_decay=5e-3, **MOMENTUM_FORMS[form])
    dense, factored = _twins(kind)
    batches = _batches(kind, 15 if form != "maximize" else 8)
    _train(dense, DecaySGD(dense.parameters(), backend="torch", **kw), batches)
    opt = DecaySGD(factored.parameters(), factored=True, model=factored, backend="torch", **kw)
    _train(factored, opt, batches)
    assert len(opt.factored_parameters()) == sum(
        isinstance(m, (nn.Linear, nn.Conv2d)) for m in factored.modules())
    assert _max_rel_diff(factored, dense) < 2e-5


def test_factored_kernel_backend_equals_dense(backend):
    """The step through each available decay_outer_ backend (Triton interpreted on the CPU)."""
    kw = dict(lr=0.1, weight_decay=5e-3, momentum=0.9)
    dense, factored = _twins("conv")
    batches = _batches("conv", 4)
    _train(dense, DecaySGD(dense.parameters(), backend="torch", **kw), batches)
    _train(factored, DecaySGD(factored.parameters(), factored=True, model=factored,
                              backend=backend, **kw), batches)
    assert _max_rel_diff(factored, dense) < 2e-5


def test_no_weight_gradient_is_materialised():
    model = mlp()
    opt = DecaySGD(model.parameters(), lr=0.1, factored=True, model=model)
    x, y = _batches("mlp", 1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            assert m.weight.grad is None and not m.weight.requires_grad
            if m.bias is not None:
                assert m.bias.grad is not None  # biases take the dense step
    before = model[0].weight.clone()
    opt.step()
    assert not torch.equal(model[0].weight, before)


def test_first_layer_without_bias_or_input_grad_is_captured():
    dense, factored = _twins("conv")
    opt = DecaySGD(factored.parameters(), lr=0.1, factored=True, model=factored)
    ref = DecaySGD(dense.parameters(), lr=0.1)
    batches = _batches("conv", 2)
    _train(dense, ref, batches)
    _train(factored, opt, batches)
    assert not torch.equal(factored[0].weight, _twins("conv")[1][0].weight)
    assert _max_rel_diff(factored, dense) < 2e-5


def test_gradient_accumulation_and_zero_grad_semantics():
    kw = dict(lr=0.1, weight_decay=1e-2, momentum=0.9)
    dense, factored = _twins("mlp")
    od = DecaySGD(dense.parameters(), **kw)
    of = DecaySGD(factored.parameters(), factored=True, model=factored, **kw)
    b = _batches("mlp", 4)
    for model, opt in ((dense, od), (factored, of)):
        # two backward passes accumulate into one step
        opt.zero_grad()
        for x, y in b[:2]:
            nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        # a forward without backward (grad enabled) and one under no_grad add nothing
        model(b[2][0])
        with torch.no_grad():
            model(b[2][0])
        opt.zero_grad()
        nn.functional.cross_entropy(model(b[3][0]), b[3][1]).backward()
        opt.step()
        # zero_grad(set_to_none=False): a zero gradient, so decay and momentum still apply
        opt.zero_grad(set_to_none=False)
        opt.step()
        # set_to_none=True: no gradient, no step at all
        opt.zero_grad()
        opt.step()
    assert _max_rel_diff(factored, dense) < 2e-5


def test_state_dict_matches_dense_and_loads_into_torch_sgd():
    kw = dict(lr=0.1, weight_decay=1e-2, momentum=0.9)
    dense, factored = _twins("mlp")
    od = DecaySGD(dense.parameters(), **kw)
    of = DecaySGD(factored.parameters(), factored=True, model=factored, **kw)
    batches = _batches("mlp", 3)
    _train(dense, od, batches)
    _train(factored, of, batches)
    sd, sf = od.state_dict(), of.state_dict()
    assert sf["param_groups"][0]["factored"] is True
    for i, st in sd["state"].items():
        torch.testing.assert_close(sf["state"][i]["momentum_buffer"], st["momentum_buffer"],
                                   rtol=2e-5, atol=1e-7)
    plain = torch.optim.SGD(dense.parameters(), **kw)
    plain.load_state_dict(sf)
    # loading a dense state dict keeps the factored hooks (they are set at construction)
    of.load_state_dict(sd)
    assert of.param_groups[0]["factored"] is True and of.factored_parameters()


def test_bfloat16_weights_close_to_dense():
    kw = dict(lr=0.1, weight_decay=1e-2, momentum=0.9)
    dense, factored = _twins("mlp")
    dense, factored = dense.to(torch.bfloat16), factored.to(torch.bfloat16)
    batches = [(x.to(torch.bfloat16), y) for x, y in _batches("mlp", 5)]
    _train(dense, DecaySGD(dense.parameters(), **kw), batches)
    _train(factored, DecaySGD(factored.parameters(), factored=True, model=factored, **kw), batches)
    for p, q in zip(factored.parameters(), dense.parameters()):
        torch.testing.assert_close(p.float(), q.float(), rtol=3e-2, atol=3e-2)


def test_per_group_factored_and_channels_last_conv():
    dense, factored = _twins("conv")
    dense = dense.to(memory_format=torch.channels_last)
    factored = factored.to(memory_format=torch.channels_last)
    kw = dict(lr=0.1, weight_decay=1e-2, momentum=0.9)
    convs = [p for n, p in factored.named_parameters() if n.startswith("0.")]
    rest = [p for n, p in factored.named_parameters() if not n.startswith("0.")]
    opt = DecaySGD([{"params": convs, "factored": True}, {"params": rest}], model=factored, **kw)
    assert len(opt.factored_parameters()) == 1 and factored[2].weight.requires_grad
    batches = [(x.to(memory_format=torch.channels_last), y) for x, y in _batches("conv", 5)]
    _train(dense, DecaySGD(dense.parameters(), **kw), batches)
    _train(factored, opt, batches)
    assert factored[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert _max_rel_diff(factored, dense) < 2e-5


def test_unsupported_layers_warn_and_take_the_dense_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2, padding=1), nn.Flatten(), nn.Linear(64, 3))
    twin = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="groups=2"):
        opt = DecaySGD(model.parameters(), lr=0.1, factored=True, model=model)
    assert model[0].weight.requires_grad and not model[2].weight.requires_grad
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(2, 4, 4, 4, generator=g), torch.tensor([0, 2])) for _ in range(3)]
    _train(model, opt, batches)
    _train(twin, DecaySGD(twin.parameters(), lr=0.1), batches)
    assert _max_rel_diff(model, twin) < 2e-5


def test_multihead_attention_projections_stay_dense():
    mha = nn.MultiheadAttention(8, 2)
    with pytest.warns(UserWarning, match="MultiheadAttention"):
        DecaySGD(mha.parameters(), lr=0.1, factored=True, model=mha)
    assert mha.out_proj.weight.requires_grad


def test_factored_errors():
    model = mlp()
    with pytest.raises(ValueError, match="model="):
        DecaySGD(model.parameters(), lr=0.1, factored=True)
    with pytest.raises(TypeError, match="nn.Module"):
        DecaySGD(model.parameters(), lr=0.1, factored=True, model="not a model")
    with pytest.raises(ValueError, match="not a parameter of the given model"):
        DecaySGD([nn.Parameter(torch.zeros(2, 2))], lr=0.1, factored=True, model=model)
    opt = DecaySGD(model.parameters(), lr=0.1, factored=True, model=model)
    x, y = _batches("mlp", 1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.grad_scale = torch.tensor(1024.0)
    with pytest.raises(RuntimeError, match="GradScaler"):
        opt.step()
    del opt.grad_scale
    model[0].weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="detach_factored"):
        opt.step()
    opt.detach_factored()
    assert all(p.requires_grad for p in model.parameters())
    assert not opt.param_groups[0]["factored"]


def test_capture_rejects_unsupported_modules():
    assert why_not_capturable(nn.Linear(2, 2)) is None
    assert "padding_mode" in why_not_capturable(nn.Conv2d(2, 2, 3, padding=1,
                                                          padding_mode="reflect"))
    assert "'same'" in why_not_capturable(nn.Conv2d(2, 2, 3, padding="same"))
    assert "Conv1d" in why_not_capturable(nn.Conv1d(2, 2, 3))
    with pytest.raises(ValueError, match="cannot capture"):
        FactorCapture(nn.Embedding(3, 2), torch.zeros((), requires_grad=True))


def test_factors_reproduce_the_autograd_weight_gradient():
    """D^T F equals the weight gradient autograd computes, for conv with stride and dilation."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2)
    x = torch.randn(2, 3, 9, 9)
    capture = FactorCapture(conv, torch.zeros((), requires_grad=True))
    conv(x).square().sum().backward()
    D, F = capture.factors()
    assert D.shape[0] == F.shape[0] == 2 * 5 * 5
    torch.testing.assert_close((D.t() @ F).view_as(conv.weight), conv.weight.grad,
                               rtol=1e-5, atol=1e-5)
    capture.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv(x)  # no hook left


@pytest.mark.parametrize("nesterov", [False, True])
def test_factored_update_checks_its_inputs_once_per_step(nesterov, monkeypatch):
    """Every pass of a step (into the buffer, into the weight) shares one check of
    decay_outer_'s inputs; a channels_last conv weight and buffer are written back."""
    from lowrank_kernels.optim import factored_step

    checks = []
    real = factored_step.check_inputs
    monkeypatch.setattr(factored_step, "check_inputs",
                        lambda *a, **k: (checks.append(1), real(*a, **k)))
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, 2, 2, generator=gen).to(memory_format=torch.channels_last)
    buf = torch.randn(4, 3, 2, 2, generator=gen).to(memory_format=torch.channels_last)
    D, F = torch.randn(5, 4, generator=gen), torch.randn(5, 12, generator=gen)
    w0, b0 = weight.clone(), buf.clone()
    kw = dict(lr=0.1, weight_decay=0.2, momentum=0.9, dampening=0.0, nesterov=nesterov,
              maximize=False, decoupled_weight_decay=False, backend="torch")
    factored_step.factored_update_(weight, (D, F), buf, first_step=False, **kw)
    assert len(checks) == 1
    g = (D.T @ F).view(4, 3, 2, 2) + 0.2 * w0
    expected_buf = 0.9 * b0 + g
    expected_w = w0 - 0.1 * ((g + 0.9 * expected_buf) if nesterov else expected_buf)
    torch.testing.assert_close(buf, expected_buf, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight, expected_w, rtol=1e-5, atol=1e-6)
    bad = torch.zeros(4, 3, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="momentum buffer .*does not match its weight"):
        factored_step.factored_update_(weight, (D, F), bad, first_step=False, **kw)
