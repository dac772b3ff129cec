"""DecaySGD: a drop-in for ``torch.optim.SGD`` whose step is one fused kernel per parameter group.

Weight decay follows PyTorch: ``weight_decay=wd`` adds ``wd * W`` to the gradient, so the
per-step shrink of the weights is ``1 - lr * wd``. The papers behind this library write the
penalty as ``lam * ||W||_F^2`` with step size ``mu``, whose shrink is ``1 - 2 * mu * lam``: their
``lam`` is ``wd / 2`` here (``wd = 2 * lam``). ``decay_factor()`` returns the shrink.

Factored mode (``factored=True``, per param group, with ``model=``) applies the step of each
Linear / Conv2d weight straight from the layer's per-example factors, see ``factored_step.py``.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import Optimizer

from ..backends import check_backend_name
from ..ops.sgd_step import fused_sgd_step_
from .factor_capture import FactorCapture, why_not_capturable
from .factored_step import factored_update_


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
    * ``factored`` (per parameter group) with ``model``: the weights of the model's ``nn.Linear``
      and ``nn.Conv2d`` layers in such a group are stepped from the captured layer inputs and
      output gradients, ``W <- (1 - lr*wd) W - lr * D^T F`` (``lowrank_kernels.decay_outer_``),
      and autograd never computes their gradient: their ``requires_grad`` is switched off and
      their ``.grad`` stays None. Every momentum form (plain, dampening, Nesterov, decoupled
      decay, maximize) is exact in this form, through the dense momentum buffer. Other params
      (biases, norms, unsupported layers: a warning names them) take the fused dense step. See
      ``lowrank_kernels/optim/factored_step.py`` for the rules and limits.

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
        factored: bool = False,
        model: nn.Module | None = None,
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
                        backend=check_backend_name(backend), factored=bool(factored))
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"DecaySGD: model must be an nn.Module, got {type(model).__name__}")
        self._model = model
        self._captures: dict[torch.Tensor, FactorCapture] = {}
        self._anchor: torch.Tensor | None = None
        super().__init__(params, defaults)

    # ------------------------------------------------------------------------------------------
    # Factored mode: which weights are captured
    # ------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["factored"]:
            self._capture_group(group)

    def _capture_group(self, group: dict[str, Any]) -> None:
        if self._model is None:
            raise ValueError("DecaySGD(factored=True) needs the model that owns the parameters "
                             "(model=...), to find the layer of each weight")
        owners: dict[int, list[tuple[str, nn.Module]]] = {}
        # Projections called functionally by nn.MultiheadAttention never run their own forward.
        in_attention = {id(child) for m in self._model.modules()
                        if isinstance(m, nn.MultiheadAttention) for child in m.children()}
        for name, module in self._model.named_modules():
            for pname, param in module.named_parameters(recurse=False):
                owners.setdefault(id(param), []).append((f"{name}.{pname}" if name else pname,
                                                         module))
        if self._anchor is None:
            # A zero that requires grad: joins first-layer outputs to the autograd graph.
            self._anchor = torch.zeros((), requires_grad=True)
        dense_weights = []
        for p in group["params"]:
            found = owners.get(id(p), [])
            if not found:
                raise ValueError("DecaySGD(factored=True): a parameter of the group is not a "
                                 "parameter of the given model")
            name, module = found[0]
            if len(found) > 1:
                dense_weights.append(f"{name} (shared by {len(found)} modules)")
                continue
            if p is not getattr(module, "weight", None):
                continue  # biases, norm scales ...: the dense step, silently
            reason = (why_not_capturable(module) if id(module) not in in_attention
                      else "projection inside nn.MultiheadAttention (called functionally)")
            if reason is not None:
                if p.dim() >= 2:
                    dense_weights.append(f"{name} ({reason})")
                continue
            self._captures[p] = FactorCapture(module, self._anchor)
            p.requires_grad_(False)
        if dense_weights:
            warnings.warn("DecaySGD(factored=True): these weights take the dense step: "
                          + ", ".join(dense_weights), stacklevel=3)

    def factored_parameters(self) -> list[torch.Tensor]:
        """The weights stepped from captured factors (their ``requires_grad`` is off)."""
        return list(self._captures)

    def detach_factored(self) -> None:
        """Remove the capture hooks and give the factored weights their ``requires_grad`` back."""
        for p, capture in self._captures.items():
            capture.remove()
            p.requires_grad_(True)
        self._captures.clear()
        for group in self.param_groups:
            group["factored"] = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for capture in self._captures.values():
            capture.clear(set_to_none)

    # Group options that say where and how this optimizer runs, not what it computes: a loaded
    # state keeps this optimizer's own (the capture hooks are set up at construction; a state
    # saved with backend="cuda" must load on a machine without a GPU).
    _PLACEMENT_OPTIONS = ("factored", "backend")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        placement = [{k: g[k] for k in self._PLACEMENT_OPTIONS} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, kept in zip(self.param_groups, placement):
            g.update(kept)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also called by load_state_dict: fills the keys a torch.optim.SGD state dict lacks.
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("backend", "auto")
            group.setdefault("factored", False)
        self.__dict__.setdefault("_model", None)
        self.__dict__.setdefault("_captures", {})
        self.__dict__.setdefault("_anchor", None)

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
            if group["factored"]:  # the captured weights; the rest of the group below
                self._factored_step(group, grad_scale, found_inf)
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

    def _factored_step(self, group, grad_scale, found_inf) -> None:
        stepping = [p for p in group["params"] if p in self._captures and self._captures[p].active]
        if not self._captures and any(p.grad is None and not p.requires_grad
                                      for p in group["params"]):
            raise RuntimeError("DecaySGD: this factored optimizer has no capture hooks (it was "
                               "copied or unpickled); build it again with model=...")
        if not stepping:
            return
        if grad_scale is not None or found_inf is not None:
            raise RuntimeError("DecaySGD(factored=True) does not support GradScaler loss scaling "
                               "(fp16 AMP); use bf16 autocast, which needs no scaler, or "
                               "factored=False")
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise RuntimeError("DecaySGD(factored=True) does not support data-parallel training "
                               "(the factors are not all-reduced); use factored=False under DDP")
        lr, weight_decay = _scalar(group["lr"]), _scalar(group["weight_decay"])  # once per group
        for p in stepping:
            if p.grad is not None or p.requires_grad:
                raise RuntimeError("DecaySGD(factored=True): a factored weight requires grad or "
                                   "has a .grad (was requires_grad switched back on?); call "
                                   "detach_factored() to return it to the dense step")
            state = self.state[p]
            factors = self._captures[p].factors(dtype=p.dtype)
            first = state.get("momentum_buffer") is None
            if group["momentum"] != 0 and first:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            factored_update_(
                p, factors, state.get("momentum_buffer"), first_step=first,
                lr=lr, weight_decay=weight_decay, momentum=group["momentum"],
                dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
                decoupled_weight_decay=group["decoupled_weight_decay"], backend=group["backend"])

    def _init_group(self, group):
        params, grads, buffers, first_step = [], [], [], []
        for p in group["params"]:
            if p.grad is None or p in self._captures:
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
