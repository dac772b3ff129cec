"""Compile csrc/ kernels at first use (NVRTC) and launch them through CuPy on torch's stream.

Nothing is built at install time. ``compile_spec`` says exactly what is compiled for an
architecture: the .cu text with its quoted includes inlined, the options and the kernel names.
The loader and the ahead-of-time check (``nvrtc_check.py``, run in CI without a GPU) both compile
that spec through ``nvrtc.compile_program``, so CI compiles the program a GPU loads.

Why not ``cupy.RawModule(code=...)``:

* CuPy appends ``-ftz=true`` after the caller's options (``_compile_with_cache_cuda`` in
  ``cupy/cuda/compiler.py``, CuPy 14.2) and NVRTC takes the last of two ``-ftz`` options (NVRTC
  13.5 warns '"-ftz=false" followed by "-ftz=true"' and emits ``.ftz`` instructions), so passing
  ``-ftz=false`` cannot win: fp32 subnormals would flush to zero in these kernels but not in torch
  or Triton. Compiling here with ``-ftz=false`` and loading the cubin with
  ``cupy.RawModule(path=...)``, which compiles nothing, keeps IEEE subnormals.
* CuPy's disk cache keys on the top-level source text only, so an edit of an included header
  reused a stale binary. Here the headers are part of the compiled text itself, and the cache
  key hashes that text, the options, the kernel names and the NVRTC version.

Launches: the CuPy kernel is cached per (file, name, device), its dynamic shared-memory limit is
raised once (to the device's opt-in limit, the first time a launch needs more than 48 KiB), and
the CuPy wrapper of torch's current stream is cached per (device, stream pointer). Kernels always
run on torch's current stream of the tensors' device. Importing this module needs neither CuPy
nor NVRTC. (Not run on a GPU in this repository's CI: the launch path is tested with stand-ins.)
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from . import nvrtc

_PACKAGE_DIR = Path(__file__).resolve().parents[2]

# Every kernel of every source: the names the launchers use, checked by NVRTC as name expressions
# (a missing one is a compile error) and compiled by the CI check.
KERNELS: dict[str, tuple[str, ...]] = {
    "sgd_step.cu": ("sgd_step_f32", "sgd_step_bf16", "sgd_step_f16"),
    "decay_outer.cu": ("decay_outer_f32", "decay_outer_bf16"),
    "symmetric_eig.cu": ("symmetric_eig_f32", "symmetric_eig_f64"),
}

# Options of every compile. The numerics flags are NVRTC's defaults, spelled out because they are
# the contract (IEEE subnormals, division and square root like torch's); -Xptxas=-v only makes
# ptxas print each kernel's registers and spills into the log (read by the check, ignored here).
OPTIONS = (
    "-std=c++17",
    "-ftz=false",
    "-prec-div=true",
    "-prec-sqrt=true",
    "-fmad=true",
    "--ptxas-options=-v",
)

# Dynamic shared memory a block may use without opting in (every GPU since Kepler).
DEFAULT_SHARED_MEM_LIMIT = 48 * 1024
# CUDA grid limits (compute capability >= 3.0) and block limits.
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_BLOCK = (1024, 1024, 64)
MAX_THREADS_PER_BLOCK = 1024


def csrc_dir() -> Path:
    """The kernel sources: copied into the package when installed, the repo's csrc/ otherwise."""
    for candidate in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parent / "csrc"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"csrc/ kernel sources not found next to {_PACKAGE_DIR}")


_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"\s*$')
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$")


def inline_includes(filename: str, directory: Path | None = None) -> str:
    """The text of csrc/``filename`` with every ``#include "x"`` replaced by x's text (once per
    file, recursively), with ``#line`` markers so compiler messages name the original file."""
    directory = directory or csrc_dir()
    seen: set[str] = set()

    def expand(name: str) -> list[str]:
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{name}: included file not found in {directory}")
        seen.add(name)
        out = [f'#line 1 "{name}"']
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            include = _INCLUDE.match(line)
            if include:
                if include.group(1) not in seen:
                    out += expand(include.group(1))
                out.append(f'#line {number + 1} "{name}"')
            elif _PRAGMA_ONCE.match(line):
                out.append("")
            else:
                out.append(line)
        return out

    return "\n".join(expand(filename)) + "\n"


@dataclass(frozen=True)
class CompileSpec:
    """Exactly what NVRTC compiles for one source and architecture."""

    filename: str
    arch: str                    # "sm_90a", "sm_80" (cubin) or "compute_120" (PTX for the driver)
    source: str                  # self-contained: headers inlined
    options: tuple[str, ...]
    kernels: tuple[str, ...]     # name expressions; extern "C", so also the symbols

    def cache_key(self) -> str:
        text = "\0".join((self.filename, self.arch, self.source, *self.options, *self.kernels,
                          "nvrtc %d.%d" % nvrtc.version()))
        return hashlib.sha256(text.encode()).hexdigest()


def compile_spec(filename: str, arch: str) -> CompileSpec:
    if filename not in KERNELS:
        raise KeyError(f"{filename}: not a csrc kernel source (known: {sorted(KERNELS)})")
    if not re.fullmatch(r"(sm|compute)_\d+[af]?", arch):
        raise ValueError(f"arch must look like 'sm_90a', 'sm_80' or 'compute_90', got {arch!r}")
    return CompileSpec(filename=filename, arch=arch, source=inline_includes(filename),
                       options=OPTIONS + (f"-arch={arch}",), kernels=KERNELS[filename])


def build(spec: CompileSpec) -> nvrtc.CompiledProgram:
    return nvrtc.compile_program(spec.source, spec.filename, spec.options, spec.kernels)


def runtime_arch(capability: tuple[int, int], supported: tuple[int, ...]) -> str:
    """The architecture to compile for a device of compute ``capability``.

    A cubin for the device itself when NVRTC knows it (Hopper gets sm_90a, what the CI check
    compiles); for a device newer than this NVRTC, PTX of the newest architecture it knows, which
    the driver compiles at load time.
    """
    cc = capability[0] * 10 + capability[1]
    if cc in supported:
        return f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
    older = [a for a in supported if a < cc]
    if not older:
        raise RuntimeError(f"NVRTC {nvrtc.version()} supports compute capabilities "
                           f"{supported}; this device is {capability[0]}.{capability[1]}")
    return f"compute_{max(older)}"


def cache_dir() -> Path:
    root = os.environ.get("LOWRANK_KERNELS_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lowrank_kernels" / "cuda"


def cached_binary(spec: CompileSpec) -> Path:
    """The compiled spec on disk (cubin, or PTX for a compute_XX arch), compiled on a miss."""
    suffix = ".cubin" if spec.arch.startswith("sm_") else ".ptx"
    path = cache_dir() / f"{Path(spec.filename).stem}-{spec.arch}-{spec.cache_key()[:32]}{suffix}"
    if path.is_file():
        return path
    program = build(spec)
    data = program.cubin if program.cubin is not None else program.ptx.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)  # atomic: concurrent processes never read a partial file
    return path


@lru_cache(maxsize=None)
def load_module(filename: str, device_index: int):
    import cupy

    arch = runtime_arch(torch.cuda.get_device_capability(device_index), nvrtc.supported_archs())
    return cupy.RawModule(path=str(cached_binary(compile_spec(filename, arch))))


@lru_cache(maxsize=None)
def shared_memory_optin(device_index: int) -> int:
    """Most dynamic shared memory one block of ``device_index`` may opt in to, in bytes."""
    props = torch.cuda.get_device_properties(device_index)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    if not limit:
        import cupy

        limit = cupy.cuda.Device(device_index).attributes.get("MaxSharedMemoryPerBlockOptin", 0)
    return int(limit) or DEFAULT_SHARED_MEM_LIMIT


class LoadedKernel:
    """One kernel on one device, with its dynamic shared-memory limit raised at most once."""

    def __init__(self, function, device, shared_optin: int):
        self.function = function        # cupy.RawKernel (anything with its call and attributes)
        self.device = device            # context manager making the kernel's device current
        self.static_shared = int(function.shared_size_bytes)
        self.shared_optin = int(shared_optin)
        self.dynamic_limit = DEFAULT_SHARED_MEM_LIMIT - self.static_shared

    def __call__(self, grid: tuple, block: tuple, args: tuple, stream, shared_mem: int) -> None:
        with self.device:
            if shared_mem > self.dynamic_limit:
                self._raise_limit(shared_mem)
            self.function(grid, block, args, stream=stream, shared_mem=shared_mem)

    def _raise_limit(self, shared_mem: int) -> None:
        limit = self.shared_optin - self.static_shared
        if shared_mem > limit:
            raise ValueError(f"{shared_mem} bytes of dynamic shared memory requested, the device "
                             f"allows {limit} per block for this kernel")
        self.function.max_dynamic_shared_size_bytes = limit
        self.dynamic_limit = limit


_KERNELS: dict[tuple[str, str, int], LoadedKernel] = {}
_STREAMS: dict[tuple[int, int], object] = {}
_STREAM_CACHE_SIZE = 64


def loaded_kernel(filename: str, name: str, device_index: int) -> LoadedKernel:
    key = (filename, name, device_index)
    kernel = _KERNELS.get(key)
    if kernel is None:
        import cupy

        device = cupy.cuda.Device(device_index)
        with device:
            function = load_module(filename, device_index).get_function(name)
            kernel = LoadedKernel(function, device, shared_memory_optin(device_index))
        _KERNELS[key] = kernel
    return kernel


def current_stream(device_index: int):
    """CuPy's view of torch's current stream on ``device_index`` (cached per stream pointer)."""
    pointer_value = torch.cuda.current_stream(device_index).cuda_stream
    key = (device_index, pointer_value)
    stream = _STREAMS.get(key)
    if stream is None:
        import cupy

        if len(_STREAMS) >= _STREAM_CACHE_SIZE:
            _STREAMS.clear()
        stream = _STREAMS[key] = cupy.cuda.ExternalStream(pointer_value, device_index)
    return stream


def check_launch_geometry(kernel: str, grid: tuple, block: tuple) -> None:
    """Raise ValueError naming the kernel when ``grid`` or ``block`` breaks a CUDA limit."""
    for what, dims, limits in (("grid", grid, MAX_GRID), ("block", block, MAX_BLOCK)):
        if not 1 <= len(dims) <= 3:
            raise ValueError(f"{kernel}: {what} must have 1 to 3 dimensions, got {dims}")
        for axis, (size, limit) in enumerate(zip(dims, limits)):
            if not 1 <= size <= limit:
                raise ValueError(f"{kernel}: {what} dimension {'xyz'[axis]} = {size} is outside "
                                 f"[1, {limit}]")
    if math.prod(block) > MAX_THREADS_PER_BLOCK:
        raise ValueError(f"{kernel}: {math.prod(block)} threads per block, more than "
                         f"{MAX_THREADS_PER_BLOCK}")


def launch(filename: str, kernel: str, grid: tuple, block: tuple, args: tuple,
           device: torch.device, shared_mem: int = 0) -> None:
    """Launch ``kernel`` from csrc/``filename`` on ``device``'s current torch stream.

    ``shared_mem``: bytes of dynamic shared memory per block; above 48 KiB the kernel's
    max_dynamic_shared_size_bytes attribute is raised first (once per kernel and device), and a
    request above the device's opt-in limit is a ValueError.
    """
    check_launch_geometry(kernel, grid, block)
    index = device.index if device.index is not None else torch.cuda.current_device()
    loaded_kernel(filename, kernel, index)(grid, block, args, current_stream(index),
                                           int(shared_mem))


def pointer(t: torch.Tensor | None):
    """A tensor's device address as a kernel argument (null when absent)."""
    return np.uint64(0 if t is None else t.data_ptr())
