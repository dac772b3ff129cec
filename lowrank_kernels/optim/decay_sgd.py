"""DecaySGD: a drop-in for ``torch.optim.SGD`` whose step is one fused kernel per parameter group.

Weight decay follows PyTorch: ``weight_decay=wd`` adds ``wd * W`` to the gradient, so the
per-step shrink of the weights is ``1 - lr * wd``. The papers behind this library write the
penalty as ``lam * ||W||_F^2`` with step size ``mu``, whose shrink is ``1 - 2 * mu * lam``: their
``lam`` is ``wd / 2`` here (``wd = 2 * lam``). ``decay_factor()`` returns the shrink.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import Optimizer

from ..backends import check_backend_name
from ..ops.sgd_step import fused_sgd_step_


def _scalar(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


class DecaySGD(Optimizer):
    """Stochastic gradient descent with momentum and weight decay, fused into one launch.

    Same arguments, defaults, errors, update rule and ``momentum_buffer`` state as
    ``torch.optim.SGD``, so a state dict moves between the two unchanged. Extra options:

    * ``decoupled_weight_decay``: shrink the weights by ``1 - lr * wd`` apart from the gradient
      (the SGDW form) instead of adding ``wd * W`` to it.
    * ``backend``: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (see
      ``lowrank_kernels.backends``), per parameter group.

    ``foreach`` and ``fused`` are accepted so code written for ``torch.optim.SGD`` runs unchanged;
    they change nothing, the step is always fused. ``differentiable=True`` is not supported.

    Every step does its arithmetic in fp32; the momentum buffer is stored in the parameter's dtype
    (fp32, bf16 or fp16; fp64 parameters take the torch backend). With a ``GradScaler``, the
    scale and the inf check are applied inside the kernel, with no host synchronisation. A
    buffer whose first step was skipped by the scaler starts from zero instead of from the
    gradient (identical when ``dampening == 0``).
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if differentiable:
            raise RuntimeError("DecaySGD does not support `differentiable`: its step is a fused kernel")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize,
                        decoupled_weight_decay=decoupled_weight_decay,
                        backend=check_backend_name(backend))
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also called by load_state_dict: fills the keys a torch.optim.SGD state dict lacks.
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("backend", "auto")

    def decay_factor(self, group: dict | int = 0) -> float:
        """Per-step weight shrink ``1 - lr * wd`` of a param group (the papers' 1 - 2*mu*lam)."""
        if isinstance(group, int):
            group = self.param_groups[group]
        return 1.0 - _scalar(group["lr"]) * _scalar(group["weight_decay"])

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params, grads, buffers, first_step = self._init_group(group)
            if not params:
                continue
            fused_sgd_step_(
                params, grads, buffers if group["momentum"] != 0 else None,
                lr=group["lr"], weight_decay=_scalar(group["weight_decay"]),
                momentum=group["momentum"], dampening=group["dampening"],
                nesterov=group["nesterov"], maximize=group["maximize"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                first_step=first_step, grad_scale=grad_scale, found_inf=found_inf,
                backend=group["backend"],
            )
        return loss

    def _init_group(self, group):
        params, grads, buffers, first_step = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("DecaySGD does not support sparse gradients "
                                   "(use torch.optim.SparseAdam or torch.optim.SGD for them)")
            if p.is_complex():
                raise RuntimeError("DecaySGD does not support complex parameters; "
                                   "optimize torch.view_as_real(param) instead")
            params.append(p)
            grads.append(p.grad)
            if group["momentum"] != 0:
                state = self.state[p]
                buffer = state.get("momentum_buffer")
                first_step.append(buffer is None)
                if buffer is None:
                    buffer = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["momentum_buffer"] = buffer
                buffers.append(buffer)
            else:
                first_step.append(False)
        return params, grads, buffers, first_step
