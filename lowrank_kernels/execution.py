"""Where and how a launch runs: the device to make current, and whether a tracer is recording.

Shared by the ops (which choose between a torch.library op and its implementation) and every
launcher (which must launch on the tensors' own GPU).
"""
from __future__ import annotations

import contextlib
import functools

import torch

_NO_SWITCH = contextlib.nullcontext()


def on_device(device: torch.device):
    """Make ``device`` current for a launch: Triton launches on the current CUDA device, so
    tensors on cuda:1 while cuda:0 is current need the switch. Nothing to do on the CPU
    (interpreter) or when the device is already current."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _NO_SWITCH
    return torch.cuda.device(device.index)


@functools.lru_cache(maxsize=None)
def dtensor_class():
    """torch.distributed.tensor.DTensor, or None on a torch built without distributed (imported
    once: the checks that use it run per tensor and step)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (a parameter sharded by FSDP2's ``fully_shard`` or tensor
    parallelism)."""
    dtensor = dtensor_class()
    return dtensor is not None and isinstance(t, dtensor)


def compiling() -> bool:
    """True while torch.compile traces (``torch.compiler.is_compiling``, torch >= 2.3)."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False
