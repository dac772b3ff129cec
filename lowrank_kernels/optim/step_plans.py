"""The checked plan of a dense param group's step, kept from one step to the next.

Checking every tensor of a group and planning its launches costs Python time per tensor each
step (about 0.2 ms for ResNet-18's 62 tensors on a CPU, as much as a small step itself). In a
training loop nothing that the checks read changes between steps: the same params, the same
gradient tensors (backward accumulates into them, or ``zero_grad`` frees them and the next
backward makes new ones), the same momentum buffers. So the plan is reused while every one of
those is the very same object, the params keep their dtype and device and the group's options
that shape the plan are unchanged; anything else checks and plans again.

Identity is held through weak references, so a freed gradient can never be mistaken for a new
one that Python happens to place at the same address, and the cache keeps nothing alive. What the
checks read from a gradient (shape, dtype, device, layout) cannot change while it stays the same
object attached to its param: torch refuses a ``.grad`` whose shape, dtype or device differ from
the param's. Under torch.compile the plan is not cached (the trace records the checks once).
"""
from __future__ import annotations

import os
import weakref
from typing import Any

import torch

from ..backends import ENV_VAR

_DEAD = object()  # a weak reference's target that no live tensor can be


def _ref(t: torch.Tensor | None):
    return None if t is None else weakref.ref(t)


def _target(ref):
    return None if ref is None else (ref() if ref() is not None else _DEAD)


class StepPlans:
    """Per optimizer: group index -> the plan made for it and what it was made from."""

    def __init__(self):
        self._plans: dict[int, tuple[tuple, Any]] = {}

    def __reduce__(self):  # deepcopy and pickle of the optimizer: start empty (weakrefs do not copy)
        return (StepPlans, ())

    @staticmethod
    def _key(group: dict[str, Any], state) -> tuple:
        params = group["params"]
        grads = tuple(_ref(p.grad) for p in params)
        momentum = group["momentum"] != 0
        buffers = tuple(_ref(state[p].get("momentum_buffer")) if momentum and p in state
                        else None for p in params)
        kinds = tuple((p.dtype, p.device) for p in params)
        return (tuple(map(id, params)), grads, buffers, kinds, momentum, group["backend"],
                os.environ.get(ENV_VAR))

    def get(self, index: int, group: dict[str, Any], state):
        """The plan made for this group if nothing it rests on has changed, else None."""
        entry = self._plans.get(index)
        if entry is None:
            return None
        (ids, grads, buffers, kinds, momentum, backend, env), plan = entry
        params = group["params"]
        if (len(params) != len(ids) or momentum != (group["momentum"] != 0)
                or backend != group["backend"] or env != os.environ.get(ENV_VAR)):
            return None
        for i, p in enumerate(params):
            if id(p) != ids[i] or _target(grads[i]) is not p.grad or kinds[i] != (p.dtype, p.device):
                return None
            if momentum:
                buffer = state[p].get("momentum_buffer") if p in state else None
                if _target(buffers[i]) is not buffer:
                    return None
        return plan

    def put(self, index: int, group: dict[str, Any], state, plan) -> None:
        self._plans[index] = (self._key(group, state), plan)

    def clear(self) -> None:
        self._plans.clear()
