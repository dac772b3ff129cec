"""A parameter listed twice in one group: DecaySGD does what torch.optim.SGD does.

torch 2.13 warns at construction ("duplicate parameters") and its single-tensor step (the CPU
default, ``foreach=False``) steps each occurrence in turn: on the first step every occurrence
starts a buffer of its own from its gradient (the second one's gradient sees the weight decay of
the once-stepped param) and the param keeps the last one; later steps update that one buffer once
per occurrence.
"""
import pytest
import torch

from lowrank_kernels import DecaySGD, fused_sgd_step_

FLAGS = [
    dict(momentum=0.9, weight_decay=0.1),
    dict(momentum=0.9, dampening=0.3),
    dict(momentum=0.8, weight_decay=0.05, nesterov=True),
    dict(weight_decay=0.1),
]


def _flag_id(flags):
    return "-".join(f"{k}={v}" for k, v in flags.items())


def _params(device):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(device))
            for shape in ((4, 3), (5,))]


def _set_grads(params, step):
    gen = torch.Generator().manual_seed(10 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)


@pytest.mark.parametrize("flags", FLAGS, ids=_flag_id)
def test_duplicate_param_matches_torch_sgd(device, backend, flags):
    ours = _params(device)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = DecaySGD([ours[0], ours[1], ours[0]], lr=0.1, backend=backend, **flags)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        ref_opt = torch.optim.SGD([ref[0], ref[1], ref[0]], lr=0.1, foreach=False, **flags)
    for step in range(3):
        _set_grads(ours, step)
        _set_grads(ref, step)
        opt.step()
        ref_opt.step()
        for i, (a, b) in enumerate(zip(ours, ref)):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6,
                                       msg=f"param {i} after step {step}")
        if flags.get("momentum"):
            torch.testing.assert_close(opt.state[ours[0]]["momentum_buffer"],
                                       ref_opt.state[ref[0]]["momentum_buffer"],
                                       rtol=1e-6, atol=1e-6)


def test_fused_step_never_launches_a_tensor_twice(device, backend, monkeypatch):
    """Both occurrences in one launch would have two programs write the same memory; each
    launch holds a tensor at most once, and the occurrences run in order."""
    from lowrank_kernels.ops import sgd_step

    launched = []
    real = sgd_step._IMPLEMENTATIONS[backend]

    def spy(params, *args, **kwargs):
        launched.append([id(p) for p in params])
        return real(params, *args, **kwargs)

    monkeypatch.setitem(sgd_step._IMPLEMENTATIONS, backend, spy)
    p, q = torch.zeros(3, device=device), torch.zeros(2, device=device)
    g = torch.ones(3, device=device)
    fused_sgd_step_([p, q, p], [g, torch.ones(2, device=device), g], None, lr=0.5,
                    backend=backend)
    assert launched == [[id(p), id(q)], [id(p)]]
    assert torch.equal(p, torch.full_like(p, -1.0)) and torch.equal(q, torch.full_like(q, -0.5))


@pytest.mark.parametrize("flags", FLAGS[:3], ids=_flag_id)
def test_duplicate_factored_weight_matches_torch_sgd(flags):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4, bias=False)
    ref_model = torch.nn.Linear(5, 4, bias=False)
    ref_model.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = DecaySGD([model.weight, model.weight], lr=0.1, factored=True, model=model,
                       backend="torch", **flags)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        ref_opt = torch.optim.SGD([ref_model.weight, ref_model.weight], lr=0.1, foreach=False,
                                  **flags)
    for step in range(3):
        x = torch.randn(6, 5, generator=torch.Generator().manual_seed(step))
        for m, o in ((model, opt), (ref_model, ref_opt)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
        torch.testing.assert_close(model.weight.detach(), ref_model.weight.detach(),
                                   rtol=1e-5, atol=1e-6, msg=f"after step {step}")
    assert len(opt.factored_parameters()) == 1
