"""Backend selection shared by every op.

Each op has three implementations: ``torch`` (plain PyTorch, always available, the ground truth
in tests), ``triton`` (Triton kernels: on a CUDA device, or on the CPU through Triton's
interpreter when ``TRITON_INTERPRET=1`` is set before the first import of the kernels) and
``cuda`` (the C++ kernels of ``csrc/``, compiled at first use by NVRTC in
``kernels/cuda/compile.py`` and loaded and launched through CuPy).

Precedence: an explicit ``backend=`` argument other than ``"auto"`` wins; otherwise the
``LOWRANK_BACKEND`` environment variable, if set, is used; otherwise ``"auto"`` picks the first
backend of the op's order (``AUTO_ORDER``, per op and dtype) that can run on the tensors' device,
then torch; on the CPU it is always torch (the Triton interpreter is a correctness tool, never a
fast path).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from functools import lru_cache
from types import ModuleType

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "LOWRANK_BACKEND"

# "auto" on a CUDA device: the kernel backends in order of preference, per op and, where it
# matters, per variant (a dtype, or a name the op passes). Torch always comes last. No entry has
# been timed on a GPU yet: each says what it rests on, and the headline stage of
# benchmarks/gpu_check.sh (sgd_step and decay_outer_ rows, spectra with batched_eigh) measures
# both kernel backends of every op, so these are the entries to revisit from its results.
DEFAULT_ORDER = ("cuda", "triton")
AUTO_ORDER: dict[str, dict[object, tuple[str, ...]]] = {
    # Memory bound on both backends (one read and one write per element), nothing in the compiled
    # code favours either: the default order.
    "sgd_step": {None: DEFAULT_ORDER},
    "decay_outer": {
        # Compile evidence, sm_90a PTX from Triton 3.6 and 3.9: the bf16 tl.dot becomes
        # wgmma.mma_async m64n128k16 (Hopper's warpgroup tensor-core instruction), where
        # csrc/decay_outer.cu issues mma.sync m16n8k16. (On sm_80 both use mma.sync.)
        torch.bfloat16: ("triton", "cuda"),
        # float32 with TF32 allowed: Triton's tl.dot becomes wgmma ...tf32 (same PTX check); the
        # CUDA kernel stays on IEEE fp32 FMAs whatever the flag.
        "float32-tf32": ("triton", "cuda"),
        # IEEE float32: both on the CUDA cores (Triton's FMA dot, the CUDA kernel's 8x8 register
        # tile); no evidence either way: the default order.
        torch.float32: DEFAULT_ORDER,
    },
    # Structure, not timing: the CUDA kernel keeps A in shared memory, the Triton kernel
    # ping-pongs A and V^T through global scratch with a block barrier per round.
    "symmetric_eig": {None: DEFAULT_ORDER},
}


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run here; the message says why and what to do."""


@lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


KERNEL_BACKENDS = ("triton", "cuda")


@lru_cache(maxsize=None)
def kernel_module(op: str, backend: str) -> ModuleType:
    """The launcher module of ``op``'s kernels for ``backend`` (``lowrank_kernels.kernels.<backend>
    .<op>``), imported on first use, so that importing an op needs neither Triton nor CuPy."""
    if op not in AUTO_ORDER:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(map(repr, AUTO_ORDER))}")
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"backend {backend!r} has no kernel module; kernel backends: "
                         f"{', '.join(map(repr, KERNEL_BACKENDS))}")
    return importlib.import_module(f"{__package__}.kernels.{backend}.{op}")


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


def default_device() -> torch.device:
    """The device kernels run on when none is named: the current CUDA device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run on ``device`` (default: ``default_device()``)."""
    device = default_device() if device is None else torch.device(device)
    return [b for b in BACKENDS if why_unavailable(b, device) is None]


def auto_order(op: str | None = None, variant=None) -> tuple[str, ...]:
    """The kernel backends ``"auto"`` tries on a CUDA device for ``op`` and ``variant``, in
    order (torch comes after them). An op or variant without an entry gets ``DEFAULT_ORDER``."""
    if op is None:
        return DEFAULT_ORDER
    if op not in AUTO_ORDER:
        raise ValueError(f"unknown op {op!r} for the backend order; known: "
                         f"{', '.join(map(repr, AUTO_ORDER))}")
    by_variant = AUTO_ORDER[op]
    return by_variant.get(variant, by_variant.get(None, DEFAULT_ORDER))


def auto_candidates(device: torch.device | str, op: str | None = None, variant=None) -> list[str]:
    """What ``"auto"`` may run on ``device``, best first, always ending with torch. An op whose
    kernels have limits of their own (matrix sizes) takes the first one that fits."""
    device = torch.device(device)
    if device.type != "cuda":
        return ["torch"]
    return [b for b in auto_order(op, variant) if why_unavailable(b, device) is None] + ["torch"]


def resolve_backend(backend: str | None, device: torch.device | str, op: str | None = None,
                    variant=None) -> str:
    """Turn a user's backend request into the concrete backend to run on ``device``.

    ``op`` (a key of ``AUTO_ORDER``: "sgd_step", "decay_outer", "symmetric_eig") and ``variant``
    (usually the dtype) choose the order ``"auto"`` follows; without them it is
    ``DEFAULT_ORDER``. Raises BackendUnavailableError naming the reason when an explicit request
    cannot run.
    """
    device = torch.device(device)
    requested = backend or "auto"
    if requested == "auto":
        requested = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        source = f"{ENV_VAR}={requested!r}"
    else:
        source = f"backend={requested!r}"
    if requested == "auto":
        return auto_candidates(device, op, variant)[0]
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
