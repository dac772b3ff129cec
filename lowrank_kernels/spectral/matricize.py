"""Which weight matrices a model contributes, and how each parameter becomes a matrix.

Rules (DESIGN.md section 2):

* Linear (out, in): as is.
* ConvNd (c_out, c_in/groups, *k): (c_out, c_in/groups * prod(k)).
* ConvTransposeNd (c_in, c_out/groups, *k): to (c_out/groups, c_in * prod(k)), i.e. the matrix
  that maps an input patch to an output channel, as for a convolution.
* MultiheadAttention with a fused in_proj (3d, d): one matrix; out_proj is a Linear.
* Embedding (num, dim): as is.

``tracked_matrices(model)`` lists every such layer in module order under its qualified name;
``include``/``exclude`` (callables or name substrings) let a user pick the layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Union

import torch
from torch import nn

LayerFilter = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


@dataclass(frozen=True)
class TrackedMatrix:
    """One tracked weight: its name, the parameter, and the rule that turns it into a matrix."""

    name: str
    module: nn.Module
    param: nn.Parameter
    kind: str  # linear | conv | conv_transpose | attention_in_proj | embedding

    def matrix(self) -> torch.Tensor:
        return matricize(self.param.detach(), self.kind)


def matricize(weight: torch.Tensor, kind: str = "linear") -> torch.Tensor:
    """The (out, in) matrix of a layer's weight, by the rules above (a view where possible)."""
    if kind in ("linear", "attention_in_proj", "embedding"):
        if weight.dim() != 2:
            raise ValueError(f"a {kind} weight must be 2-D, got shape {tuple(weight.shape)}")
        return weight
    if kind == "conv":
        if weight.dim() < 3:
            raise ValueError(f"a conv weight must be at least 3-D, got shape {tuple(weight.shape)}")
        return weight.reshape(weight.shape[0], -1)
    if kind == "conv_transpose":
        if weight.dim() < 3:
            raise ValueError(f"a transposed-conv weight must be at least 3-D, got {tuple(weight.shape)}")
        c_in, c_out = weight.shape[:2]
        return weight.transpose(0, 1).reshape(c_out, -1)
    raise ValueError(f"unknown matricization kind {kind!r}")


def _kind_of(module: nn.Module) -> list[tuple[str, str]]:
    """(parameter attribute, kind) pairs a module contributes."""
    if isinstance(module, nn.Linear):
        return [("weight", "linear")]
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return [("weight", "conv")]
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return [("weight", "conv_transpose")]
    if isinstance(module, nn.MultiheadAttention):
        return [("in_proj_weight", "attention_in_proj")] if module.in_proj_weight is not None else [
            ("q_proj_weight", "linear"), ("k_proj_weight", "linear"), ("v_proj_weight", "linear")]
    if isinstance(module, nn.Embedding):
        return [("weight", "embedding")]
    return []


def _matches(name: str, module: nn.Module, rule: LayerFilter) -> bool:
    if callable(rule):
        return bool(rule(name, module))
    if isinstance(rule, str):
        return rule in name
    return any(part in name for part in rule)


def tracked_matrices(model: nn.Module, include: LayerFilter = None,
                     exclude: LayerFilter = None) -> list[TrackedMatrix]:
    """Every weight matrix of ``model`` that the rules above cover, in module order.

    ``include``/``exclude``: a substring, a list of substrings, or ``f(name, module) -> bool``.
    Names are the parameters' qualified names (``layer1.0.conv1.weight``).
    """
    found = []
    for module_name, module in model.named_modules():
        for attr, kind in _kind_of(module):
            param = getattr(module, attr, None)
            if not isinstance(param, torch.Tensor):
                continue
            name = f"{module_name}.{attr}" if module_name else attr
            if include is not None and not _matches(name, module, include):
                continue
            if exclude is not None and _matches(name, module, exclude):
                continue
            found.append(TrackedMatrix(name, module, param, kind))
    return found
