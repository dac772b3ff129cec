"""DecaySGD behaves like torch.optim.SGD: the checks PyTorch runs on its own optimizers.

Argument errors, param groups, tensor / scheduled learning rates, closures, params without
gradients, state dicts (both ways with torch.optim.SGD, dtype casting, weights_only loading),
GradScaler, repr, deepcopy, unsupported inputs, backend selection, and a small training run.
"""
import copy
import io

import pytest
import torch

import lowrank_kernels
from lowrank_kernels import BackendUnavailableError, DecaySGD, fused_sgd_step_
from lowrank_kernels import backends as backends_mod
from lowrank_kernels.backends import available_backends, check_backend_name, resolve_backend
from lowrank_kernels.ops import sgd_step


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


FP32_TOL = dict(rtol=1e-6, atol=1e-6)


def assert_close(actual, expected, rtol=1e-6, atol=1e-6, msg=""):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg or None)


def make_params(device, seed=0, dtype=torch.float32, shapes=((5, 4), (4,), (2, 3, 3, 3))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype))
            for s in shapes]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(params, step, skip=()):
    """Deterministic gradients for ``step``; params whose index is in ``skip`` get None."""
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)
        p.grad = None if i in skip else g


def run(opt, params, steps, start=0, skip=()):
    for s in range(start, start + steps):
        set_grads(params, s, skip)
        opt.step()


def assert_params_close(ours, ref, **tol):
    tol = tol or FP32_TOL
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a.detach(), b.detach(), msg=f"param {i} differs", **tol)


def assert_equal_params(ours, ref):
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert torch.equal(a.detach(), b.detach()), f"param {i} differs"


# ----------------------------------------------------------------------------------------------
# Constructor arguments
# ----------------------------------------------------------------------------------------------
BAD_ARGS = {
    "negative_lr": dict(lr=-0.1),
    "negative_tensor_lr": dict(lr=torch.tensor(-0.1)),
    "tensor_lr_two_elements": dict(lr=torch.tensor([0.1, 0.2])),
    "negative_momentum": dict(lr=0.1, momentum=-0.5),
    "negative_weight_decay": dict(lr=0.1, weight_decay=-1e-4),
    "nesterov_without_momentum": dict(lr=0.1, nesterov=True),
    "nesterov_zero_momentum": dict(lr=0.1, momentum=0.0, nesterov=True),
    "nesterov_with_dampening": dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
}


@pytest.mark.parametrize("name", list(BAD_ARGS))
def test_argument_errors_match_torch_sgd(name):
    kwargs = BAD_ARGS[name]
    with pytest.raises(Exception) as torch_err:
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], **kwargs)
    with pytest.raises(Exception) as ours_err:
        DecaySGD([torch.nn.Parameter(torch.zeros(2))], **kwargs)
    assert type(ours_err.value) is type(torch_err.value) is ValueError
    assert str(ours_err.value) == str(torch_err.value)


def test_argument_error_messages():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="Invalid learning rate: -0.1"):
        DecaySGD(p, lr=-0.1)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        DecaySGD(p, lr=torch.ones(2))
    with pytest.raises(ValueError, match="Invalid momentum value: -0.5"):
        DecaySGD(p, momentum=-0.5)
    with pytest.raises(ValueError, match="Invalid weight_decay value: -0.001"):
        DecaySGD(p, weight_decay=-1e-3)
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum and zero dampening"):
        DecaySGD(p, nesterov=True)
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        DecaySGD(p, backend="bogus")
    with pytest.raises(RuntimeError, match="differentiable"):
        DecaySGD(p, differentiable=True)
    with pytest.raises(ValueError, match="empty parameter list"):
        DecaySGD([], lr=0.1)


def test_valid_arguments_and_defaults():
    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = DecaySGD(p)
    ref = torch.optim.SGD(p)
    for key in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"):
        assert opt.defaults[key] == ref.defaults[key], key
    assert opt.defaults["decoupled_weight_decay"] is False
    assert opt.defaults["backend"] == "auto"
    assert DecaySGD(p, backend=None).defaults["backend"] == "auto"
    for name in available_backends("cpu"):  # a named backend must run on the params' device
        assert DecaySGD(p, backend=name).defaults["backend"] == name
    # foreach / fused are accepted for drop-in compatibility and change nothing.
    a, b = clone_params(make_params("cpu")), clone_params(make_params("cpu"))
    run(DecaySGD(a, lr=0.1, momentum=0.9, foreach=True, fused=True), a, 2)
    run(DecaySGD(b, lr=0.1, momentum=0.9), b, 2)
    assert_equal_params(a, b)


# ----------------------------------------------------------------------------------------------
# Param groups
# ----------------------------------------------------------------------------------------------
def test_param_groups_use_their_own_hyperparameters(device, backend):
    a, b, c = make_params(device, shapes=((3, 4), (5,), (2, 2)))
    start = [t.detach().clone() for t in (a, b, c)]
    groups = [
        {"params": [a], "lr": 0.1, "weight_decay": 0.01},
        {"params": [b], "lr": 0.5, "weight_decay": 0.2},
        {"params": [c]},  # the defaults
    ]
    opt = DecaySGD(groups, lr=0.05, weight_decay=0.3, backend=backend)
    ref_params = [torch.nn.Parameter(t.clone()) for t in start]
    ref = torch.optim.SGD([{**g, "params": [r]} for g, r in zip(groups, ref_params)],
                          lr=0.05, weight_decay=0.3, foreach=False)
    for p, r in zip((a, b, c), ref_params):
        p.grad = torch.full_like(p, 0.5)
        r.grad = torch.full_like(r, 0.5)
    opt.step()
    ref.step()
    assert_params_close([a, b, c], ref_params)
    for p, s, lr, wd in zip((a, b, c), start, (0.1, 0.5, 0.05), (0.01, 0.2, 0.3)):
        assert_close(p.detach(), s - lr * (0.5 + wd * s))
    # decay_factor: 1 - lr * wd per group, by group dict or by index.
    for i, (lr, wd) in enumerate(((0.1, 0.01), (0.5, 0.2), (0.05, 0.3))):
        assert opt.decay_factor(i) == pytest.approx(1 - lr * wd, abs=1e-15)
        assert opt.decay_factor(opt.param_groups[i]) == pytest.approx(1 - lr * wd, abs=1e-15)
    # One value per group, in order, like a scheduler's get_last_lr().
    assert opt.decay_factors() == [opt.decay_factor(i) for i in range(3)]
    # Without a group the groups must agree: differing ones are never reported as group 0's.
    with pytest.raises(ValueError, match=r"different decay factors \(group 0: 0\.999, group 1: "
                                         r"0\.9, group 2: 0\.985\); pass group=") as err:
        opt.decay_factor()
    assert "decay_factors()" in str(err.value)
    with pytest.raises(IndexError, match="no param group 3 \\(there are 3\\)"):
        opt.decay_factor(3)
    assert opt.decay_factor(-1) == opt.decay_factor(2)
    opt.param_groups[1]["lr"] = torch.tensor(0.25)
    assert opt.decay_factor(1) == pytest.approx(1 - 0.25 * 0.2)
    assert isinstance(opt.decay_factor(1), float)
    for g in opt.param_groups:  # groups that agree: the shared factor, as a float
        g["lr"], g["weight_decay"] = 0.1, 0.5
    assert opt.decay_factor() == pytest.approx(0.95) and isinstance(opt.decay_factor(), float)


def test_add_param_group(device, backend):
    a, b = make_params(device, shapes=((3,), (4,)))
    opt = DecaySGD([a], lr=0.1, momentum=0.9, backend=backend)
    opt.add_param_group({"params": [b], "lr": 0.2})
    assert opt.param_groups[1]["backend"] == backend
    assert opt.param_groups[1]["momentum"] == 0.9
    b0 = b.detach().clone()
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    assert_close(b.detach(), b0 - 0.2)
    assert torch.equal(opt.state[b]["momentum_buffer"], torch.ones_like(b))


# ----------------------------------------------------------------------------------------------
# Learning rates: tensors, changes between steps, schedulers
# ----------------------------------------------------------------------------------------------
def test_tensor_lr_and_lr_changes_between_steps(device, backend):
    params = make_params(device)
    ref_params = clone_params(params)
    opt = DecaySGD(params, lr=torch.tensor(0.1), momentum=0.9, weight_decay=1e-2, backend=backend)
    ref = torch.optim.SGD(ref_params, lr=torch.tensor(0.1), momentum=0.9, weight_decay=1e-2,
                          foreach=False)
    changes = {1: lambda g: g["lr"].fill_(0.03),           # in place: the tensor is read every step
               2: lambda g: g.__setitem__("lr", 0.2),      # replaced by a float
               3: lambda g: g.__setitem__("lr", torch.tensor([0.0])),
               4: lambda g: g["lr"].fill_(0.07)}
    for step in range(6):
        if step in changes:
            changes[step](opt.param_groups[0])
            changes[step](ref.param_groups[0])
        before = [p.detach().clone() for p in params]
        set_grads(params, step)
        set_grads(ref_params, step)
        opt.step()
        ref.step()
        assert_params_close(params, ref_params)
        if step == 3:  # lr 0: nothing moves
            assert_equal_params(params, before)
        else:
            assert not torch.equal(params[0].detach(), before[0])


@pytest.mark.parametrize("scheduler", ["step", "cosine"])
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
def test_lr_schedulers_match_torch_sgd(device, backend, scheduler, tensor_lr):
    lr = torch.tensor(0.2) if tensor_lr else 0.2
    params = make_params(device)
    ref_params = clone_params(params)
    opt = DecaySGD(params, lr=lr.clone() if tensor_lr else lr, momentum=0.9, weight_decay=1e-2,
                   backend=backend)
    ref = torch.optim.SGD(ref_params, lr=lr.clone() if tensor_lr else lr, momentum=0.9,
                          weight_decay=1e-2, foreach=False)

    def make(o):
        if scheduler == "step":
            return torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
        return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5, eta_min=0.01)

    sched, ref_sched = make(opt), make(ref)
    lrs = []
    for step in range(6):
        set_grads(params, step)
        set_grads(ref_params, step)
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
        last = [float(x) for x in sched.get_last_lr()]
        assert last == pytest.approx([float(x) for x in ref_sched.get_last_lr()], rel=1e-12)
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(last[0], rel=1e-12)
        lrs.append(last[0])
        assert_params_close(params, ref_params)
    assert len(set(round(float(x), 8) for x in lrs)) >= 3  # the schedule did change the lr
    assert opt.decay_factor() == pytest.approx(1 - float(ref.param_groups[0]["lr"]) * 1e-2)


# ----------------------------------------------------------------------------------------------
# step(): closure, params without gradients, zero-size params
# ----------------------------------------------------------------------------------------------
def test_closure_is_called_and_its_loss_returned(device, backend):
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], device=device))
    opt = DecaySGD([w], lr=0.1, backend=backend)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1
    assert isinstance(loss, torch.Tensor) and loss.item() == pytest.approx(14.0)
    # The step used the gradient the closure computed: w - 0.1 * 2w = 0.8 w.
    assert_close(w.detach(), torch.tensor([0.8, -1.6, 2.4], device=device))
    assert opt.step() is None  # no closure: returns None, steps with the current grads
    assert_close(w.detach(), torch.tensor([0.8, -1.6, 2.4], device=device) - 0.2 * torch.tensor(
        [1.0, -2.0, 3.0], device=device))


def test_params_without_grad_are_skipped(device, backend):
    a, b, c = make_params(device, shapes=((3, 4), (5,), (2, 3)))
    b0 = b.detach().clone()
    opt = DecaySGD([a, b, c], lr=0.1, momentum=0.9, weight_decay=0.1, backend=backend)
    for step in range(2):
        set_grads([a, b, c], step, skip=(1,))
        opt.step()
    assert torch.equal(b.detach(), b0)  # weight decay did not touch it either
    assert b not in opt.state
    assert a in opt.state and c in opt.state
    # No gradient at all: nothing happens.
    for p in (a, b, c):
        p.grad = None
    before = [p.detach().clone() for p in (a, b, c)]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in (a, c)]
    opt.step()
    assert_equal_params([a, b, c], before)
    assert torch.equal(opt.state[a]["momentum_buffer"], bufs[0])
    assert torch.equal(opt.state[c]["momentum_buffer"], bufs[1])


def test_param_frozen_mid_run_matches_torch_sgd(device, backend):
    params = make_params(device)
    ref_params = clone_params(params)
    opt = DecaySGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, backend=backend)
    ref = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=False)
    run(opt, params, 3)
    run(ref, ref_params, 3)
    frozen = params[1].detach().clone()
    frozen_buf = opt.state[params[1]]["momentum_buffer"].clone()
    run(opt, params, 2, start=3, skip=(1,))
    run(ref, ref_params, 2, start=3, skip=(1,))
    assert torch.equal(params[1].detach(), frozen)
    assert torch.equal(opt.state[params[1]]["momentum_buffer"], frozen_buf)
    assert_params_close(params, ref_params)
    run(opt, params, 2, start=5)  # unfrozen: resumes from its old buffer, like torch
    run(ref, ref_params, 2, start=5)
    assert_params_close(params, ref_params)
    for p, r in zip(params, ref_params):
        assert_close(opt.state[p]["momentum_buffer"], ref.state[r]["momentum_buffer"])


def test_zero_size_params(device, backend):
    params = make_params(device, shapes=((0,), (3, 0, 2), (4, 3)))
    ref_params = clone_params(params)
    opt = DecaySGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, backend=backend)
    ref = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=False)
    run(opt, params, 2)
    run(ref, ref_params, 2)
    assert params[0].shape == (0,) and params[1].shape == (3, 0, 2)
    assert opt.state[params[1]]["momentum_buffer"].shape == (3, 0, 2)
    assert_params_close(params, ref_params)
    only_empty = make_params(device, shapes=((0, 5),))
    opt2 = DecaySGD(only_empty, lr=0.1, momentum=0.9, backend=backend)
    run(opt2, only_empty, 1)
    assert only_empty[0].shape == (0, 5)


def test_float64_params_with_auto_backend(device):
    """fp64 params "take the torch backend" (DecaySGD docstring) when no backend is named."""
    params = make_params(device, dtype=torch.float64)
    ref_params = clone_params(params)
    opt = DecaySGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2)
    ref = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=False)
    run(opt, params, 2)
    run(ref, ref_params, 2)
    assert_params_close(params, ref_params, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# State dicts
# ----------------------------------------------------------------------------------------------
def test_state_key_is_momentum_buffer(device, backend):
    params = make_params(device)
    opt = DecaySGD(params, lr=0.1, momentum=0.9, backend=backend)
    ref_params = clone_params(params)
    ref = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9, foreach=False)
    run(opt, params, 1)
    run(ref, ref_params, 1)
    sd, ref_sd = opt.state_dict(), ref.state_dict()
    assert sorted(sd["state"]) == sorted(ref_sd["state"]) == [0, 1, 2]
    for i in sd["state"]:
        assert set(sd["state"][i]) == set(ref_sd["state"][i]) == {"momentum_buffer"}
        assert sd["state"][i]["momentum_buffer"].dtype == params[i].dtype
        assert sd["state"][i]["momentum_buffer"].shape == params[i].shape
    # Without momentum there is no state at all, as in torch.
    no_m = DecaySGD(clone_params(params), lr=0.1, backend=backend)
    run(no_m, no_m.param_groups[0]["params"], 1)
    assert no_m.state_dict()["state"] == {}


def test_state_dict_round_trip_decay_sgd(device, backend):
    params = make_params(device)
    opt = DecaySGD(params, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2,
                   decoupled_weight_decay=True, backend=backend)
    run(opt, params, 3)
    sd = copy.deepcopy(opt.state_dict())  # what a checkpoint holds (load aliases tensors)
    params2 = clone_params(params)
    opt2 = DecaySGD(params2, lr=1.0, backend=backend)  # hyperparameters come from the state dict
    opt2.load_state_dict(sd)
    for key in ("lr", "momentum", "dampening", "weight_decay", "decoupled_weight_decay", "backend"):
        assert opt2.param_groups[0][key] == opt.param_groups[0][key], key
    run(opt, params, 3, start=3)
    run(opt2, params2, 3, start=3)
    assert_equal_params(params2, params)
    for p, p2 in zip(params, params2):
        assert torch.equal(opt2.state[p2]["momentum_buffer"], opt.state[p]["momentum_buffer"])


def test_state_dict_from_torch_sgd(device, backend):
    params = make_params(device)
    ref = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True,
                          foreach=False)
    run(ref, params, 3)
    sd = copy.deepcopy(ref.state_dict())
    ours_params = clone_params(params)
    opt = DecaySGD(ours_params, lr=1.0)
    opt.load_state_dict(sd)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.1, 0.9, 1e-2, True)
    # Keys a torch.optim.SGD state dict lacks get their defaults.
    assert group["decoupled_weight_decay"] is False and group["backend"] == "auto"
    assert group["maximize"] is False
    group["backend"] = backend
    run(ref, params, 3, start=3)
    run(opt, ours_params, 3, start=3)
    assert_params_close(ours_params, params)
    for p, r in zip(ours_params, params):
        assert_close(opt.state[p]["momentum_buffer"], ref.state[r]["momentum_buffer"])


def test_state_dict_to_torch_sgd(device, backend):
    params = make_params(device)
    opt = DecaySGD(params, lr=0.1, momentum=0.9, dampening=0.2, weight_decay=1e-2, maximize=True,
                   backend=backend)
    run(opt, params, 3)
    sd = copy.deepcopy(opt.state_dict())
    ref_params = clone_params(params)
    ref = torch.optim.SGD(ref_params, lr=1.0, foreach=False)
    ref.load_state_dict(sd)
    assert ref.param_groups[0]["maximize"] is True and ref.param_groups[0]["dampening"] == 0.2
    run(opt, params, 3, start=3)
    run(ref, ref_params, 3, start=3)
    assert_params_close(ref_params, params)
    for p, r in zip(params, ref_params):
        assert_close(ref.state[r]["momentum_buffer"], opt.state[p]["momentum_buffer"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=dtype_id)
def test_load_state_dict_casts_buffers_to_param_dtype(device, backend, dtype):
    if dtype == torch.float64:
        backend = "torch"  # fp64 params run on the torch backend only
    params = make_params(device)
    opt = DecaySGD(params, lr=0.1, momentum=0.9, backend=backend)
    run(opt, params, 2)
    sd = copy.deepcopy(opt.state_dict())
    cast = [torch.nn.Parameter(p.detach().to(dtype)) for p in params]
    opt2 = DecaySGD(cast, lr=0.1, momentum=0.9, backend=backend)
    opt2.load_state_dict(sd)
    ref_cast = [torch.nn.Parameter(p.detach().to(dtype)) for p in params]
    ref = torch.optim.SGD(ref_cast, lr=0.1, momentum=0.9, foreach=False)
    ref.load_state_dict(copy.deepcopy(sd))
    for p, saved in zip(cast, sd["state"].values()):
        buf = opt2.state[p]["momentum_buffer"]
        assert buf.dtype == dtype and buf.device == p.device
        assert torch.equal(buf, saved["momentum_buffer"].to(dtype))
    run(opt2, cast, 1, start=2)
    run(ref, ref_cast, 1, start=2)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    for p, r in zip(cast, ref_cast):
        assert opt2.state[p]["momentum_buffer"].dtype == dtype
        assert_close(p.detach(), r.detach(), **tol)
        assert_close(opt2.state[p]["momentum_buffer"], ref.state[r]["momentum_buffer"], **tol)


def test_state_dict_save_load_weights_only(device, backend, tmp_path):
    params = make_params(device)
    opt = DecaySGD(params, lr=torch.tensor(0.1), momentum=0.9, weight_decay=1e-2, backend=backend)
    run(opt, params, 2)
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    params2 = clone_params(params)
    opt2 = DecaySGD(params2, lr=1.0, backend=backend)
    opt2.load_state_dict(sd)
    assert float(opt2.param_groups[0]["lr"]) == pytest.approx(0.1)
    run(opt, params, 2, start=2)
    run(opt2, params2, 2, start=2)
    assert_equal_params(params2, params)
    # In memory too.
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert set(loaded["state"][0]) == {"momentum_buffer"}
    assert torch.equal(loaded["state"][0]["momentum_buffer"].to(device),
                       opt.state[params[0]]["momentum_buffer"])


# ----------------------------------------------------------------------------------------------
# GradScaler
# ----------------------------------------------------------------------------------------------
def _model_and_data(device, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    xs = [torch.randn(10, 6, generator=gen).to(device) for _ in range(20)]
    ys = [torch.randn(10, 3, generator=gen).to(device) for _ in range(20)]
    return model, xs, ys


def test_step_supports_amp_scaling():
    assert DecaySGD._step_supports_amp_scaling is True


def test_grad_scaler_matches_unscaled_torch_sgd(device, backend):
    model, xs, ys = _model_and_data(device)
    ref_model = copy.deepcopy(model)
    opt = DecaySGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, backend=backend)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3,
                          foreach=False)
    scaler = torch.amp.GradScaler(device.type)
    for step in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xs[step]), ys[step])
        scaler.scale(loss).backward()
        # The grads are still scaled when step() runs: the kernel unscales them.
        assert model[0].weight.grad.abs().max() > 100
        scaler.step(opt)
        scaler.update()
        ref.zero_grad()
        torch.nn.functional.mse_loss(ref_model(xs[step]), ys[step]).backward()
        ref.step()
        assert_params_close(list(model.parameters()), list(ref_model.parameters()))
    assert scaler.get_scale() == 2.0 ** 16  # no inf seen, no growth yet
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


def test_grad_scaler_skips_step_on_inf_and_backs_off(device, backend):
    model, xs, ys = _model_and_data(device)
    ref_model = copy.deepcopy(model)
    opt = DecaySGD(model.parameters(), lr=0.05, momentum=0.9, backend=backend)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9, foreach=False)
    scaler = torch.amp.GradScaler(device.type)
    ref_scaler = torch.amp.GradScaler(device.type)
    for step in range(4):
        for m, o, s in ((model, opt, scaler), (ref_model, ref, ref_scaler)):
            o.zero_grad()
            s.scale(torch.nn.functional.mse_loss(m(xs[step]), ys[step])).backward()
            if step == 1:
                m[2].weight.grad[0, 0] = float("inf")
        if step == 1:
            before = [p.detach().clone() for p in model.parameters()]
            bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        ref_scaler.step(ref)
        ref_scaler.update()
        if step == 1:
            # Skipped: params and momentum buffers unchanged bit for bit; the scale halves.
            assert_equal_params(list(model.parameters()), before)
            for p, b in zip(model.parameters(), bufs):
                assert torch.equal(opt.state[p]["momentum_buffer"], b)
            assert scaler.get_scale() == 2.0 ** 15
        assert scaler.get_scale() == ref_scaler.get_scale()
        assert_params_close(list(model.parameters()), list(ref_model.parameters()))


def test_grad_scaler_inf_on_first_step(device, backend):
    """A skipped first step leaves a zero buffer; with dampening 0 the run still equals torch's."""
    model, xs, ys = _model_and_data(device)
    ref_model = copy.deepcopy(model)
    opt = DecaySGD(model.parameters(), lr=0.05, momentum=0.9, backend=backend)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9, foreach=False)
    scaler, ref_scaler = torch.amp.GradScaler(device.type), torch.amp.GradScaler(device.type)
    start = [p.detach().clone() for p in model.parameters()]
    for step in range(3):
        for m, o, s in ((model, opt, scaler), (ref_model, ref, ref_scaler)):
            o.zero_grad()
            s.scale(torch.nn.functional.mse_loss(m(xs[step]), ys[step])).backward()
            if step == 0:
                m[0].bias.grad[1] = float("nan")
            s.step(o)
            s.update()
        if step == 0:
            assert_equal_params(list(model.parameters()), start)
            assert scaler.get_scale() == 2.0 ** 15
            # Documented: the skipped first step leaves zero buffers (torch leaves none).
            for p in model.parameters():
                assert torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p))
            assert len(ref.state) == 0
        assert_params_close(list(model.parameters()), list(ref_model.parameters()))


def test_grad_scaler_with_unscale_and_clipping(device, backend):
    model, xs, ys = _model_and_data(device)
    ref_model = copy.deepcopy(model)
    opt = DecaySGD(model.parameters(), lr=0.05, momentum=0.9, backend=backend)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9, foreach=False)
    scaler = torch.amp.GradScaler(device.type)
    for step in range(3):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(xs[step]), ys[step])).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        scaler.step(opt)  # grads already unscaled: must not be divided by the scale again
        scaler.update()
        ref.zero_grad()
        torch.nn.functional.mse_loss(ref_model(xs[step]), ys[step]).backward()
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.1)
        ref.step()
        assert_params_close(list(model.parameters()), list(ref_model.parameters()))


# ----------------------------------------------------------------------------------------------
# repr, deepcopy
# ----------------------------------------------------------------------------------------------
def test_repr_mentions_hyperparameters():
    opt = DecaySGD([torch.nn.Parameter(torch.zeros(2))], lr=0.125, momentum=0.9, weight_decay=5e-4,
                   nesterov=True, decoupled_weight_decay=True, backend="torch")
    text = repr(opt)
    assert text.startswith("DecaySGD (")
    for piece in ("lr: 0.125", "momentum: 0.9", "weight_decay: 0.0005", "nesterov: True",
                  "dampening: 0", "maximize: False", "decoupled_weight_decay: True",
                  "backend: torch"):
        assert piece in text, piece


def test_deepcopy_steps_independently(device, backend):
    params = make_params(device)
    opt = DecaySGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, backend=backend)
    run(opt, params, 2)
    clone = copy.deepcopy(opt)
    cparams = clone.param_groups[0]["params"]
    assert all(c is not p for c, p in zip(cparams, params))
    for key in ("lr", "momentum", "weight_decay", "backend"):
        assert clone.param_groups[0][key] == opt.param_groups[0][key]
    before = [p.detach().clone() for p in params]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in params]
    for c, p in zip(cparams, params):
        assert torch.equal(clone.state[c]["momentum_buffer"], opt.state[p]["momentum_buffer"])
        assert clone.state[c]["momentum_buffer"].data_ptr() != opt.state[p]["momentum_buffer"].data_ptr()
    run(clone, cparams, 2, start=2)
    assert_equal_params(params, before)  # the original did not move
    for p, b in zip(params, bufs):
        assert torch.equal(opt.state[p]["momentum_buffer"], b)
    run(opt, params, 2, start=2)  # and stepping it now gives what the copy got
    assert_equal_params(cparams, params)
    assert not torch.equal(params[0].detach(), before[0])


# ----------------------------------------------------------------------------------------------
# Unsupported inputs
# ----------------------------------------------------------------------------------------------
def test_sparse_gradient_raises(device, backend):
    p = torch.nn.Parameter(torch.randn(5, 3, device=device))
    p.grad = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.randn(2, 3), (5, 3),
                                     check_invariants=True).to(device)
    p0 = p.detach().clone()
    opt = DecaySGD([p], lr=0.1, backend=backend)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(p.detach(), p0)


def test_complex_param_raises(device, backend):
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64, device=device))
    p.grad = torch.ones_like(p)
    p0 = p.detach().clone()
    opt = DecaySGD([p], lr=0.1, backend=backend)
    with pytest.raises(RuntimeError, match="complex"):
        opt.step()
    assert torch.equal(p.detach(), p0)


def test_grad_dtype_mismatch_raises(device, backend):
    p = torch.nn.Parameter(torch.zeros(3, device=device))
    p.grad_dtype = None  # torch refuses a grad of another dtype unless this is cleared
    p.grad = torch.ones(3, device=device, dtype=torch.float64)
    opt = DecaySGD([p], lr=0.1, backend=backend)
    with pytest.raises(TypeError, match=r"grad is torch.float64 .* param is torch.float32"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(3, device=device))


def test_grad_shape_mismatch_raises(device, backend):
    p = torch.nn.Parameter(torch.zeros(3, 4, device=device))
    p.grad = torch.ones(3, 4, device=device)
    p.data = torch.zeros(2, 6, device=device)  # the param changed shape under its grad
    opt = DecaySGD([p], lr=0.1, backend=backend)
    with pytest.raises(ValueError, match=r"grad shape \(3, 4\) != param shape \(2, 6\)"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(2, 6, device=device))


def test_integer_param_raises():
    p = torch.zeros(3, dtype=torch.int64)
    p.grad = torch.ones(3, dtype=torch.int64)
    opt = DecaySGD([p], lr=0.1)
    with pytest.raises(TypeError, match="floating point"):
        opt.step()


# ----------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------
def _spy_backends(monkeypatch):
    calls = []
    for name, impl in list(sgd_step._IMPLEMENTATIONS.items()):
        def spy(*args, _name=name, _impl=impl, **kwargs):
            calls.append(_name)
            return _impl(*args, **kwargs)
        monkeypatch.setitem(sgd_step._IMPLEMENTATIONS, name, spy)
    return calls


def test_explicit_unavailable_backend_raises_at_construction():
    p = torch.nn.Parameter(torch.ones(3))  # CPU tensors: the CUDA C++ kernels can never run
    with pytest.raises(BackendUnavailableError) as err:
        DecaySGD([p], lr=0.1, backend="cuda")
    message = str(err.value)
    assert "param group 0 (param 0 on cpu)" in message
    assert "backend='cuda'" in message and "CUDA device" in message and "'cpu'" in message
    assert isinstance(err.value, RuntimeError)
    assert lowrank_kernels.BackendUnavailableError is BackendUnavailableError
    # add_param_group checks the same way, names the group and keeps the optimizer as it was.
    opt = DecaySGD([p], lr=0.1)
    q = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(BackendUnavailableError, match="param group 1 \\(param 0 on cpu\\)"):
        opt.add_param_group({"params": [q], "backend": "cuda"})
    assert len(opt.param_groups) == 1
    # Named parameters are named.
    with pytest.raises(BackendUnavailableError, match="param 0 \\('w'\\) on cpu"):
        DecaySGD([("w", p)], lr=0.1, backend="cuda")


def test_triton_on_cpu_without_interpreter_raises_at_construction(monkeypatch):
    if not backends_mod._importable("triton"):
        pytest.skip("triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(BackendUnavailableError, match="param group 0.*TRITON_INTERPRET=1"):
        DecaySGD([p], lr=0.1, backend="triton")


def test_unavailable_backend_after_construction_raises_before_any_step(monkeypatch):
    """A param moved where its group's backend cannot run after construction: the step checks
    every group first, names the param, its group and its device, and writes nothing."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    c = torch.nn.Parameter(torch.ones(4))
    opt = DecaySGD([{"params": [a]}, {"params": [b, c], "backend": "torch"}], lr=0.1,
                   momentum=0.9)
    opt.param_groups[1]["backend"] = "cuda"  # as a loaded or edited group could say
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    with pytest.raises(BackendUnavailableError) as err:
        opt.step()
    message = str(err.value)
    assert "DecaySGD param group 1" in message and "param 0, param 1 on cpu" in message
    assert "no parameter was stepped" in message
    for p in (a, b, c):
        assert torch.equal(p.detach(), torch.ones_like(p))
    assert len(opt.state) == 0  # no momentum buffer was made either


def test_group_mixing_devices_fails_before_stepping_any_of_it():
    """A CPU and a meta param in one group switched to triton after construction: the error
    names the meta param, and the CPU one (first in the group) is not stepped."""
    if "triton" not in available_backends("cpu"):
        pytest.skip("the Triton interpreter is not available")
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(2, device="meta"))
    opt = DecaySGD([a, b], lr=0.1, momentum=0.9, backend="torch")
    opt.param_groups[0]["backend"] = "triton"
    a.grad, b.grad = torch.ones(3), torch.ones(2, device="meta")
    with pytest.raises(BackendUnavailableError, match="param group 0.*param 1 on meta.*'meta'"):
        opt.step()
    assert torch.equal(a.detach(), torch.ones(3))
    assert len(opt.state) == 0
    # The same in the functional op: the CPU tensor stays as it was.
    p, g = torch.ones(3), torch.ones(3)
    with pytest.raises(BackendUnavailableError, match="param 1 on meta"):
        fused_sgd_step_([p, torch.ones(2, device="meta")], [g, torch.ones(2, device="meta")],
                        None, lr=0.1, backend="triton")
    assert torch.equal(p, torch.ones(3))


def test_group_mixing_dtypes_fails_before_stepping_any_of_it(device, backend):
    """float64 has no kernel: an explicit kernel backend rejects the group before its float32
    param (first in the group) is stepped."""
    if backend == "torch":
        pytest.skip("the torch backend steps float64")
    a = torch.nn.Parameter(torch.ones(3, device=device))
    b = torch.nn.Parameter(torch.ones(2, device=device, dtype=torch.float64))
    opt = DecaySGD([a, b], lr=0.1, backend=backend)
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    with pytest.raises(TypeError, match="param group 0: fused SGD step, param 1 \\(torch.float64"):
        opt.step()
    assert torch.equal(a.detach(), torch.ones_like(a))


def test_env_var_selects_backend(device, backend, monkeypatch):
    monkeypatch.setenv("LOWRANK_BACKEND", backend)
    calls = _spy_backends(monkeypatch)
    params = make_params(device)
    ref_params = clone_params(params)
    opt = DecaySGD(params, lr=0.1, momentum=0.9)  # backend "auto": the variable decides
    ref = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9, foreach=False)
    run(opt, params, 2)
    run(ref, ref_params, 2)
    assert calls == [backend, backend]
    assert_params_close(params, ref_params)
    # The raw op's default and backend=None follow the variable too.
    calls.clear()
    fused_sgd_step_([torch.zeros(2, device=device)], [torch.ones(2, device=device)], None, lr=0.1)
    fused_sgd_step_([torch.zeros(2, device=device)], [torch.ones(2, device=device)], None, lr=0.1,
                    backend=None)
    assert calls == [backend, backend]


def test_env_var_torch_and_explicit_backend_wins(device, backend, monkeypatch):
    calls = _spy_backends(monkeypatch)
    monkeypatch.setenv("LOWRANK_BACKEND", "torch")
    p = make_params(device)
    run(DecaySGD(p, lr=0.1), p, 1)
    assert calls == ["torch"]
    calls.clear()
    monkeypatch.setenv("LOWRANK_BACKEND", "bogus")  # never consulted when a backend is named
    run(DecaySGD(p, lr=0.1, backend=backend), p, 1)
    assert calls == [backend]


def test_per_group_backend(device, backend, monkeypatch):
    calls = _spy_backends(monkeypatch)
    a, b = make_params(device, shapes=((3,), (4,)))
    opt = DecaySGD([{"params": [a], "backend": "torch"}, {"params": [b], "backend": backend}], lr=0.1)
    run(opt, [a, b], 1)
    assert calls == ["torch", backend]


def test_env_var_bogus_raises(device, monkeypatch):
    monkeypatch.setenv("LOWRANK_BACKEND", "bogus")
    p = make_params(device)
    p0 = [t.detach().clone() for t in p]
    opt = DecaySGD(p, lr=0.1)
    set_grads(p, 0)
    with pytest.raises(ValueError, match="LOWRANK_BACKEND='bogus'"):
        opt.step()
    assert_equal_params(p, p0)


def test_resolve_backend_auto(monkeypatch):
    monkeypatch.delenv("LOWRANK_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend(None, "cpu") == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    monkeypatch.setenv("LOWRANK_BACKEND", "")
    assert resolve_backend("auto", cpu) == "torch"
    monkeypatch.setenv("LOWRANK_BACKEND", " Torch ")
    assert resolve_backend("auto", cpu) == "torch"
    monkeypatch.setenv("LOWRANK_BACKEND", "auto")
    assert resolve_backend("auto", cpu) == "torch"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resolve_backend_auto_on_gpu(monkeypatch):
    monkeypatch.delenv("LOWRANK_BACKEND", raising=False)
    dev = torch.device("cuda")
    expected = next(b for b in ("cuda", "triton", "torch") if b in available_backends(dev))
    assert resolve_backend("auto", dev) == expected


def test_resolve_backend_explicit(monkeypatch):
    monkeypatch.delenv("LOWRANK_BACKEND", raising=False)
    cpu = torch.device("cpu")
    with pytest.raises(BackendUnavailableError, match="backend='cuda' cannot run on device 'cpu'.*CUDA device"):
        resolve_backend("cuda", cpu)
    with pytest.raises(ValueError, match="unknown backend from backend='bogus'"):
        resolve_backend("bogus", cpu)
    monkeypatch.setenv("LOWRANK_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend from LOWRANK_BACKEND='bogus'"):
        resolve_backend("auto", cpu)
    monkeypatch.setenv("LOWRANK_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="LOWRANK_BACKEND='cuda'"):
        resolve_backend("auto", cpu)
    assert resolve_backend("torch", cpu) == "torch"  # an explicit name beats the variable


def test_resolve_triton_on_cpu(monkeypatch):
    if not backends_mod._importable("triton"):
        pytest.skip("triton is not installed")
    monkeypatch.delenv("LOWRANK_BACKEND", raising=False)
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", cpu) == "triton"
    assert available_backends(cpu)[:2] == ["torch", "triton"]
    assert resolve_backend("auto", cpu) == "torch"  # the interpreter is never picked by auto
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1") as err:
        resolve_backend("triton", cpu)
    assert "backend='triton'" in str(err.value)
    assert available_backends(cpu) == ["torch"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError):
        resolve_backend("triton", "cpu")
    monkeypatch.setenv("LOWRANK_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match="LOWRANK_BACKEND='triton'"):
        resolve_backend("auto", cpu)


def test_check_backend_name():
    assert check_backend_name(None) == "auto"
    for name in ("auto", "torch", "triton", "cuda"):
        assert check_backend_name(name) == name
    with pytest.raises(ValueError, match="unknown backend 'TRITON'"):
        check_backend_name("TRITON")


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def test_training_tiny_model_matches_torch_sgd(device, backend):
    model, xs, ys = _model_and_data(device, seed=3)
    ref_model = copy.deepcopy(model)
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    opt = DecaySGD(model.parameters(), backend=backend, **kwargs)
    ref = torch.optim.SGD(ref_model.parameters(), foreach=False, **kwargs)
    losses, ref_losses = [], []
    for x, y in zip(xs, ys):
        for m, o, out in ((model, opt, losses), (ref_model, ref, ref_losses)):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            o.step()
            out.append(loss.item())
    assert len(losses) == 20
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    assert sum(losses[-5:]) < sum(losses[:5])  # it did train
    for (name, p), r in zip(model.named_parameters(), ref_model.parameters()):
        assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-5, msg=f"{name} differs")


def test_load_state_dict_keeps_this_optimizers_backend():
    """A state saved with another backend (e.g. "cuda" on a GPU machine) loads anywhere."""
    p = torch.nn.Parameter(torch.ones(3))
    saved = DecaySGD([p], lr=0.1, backend="torch").state_dict()
    saved["param_groups"][0]["backend"] = "cuda"  # as a GPU machine saves it
    opt = DecaySGD([torch.nn.Parameter(torch.ones(3))], lr=0.5, backend="torch")
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["backend"] == "torch" and opt.param_groups[0]["lr"] == 0.1


# ----------------------------------------------------------------------------------------------
# Host syncs and CUDA graph capture of the dense step (kernel backends: the torch reference reads
# found_inf and a tensor lr on the host by design)
# ----------------------------------------------------------------------------------------------
KERNEL_BACKENDS = [b for b in available_backends(torch.device("cpu")) if b != "torch"]
needs_kernel_backend = pytest.mark.skipif(not KERNEL_BACKENDS,
                                          reason="no kernel backend runs on the CPU here")


class HostRead(AssertionError):
    pass


def forbid_host_reads(monkeypatch):
    """Make every Python-level read of a tensor's value (item(), bool(), float()) fail: each is
    a device-to-host sync on a GPU."""
    def refuse(self, *args, **kwargs):
        raise HostRead("a tensor value was read on the host during step()")

    for name in ("item", "__bool__", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@needs_kernel_backend
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dense_step_with_tensor_lr_and_scaler_reads_no_tensor_value(backend, monkeypatch):
    params = make_params("cpu")
    reference = clone_params(params)
    opt = DecaySGD(params, lr=torch.tensor(0.05), momentum=0.9, weight_decay=1e-2,
                   backend=backend)
    ref = torch.optim.SGD(reference, lr=0.05, momentum=0.9, weight_decay=1e-2)
    for step in range(2):
        set_grads(params, step)
        set_grads(reference, step)
        opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(0.0)  # GradScaler's
        with monkeypatch.context() as m:
            forbid_host_reads(m)
            opt.step()
        ref.step()
    assert_params_close(params, reference)
    # The probe is live: the torch reference backend reads the tensor lr on the host.
    opt.param_groups[0]["backend"] = "torch"
    with monkeypatch.context() as m:
        forbid_host_reads(m)
        with pytest.raises(HostRead):
            opt.step()


@needs_kernel_backend
def test_dense_step_under_graph_capture_needs_warm_up_steps(monkeypatch):
    from lowrank_kernels.ops import multi_tensor

    backend = KERNEL_BACKENDS[0]
    capturing = {"on": False}
    monkeypatch.setattr(multi_tensor, "capture_underway", lambda device: capturing["on"])

    def fresh():
        capturing["on"] = False
        params = make_params("cpu", shapes=((7, 3), (11,)))
        set_grads(params, 0)  # the gradients keep their addresses from here on
        return params, DecaySGD(params, lr=0.1, momentum=0.9, backend=backend)

    params, opt = fresh()
    capturing["on"] = True
    with pytest.raises(multi_tensor.TableMissDuringCapture, match="Run warm-up steps eagerly"):
        opt.step()  # no warm-up: these tensors' tables do not exist yet

    params, opt = fresh()
    opt.step()  # one warm-up step: the momentum buffers' first step, a table of its own
    capturing["on"] = True
    with pytest.raises(multi_tensor.TableMissDuringCapture, match="two with momentum"):
        opt.step()

    params, opt = fresh()
    opt.step()
    opt.step()  # the second warm-up step has the steady-state tables
    capturing["on"] = True
    before = [p.detach().clone() for p in params]
    opt.step()  # same params, grads and buffers: every table is found
    assert not any(torch.equal(a, b.detach()) for a, b in zip(before, params))
