"""The kernels' torch.library ops pass torch.library.opcheck: their schemas declare every
mutation, their fake implementations match the real outputs, and they trace through
AOTAutograd (static and dynamic shapes). Run for every backend that can run here: torch, and
Triton through its interpreter on the CPU (the CUDA kernels need a GPU: the same tests then run
there).
"""
import pytest
import torch

import lowrank_kernels.ops.decay_outer  # noqa: F401  (registers lowrank_kernels::decay_outer_)
import lowrank_kernels.ops.sgd_step  # noqa: F401  (registers lowrank_kernels::fused_sgd_step_)
import lowrank_kernels.ops.symmetric_eig  # noqa: F401  (registers lowrank_kernels::symmetric_eig)

ops = torch.ops.lowrank_kernels


def _sgd_args(device, dtype, *, momentum, tensor_lr, backend, first):
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (33,), (4, 3, 2)]
    params = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    bufs = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes] if momentum else []
    lr_tensor = torch.tensor([0.05], device=device) if tensor_lr else None
    return (params, grads, bufs, [first] * len(shapes), 0.0 if tensor_lr else 0.05, lr_tensor,
            None, None, backend, 1e-2, momentum, 0.0, momentum != 0, False, False)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_fused_sgd_step_opcheck(backend, device, momentum, tensor_lr):
    args = _sgd_args(device, torch.float32, momentum=momentum, tensor_lr=tensor_lr,
                     backend=backend, first=False)
    torch.library.opcheck(ops.fused_sgd_step_, args)


def test_fused_sgd_step_opcheck_with_grad_scaler_tensors(backend, device):
    args = list(_sgd_args(device, torch.float32, momentum=0.9, tensor_lr=False, backend=backend,
                          first=True))
    args[6] = torch.tensor([4.0], device=device)  # grad_scale
    args[7] = torch.tensor([0.0], device=device)  # found_inf
    torch.library.opcheck(ops.fused_sgd_step_, tuple(args))


def test_fused_sgd_step_op_mutates_what_it_declares(backend, device):
    """The op writes params and buffers and nothing else (opcheck's schema test would see an
    undeclared write; this pins the declared ones down)."""
    args = _sgd_args(device, torch.float32, momentum=0.9, tensor_lr=False, backend=backend,
                     first=False)
    params, grads, bufs = args[0], args[1], args[2]
    before = [t.clone() for t in params + grads + bufs]
    ops.fused_sgd_step_(*args)
    changed = [not torch.equal(a, b) for a, b in zip(before, params + grads + bufs)]
    assert changed == [True] * 3 + [False] * 3 + [True] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decay_outer_opcheck(backend, device, dtype):
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(40, 24, generator=gen).to(device, dtype)
    D = torch.randn(5, 40, generator=gen).to(device, dtype)
    F = torch.randn(5, 24, generator=gen).to(device, dtype)
    torch.library.opcheck(ops.decay_outer_, (W, D, F, 0.99, -0.1, backend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetric_eig_opcheck(backend, device, dtype):
    if backend == "torch":
        pytest.skip("the torch backend is torch.linalg.eigh itself, not a custom op")
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(3, 9, 9, generator=gen, dtype=dtype)
    a = ((a + a.mT) / 20).to(device).contiguous()  # entries <= 1, as batched_eigh scales them
    torch.library.opcheck(ops.symmetric_eig, (a, 15, 1e-7, backend))


def test_ops_live_in_the_package_namespace():
    for name in ("fused_sgd_step_", "decay_outer_", "symmetric_eig"):
        schema = str(getattr(ops, name).default._schema)
        assert schema.startswith(f"lowrank_kernels::{name}("), schema
    mutated = {name: {a.name for a in getattr(ops, name).default._schema.arguments
                      if a.alias_info is not None and a.alias_info.is_write}
               for name in ("fused_sgd_step_", "decay_outer_", "symmetric_eig")}
    assert mutated == {"fused_sgd_step_": {"params", "momentum_buffers"},
                       "decay_outer_": {"W"}, "symmetric_eig": set()}
