"""NVRTC through ctypes: CUDA C++ source to cubin and PTX, with no GPU and no CUDA toolkit.

NVRTC is a plain host library: it compiles for any architecture it supports whether or not a
device (or a driver) is present. The run-time loader (``compile.py``) and the ahead-of-time check
(``nvrtc_check.py``) both compile through ``compile_program`` here, so a CPU machine compiles the
very program a GPU machine loads.

The library is looked up in this order: the ``LOWRANK_KERNELS_NVRTC`` environment variable (a
path), the ``nvidia-cuda-nvrtc`` pip wheels (``nvidia/cu13/lib``, ``nvidia/cuda_nvrtc/lib``: the
ones PyTorch's CUDA wheels depend on), ``$CUDA_HOME``/``$CUDA_PATH``/``/usr/local/cuda``, then the
system loader path. When PyTorch is a CUDA build, a library of its CUDA major version comes first:
a cubin from a newer major toolkit may not load on the driver that PyTorch runs with.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


class NvrtcUnavailable(RuntimeError):
    """No loadable NVRTC library was found."""


class NvrtcCompileError(RuntimeError):
    """NVRTC rejected the program; the message carries its log."""


@dataclass(frozen=True)
class CompiledProgram:
    cubin: bytes | None          # None when compiled for a virtual architecture (compute_XX)
    ptx: str
    log: str                     # warnings, and ptxas' report when -Xptxas=-v was passed
    lowered_names: dict[str, str]  # name expression -> symbol in the binary


def _candidates() -> list[str]:
    explicit = os.environ.get("LOWRANK_KERNELS_NVRTC")
    if explicit:
        return [explicit]
    found: list[str] = []
    for entry in sys.path:
        for pattern in ("nvidia/cu*/lib/libnvrtc.so.*", "nvidia/cuda_nvrtc/lib/libnvrtc.so.*",
                        "nvidia/cu*/bin/nvrtc64_*.dll", "nvidia/cuda_nvrtc/bin/nvrtc64_*.dll"):
            found += glob.glob(os.path.join(entry, pattern))
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            found += glob.glob(os.path.join(root, "lib64", "libnvrtc.so*"))
            found += glob.glob(os.path.join(root, "bin", "nvrtc64_*.dll"))
    found = [f for f in found if "builtins" not in os.path.basename(f)
             and not f.endswith((".alt.so", ".a"))]
    system = ctypes.util.find_library("nvrtc")
    if system:
        found.append(system)
    return list(dict.fromkeys(sorted(found, key=_preference)))


def _preference(path: str):
    """Sort key: PyTorch's CUDA major version first, then newer majors first."""
    match = re.search(r"(?:libnvrtc\.so\.|nvrtc64_)(\d+)", os.path.basename(path))
    major = int(match.group(1)[:2]) if match else 0
    torch_major = _torch_cuda_major()
    return (0 if torch_major is not None and major == torch_major else 1, -major, path)


def _torch_cuda_major() -> int | None:
    try:
        import torch

        return int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None
    except Exception:  # noqa: BLE001 - no torch or a build without CUDA: no preference
        return None


@lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    """The NVRTC library (loaded once); raises NvrtcUnavailable naming where it looked."""
    tried = []
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError as error:
            tried.append(f"{path}: {error}")
            continue
        _declare(lib)
        return lib
    where = "\n  ".join(tried) or "no candidate file found"
    raise NvrtcUnavailable(
        "NVRTC could not be loaded (pip install nvidia-cuda-nvrtc, or set LOWRANK_KERNELS_NVRTC "
        f"to the path of libnvrtc):\n  {where}")


def library_path() -> str:
    """The file the loaded NVRTC library came from."""
    lib = library()
    return str(Path(lib._name).resolve()) if os.path.exists(lib._name) else lib._name


def _declare(lib: ctypes.CDLL) -> None:
    c_int_p, c_size_p = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_size_t)
    prog_p = ctypes.POINTER(ctypes.c_void_p)
    signatures = {
        "nvrtcVersion": [c_int_p, c_int_p],
        "nvrtcGetNumSupportedArchs": [c_int_p],
        "nvrtcGetSupportedArchs": [c_int_p],
        "nvrtcCreateProgram": [prog_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
                               ctypes.c_void_p, ctypes.c_void_p],
        "nvrtcDestroyProgram": [prog_p],
        "nvrtcCompileProgram": [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
        "nvrtcAddNameExpression": [ctypes.c_void_p, ctypes.c_char_p],
        "nvrtcGetLoweredName": [ctypes.c_void_p, ctypes.c_char_p,
                                ctypes.POINTER(ctypes.c_char_p)],
        "nvrtcGetProgramLogSize": [ctypes.c_void_p, c_size_p],
        "nvrtcGetProgramLog": [ctypes.c_void_p, ctypes.c_char_p],
        "nvrtcGetPTXSize": [ctypes.c_void_p, c_size_p],
        "nvrtcGetPTX": [ctypes.c_void_p, ctypes.c_char_p],
        "nvrtcGetCUBINSize": [ctypes.c_void_p, c_size_p],
        "nvrtcGetCUBIN": [ctypes.c_void_p, ctypes.c_char_p],
    }
    for name, argtypes in signatures.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = ctypes.c_int
    lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p


def _check(lib, status: int, call: str) -> None:
    if status != 0:
        raise RuntimeError(f"{call} failed: {lib.nvrtcGetErrorString(status).decode()}")


@lru_cache(maxsize=None)
def version() -> tuple[int, int]:
    lib = library()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


@lru_cache(maxsize=None)
def supported_archs() -> tuple[int, ...]:
    """Compute capabilities NVRTC can emit code for, e.g. (75, 80, 86, ..., 90, 100, ...)."""
    lib = library()
    count = ctypes.c_int()
    _check(lib, lib.nvrtcGetNumSupportedArchs(ctypes.byref(count)), "nvrtcGetNumSupportedArchs")
    archs = (ctypes.c_int * count.value)()
    _check(lib, lib.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
    return tuple(archs)


def _read(lib, prog, size_call: str, read_call: str) -> bytes:
    size = ctypes.c_size_t()
    _check(lib, getattr(lib, size_call)(prog, ctypes.byref(size)), size_call)
    buffer = ctypes.create_string_buffer(size.value)
    _check(lib, getattr(lib, read_call)(prog, buffer), read_call)
    return buffer.raw[:size.value]


def compile_program(source: str, name: str, options: tuple[str, ...],
                    name_expressions: tuple[str, ...] = ()) -> CompiledProgram:
    """Compile ``source`` (self-contained: NVRTC is given no headers) with ``options``.

    An ``-arch=sm_XX`` option yields a cubin and PTX, ``-arch=compute_XX`` PTX only. Raises
    NvrtcCompileError with the compiler's log when the program does not compile, or when a name
    expression names no kernel.
    """
    lib = library()
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0,
                                       None, None), "nvrtcCreateProgram")
    try:
        for expression in name_expressions:
            _check(lib, lib.nvrtcAddNameExpression(prog, expression.encode()),
                   "nvrtcAddNameExpression")
        encoded = [o.encode() for o in options]
        status = lib.nvrtcCompileProgram(prog, len(encoded),
                                         (ctypes.c_char_p * len(encoded))(*encoded))
        log = _read(lib, prog, "nvrtcGetProgramLogSize", "nvrtcGetProgramLog")
        log = log.rstrip(b"\0").decode(errors="replace")
        if status != 0:
            raise NvrtcCompileError(
                f"NVRTC {version()[0]}.{version()[1]} could not compile {name} with "
                f"{' '.join(options)}: {lib.nvrtcGetErrorString(status).decode()}\n{log}")
        lowered = {}
        for expression in name_expressions:
            symbol = ctypes.c_char_p()
            status = lib.nvrtcGetLoweredName(prog, expression.encode(), ctypes.byref(symbol))
            if status != 0 or not symbol.value:
                raise NvrtcCompileError(f"{name}: no kernel named {expression!r}")
            lowered[expression] = symbol.value.decode()
        ptx = _read(lib, prog, "nvrtcGetPTXSize", "nvrtcGetPTX").rstrip(b"\0").decode()
        real_arch = any(o.startswith(("-arch=sm_", "--gpu-architecture=sm_")) for o in options)
        cubin = _read(lib, prog, "nvrtcGetCUBINSize", "nvrtcGetCUBIN") if real_arch else None
        return CompiledProgram(cubin=cubin, ptx=ptx, log=log, lowered_names=lowered)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
