"""The fused SGD step: weight-decay shrink, momentum and update over many tensors in one launch.

Per element, in fp32 arithmetic whatever the storage dtype::

    g = grad * (1 / grad_scale)                (when a GradScaler scale is given)
    g = -g                                     (maximize)
    g = g + wd * p                             (coupled weight decay, torch's convention)
    buf = g              on the first step,    (momentum != 0)
    buf = m * buf + (1 - dampening) * g        afterwards
    g = g + m * buf  (nesterov)  or  g = buf
    p = (1 - lr * wd) * p                      (decoupled weight decay, the SGDW form)
    p = p - lr * g

and nothing at all when ``found_inf`` is non-zero (GradScaler found an inf/NaN gradient), decided
on the device so the step never waits for the host. The momentum buffer is stored in the
parameter's dtype, like ``torch.optim.SGD``'s, so state dicts move between the two unchanged.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from ..backends import BackendUnavailableError, kernel_module, resolve_backend
from ..execution import compiling, is_dtensor
from . import multi_tensor, sgd_step_torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TORCH_DTYPES = KERNEL_DTYPES + (torch.float64,)


def fused_sgd_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor] | None,
    *,
    lr: float | torch.Tensor,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    first_step: list[bool] | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    backend: str | None = "auto",
) -> None:
    """Apply one SGD step in place to ``params`` (and ``momentum_buffers``).

    One kernel launch per (device, dtype) group of tensors. ``momentum_buffers`` is required when
    ``momentum != 0`` (one tensor per param, same dtype and shape); ``first_step[i]`` marks a
    buffer to initialise from the gradient (torch's first-step rule) instead of updating it.
    A param listed twice (with the same buffer) is stepped twice, one occurrence after the
    other, see ``plan_launches``. Nothing is written when any group cannot run.
    """
    check_inputs(params, grads, momentum_buffers, momentum=momentum, first_step=first_step)
    if not params:
        return
    run_launches(plan_launches(params, backend), params, grads,
                 momentum_buffers if momentum != 0 else None, first_step, lr=lr,
                 weight_decay=weight_decay, momentum=momentum, dampening=dampening,
                 nesterov=nesterov, maximize=maximize,
                 decoupled_weight_decay=decoupled_weight_decay, grad_scale=grad_scale,
                 found_inf=found_inf)


def run_launches(launches, params, grads, momentum_buffers, first_step, *, lr, weight_decay,
                 momentum, dampening, nesterov, maximize, decoupled_weight_decay, grad_scale,
                 found_inf) -> None:
    """Run the ``plan_launches`` launches on inputs that ``check_inputs`` accepted (the split
    lets an optimizer check every param group before it steps any)."""
    if first_step is None:
        first_step = [False] * len(params)
    hyper = dict(weight_decay=float(weight_decay), momentum=float(momentum),
                 dampening=float(dampening), nesterov=bool(nesterov), maximize=bool(maximize),
                 decoupled_weight_decay=bool(decoupled_weight_decay))
    # The per-device scalars first: a bad one raises before any launch has run.
    scalars = {}
    for launch in launches:
        if launch.device not in scalars:
            scalars[launch.device] = (_lr_for(lr, launch.device),
                                      _on_device(grad_scale, launch.device, "grad_scale"),
                                      _on_device(found_inf, launch.device, "found_inf"))
    for launch in launches:
        index = launch.index
        p = [local_tensor(params[i]) for i in index]
        g = [local_tensor(grads[i]) for i in index]
        b = [local_tensor(momentum_buffers[i]) for i in index] \
            if momentum_buffers is not None else []
        f = [bool(first_step[i]) for i in index]
        step_lr, scale, inf = scalars[launch.device]
        tensor_lr = step_lr if isinstance(step_lr, torch.Tensor) else None
        # Eager calls go straight to the implementation the op wraps: the op's dispatch (its
        # argument binding and a version bump per mutated tensor, ~0.5 ms for ResNet-18's 62
        # params on a CPU) buys nothing outside a trace. Traced calls (torch.compile, export)
        # record the op.
        launch_step = _sgd_step_op if compiling() else _sgd_step_impl
        launch_step(p, g, b, f, 0.0 if tensor_lr is not None else step_lr, tensor_lr, scale, inf,
                    launch.backend, **hyper)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2's parameters, their grads and buffers), which shares
    its storage, so stepping it in place steps the DTensor; any other tensor as it is. The step
    is elementwise, so stepping each shard is exactly stepping the whole."""
    if type(t) in _PLAIN_TENSOR_TYPES:  # the common case, without an isinstance walk
        return t
    return t.to_local() if is_dtensor(t) else t


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


# ----------------------------------------------------------------------------------------------
# The launch as a torch.library op: torch.compile sees one opaque, schema-checked node (its
# mutations declared, a fake implementation for tracing) instead of pointer arithmetic, and
# torch.library.opcheck can test it. Planning (backend choice, duplicates, checks) stays in Python
# above; one call is one launch of one concrete backend.
# ----------------------------------------------------------------------------------------------
def _sgd_step_impl(params: list[torch.Tensor], grads: list[torch.Tensor],
                   momentum_buffers: list[torch.Tensor], first_step: list[bool], lr: float,
                   lr_tensor: torch.Tensor | None, grad_scale: torch.Tensor | None,
                   found_inf: torch.Tensor | None, backend: str, weight_decay: float,
                   momentum: float, dampening: float, nesterov: bool, maximize: bool,
                   decoupled_weight_decay: bool) -> None:
    if backend not in _IMPLEMENTATIONS:
        raise ValueError(f"lowrank_kernels::fused_sgd_step_: unknown backend {backend!r}")
    _IMPLEMENTATIONS[backend](
        params, grads, momentum_buffers if momentum != 0 else None, first_step,
        lr_tensor if lr_tensor is not None else lr, grad_scale, found_inf,
        weight_decay=weight_decay, momentum=momentum, dampening=dampening, nesterov=nesterov,
        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay)


_sgd_step_op = torch.library.custom_op("lowrank_kernels::fused_sgd_step_",
                                       mutates_args=("params", "momentum_buffers"))(_sgd_step_impl)


@_sgd_step_op.register_fake
def _sgd_step_fake(params, grads, momentum_buffers, first_step, lr, lr_tensor, grad_scale,
                   found_inf, backend, weight_decay, momentum, dampening, nesterov, maximize,
                   decoupled_weight_decay) -> None:
    return None  # in place only: params and buffers keep their shapes, nothing is returned


class Launch(NamedTuple):
    """One launch of a step: the positions in ``params`` it covers, on one device and dtype."""
    backend: str
    device: torch.device
    dtype: torch.dtype
    index: list[int]


def plan_launches(params: list[torch.Tensor], backend: str | None = "auto",
                  labels: Sequence[str] | None = None) -> list[Launch]:
    """The launches of one step over ``params``, in order, each with its concrete backend.

    One launch per (device, dtype); raises (BackendUnavailableError, TypeError) for a group that
    cannot run, naming its params, before anything runs. A tensor that appears more
    than once is stepped once per occurrence, in order, as ``torch.optim.SGD``'s single-tensor
    loop does: its k-th occurrences go to the k-th round of launches (one launch never holds a
    tensor twice, where its programs would race on the same memory). ``labels`` name the params
    in errors (default: their positions)."""
    rounds: list[dict[tuple[torch.device, torch.dtype], list[int]]] = [{}]
    if len({id(p) for p in params}) == len(params):
        for i, p in enumerate(params):
            rounds[0].setdefault((p.device, p.dtype), []).append(i)
    else:
        seen: dict[int, int] = {}
        for i, p in enumerate(params):
            occurrence = seen.get(id(p), 0)
            seen[id(p)] = occurrence + 1
            if occurrence == len(rounds):
                rounds.append({})
            rounds[occurrence].setdefault((p.device, p.dtype), []).append(i)
    explicit = (backend or "auto") != "auto"
    names: dict[tuple[torch.device, torch.dtype], str] = {}
    launches = []
    for groups in rounds:
        for (device, dtype), index in groups.items():
            if (device, dtype) not in names:
                names[device, dtype] = _backend_for(backend, explicit, device, dtype,
                                                     _which(index, labels))
            launches.append(Launch(names[device, dtype], device, dtype, index))
    return launches


def _backend_for(backend, explicit, device, dtype, which: str) -> str:
    try:
        name = resolve_backend(backend, device, op="sgd_step", variant=dtype)
    except BackendUnavailableError as exc:
        raise BackendUnavailableError(f"fused SGD step, {which} on {device}: {exc}") from None
    if name != "torch" and dtype not in KERNEL_DTYPES and not explicit:
        name = "torch"  # "auto" (or LOWRANK_BACKEND) sends float64 to the reference
    if name != "torch" and dtype not in KERNEL_DTYPES:
        raise TypeError(f"fused SGD step, {which} ({dtype} on {device}): backend {name!r} "
                        f"supports parameters of dtype float32, bfloat16 and float16; use "
                        f"backend='torch' for them")
    return name


def _label(i: int, labels: Sequence[str] | None) -> str:
    return labels[i] if labels is not None else f"param {i}"


def _which(index: list[int], labels: Sequence[str] | None) -> str:
    return ", ".join(_label(i, labels) for i in index[:6]) + (", ..." if len(index) > 6 else "")


def check_inputs(params, grads, momentum_buffers=None, *, momentum=0.0, first_step=None,
                 labels: Sequence[str] | None = None) -> None:
    """Raise a clear error, naming the param (``labels``, default its position), for anything
    the fused step cannot take."""
    if len(params) != len(grads):
        raise ValueError(f"got {len(params)} params but {len(grads)} grads")
    if momentum != 0:
        if momentum_buffers is None or len(momentum_buffers) != len(params):
            raise ValueError("momentum != 0 needs one momentum buffer per param")
    if first_step is not None and len(first_step) != len(params):
        raise ValueError(f"first_step has {len(first_step)} entries for {len(params)} params")
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.is_sparse or p.is_sparse:
            raise RuntimeError(f"{_label(i, labels)}: sparse tensors are not supported by the "
                               "fused SGD step")
        if p.is_complex() or g.is_complex():
            raise RuntimeError(f"{_label(i, labels)}: complex tensors are not supported by the "
                               "fused SGD step; step torch.view_as_real(param) instead")
        if p.dtype not in TORCH_DTYPES:
            raise TypeError(f"{_label(i, labels)}: parameters must be floating point "
                            f"(float32, bfloat16, float16, float64), got {p.dtype}")
        if g.shape != p.shape:
            raise ValueError(f"{_label(i, labels)}: grad shape {tuple(g.shape)} != param shape "
                             f"{tuple(p.shape)}")
        if g.dtype != p.dtype or g.device != p.device:
            raise TypeError(f"{_label(i, labels)}: grad is {g.dtype} on {g.device} but param is "
                            f"{p.dtype} on {p.device}")
        if momentum != 0:
            check_buffer(p, momentum_buffers[i], i, labels)


def check_buffer(p: torch.Tensor, b: torch.Tensor, i: int,
                 labels: Sequence[str] | None = None) -> None:
    """A momentum buffer must match its param (the i-th, named by ``labels``)."""
    if b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
        raise TypeError(f"{_label(i, labels)}: momentum buffer must match its param in shape, "
                        f"dtype and device; got {tuple(b.shape)} {b.dtype} {b.device} for a param "
                        f"{tuple(p.shape)} {p.dtype} {p.device}")


def _lr_for(lr, device):
    """A float, or a one-element fp32 tensor on ``device`` that the kernels read there.

    A CPU tensor lr is read on the host (reading host memory waits for nothing), never copied to
    the GPU: a pageable host-to-device copy would wait for the stream, and it cannot be captured
    in a CUDA graph. torch's fused optimizers treat a CPU lr the same way."""
    if not isinstance(lr, torch.Tensor):
        return float(lr)
    if lr.device.type == "cpu" and torch.device(device).type != "cpu":
        if lr.numel() != 1:
            raise ValueError("lr must be a one-element tensor")
        return float(lr)
    return _on_device(lr, device, "lr")


def _on_device(t, device, name):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        raise ValueError(f"{name} must be a one-element tensor")
    return t.to(device=device, dtype=torch.float32).reshape(1)


# ----------------------------------------------------------------------------------------------
# Kernel backends: build the launch tables, stage tensors whose layouts differ, launch once.
# ----------------------------------------------------------------------------------------------


def _stage(params, grads, bufs):
    """Flat views the kernel can index as arrays, plus the copies to write back afterwards.

    Tensors that are flat and laid out alike go straight to the kernel; any other param (strided
    slices, grads with another memory format) is stepped on contiguous copies.
    """
    flat_p, flat_g, flat_b, write_back = [], [], [], []
    for i, (p, g) in enumerate(zip(params, grads)):
        b = bufs[i] if bufs is not None else None
        group = [p, g] + ([b] if b is not None else [])
        if multi_tensor.flat_compatible(group):
            flat_p.append(p), flat_g.append(g), flat_b.append(b)
            continue
        p_c, b_c = p.contiguous(), (b.contiguous() if b is not None else None)
        flat_p.append(p_c), flat_g.append(g.contiguous()), flat_b.append(b_c)
        write_back.append((p, p_c))
        if b is not None:
            write_back.append((b, b_c))
    return flat_p, flat_g, flat_b, write_back


def _launch_tables(params, grads, bufs, first, chunk):
    """(tensor table, block table, aligned): ``aligned`` says that every pointer of the launch is
    16-byte aligned, so the kernels may use their 128-bit path (chunk starts are multiples of
    ``chunk`` elements, which keeps each chunk aligned as well)."""
    keep = [i for i, p in enumerate(params) if p.numel() > 0]
    rows = [[params[i].data_ptr(), grads[i].data_ptr(),
             bufs[i].data_ptr() if bufs is not None else 0,
             params[i].numel(), int(bool(first[i]))] for i in keep]
    aligned = all(row[0] % _ALIGNMENT == 0 and row[1] % _ALIGNMENT == 0
                  and row[2] % _ALIGNMENT == 0 for row in rows)
    device = params[0].device
    return (multi_tensor.tensor_table(rows, device),
            multi_tensor.block_table([r[3] for r in rows], chunk, device), aligned)


_ALIGNMENT = 16  # bytes of one 128-bit access


def _kernel_step(backend: str):
    """A backend step: shared staging and table building around one kernel module's launcher
    (``backends.kernel_module("sgd_step", backend)``: ``CHUNK``, elements per program, and
    ``launch_sgd_step``)."""

    def step(params, grads, bufs, first, lr, grad_scale, found_inf, **hyper):
        kernels = kernel_module("sgd_step", backend)
        flat_p, flat_g, flat_b, write_back = _stage(params, grads, bufs)
        if not any(p.numel() for p in flat_p):
            return
        tensors, blocks, aligned = _launch_tables(
            flat_p, flat_g, flat_b if bufs is not None else None, first, kernels.CHUNK)
        kernels.launch_sgd_step(tensors, blocks, flat_p[0].dtype, lr, grad_scale, found_inf,
                                aligned=aligned, **hyper)
        for original, staged in write_back:
            original.copy_(staged)

    return step


_IMPLEMENTATIONS = {
    "torch": sgd_step_torch.step_torch,
    "triton": _kernel_step("triton"),
    "cuda": _kernel_step("cuda"),
}
