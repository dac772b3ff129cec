"""DecaySGD: a drop-in for ``torch.optim.SGD`` whose step is one fused kernel per parameter group.

Weight decay follows PyTorch: ``weight_decay=wd`` adds ``wd * W`` to the gradient, so the
per-step shrink of the weights is ``1 - lr * wd``. The papers behind this library write the
penalty as ``lam * ||W||_F^2`` with step size ``mu``, whose shrink is ``1 - 2 * mu * lam``: their
``lam`` is ``wd / 2`` here (``wd = 2 * lam``). ``decay_factors()`` returns the shrink of each
param group, ``decay_factor(group)`` that of one.

Factored mode (``factored=True``, per param group, with ``model=``) applies the step of each
Linear / Conv2d weight straight from the layer's per-example factors, see ``factored_step.py``;
under data parallelism the ranks exchange the factors, see ``distributed_factors.py``.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import Optimizer

from ..backends import BackendUnavailableError, check_backend_name, resolve_backend
from ..ops import sgd_step
from ..execution import compiling
from .compiling import refuse_factored_under_compile
from .distributed_factors import CommunicationStats, FactorExchange
from .factor_capture import FactorCapture, why_not_capturable
from .factored_step import factored_update_
from .step_plans import StepPlans


def _scalar(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _param_label(group: dict[str, Any], i: int) -> str:
    """How errors name the i-th param of a group: its position, and its name when the group was
    built from named parameters."""
    names = group.get("param_names")
    return f"param {i} ({names[i]!r})" if names is not None else f"param {i}"


class _Labels:
    """The labels of a group's stepped params, made only when an error needs one."""

    def __init__(self, group: dict[str, Any], positions: list[int]):
        self.group, self.positions = group, positions

    def __getitem__(self, i: int) -> str:
        return _param_label(self.group, self.positions[i])


class DecaySGD(Optimizer):
    """Stochastic gradient descent with momentum and weight decay, fused into one launch.

    Same arguments, defaults, errors, update rule and ``momentum_buffer`` state as
    ``torch.optim.SGD``, so a state dict moves between the two unchanged. Extra options:

    * ``decoupled_weight_decay``: shrink the weights by ``1 - lr * wd`` apart from the gradient
      (the SGDW form) instead of adding ``wd * W`` to it.
    * ``backend``: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (see
      ``lowrank_kernels.backends``), per parameter group. A named backend must run on the
      devices of its group's params: BackendUnavailableError at construction otherwise.
    * ``factored`` (per parameter group) with ``model``: the weights of the model's ``nn.Linear``
      and ``nn.Conv2d`` layers in such a group are stepped from the captured layer inputs and
      output gradients, ``W <- (1 - lr*wd) W - lr * D^T F`` (``lowrank_kernels.decay_outer_``),
      and autograd never computes their gradient: their ``requires_grad`` is switched off and
      their ``.grad`` stays None. Every momentum form (plain, dampening, Nesterov, decoupled
      decay, maximize) is exact in this form, through the dense momentum buffer. Other params
      (biases, norms, unsupported layers: a warning names them) take the fused dense step. See
      ``lowrank_kernels/optim/factored_step.py`` for the rules and limits.
    * ``process_group``: with torch.distributed initialised, factored mode steps every rank with
      the mean over this group's ranks (default: the default group) of their factored
      gradients, exchanging the factors (``lowrank_kernels/optim/distributed_factors.py``;
      ``communication_stats()`` counts the bytes). Wrap the model in DDP after building the
      optimizer, for its other params.

    ``step()`` checks every param group before it steps any: an error (a backend that cannot run
    where a param now is, a dtype it does not take, a grad that does not match) names the group,
    the params and their device, and leaves the params and the state as they were. A param
    listed twice in a group is stepped once per occurrence, as ``torch.optim.SGD``'s
    single-tensor step does (it warns at construction).

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
        process_group: Any = None,
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
        self._exchange = FactorExchange(process_group)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------------------------------
    # Factored mode: which weights are captured
    # ------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group_backend(group, len(self.param_groups) - 1)
        except BaseException:
            self.param_groups.pop()
            raise
        if group["factored"]:
            self._capture_group(group)

    @staticmethod
    def _check_group_backend(group: dict[str, Any], index: int) -> None:
        """A backend named for the group must run on every device of its params: fail here, at
        construction, rather than at the first step. ("auto" always runs; LOWRANK_BACKEND is
        read at each step.)"""
        if group["backend"] == "auto":
            return
        devices: dict[torch.device, list[str]] = {}
        for i, p in enumerate(group["params"]):
            devices.setdefault(p.device, []).append(_param_label(group, i))
        for device, labels in devices.items():
            try:
                resolve_backend(group["backend"], device)
            except BackendUnavailableError as exc:
                shown = ", ".join(labels[:6]) + (", ..." if len(labels) > 6 else "")
                raise BackendUnavailableError(f"DecaySGD param group {index} ({shown} on "
                                              f"{device}): {exc}") from None

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
            if p in self._captures:  # listed twice: one capture, stepped once per occurrence
                continue
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

    def communication_stats(self) -> CommunicationStats:
        """The bytes the data-parallel factored step passed to its collectives (a snapshot; see
        ``distributed_factors.CommunicationStats``; all zero in a single process)."""
        return self._exchange.stats()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for capture in self._captures.values():
            capture.clear(set_to_none)

    # Group options that say where and how this optimizer runs, not what it computes: a loaded
    # state keeps this optimizer's own (the capture hooks are set up at construction; a state
    # saved with backend="cuda" must load on a machine without a GPU).
    _PLACEMENT_OPTIONS = ("factored", "backend")

    # torch.optim.SGD's group options that DecaySGD accepts and does not use (its step is always
    # fused), with torch's defaults: torch SGD, loading them, picks its own implementation.
    _TORCH_SGD_OPTIONS = {"foreach": None, "fused": None, "differentiable": False}
    _OWN_OPTION_DEFAULTS = {"decoupled_weight_decay": False, "backend": "auto", "factored": False}

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.SGD's state dict: the same state and param-group keys (DecaySGD's own
        options only where they are not at their defaults).

        The same keys, so that ``torch.distributed.checkpoint.state_dict``'s full state dicts
        (``StateDictOptions(full_state_dict=True)``) load either way between the two: without
        ``broadcast_from_rank0`` they fail (KeyError) on a group key the loading optimizer lacks.
        DecaySGD's own options go in only when not at their defaults (which a state dict without
        them loads as, see ``__setstate__``)."""
        state = super().state_dict()
        for group in state["param_groups"]:  # copies of the groups, without their params
            for key, default in self._OWN_OPTION_DEFAULTS.items():
                if group.get(key, default) == default:
                    group.pop(key, None)
            for key, default in self._TORCH_SGD_OPTIONS.items():
                group.setdefault(key, default)
        return state

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
        self.__dict__.setdefault("_exchange", FactorExchange())

    def decay_factors(self) -> list[float]:
        """Per-step weight shrink ``1 - lr * wd`` of each param group, in order (like a
        scheduler's ``get_last_lr()``)."""
        return [self._group_decay(g) for g in self.param_groups]

    def decay_factor(self, group: dict | int | None = None) -> float:
        """Per-step weight shrink ``1 - lr * wd`` (the papers' 1 - 2*mu*lam) of one param group,
        given by index or as the group dict. Without ``group``, the factor shared by every group;
        when the groups differ (e.g. biases without weight decay) that raises ValueError: pass
        ``group=`` or use ``decay_factors()``."""
        if group is None:
            factors = self.decay_factors()
            if len(set(factors)) > 1:
                listed = ", ".join(f"group {i}: {f:.6g}" for i, f in enumerate(factors))
                raise ValueError(f"DecaySGD.decay_factor(): the param groups have different decay "
                                 f"factors ({listed}); pass group=<index> or use decay_factors()")
            return factors[0]
        if isinstance(group, int):
            if not -len(self.param_groups) <= group < len(self.param_groups):
                raise IndexError(f"DecaySGD.decay_factor: no param group {group} (there are "
                                 f"{len(self.param_groups)})")
            group = self.param_groups[group]
        return self._group_decay(group)

    @staticmethod
    def _group_decay(group: dict) -> float:
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
        # Check every group before stepping any, so an error leaves the params and the state as
        # they were.
        plans = [self._plan_group(i, group, grad_scale, found_inf)
                 for i, group in enumerate(self.param_groups)]
        for group, (stepping, params, grads, buffers, launches) in zip(self.param_groups, plans):
            if stepping:  # the captured weights; the rest of the group below
                self._factored_step(group, stepping)
            if not params:
                continue
            first_step = self._make_missing_buffers(params, buffers)
            sgd_step.run_launches(
                launches, params, grads, buffers, first_step,
                lr=group["lr"], weight_decay=_scalar(group["weight_decay"]),
                momentum=group["momentum"], dampening=group["dampening"],
                nesterov=group["nesterov"], maximize=group["maximize"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                grad_scale=grad_scale, found_inf=found_inf)
        return loss

    def _plan_group(self, index, group, grad_scale, found_inf):
        """Check a group's step without writing anything: (the factored weights to step, the
        dense params, their grads, their launches). A dense group's plan is reused while
        nothing it was made from has changed (``step_plans``)."""
        cacheable = not group["factored"] and not compiling()
        plans = self.__dict__.setdefault("_step_plans", StepPlans())
        if cacheable:
            plan = plans.get(index, group, self.state)
            if plan is not None:
                return plan
        try:
            stepping = self._check_factored(group, grad_scale, found_inf) \
                if group["factored"] else []
            params, grads, positions = self._dense_params(group)
            if not params:
                return stepping, params, grads, None, []
            labels = _Labels(group, positions)
            buffers = None
            if group["momentum"] != 0:  # the buffers there are (None: made by this step)
                state = self.state
                buffers = [state[p].get("momentum_buffer") if p in state else None
                           for p in params]
            # A missing buffer is checked as its param, which the one made will match.
            sgd_step.check_inputs(
                params, grads, None if buffers is None else
                [b if b is not None else p for b, p in zip(buffers, params)],
                momentum=group["momentum"], labels=labels)
            launches = sgd_step.plan_launches(params, group["backend"], labels=labels)
        except (BackendUnavailableError, TypeError, ValueError, RuntimeError) as exc:
            raise type(exc)(f"DecaySGD param group {index}: {exc} (no parameter was stepped)") \
                from None
        plan = stepping, params, grads, buffers, launches
        if cacheable and (buffers is None or all(b is not None for b in buffers)):
            plans.put(index, group, self.state, plan)  # a first step's missing buffers: not yet
        return plan

    def _check_factored(self, group, grad_scale, found_inf) -> list[torch.Tensor]:
        """The captured weights of a factored group that have factors to step, after the checks
        that can fail."""
        refuse_factored_under_compile()
        stepping = [p for p in group["params"] if p in self._captures and self._captures[p].active]
        if not self._captures and any(p.grad is None and not p.requires_grad
                                      for p in group["params"]):
            raise RuntimeError("DecaySGD: this factored optimizer has no capture hooks (it was "
                               "copied or unpickled); build it again with model=...")
        data_parallel = self._exchange.active()
        if data_parallel:  # every rank joins the exchange, whether its backward reached a layer
            stepping = [p for p in group["params"] if p in self._captures]
        if not stepping:
            return stepping
        if grad_scale is not None or found_inf is not None:
            raise RuntimeError("DecaySGD(factored=True) does not support GradScaler loss scaling "
                               "(fp16 AMP); use bf16 autocast, which needs no scaler, or "
                               "factored=False")
        if data_parallel:
            self._exchange.check(self._model, stepping)
        for p in stepping:
            if p.grad is not None or p.requires_grad:
                raise RuntimeError("DecaySGD(factored=True): a factored weight requires grad or "
                                   "has a .grad (was requires_grad switched back on?); call "
                                   "detach_factored() to return it to the dense step")
        for device in {p.device for p in stepping}:
            resolve_backend(group["backend"], device, op="decay_outer")
        return stepping

    def _factored_step(self, group, stepping) -> None:
        lr, weight_decay = _scalar(group["lr"]), _scalar(group["weight_decay"])  # once per group
        exchange = self._exchange if self._exchange.active() else None
        if exchange is not None:  # data parallel: every rank's factors (distributed_factors.py)
            stepping = exchange.exchange(stepping, self._captures, self._model)
        update = factored_update_ if exchange is None else exchange.update_
        # A weight listed twice is stepped twice, as torch.optim.SGD does: each occurrence on
        # the first step starts its buffer from the gradient (torch's first-step rule).
        first = {p: self.state[p].get("momentum_buffer") is None for p in stepping}
        factors: dict[torch.Tensor, Any] = {}
        for p in stepping:
            state = self.state[p]
            if p not in factors:
                factors[p] = self._captures[p].factors(dtype=p.dtype) if exchange is None \
                    else exchange.factors(p)
            if group["momentum"] != 0 and state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            update(
                p, factors[p], state.get("momentum_buffer"), first_step=first[p],
                lr=lr, weight_decay=weight_decay, momentum=group["momentum"],
                dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
                decoupled_weight_decay=group["decoupled_weight_decay"], backend=group["backend"])
            for sketch in self.__dict__.get("_sketches", {}).get(p, ()):  # attach_sketch
                sketch.factored_step_(p, factors[p], first_step=first[p], group=group)

    def _dense_params(self, group):
        """The dense params of a group that have a gradient, their grads and their positions in
        the group (for errors); writes nothing.

        Not named ``_init_group``: torch.compile treats a method of that name as torch's own
        optimizers' state initialisation and breaks the graph when the parameters' grads were
        written in the same graph (a compiled forward + backward + step)."""
        params, grads, positions = [], [], []
        for i, p in enumerate(group["params"]):
            if p.grad is None or p in self._captures:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{_param_label(group, i)}: DecaySGD does not support sparse "
                                   "gradients (use torch.optim.SparseAdam or torch.optim.SGD "
                                   "for them)")
            if p.is_complex():
                raise RuntimeError(f"{_param_label(group, i)}: DecaySGD does not support complex "
                                   "parameters; optimize torch.view_as_real(param) instead")
            params.append(p)
            grads.append(p.grad)
            positions.append(i)
        return params, grads, positions

    def _make_missing_buffers(self, params, buffers):
        """Fill the missing (None) momentum buffers in place and return the first-step flags
        (None without momentum). A param listed twice shares its one buffer, and every occurrence
        has the flag its buffer had before this step: torch.optim.SGD starts each occurrence from
        the gradient on the first step and keeps the last one's buffer, which is what this step's
        second write leaves."""
        if buffers is None:
            return None
        made: dict[torch.Tensor, torch.Tensor] = {}
        first_step = [False] * len(params)
        for i, (p, buffer) in enumerate(zip(params, buffers)):
            if buffer is not None:
                continue
            if p not in made:
                made[p] = torch.zeros_like(p, memory_format=torch.preserve_format)
                self.state[p]["momentum_buffer"] = made[p]
            buffers[i], first_step[i] = made[p], True
        return first_step

    def attach_sketch(self, sketch) -> None:
        """Keep ``sketch`` (a ``lowrank_kernels.spectral.streaming_sketch.StreamingSketch``, which
        calls this itself) in step with the factored weights it tracks: right after each one's
        factored step, ``sketch.factored_step_(p, factors, first_step=..., group=...)`` applies
        the same update to its sketch with the factors that step used (``factored_step.py``)."""
        sketches = self.__dict__.setdefault("_sketches", {})
        for p in sketch.factored_weights():
            if p not in self._captures:
                raise ValueError("DecaySGD.attach_sketch: a weight of the sketch is not stepped "
                                 "in factored form by this optimizer")
            listed = sketches.setdefault(p, [])
            if not any(s is sketch for s in listed):
                listed.append(sketch)
