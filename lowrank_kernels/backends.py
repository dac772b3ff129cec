"""Backend selection shared by every op.

Each op has three implementations: ``torch`` (plain PyTorch, always available, the ground truth
in tests), ``triton`` (Triton kernels: on a CUDA device, or on the CPU through Triton's
interpreter when ``TRITON_INTERPRET=1`` is set before the first import of the kernels) and
``cuda`` (the C++ kernels of ``csrc/``, compiled at first use through CuPy's NVRTC).

Precedence: an explicit ``backend=`` argument other than ``"auto"`` wins; otherwise the
``LOWRANK_BACKEND`` environment variable, if set, is used; otherwise ``"auto"`` picks the fastest
backend that can run on the tensors' device: cuda > triton > torch on a GPU, torch on the CPU
(the Triton interpreter is a correctness tool, never a fast path).
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "LOWRANK_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run here; the message says why and what to do."""


@lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """Return None when ``backend`` can run on ``device``, else the reason it cannot."""
    device = torch.device(device)
    if backend == "torch":
        return None
    if backend == "triton":
        if not _importable("triton"):
            return "the 'triton' package is not installed (pip install 'lowrank-kernels[triton]')"
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if triton_interpreter_enabled():
                return None
            return ("tensors are on the CPU; Triton runs on the CPU only through its interpreter: "
                    "set TRITON_INTERPRET=1 before importing lowrank_kernels")
        return f"Triton kernels do not run on device type '{device.type}'"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA C++ kernels need tensors on a CUDA device, got '{device.type}'"
        if torch.version.hip is not None:
            return "the CUDA C++ kernels are compiled for NVIDIA GPUs; this PyTorch is a ROCm build"
        if not _importable("cupy"):
            return ("the 'cupy' package is not installed; it compiles csrc/ at first use "
                    "(pip install cupy-cuda12x or cupy-cuda13x, matching your CUDA)")
        return None
    raise ValueError(f"unknown backend {backend!r}; choose one of 'auto', {', '.join(map(repr, BACKENDS))}")


def available_backends(device: torch.device | str) -> list[str]:
    return [b for b in BACKENDS if why_unavailable(b, torch.device(device)) is None]


def resolve_backend(backend: str | None, device: torch.device | str) -> str:
    """Turn a user's backend request into the concrete backend to run on ``device``.

    Raises BackendUnavailableError naming the reason when an explicit request cannot run.
    """
    device = torch.device(device)
    requested = backend or "auto"
    if requested == "auto":
        requested = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        source = f"{ENV_VAR}={requested!r}"
    else:
        source = f"backend={requested!r}"
    if requested == "auto":
        if device.type != "cuda":
            return "torch"
        for candidate in ("cuda", "triton"):
            if why_unavailable(candidate, device) is None:
                return candidate
        return "torch"
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend from {source}; choose one of 'auto', "
                         f"{', '.join(map(repr, BACKENDS))}")
    reason = why_unavailable(requested, device)
    if reason is not None:
        raise BackendUnavailableError(f"{source} cannot run on device '{device}': {reason}")
    return requested


def check_backend_name(backend: str | None) -> str:
    """Validate a backend name early (at construction), without a device."""
    name = backend or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of 'auto', {', '.join(map(repr, BACKENDS))}")
    return name
