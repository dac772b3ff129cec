"""Numerical parity of the fused SGD step.

* DecaySGD against ``torch.optim.SGD(foreach=False)`` over every flag combination, several steps,
  params of every layout (contiguous, transposed, strided, channels_last, zero-size) and dtypes;
* decoupled weight decay against a manual reference;
* backends against each other;
* the raw op ``fused_sgd_step_``: tensor lr, GradScaler unscale / found_inf, per-tensor
  ``first_step`` flags and a tensor crossing the kernels' 16384-element chunk boundary.
"""
import itertools

import pytest
import torch

from helpers import TOLERANCE, assert_close_verbose
from lowrank_kernels import DecaySGD, fused_sgd_step_
from lowrank_kernels.ops import sgd_step


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


LR = 0.1
STEPS = 4
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# Tolerance against torch.optim.SGD, which does every operation in the parameter's dtype while
# the fused step does its arithmetic in fp32 and rounds once per stored tensor. fp32 / fp64 must
# agree to rounding; half precision to a few ulps, a gap that grows slowly with the steps.
PARITY_TOLERANCE = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.bfloat16: TOLERANCE[torch.bfloat16],
    torch.float16: TOLERANCE[torch.float16],
}


def step_scale(dtype, step):
    """Loosening of the half-precision tolerance after ``step`` earlier steps."""
    return 1.0 if dtype in (torch.float32, torch.float64) else 1.0 + 0.25 * step


def interpreter_truncates_bf16(backend, device, dtype):
    """Triton's CPU interpreter converts fp32 to bf16 by truncation (round toward zero) where a
    GPU rounds to nearest even, so interpreted bf16 results sit up to one ulp per rounding below
    the torch backend's."""
    return backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16


def _flag_grid():
    grid = []
    for momentum, dampening, nesterov, wd, maximize in itertools.product(
            [0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 1e-2], [False, True]):
        if nesterov and (momentum == 0 or dampening != 0):
            continue  # invalid: torch.optim.SGD refuses it (tested in test_decay_sgd_behaviour)
        grid.append(dict(momentum=momentum, dampening=dampening, nesterov=nesterov,
                         weight_decay=wd, maximize=maximize))
    return grid


FLAGS = _flag_grid()


def _flag_id(f):
    return (f"m{f['momentum']:g}-d{f['dampening']:g}-{'nest' if f['nesterov'] else 'plain'}"
            f"-wd{f['weight_decay']:g}-{'max' if f['maximize'] else 'min'}")


def make_params(dtype, device, seed=0):
    """Params of every layout the step must handle; the same seed gives identical params."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    tensors = {
        "matrix": r(6, 5),
        "vector": r(7),
        "conv": r(4, 3, 3, 3),
        "transposed": r(5, 6).t(),                     # dense, not contiguous
        "strided": r(8, 10)[:, ::2],                   # not dense: a strided view of a bigger tensor
        "channels_last": r(2, 3, 4, 4).to(memory_format=torch.channels_last),
        "empty": r(0, 3),
    }
    params = {k: torch.nn.Parameter(v) for k, v in tensors.items()}
    assert not params["transposed"].is_contiguous()
    assert params["strided"].stride() == (10, 2)
    assert params["channels_last"].is_contiguous(memory_format=torch.channels_last)
    return params


def make_grads(params, seed):
    """One gradient per param, laid out like the param when it is dense (as autograd does)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    grads = {}
    for k, p in params.items():
        g = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)
        grads[k] = torch.empty_like(p).copy_(g)
    return grads


def set_grads(params, grads):
    for k, p in params.items():
        p.grad = grads[k].clone(memory_format=torch.preserve_format)


def check_close(ours, ref, dtype, what, scale=1.0):
    rtol, atol = PARITY_TOLERANCE[dtype]
    assert ours.dtype == ref.dtype == dtype, f"{what}: dtype {ours.dtype} vs {ref.dtype}"
    assert_close_verbose(ours, ref, rtol * scale, atol * scale, name=what)


def check_in_place(params, before):
    for k, p in params.items():
        ptr, stride = before[k]
        assert p.data_ptr() == ptr, f"{k}: param storage was replaced"
        assert p.stride() == stride, f"{k}: param layout changed"


# ----------------------------------------------------------------------------------------------
# DecaySGD vs torch.optim.SGD
# ----------------------------------------------------------------------------------------------
def _parity_cases():
    cases = []
    for dtype in DTYPES:
        for flags in FLAGS:
            cases.append(pytest.param(dtype, flags, id=f"{str(dtype)[6:]}-{_flag_id(flags)}"))
    return cases


@pytest.mark.parametrize("dtype, flags", _parity_cases())
def test_decay_sgd_matches_torch_sgd(device, backend, dtype, flags):
    if dtype == torch.float64 and backend != "torch":
        pytest.skip("float64 parameters run on the torch backend only")
    ours = make_params(dtype, device)
    ref = make_params(dtype, device)
    before = {k: (p.data_ptr(), p.stride()) for k, p in ours.items()}
    opt = DecaySGD(list(ours.values()), lr=LR, backend=backend, **flags)
    ref_opt = torch.optim.SGD(list(ref.values()), lr=LR, foreach=False, **flags)

    for step in range(STEPS):
        grads = make_grads(ours, step)
        set_grads(ours, grads)
        set_grads(ref, grads)
        opt.step()
        ref_opt.step()
        scale = step_scale(dtype, step)
        for k in ours:
            check_close(ours[k].detach(), ref[k].detach(), dtype, f"step {step} param {k}", scale)
            if flags["momentum"] != 0:
                buf = opt.state[ours[k]]["momentum_buffer"]
                ref_buf = ref_opt.state[ref[k]]["momentum_buffer"]
                assert buf.shape == ours[k].shape
                check_close(buf, ref_buf, dtype, f"step {step} momentum buffer {k}", scale)
            else:
                assert "momentum_buffer" not in opt.state.get(ours[k], {})
    # The params did move (so the comparisons above are not between two untouched copies).
    start = make_params(dtype, device)
    for k in ours:
        if ours[k].numel():
            assert not torch.equal(ours[k].detach(), start[k].detach()), f"{k} never changed"
    check_in_place(ours, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_grad_layout_differs_from_param(device, backend, dtype):
    """Grads laid out differently from their params (contiguous grad for a transposed or
    channels_last param, and the reverse) are matched element by element, not memory order."""
    gen = torch.Generator().manual_seed(3)
    p_t = torch.randn(5, 6, generator=gen).t().to(device=device, dtype=dtype)
    p_cl = torch.randn(2, 3, 4, 4, generator=gen).to(device=device, dtype=dtype).to(
        memory_format=torch.channels_last)
    p_c = torch.randn(6, 5, generator=gen).to(device=device, dtype=dtype)
    g_t = torch.randn(6, 5, generator=gen).to(device=device, dtype=dtype)           # contiguous
    g_cl = torch.randn(2, 3, 4, 4, generator=gen).to(device=device, dtype=dtype)    # contiguous
    g_c = torch.randn(5, 6, generator=gen).to(device=device, dtype=dtype).t()       # transposed
    ours = [torch.nn.Parameter(p.clone(memory_format=torch.preserve_format)) for p in (p_t, p_cl, p_c)]
    ref = [torch.nn.Parameter(p.clone(memory_format=torch.preserve_format)) for p in (p_t, p_cl, p_c)]
    opt = DecaySGD(ours, lr=LR, momentum=0.9, weight_decay=1e-2, backend=backend)
    ref_opt = torch.optim.SGD(ref, lr=LR, momentum=0.9, weight_decay=1e-2, foreach=False)
    for step in range(2):
        for p, r, g in zip(ours, ref, (g_t, g_cl, g_c)):
            p.grad = g.clone(memory_format=torch.preserve_format) * (step + 1)
            r.grad = g.clone(memory_format=torch.preserve_format) * (step + 1)
        opt.step()
        ref_opt.step()
    for i, (p, r) in enumerate(zip(ours, ref)):
        check_close(p.detach(), r.detach(), dtype, f"param {i}", 2.0)
        check_close(opt.state[p]["momentum_buffer"], ref_opt.state[r]["momentum_buffer"], dtype,
                    f"buffer {i}", 2.0)
    assert ours[0].stride() == p_t.stride() and ours[1].stride() == p_cl.stride()


# ----------------------------------------------------------------------------------------------
# Decoupled weight decay
# ----------------------------------------------------------------------------------------------
def manual_decoupled_sgd(params, grads_per_step, *, lr, weight_decay, momentum, dampening,
                         nesterov, maximize):
    """Plain-torch SGDW in fp32: p <- p * (1 - lr * wd), then SGD without weight decay."""
    params = [p.detach().float().clone() for p in params]
    bufs = [None] * len(params)
    for grads in grads_per_step:
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g.float()
            if maximize:
                g = -g
            if momentum != 0:
                if bufs[i] is None:
                    bufs[i] = g.clone()
                else:
                    bufs[i] = bufs[i] * momentum + (1 - dampening) * g
                g = g + momentum * bufs[i] if nesterov else bufs[i]
            p.mul_(1 - lr * weight_decay)
            p.sub_(lr * g)
    return params, bufs


@pytest.mark.parametrize("flags", [
    dict(momentum=0.0, dampening=0.0, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.0, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.3, nesterov=False, maximize=True),
    dict(momentum=0.9, dampening=0.0, nesterov=True, maximize=False),
], ids=["plain", "momentum", "dampening-maximize", "nesterov"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_decoupled_weight_decay_matches_manual_reference(device, backend, dtype, flags):
    wd = 0.05
    ours = make_params(dtype, device)
    names = list(ours)
    start = [ours[k].detach().clone() for k in names]
    opt = DecaySGD(list(ours.values()), lr=LR, weight_decay=wd, decoupled_weight_decay=True,
                   backend=backend, **flags)
    all_grads = []
    for step in range(3):
        grads = make_grads(ours, step)
        set_grads(ours, grads)
        all_grads.append([grads[k] for k in names])
        opt.step()
    expected, bufs = manual_decoupled_sgd(start, all_grads, lr=LR, weight_decay=wd, **flags)
    # fp32 reference: for bf16 the reference itself never rounds, so allow a few bf16 ulps.
    rtol, atol = (1e-6, 1e-6) if dtype == torch.float32 else TOLERANCE[dtype]
    for k, e, b in zip(names, expected, bufs):
        assert_close_verbose(ours[k].detach(), e, rtol, atol, name=f"param {k}")
        if flags["momentum"] != 0:
            assert_close_verbose(opt.state[ours[k]]["momentum_buffer"], b, rtol, atol, name=f"buffer {k}")
    # Decoupled decay differs from coupled decay (with momentum the coupled penalty is also
    # accumulated in the buffer): make sure the flag is not ignored.
    coupled = make_params(dtype, device)
    copt = DecaySGD(list(coupled.values()), lr=LR, weight_decay=wd, backend=backend, **flags)
    for grads in all_grads:
        set_grads(coupled, dict(zip(names, grads)))
        copt.step()
    if flags["momentum"] != 0:
        assert not torch.allclose(coupled["matrix"].detach().float(), ours["matrix"].detach().float(),
                                  rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Backends agree with each other
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2, maximize=False),
    dict(momentum=0.9, dampening=0.3, nesterov=False, weight_decay=1e-2, maximize=True),
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=1e-2, maximize=False,
         decoupled_weight_decay=True),
    dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-2, maximize=False,
         decoupled_weight_decay=True),
], ids=["nesterov", "dampening-maximize", "decoupled", "decoupled-momentum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_backend_matches_torch_backend(device, backend, dtype, flags):
    ours = make_params(dtype, device)
    ref = make_params(dtype, device)
    opt = DecaySGD(list(ours.values()), lr=LR, backend=backend, **flags)
    ref_opt = DecaySGD(list(ref.values()), lr=LR, backend="torch", **flags)
    for step in range(3):
        grads = make_grads(ours, step)
        set_grads(ours, grads)
        set_grads(ref, grads)
        opt.step()
        ref_opt.step()
    # Same fp32 arithmetic in every backend: fp32 agrees to 1e-6, half precision to about one
    # ulp (a rounding tie or an fma may land on the neighbouring value), a few where the
    # interpreter truncates bf16 (one ulp per rounding, compounded over the steps).
    ulp = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    if interpreter_truncates_bf16(backend, device, dtype):
        ulp *= 4
    for k in ours:
        assert_close_verbose(ours[k].detach(), ref[k].detach(), ulp, ulp, name=f"param {k}")
        if flags["momentum"] != 0:
            assert_close_verbose(opt.state[ours[k]]["momentum_buffer"],
                                 ref_opt.state[ref[k]]["momentum_buffer"], ulp, ulp, name=f"buffer {k}")


def test_backend_is_actually_used(device, backend, monkeypatch):
    """The `backend` argument routes the step to that implementation (so the parity tests above
    really test each backend), once per (device, dtype) group of tensors."""
    calls = []
    real = sgd_step._IMPLEMENTATIONS[backend]

    def spy(params, *args, **kwargs):
        calls.append([p.dtype for p in params])
        return real(params, *args, **kwargs)

    for name in sgd_step._IMPLEMENTATIONS:
        if name != backend:
            monkeypatch.setitem(sgd_step._IMPLEMENTATIONS, name, _forbidden(name))
    monkeypatch.setitem(sgd_step._IMPLEMENTATIONS, backend, spy)
    a = torch.nn.Parameter(torch.randn(3, 4, device=device))
    b = torch.nn.Parameter(torch.randn(5, device=device, dtype=torch.bfloat16))
    c = torch.nn.Parameter(torch.randn(2, device=device))
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    opt = DecaySGD([a, b, c], lr=0.5, backend=backend)
    opt.step()
    assert sorted(calls, key=len) == [[torch.bfloat16], [torch.float32, torch.float32]]
    assert torch.all(c.detach() != 0) and torch.equal(c.grad, torch.ones_like(c))


def _forbidden(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"backend {name!r} should not have been used")
    return fail


# ----------------------------------------------------------------------------------------------
# The raw op
# ----------------------------------------------------------------------------------------------
def _raw_tensors(device, dtype=torch.float32, seed=0, shapes=((6, 5), (7,), (2, 3, 4))):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    bufs = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    return params, grads, bufs


def _clone(ts):
    return [t.clone() for t in ts]


HYPER = dict(weight_decay=1e-2, momentum=0.9, dampening=0.1, nesterov=False, maximize=False)


@pytest.mark.parametrize("lr_shape", [(), (1,)], ids=["0-d", "1-element"])
def test_raw_op_tensor_lr(device, backend, lr_shape):
    params, grads, bufs = _raw_tensors(device)
    p_tensor, b_tensor = _clone(params), _clone(bufs)
    p_float, b_float = _clone(params), _clone(bufs)
    lr = torch.full(lr_shape, 0.25, device=device)
    fused_sgd_step_(p_tensor, grads, b_tensor, lr=lr, backend=backend, **HYPER)
    fused_sgd_step_(p_float, grads, b_float, lr=0.25, backend=backend, **HYPER)
    for a, b in zip(p_tensor + b_tensor, p_float + b_float):
        assert_close_verbose(a, b, 1e-6, 1e-7)
    assert not torch.equal(p_tensor[0], params[0])
    # The tensor is read at every call: change it in place and the next step uses the new value.
    lr.fill_(0.0)
    frozen = _clone(p_tensor)
    fused_sgd_step_(p_tensor, grads, None, lr=lr, backend=backend)
    for a, b in zip(p_tensor, frozen):
        assert torch.equal(a, b)
    lr.fill_(1.0)
    fused_sgd_step_(p_tensor, grads, None, lr=lr, backend=backend)
    for a, b, g in zip(p_tensor, frozen, grads):
        assert_close_verbose(a, b - g, 1e-6, 1e-6)


def test_raw_op_tensor_lr_decoupled(device, backend):
    params, grads, bufs = _raw_tensors(device)
    p_tensor, p_float = _clone(params), _clone(params)
    hyper = dict(weight_decay=0.2, decoupled_weight_decay=True)
    fused_sgd_step_(p_tensor, grads, None, lr=torch.tensor([0.5], device=device), backend=backend, **hyper)
    fused_sgd_step_(p_float, grads, None, lr=0.5, backend=backend, **hyper)
    for a, b, p, g in zip(p_tensor, p_float, params, grads):
        assert_close_verbose(a, b, 1e-6, 1e-6)
        assert_close_verbose(a, p * 0.9 - 0.5 * g, 1e-6, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_raw_op_grad_scale_unscales(device, backend, dtype):
    scale = 2.0 ** 10  # a power of two: scaling and unscaling are exact
    params, grads, bufs = _raw_tensors(device, dtype)
    scaled = [g * scale for g in grads]
    assert all(torch.equal(s / scale, g) for s, g in zip(scaled, grads))
    p_scaled, b_scaled = _clone(params), _clone(bufs)
    p_plain, b_plain = _clone(params), _clone(bufs)
    first = [True, False, False]
    fused_sgd_step_(p_scaled, scaled, b_scaled, lr=0.1, first_step=first, backend=backend,
                    grad_scale=torch.tensor(scale, device=device), **HYPER)
    fused_sgd_step_(p_plain, grads, b_plain, lr=0.1, first_step=first, backend=backend, **HYPER)
    for i, (a, b) in enumerate(zip(p_scaled + b_scaled, p_plain + b_plain)):
        assert torch.equal(a, b), f"tensor {i} differs: the scale was not removed exactly"
    assert not torch.equal(p_plain[0], params[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_raw_op_found_inf(device, backend, dtype, momentum):
    params, grads, bufs = _raw_tensors(device, dtype)
    grads[1][3] = float("inf")
    use_bufs = bufs if momentum else None
    # Non-zero found_inf: nothing at all changes, bit for bit, whatever the first-step flags.
    p_skip, b_skip = _clone(params), _clone(bufs)
    fused_sgd_step_(p_skip, grads, b_skip if momentum else None, lr=0.1, momentum=momentum,
                    weight_decay=1e-2, first_step=[True, False, True], backend=backend,
                    grad_scale=torch.tensor(4.0, device=device),
                    found_inf=torch.tensor([1.0], device=device))
    for a, b in zip(p_skip + b_skip, params + bufs):
        assert torch.equal(a, b)
    # Zero found_inf: the normal step, identical to a call without it.
    finite = [g.clone() for g in grads]
    finite[1][3] = 0.5
    p_run, b_run = _clone(params), _clone(bufs)
    p_ref, b_ref = _clone(params), _clone(bufs)
    fused_sgd_step_(p_run, finite, b_run if momentum else None, lr=0.1, momentum=momentum,
                    weight_decay=1e-2, backend=backend, found_inf=torch.zeros(1, device=device))
    fused_sgd_step_(p_ref, finite, b_ref if momentum else None, lr=0.1, momentum=momentum,
                    weight_decay=1e-2, backend=backend)
    for a, b in zip(p_run + b_run, p_ref + b_ref):
        assert torch.equal(a, b)
    assert not torch.equal(p_run[1], params[1])
    assert use_bufs is None or not torch.equal(b_run[1], bufs[1])


def test_raw_op_per_tensor_first_step(device, backend):
    params, grads, bufs = _raw_tensors(device, shapes=((6, 5), (7,), (2, 3, 4), (9,)))
    first = [True, False, False, True]
    m, d, wd = 0.8, 0.25, 0.1
    p_out, b_out = _clone(params), _clone(bufs)
    fused_sgd_step_(p_out, grads, b_out, lr=0.1, momentum=m, dampening=d, weight_decay=wd,
                    first_step=first, backend=backend)
    for i, (p, g, b) in enumerate(zip(params, grads, bufs)):
        g = g.double() + wd * p.double()
        buf = g if first[i] else m * b.double() + (1 - d) * g
        assert_close_verbose(b_out[i], buf, 1e-6, 1e-6, name=f"buffer {i} (first={first[i]})")
        assert_close_verbose(p_out[i], p.double() - 0.1 * buf, 1e-6, 1e-6, name=f"param {i}")
    # Without first_step every buffer is updated.
    p_none, b_none = _clone(params), _clone(bufs)
    fused_sgd_step_(p_none, grads, b_none, lr=0.1, momentum=m, dampening=d, weight_decay=wd,
                    backend=backend)
    assert torch.equal(b_none[1], b_out[1])
    assert not torch.allclose(b_none[0], b_out[0])


@pytest.mark.parametrize("nesterov", [False, True])
def test_raw_op_crosses_chunk_boundary(device, backend, nesterov):
    """A 40000-element tensor spans three 16384-element programs of the kernels; every element,
    on both sides of each boundary, gets the step, as do the small tensors launched with it."""
    n = 40000
    gen = torch.Generator().manual_seed(7)
    shapes = [(3,), (n,), (5, 4)]
    params = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
    bufs = [torch.randn(s, generator=gen).to(device) for s in shapes]
    first = [False, True, False]
    p_out, b_out = _clone(params), _clone(bufs)
    for step in range(2):
        fused_sgd_step_(p_out, grads, b_out, lr=0.05, momentum=0.9, nesterov=nesterov,
                        weight_decay=1e-2, first_step=first if step == 0 else None, backend=backend)
    # fp64 reference of the same two steps.
    exp_p = [p.double() for p in params]
    exp_b = [b.double() for b in bufs]
    for step in range(2):
        for i, g in enumerate(grads):
            gg = g.double() + 1e-2 * exp_p[i]
            exp_b[i] = gg if (step == 0 and first[i]) else 0.9 * exp_b[i] + gg
            upd = gg + 0.9 * exp_b[i] if nesterov else exp_b[i]
            exp_p[i] = exp_p[i] - 0.05 * upd
    for i in range(3):
        assert_close_verbose(p_out[i], exp_p[i], 1e-5, 1e-6, name=f"param {i}")
        assert_close_verbose(b_out[i], exp_b[i], 1e-5, 1e-6, name=f"buffer {i}")
    for edge in (16383, 16384, 32767, 32768, n - 1):
        assert p_out[1][edge] != params[1][edge]


def test_raw_op_mixed_dtypes_in_one_call(device, backend):
    """Tensors of several dtypes in one call are grouped by dtype; each group gets the same
    result as a call of its own."""
    shapes = ((6, 5), (7,))
    groups = [_raw_tensors(device, dt, seed=i) for i, dt in
              enumerate((torch.float32, torch.bfloat16, torch.float16))]
    params = [t for grp in groups for t in grp[0]]
    grads = [t for grp in groups for t in grp[1]]
    bufs = [t for grp in groups for t in grp[2]]
    first = [i % 2 == 0 for i in range(len(params))]
    p_all, b_all = _clone(params), _clone(bufs)
    fused_sgd_step_(p_all, grads, b_all, lr=0.1, first_step=first, backend=backend, **HYPER)
    k = 0
    for p, g, b in groups:
        p_one, b_one = _clone(p), _clone(b)
        fused_sgd_step_(p_one, g, b_one, lr=0.1, first_step=first[k:k + len(p)], backend=backend,
                        **HYPER)
        for x, y in zip(p_one + b_one, p_all[k:k + len(p)] + b_all[k:k + len(p)]):
            assert x.dtype == y.dtype
            assert torch.equal(x, y)
        k += len(p)
    del shapes


@pytest.mark.parametrize("layouts", [
    ("transposed", "contiguous", "contiguous"),
    ("contiguous", "transposed", "channels_last"),
    ("channels_last", "channels_last", "contiguous"),
    ("strided", "contiguous", "strided"),
    ("contiguous", "strided", "transposed"),
], ids=lambda t: "-".join(t))
def test_raw_op_layouts_of_param_grad_buffer(device, backend, layouts):
    """Param, grad and momentum buffer each in its own layout: the step pairs elements by index
    (as the torch backend does), writes through to the caller's tensors and keeps their layouts."""
    gen = torch.Generator().manual_seed(11)

    def make(layout):
        if layout == "channels_last":
            return torch.randn(2, 3, 4, 4, generator=gen).to(device).to(memory_format=torch.channels_last)
        t = torch.randn(2, 3, 4, 8, generator=gen).to(device)
        if layout == "transposed":
            return t[..., :4].contiguous().transpose(1, 3).contiguous().transpose(1, 3)
        if layout == "strided":
            return t[..., ::2]
        return t[..., :4].contiguous()

    p, g, b = (make(layout) for layout in layouts)
    assert p.shape == g.shape == b.shape == (2, 3, 4, 4)
    strides = (p.stride(), g.stride(), b.stride())
    p_ref, b_ref = p.clone(), b.clone()
    p0, g0 = p.clone(), g.clone()
    for step in range(2):
        fused_sgd_step_([p], [g], [b], lr=0.1, momentum=0.9, weight_decay=1e-2,
                        first_step=[step == 0], backend=backend)
        fused_sgd_step_([p_ref], [g], [b_ref], lr=0.1, momentum=0.9, weight_decay=1e-2,
                        first_step=[step == 0], backend="torch")
    assert (p.stride(), g.stride(), b.stride()) == strides
    assert torch.equal(g, g0)
    assert_close_verbose(p, p_ref, 1e-6, 1e-6, name="param")
    assert_close_verbose(b, b_ref, 1e-6, 1e-6, name="buffer")
    # Independent fp64 check of the first-step-then-update rule.
    gg = g0.double() + 1e-2 * p0.double()
    p1 = p0.double() - 0.1 * gg
    gg2 = g0.double() + 1e-2 * p1
    buf = 0.9 * gg + gg2
    assert_close_verbose(b, buf, 1e-5, 1e-6, name="buffer vs fp64")
    assert_close_verbose(p, p1 - 0.1 * buf, 1e-5, 1e-6, name="param vs fp64")


def test_raw_op_no_params_and_zero_size(device, backend):
    fused_sgd_step_([], [], None, lr=0.1, backend=backend)  # nothing to do, no error
    empty = [torch.zeros(0, 4, device=device)]
    fused_sgd_step_(empty, [torch.zeros(0, 4, device=device)], [torch.zeros(0, 4, device=device)],
                    lr=0.1, momentum=0.9, backend=backend)
    assert empty[0].shape == (0, 4)
    # A zero-size tensor next to a real one does not shift the real one's table row.
    params = [torch.zeros(0, device=device), torch.ones(3, device=device)]
    grads = [torch.zeros(0, device=device), torch.full((3,), 2.0, device=device)]
    bufs = [torch.zeros(0, device=device), torch.full((3,), 5.0, device=device)]
    fused_sgd_step_(params, grads, bufs, lr=0.5, momentum=0.5, first_step=[True, False],
                    backend=backend)
    assert torch.allclose(bufs[1], torch.full((3,), 4.5, device=device))  # 0.5 * 5 + 2, not 2
    assert torch.allclose(params[1], torch.full((3,), 1 - 0.5 * 4.5, device=device))


def test_raw_op_input_errors(device, backend):
    p = [torch.zeros(3, device=device)]
    g = [torch.zeros(3, device=device)]
    with pytest.raises(ValueError, match="params but"):
        fused_sgd_step_(p, g + g, None, lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="momentum buffer"):
        fused_sgd_step_(p, g, None, lr=0.1, momentum=0.9, backend=backend)
    with pytest.raises(ValueError, match="first_step"):
        fused_sgd_step_(p, g, None, lr=0.1, first_step=[True, False], backend=backend)
    with pytest.raises(ValueError, match="shape"):
        fused_sgd_step_(p, [torch.zeros(4, device=device)], None, lr=0.1, backend=backend)
    with pytest.raises(TypeError, match="float64"):
        fused_sgd_step_(p, [torch.zeros(3, device=device, dtype=torch.float64)], None, lr=0.1,
                        backend=backend)
    with pytest.raises(TypeError, match="momentum buffer"):
        fused_sgd_step_(p, g, [torch.zeros(3, device=device, dtype=torch.float16)], lr=0.1,
                        momentum=0.9, backend=backend)
    with pytest.raises(TypeError, match="floating point"):
        fused_sgd_step_([torch.zeros(3, dtype=torch.int32, device=device)],
                        [torch.zeros(3, dtype=torch.int32, device=device)], None, lr=0.1,
                        backend=backend)
    with pytest.raises(ValueError, match="one-element"):
        fused_sgd_step_(p, g, None, lr=torch.tensor([0.1, 0.2], device=device), backend=backend)
    with pytest.raises(ValueError, match="one-element"):
        fused_sgd_step_(p, g, None, lr=0.1, grad_scale=torch.ones(2, device=device), backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        fused_sgd_step_(p, g, None, lr=0.1, backend="bogus")
    assert torch.equal(p[0], torch.zeros(3, device=device))


def test_raw_op_float64_needs_torch_backend(device, backend):
    p = [torch.ones(3, device=device, dtype=torch.float64)]
    g = [torch.ones(3, device=device, dtype=torch.float64)]
    if backend == "torch":
        fused_sgd_step_(p, g, None, lr=0.25, backend=backend)
        assert torch.equal(p[0], torch.full_like(p[0], 0.75))
    else:
        with pytest.raises(TypeError, match="backend='torch'"):
            fused_sgd_step_(p, g, None, lr=0.25, backend=backend)
        assert torch.equal(p[0], torch.ones_like(p[0]))
