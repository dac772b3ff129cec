"""Compile csrc/ kernels at first use (NVRTC through CuPy) and launch them on torch's stream.

Nothing is built at install time: the first launch on a GPU compiles the .cu file for the
device's architecture, CuPy caches the binary on disk (~/.cupy/kernel_cache), and this module
keeps the loaded module per (file, device) for the life of the process.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

_PACKAGE_DIR = Path(__file__).resolve().parents[2]


def csrc_dir() -> Path:
    """The kernel sources: copied into the package when installed, the repo's csrc/ otherwise."""
    for candidate in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parent / "csrc"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"csrc/ kernel sources not found next to {_PACKAGE_DIR}")


@lru_cache(maxsize=None)
def load_module(filename: str, device_index: int):
    import cupy

    source_dir = csrc_dir()
    source = (source_dir / filename).read_text()
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=source, backend="nvrtc",
                              options=("-std=c++17", f"-I{source_dir}"))


# Dynamic shared memory a block may use without opting in (every GPU since Kepler).
DEFAULT_SHARED_MEM_LIMIT = 48 * 1024


def launch(filename: str, kernel: str, grid: tuple, block: tuple, args: tuple,
           device: torch.device, shared_mem: int = 0) -> None:
    """Launch ``kernel`` from csrc/``filename`` on ``device``'s current torch stream.

    ``shared_mem``: bytes of dynamic shared memory per block. Above 48 KiB the kernel's
    max_dynamic_shared_size_bytes attribute is raised first (the caller checks the device's opt-in
    limit).
    """
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    function = load_module(filename, index).get_function(kernel)
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(index).cuda_stream, index)
    with cupy.cuda.Device(index):
        if shared_mem > DEFAULT_SHARED_MEM_LIMIT:
            function.max_dynamic_shared_size_bytes = int(shared_mem)
        function(grid, block, args, stream=stream, shared_mem=int(shared_mem))


def pointer(t: torch.Tensor | None):
    """A tensor's device address as a kernel argument (null when absent)."""
    return np.uint64(0 if t is None else t.data_ptr())
