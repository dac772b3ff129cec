"""DecaySGD reuses a dense group's checked plan only while nothing it rests on has changed."""
import copy
import pickle

import pytest
import torch

from lowrank_kernels import BackendUnavailableError, DecaySGD
from lowrank_kernels.ops import sgd_step


@pytest.fixture
def checks(monkeypatch):
    """Counts the per-tensor checks (they run whenever a plan is made)."""
    calls = []
    original = sgd_step.check_inputs

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(sgd_step, "check_inputs", counting)
    return calls


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _backward(model, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    model(torch.randn(8, 6, generator=gen).to(dtype)).square().sum().backward()


def _train(model, opt, steps, set_to_none):
    for s in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        _backward(model, s)
        opt.step()


def test_steady_state_reuses_the_plan_and_steps_like_torch(checks):
    model, reference = _model(), _model()
    opt = DecaySGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    ref = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    _train(model, opt, 5, set_to_none=False)
    _train(reference, ref, 5, set_to_none=False)
    # step 1 (buffers missing: not kept), step 2 (kept), steps 3-5 reuse it
    assert len(checks) == 2
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_new_gradient_tensors_are_checked_again(checks):
    model = _model()
    opt = DecaySGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, 4, set_to_none=True)  # every backward makes new .grad tensors
    assert len(checks) == 4


def test_changed_backend_is_planned_again_and_refused_where_it_cannot_run():
    model = _model()
    opt = DecaySGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, 3, set_to_none=False)
    opt.param_groups[0]["backend"] = "cuda"
    _backward(model, 9)
    with pytest.raises(BackendUnavailableError):
        opt.step()


def test_loaded_state_and_changed_dtype_are_planned_again(checks):
    model = _model()
    opt = DecaySGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, 3, set_to_none=False)
    before = len(checks)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new buffer tensors
    _train(model, opt, 1, set_to_none=False)
    assert len(checks) == before + 1
    model.double()  # same Parameter objects and grads, a new dtype: the float32 buffers no
    # longer match, which only a fresh check can see
    with pytest.raises(TypeError, match="momentum buffer must match its param"):
        _train(model, opt, 1, set_to_none=False)


def test_optimizer_with_a_kept_plan_copies_and_pickles():
    model = _model()
    opt = DecaySGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, 3, set_to_none=False)
    copy.deepcopy(opt)
    pickle.loads(pickle.dumps(opt))
