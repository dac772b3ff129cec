"""PyTorch's own optimizer checks for torch.optim.SGD, run on DecaySGD.

The configurations, error cases and LR schedulers are PyTorch's: the ``OptimizerInfo`` of
``torch.optim.SGD`` in ``torch.testing._internal.common_optimizers.optim_db`` (its
``optim_inputs_func``, ``optim_error_inputs_func`` and ``scheduler_inputs``, with the
foreach / fused / differentiable variants its ``_get_optim_inputs_including_global_cliquey_kwargs``
adds). The checks are the kinds PyTorch's ``test/test_optim.py`` (TestOptimRenewed) runs: every
input gives the same params, state and grads as ``torch.optim.SGD`` over several steps and
moves the loss the right way; every error input raises (or warns) with the same type and
message; schedulers, tensor lr, param groups, no-grad and zero-grad steps, found_inf, state
dicts (also older ones), hooks, printing and deepcopy behave alike.

Deliberate differences, each tested under a name that says so:

* ``differentiable=True`` raises RuntimeError (the step is a fused kernel, not autograd ops);
* ``foreach`` / ``fused`` are accepted and change nothing, even both True (torch refuses that);
* complex params and sparse grads raise RuntimeError (SGD steps them); complex params step as
  ``torch.view_as_real`` views, which is what SGD does to them;
* with a GradScaler's ``grad_scale``, ``.grad`` is left scaled (torch's fused step writes the
  unscaled gradient into it; its for-loop takes no grad_scale).
"""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)
from torch.optim.optimizer import register_optimizer_step_post_hook

from lowrank_kernels import DecaySGD

SGD_INFO = next(info for info in optim_db if info.optim_cls is torch.optim.SGD)
CPU = torch.device("cpu")
STEPS = 5


def _all_inputs(device):
    """PyTorch's SGD inputs with its foreach / fused / differentiable variants, plus an explicit
    ``foreach=True`` variant (PyTorch adds that one only where it has foreach kernels, not on
    the CPU; DecaySGD accepts it everywhere)."""
    inputs = _get_optim_inputs_including_global_cliquey_kwargs(device, torch.float32, SGD_INFO)
    for base in SGD_INFO.optim_inputs_func(device):
        inputs.append(type(base)(params=None, kwargs={**base.kwargs, "foreach": True},
                                 desc=f"{base.desc} & foreach"))
    return inputs


BASE_INPUTS = SGD_INFO.optim_inputs_func(CPU)
ALL_INPUTS = _all_inputs(CPU)
STEPPED_INPUTS = [i for i in ALL_INPUTS if not i.kwargs.get("differentiable")]
DIFFERENTIABLE_INPUTS = [i for i in ALL_INPUTS if i.kwargs.get("differentiable")]
ERROR_INPUTS = SGD_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32)


def _ids(inputs):
    return [i.desc.replace(" ", "_") for i in inputs]


@pytest.fixture
def dtype_for(backend):
    """The dtypes a backend is checked in: fp32 everywhere, fp64 on torch (the kernels take
    fp32 / bf16 / fp16 only)."""
    return [torch.float32] + ([torch.float64] if backend == "torch" else [])


def _problem(device, dtype, seed=0, contiguous=False):
    """TestOptimRenewed's problem, ``(W x + b)^2`` summed, with a second weight, non-contiguous
    unless ``contiguous``: (params, loss function)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(10, 5, generator=gen, dtype=dtype).to(device).requires_grad_()
    weight_nc = torch.randn(10, 5, 2, generator=gen, dtype=dtype).to(device)[..., 0]
    weight_nc = (weight_nc.contiguous() if contiguous else weight_nc).requires_grad_()
    bias = torch.randn(10, generator=gen, dtype=dtype).to(device).requires_grad_()
    x = torch.randn(5, generator=gen, dtype=dtype).to(device)

    def loss_fn(params):
        w, w_nc, b = params
        return (w.mv(x) + w_nc.mv(x) + b).pow(2).sum()

    return [weight, weight_nc, bias], loss_fn


def _fresh_kwargs(kwargs):
    """A deep copy (a tensor lr must not be shared between the two optimizers)."""
    return copy.deepcopy(kwargs)


def _step_both(ref, ours, ref_params, our_params, loss_fn, steps=STEPS, schedulers=()):
    """Step both optimizers from their own gradients; after each step the params, the grads
    (unchanged by the step) and the state must agree. Returns the first and last loss."""
    losses = []
    for _ in range(steps):
        for opt in (ref, ours):
            opt.zero_grad()
        ref_loss, our_loss = loss_fn(ref_params), loss_fn(our_params)
        ref_loss.backward()
        our_loss.backward()
        losses.append(our_loss.item())
        grads = [p.grad.clone() for p in our_params]
        ref.step()
        ours.step()
        for ref_sched, our_sched in schedulers:
            if isinstance(ref_sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                ref_sched.step(ref_loss.item())
                our_sched.step(our_loss.item())
            else:
                ref_sched.step()
                our_sched.step()
        for p, g in zip(our_params, grads):
            assert torch.equal(p.grad, g), "DecaySGD.step() changed a .grad"
        _assert_same_state(ref, ours, ref_params, our_params)
    losses.append(loss_fn(our_params).item())
    return losses[0], losses[-1]


def _assert_same_state(ref, ours, ref_params, our_params):
    for rp, op in zip(ref_params, our_params):
        torch.testing.assert_close(op.detach(), rp.detach())
        assert set(ours.state[op]) == set(ref.state[rp])
        for key, value in ref.state[rp].items():
            torch.testing.assert_close(ours.state[op][key], value)
    for ref_group, our_group in zip(ref.param_groups, ours.param_groups):
        for key in ref_group.keys() & our_group.keys() - {"params", "fused"}:
            assert our_group[key] == ref_group[key], key


def _reference_kwargs(kwargs):
    """torch.optim.SGD's arguments for the reference run: the input's, except that fused=True
    runs SGD's for-loop. torch 2.13's fused CPU step indexes param, grad and buffer as flat
    arrays, so it mis-steps a param whose grad is laid out differently (the non-contiguous
    weight here); the for-loop is the update it stands for."""
    kwargs = _fresh_kwargs(kwargs)
    if kwargs.get("fused"):
        kwargs["fused"] = False
    return kwargs


def _pair(device, dtype, kwargs, backend, seed=0):
    ref_params, loss_fn = _problem(device, dtype, seed)
    our_params, _ = _problem(device, dtype, seed)
    ref = torch.optim.SGD(ref_params, **_reference_kwargs(kwargs))
    ours = DecaySGD(our_params, **_fresh_kwargs(kwargs), backend=backend)
    return ref, ours, ref_params, our_params, loss_fn


# ----------------------------------------------------------------------------------------------
# Every input, every error input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optim_input", STEPPED_INPUTS, ids=_ids(STEPPED_INPUTS))
def test_every_sgd_input_matches_torch_sgd(optim_input, device, backend, dtype_for):
    """TestOptimRenewed's test_forloop_goes_right_direction and test_foreach/fused_matches_forloop
    kinds: same params, momentum buffers, group options and untouched grads as torch.optim.SGD
    with the same arguments, and the loss moves the way ``maximize`` says."""
    for dtype in dtype_for:
        ref, ours, ref_params, our_params, loss_fn = _pair(device, dtype, optim_input.kwargs,
                                                           backend)
        first, last = _step_both(ref, ours, ref_params, our_params, loss_fn)
        if optim_input.kwargs.get("maximize", False):
            assert last > first
        else:
            assert last < first


def _outcome(fn):
    """(exception type, message, [(warning category, message)]) of calling ``fn``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
            error = (None, None)
        except Exception as exc:  # noqa: BLE001 - the type itself is what is compared
            error = (type(exc), str(exc))
    return error + ([(w.category, str(w.message)) for w in caught],)


@pytest.mark.parametrize("error_input", ERROR_INPUTS,
                         ids=[e.optimizer_error_input.desc.replace(" ", "_") for e in ERROR_INPUTS])
def test_every_sgd_error_input_raises_like_torch_sgd(error_input):
    """TestOptimRenewed's test_errors: the error (or warning) PyTorch expects, with the same
    type and message as torch.optim.SGD's."""
    optim_input = error_input.optimizer_error_input

    def run(cls):
        def call():
            opt = cls(optim_input.params, **optim_input.kwargs)
            if error_input.error_on == OptimizerErrorEnum.STEP_ERROR:
                opt.step()
        return _outcome(call)

    ref_type, ref_message, ref_warnings = run(torch.optim.SGD)
    our_type, our_message, our_warnings = run(DecaySGD)
    if issubclass(error_input.error_type, Warning):
        expected = [w for w in ref_warnings if issubclass(w[0], error_input.error_type)]
        assert expected, "torch.optim.SGD no longer warns here; update the test"
        assert [w for w in our_warnings if issubclass(w[0], error_input.error_type)] == expected
        assert our_type is None and ref_type is None
    else:
        assert ref_type is error_input.error_type
        assert our_type is ref_type and our_message == ref_message
        assert re.search(error_input.error_regex, our_message)


def test_suite_covers_pytorchs_sgd_entry():
    """The parametrisations above hold every input and error input PyTorch lists for SGD."""
    assert len(BASE_INPUTS) > 0 and len(ERROR_INPUTS) > 0
    # Each input plain, with fused=True and with foreach=True; and with differentiable=True.
    assert len(STEPPED_INPUTS) == 3 * len(BASE_INPUTS)
    assert len(DIFFERENTIABLE_INPUTS) == len(BASE_INPUTS)
    assert len(set(_ids(ALL_INPUTS))) == len(ALL_INPUTS)


# ----------------------------------------------------------------------------------------------
# Deliberate differences
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optim_input", DIFFERENTIABLE_INPUTS, ids=_ids(DIFFERENTIABLE_INPUTS))
def test_differentiable_is_refused_deliberate_difference(optim_input, device):
    """torch.optim.SGD(differentiable=True) steps through autograd ops; DecaySGD's step is a
    fused kernel, so it refuses the flag at construction."""
    leaves, _ = _problem(device, torch.float32)
    # A differentiable step is an autograd op on its params: they are not leaves there.
    ref_params = [p.clone() for p in leaves]
    for p in ref_params:
        p.grad = torch.ones_like(p)
    ref = torch.optim.SGD(ref_params, **_fresh_kwargs(optim_input.kwargs))
    ref.step()
    assert ref_params[0].grad_fn is not None  # torch stepped through autograd
    our_params, _ = _problem(device, torch.float32)
    with pytest.raises(RuntimeError, match="does not support `differentiable`"):
        DecaySGD(our_params, **_fresh_kwargs(optim_input.kwargs))


def test_foreach_and_fused_together_are_accepted_deliberate_difference(device, backend):
    """torch.optim.SGD refuses fused=True with foreach=True; DecaySGD ignores both flags (its
    step is always fused) and steps like SGD's for-loop."""
    params, _ = _problem(device, torch.float32)
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        torch.optim.SGD(params, fused=True, foreach=True)
    ref_params, loss_fn = _problem(device, torch.float32)
    our_params, _ = _problem(device, torch.float32)
    ref = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9, foreach=False, fused=False)
    ours = DecaySGD(our_params, lr=0.1, momentum=0.9, foreach=True, fused=True, backend=backend)
    _step_both(ref, ours, ref_params, our_params, loss_fn)


def test_complex_params_are_refused_deliberate_difference(device):
    """SGD_INFO.supports_complex: torch.optim.SGD steps complex params as their real views.
    DecaySGD refuses them with an error that says so, and stepping the real views instead
    gives SGD's complex result (TestOptimRenewed's test_complex kind)."""
    assert SGD_INFO.supports_complex
    gen = torch.Generator().manual_seed(1)
    complex_param = torch.randn(5, 5, generator=gen, dtype=torch.complex64).to(device)
    complex_param.requires_grad_()
    real_param = torch.view_as_real(complex_param).detach().clone().requires_grad_()
    ours = DecaySGD([complex_param.detach().clone().requires_grad_()], lr=0.1)
    ours.param_groups[0]["params"][0].grad = torch.ones_like(complex_param)
    with pytest.raises(RuntimeError, match="complex parameters.*view_as_real"):
        ours.step()
    ref = torch.optim.SGD([complex_param], lr=0.1, momentum=0.9, weight_decay=0.1)
    real = DecaySGD([real_param], lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        complex_param.grad = torch.randn(5, 5, generator=gen, dtype=torch.complex64).to(device)
        real_param.grad = torch.view_as_real(complex_param.grad).clone()
        ref.step()
        real.step()
        torch.testing.assert_close(real_param.detach(), torch.view_as_real(complex_param.detach()))


def test_sparse_grads_are_refused_deliberate_difference(device):
    """SGD_INFO.supports_sparse: torch.optim.SGD steps sparse grads; DecaySGD raises before it
    writes anything."""
    assert SGD_INFO.supports_sparse
    param = torch.ones(4, device=device, requires_grad=True)
    param.grad = torch.sparse_coo_tensor([[1]], [2.0], (4,), check_invariants=True).to(device)
    ours = DecaySGD([param], lr=0.1)
    with pytest.raises(RuntimeError, match="sparse"):
        ours.step()
    assert torch.equal(param.detach(), torch.ones(4, device=device))


def test_grad_scale_leaves_grad_scaled_deliberate_difference(device, backend):
    """With a GradScaler's grad_scale (and found_inf zero), DecaySGD steps like
    torch.optim.SGD(fused=True) but leaves .grad as it was, where torch's fused step writes the
    unscaled gradient into it (its for-loop takes no grad_scale at all)."""
    kwargs = dict(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)
    # Contiguous params: torch's fused CPU step mis-steps the non-contiguous one (see
    # _reference_kwargs).
    ref_params, loss_fn = _problem(device, torch.float32, contiguous=True)
    our_params, _ = _problem(device, torch.float32, contiguous=True)
    ref = torch.optim.SGD(ref_params, fused=True, **kwargs)
    ours = DecaySGD(our_params, backend=backend, **kwargs)
    for opt in (ref, ours):
        opt.grad_scale = torch.tensor(4.0, device=device)
        opt.found_inf = torch.tensor(0.0, device=device)
    for _ in range(3):
        for opt, params in ((ref, ref_params), (ours, our_params)):
            opt.zero_grad()
            (4.0 * loss_fn(params)).backward()
        scaled = [p.grad.clone() for p in our_params]
        ref.step()
        ours.step()
        for p, g, rp in zip(our_params, scaled, ref_params):
            assert torch.equal(p.grad, g)
            torch.testing.assert_close(rp.grad, g / 4.0)
        _assert_same_state(ref, ours, ref_params, our_params)


# ----------------------------------------------------------------------------------------------
# Schedulers, tensor lr, param groups
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", range(len(SGD_INFO.scheduler_inputs)))
def test_every_sgd_scheduler_input_matches_torch_sgd(index, device, backend):
    """TestOptimRenewed's with_lrsched variants: each of PyTorch's SGD scheduler lists drives
    DecaySGD's lr exactly as SGD's."""
    constructors = SGD_INFO.scheduler_inputs[index]
    ref, ours, ref_params, our_params, loss_fn = _pair(
        device, torch.float32, dict(lr=0.01, momentum=0.9, weight_decay=0.1), backend)
    schedulers = [(make(ref), make(ours)) for make in constructors]
    first, last = _step_both(ref, ours, ref_params, our_params, loss_fn, schedulers=schedulers)
    assert last < first
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in ref.param_groups]


def test_tensor_lr_matches_float_lr(device, backend):
    """TestOptimRenewed's test_tensor_lr kind: a tensor lr steps like the same float lr, and a
    scheduler updates it in place."""
    params_f, loss_fn = _problem(device, torch.float32)
    params_t, _ = _problem(device, torch.float32)
    opt_f = DecaySGD(params_f, lr=0.01, momentum=0.9, backend=backend)
    opt_t = DecaySGD(params_t, lr=torch.tensor(0.01), momentum=0.9, backend=backend)
    scheds = [(torch.optim.lr_scheduler.StepLR(opt_f, step_size=2, gamma=0.5),
               torch.optim.lr_scheduler.StepLR(opt_t, step_size=2, gamma=0.5))]
    _step_both(opt_f, opt_t, params_f, params_t, loss_fn, schedulers=scheds)
    assert isinstance(opt_t.param_groups[0]["lr"], torch.Tensor)


def test_param_groups_with_their_own_options_match_torch_sgd(device, backend):
    """TestOptimRenewed's test_param_groups_lr / test_param_groups_weight_decay kinds."""
    def groups(params):
        w, w_nc, b = params
        return [{"params": [w], "lr": 0.05, "weight_decay": 0.1, "nesterov": True},
                {"params": [w_nc], "momentum": 0.5, "dampening": 0.3, "maximize": False},
                {"params": [b], "lr": 0.01, "momentum": 0.0}]

    ref_params, loss_fn = _problem(device, torch.float32)
    our_params, _ = _problem(device, torch.float32)
    ref = torch.optim.SGD(groups(ref_params), lr=0.1, momentum=0.9)
    ours = DecaySGD(groups(our_params), lr=0.1, momentum=0.9, backend=backend)
    first, last = _step_both(ref, ours, ref_params, our_params, loss_fn)
    assert last < first


# ----------------------------------------------------------------------------------------------
# No-op steps, found_inf
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optim_input", BASE_INPUTS, ids=_ids(BASE_INPUTS))
def test_no_grad_and_zero_grad_steps_match_torch_sgd(optim_input, device, backend):
    """TestOptimRenewed's test_step_is_noop_when_params_have_no_grad and
    test_step_is_noop_for_zero_grads: no grad leaves everything as it was; zero grads step as
    SGD does (a no-op without weight decay)."""
    params, _ = _problem(device, torch.float32)
    before = [p.detach().clone() for p in params]
    ours = DecaySGD(params, **_fresh_kwargs(optim_input.kwargs), backend=backend)
    ours.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert not ours.state

    ref_params, _ = _problem(device, torch.float32)
    ref = torch.optim.SGD(ref_params, **_reference_kwargs(optim_input.kwargs))
    for p in params + ref_params:
        p.grad = torch.zeros_like(p)
    for _ in range(2):
        ours.step()
        ref.step()
    _assert_same_state(ref, ours, ref_params, params)
    if optim_input.kwargs.get("weight_decay", 0) == 0:
        assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


@pytest.mark.parametrize("optim_input", BASE_INPUTS, ids=_ids(BASE_INPUTS))
def test_found_inf_skips_the_step(optim_input, device, backend):
    """TestOptimRenewed's test_fused_does_not_step_if_foundinf, with and without grad_scale;
    also a found_inf of 2 (DecaySGD skips on any non-zero value)."""
    for grad_scale, inf in ((None, 1.0), (torch.ones((), device=device), 1.0), (None, 2.0)):
        params = [torch.ones(3, device=device, requires_grad=True) for _ in range(4)]
        for p in params:
            p.grad = torch.ones_like(p)
        ours = DecaySGD(params, **_fresh_kwargs(optim_input.kwargs), backend=backend)
        ours.grad_scale = grad_scale
        ours.found_inf = torch.full((), inf, device=device)
        ours.step()
        assert all(torch.equal(p.detach(), torch.ones(3, device=device)) for p in params)


# ----------------------------------------------------------------------------------------------
# State dicts, hooks, printing, deepcopy
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optim_input", BASE_INPUTS, ids=_ids(BASE_INPUTS))
def test_state_dicts_move_between_torch_sgd_and_decay_sgd(optim_input, device, backend):
    """TestOptimRenewed's test_state_dict_deterministic and test_can_load_older_state_dict
    kinds: SGD's state dict loads into DecaySGD mid-run (and back), an older one without the
    newer group keys loads too, and the runs stay together."""
    kwargs = optim_input.kwargs
    ref, ours, ref_params, our_params, loss_fn = _pair(device, torch.float32, kwargs, backend)
    _step_both(ref, ours, ref_params, our_params, loss_fn, steps=2)

    fresh_params = [p.detach().clone().requires_grad_() for p in our_params]
    loaded = DecaySGD(fresh_params, **_fresh_kwargs(kwargs), backend=backend)
    loaded.load_state_dict(copy.deepcopy(ref.state_dict()))

    # A state dict from before the flags SGD gained later (PyTorch's not_og_supported_flags).
    older_state = copy.deepcopy(ref.state_dict())
    for group in older_state["param_groups"]:
        for key in SGD_INFO.not_og_supported_flags:
            group.pop(key, None)
    older_params = [p.detach().clone().requires_grad_() for p in our_params]
    older = DecaySGD(older_params, **_fresh_kwargs(kwargs), backend=backend)
    older.load_state_dict(older_state)
    assert older.param_groups[0]["maximize"] is False
    loss_fn(older_params).backward()
    older.step()
    assert all(torch.isfinite(p).all() for p in older_params)

    _step_both(ref, loaded, ref_params, fresh_params, loss_fn, steps=2)

    back_params = [p.detach().clone().requires_grad_() for p in fresh_params]
    back = torch.optim.SGD(back_params, **_reference_kwargs(kwargs))
    back.load_state_dict(copy.deepcopy(loaded.state_dict()))
    _step_both(back, loaded, back_params, fresh_params, loss_fn, steps=2)
    assert loaded.state_dict()["state"].keys() == ref.state_dict()["state"].keys()


def test_step_hooks_run_as_for_torch_sgd(device, backend):
    """TestOptimRenewed's test_step_pre_hook / test_step_post_hook / test_step_all_hooks."""
    params, loss_fn = _problem(device, torch.float32)
    ours = DecaySGD(params, lr=0.1, backend=backend)
    calls = []
    ours.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    ours.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    handle = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: calls.append("global post"))
    try:
        loss_fn(params).backward()
        ours.step()
    finally:
        handle.remove()
    assert calls == ["pre", "post", "global post"]


def test_optimizer_prints_and_deepcopies_like_torch_sgd(device):
    """TestOptimRenewed's test_optimizer_can_be_printed and
    test_deepcopy_copies_all_public_attrs."""
    params, loss_fn = _problem(device, torch.float32)
    ours = DecaySGD(params, lr=0.1, momentum=0.9)
    loss_fn(params).backward()
    ours.step()
    text = repr(ours)
    assert text.startswith("DecaySGD (") and "momentum: 0.9" in text

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    assert public(copy.deepcopy(ours)) == public(ours)
