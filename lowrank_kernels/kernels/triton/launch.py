"""What every Triton launcher of this package does the same way."""
from __future__ import annotations

import contextlib

import torch

# Multiply-adds contract to FMAs, as nvcc and NVRTC do by default for the CUDA kernels (and for
# torch's own CUDA kernels). Said explicitly: Triton 3.9 warns that its default will change in
# 3.10, and the rounding of every kernel must not change with the Triton version.
FP_FUSION = True

_NO_SWITCH = contextlib.nullcontext()


def on_device(device: torch.device):
    """Make ``device`` current for a launch: Triton launches on the current CUDA device, so
    tensors on cuda:1 while cuda:0 is current need the switch. Nothing to do on the CPU
    (interpreter) or when the device is already current."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _NO_SWITCH
    return torch.cuda.device(device.index)
