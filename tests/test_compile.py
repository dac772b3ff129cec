"""DecaySGD under torch.compile and in CUDA graphs.

* ``torch.compile(fullgraph=True)`` of one function holding forward, backward and ``opt.step()``
  compiles with no graph break (fullgraph raises on any) and steps the parameters as eager does:
  the step is one ``lowrank_kernels::fused_sgd_step_`` op per launch, opaque to the compiler.
  Tracing ``loss.backward()`` needs ``torch._dynamo.config.trace_autograd_ops`` (torch 2.13);
  ``zero_grad`` stays outside (torch marks it as not traceable).
* The factored mode captures its factors with hooks outside the graph: under compile it raises.
* CUDA graphs (GPU only, skipped here): after the documented warm-up, a captured forward +
  backward + step replays exactly like eager steps, with the lr a device tensor.
"""
import copy

import pytest
import torch
from torch import nn

from lowrank_kernels import DecaySGD

needs_compile = pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile missing")


def _model(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(device)


def _batches(device, n=4):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 8, generator=gen).to(device),
             torch.randint(0, 4, (32,), generator=gen).to(device)) for _ in range(n)]


def _train_step(model, opt):
    def step(x, y):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


@pytest.fixture
def trace_backward():
    import torch._dynamo

    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        pytest.skip("this torch cannot trace loss.backward() inside torch.compile")
    torch._dynamo.reset()
    # config.patch, not monkeypatch: undoing a monkeypatch deletes the config entry.
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        yield
    torch._dynamo.reset()


def _compiled_vs_eager(device, compiler, backend, **hyper):
    model = _model(device)
    reference = copy.deepcopy(model)
    opt = DecaySGD(model.parameters(), backend=backend, **hyper)
    opt_ref = DecaySGD(reference.parameters(), backend=backend, **hyper)
    compiled = torch.compile(_train_step(model, opt), fullgraph=True, backend=compiler)
    eager = _train_step(reference, opt_ref)
    for x, y in _batches(device):
        torch.testing.assert_close(compiled(x, y), eager(x, y), rtol=1e-6, atol=1e-6)
        opt.zero_grad()
        opt_ref.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), reference.parameters()):
        if hyper.get("momentum"):
            torch.testing.assert_close(opt.state[p]["momentum_buffer"],
                                       opt_ref.state[q]["momentum_buffer"], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), _model(device).parameters()))


@needs_compile
@pytest.mark.parametrize("hyper", [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2, decoupled_weight_decay=True),
], ids=["plain", "momentum-wd", "nesterov-decoupled"])
def test_fullgraph_compile_of_forward_backward_step(trace_backward, device, backend, hyper):
    """aot_eager: dynamo's graph (no break) and AOTAutograd's functionalization of the op."""
    _compiled_vs_eager(device, "aot_eager", backend, **hyper)


@needs_compile
def test_fullgraph_compile_with_inductor(trace_backward, device):
    """The default compiler, end to end (the first run on a machine compiles C++: ~40 s)."""
    _compiled_vs_eager(device, "inductor", "auto", lr=0.1, momentum=0.9, weight_decay=1e-2)


@needs_compile
def test_factored_mode_under_compile_is_a_clear_error(trace_backward, device):
    model = _model(device)
    opt = DecaySGD(model.parameters(), lr=0.1, factored=True, model=model)
    compiled = torch.compile(_train_step(model, opt), fullgraph=True, backend="aot_eager")
    x, y = _batches(device, 1)[0]
    with pytest.raises(Exception, match="cannot run inside torch.compile"):
        compiled(x, y)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel_backend", ["triton", "cuda"])
def test_step_replays_in_a_cuda_graph(kernel_backend):
    """Whole-iteration capture (PyTorch's recipe): warm up on a side stream, keep the grads in
    place (zero_grad(set_to_none=False)), capture forward + backward + step, replay."""
    from lowrank_kernels.backends import why_unavailable

    device = torch.device("cuda")
    if why_unavailable(kernel_backend, device):
        pytest.skip(why_unavailable(kernel_backend, device))
    model, batches = _model(device), _batches(device, 6)
    reference = copy.deepcopy(model)
    hyper = dict(momentum=0.9, weight_decay=1e-2, backend=kernel_backend)
    opt = DecaySGD(model.parameters(), lr=torch.tensor(0.1, device=device), **hyper)
    opt_ref = DecaySGD(reference.parameters(), lr=0.1, **hyper)
    step, step_ref = _train_step(model, opt), _train_step(reference, opt_ref)
    static_x, static_y = (t.clone() for t in batches[0])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:2]:  # two eager steps: the momentum tables reach their steady state
            opt.zero_grad(set_to_none=False)
            static_x.copy_(x), static_y.copy_(y)
            step(static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in batches[:2]:
        opt_ref.zero_grad(set_to_none=False)
        step_ref(x, y)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.zero_grad(set_to_none=False)
        step(static_x, static_y)
    for x, y in batches[2:]:
        static_x.copy_(x), static_y.copy_(y)
        graph.replay()
        opt_ref.zero_grad(set_to_none=False)
        step_ref(x, y)
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
