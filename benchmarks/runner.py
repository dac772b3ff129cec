"""Shared benchmark runner: environment capture, timing, copy bandwidth, result files.

Every benchmark suite and report section of this repository uses these helpers, so results from
different ops are measured and written the same way. Nothing here is specific to one op.

* ``environment(device)``: what the numbers were measured on (no host name).
* ``speed_backends(device)`` / ``why_backend_skipped``: the op backends worth timing on a device.
* ``DeviceSets``: which of a suite's named sets (parameter sets, matrix sets) a device runs.
* ``time_fn(fn, warmup=..., repeat=..., device=...)``: median / min / IQR of one call, in ms.
  On a CUDA device each call sits between two CUDA events on the current stream and the device is
  synchronised before reading them; on the CPU ``time.perf_counter`` is used.
* ``synchronized(fn, device)`` / ``free(device)``: what the pytest-benchmark suites and the report
  sections do around a measurement (wait for the kernels on CUDA; release memory after it).
* ``measure_copy_bandwidth(device, nbytes)``: achieved ``dst.copy_(src)`` bandwidth, counting
  the bytes read plus the bytes written: the practical ceiling for memory-bound kernels.
* ``markdown_table`` / ``write_results``: a markdown table and a JSON file in ``results/``,
  named after the benchmark, the device kind and the UTC date.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Mapping, Sequence, TypeVar

import torch

from lowrank_kernels.backends import available_backends, why_unavailable

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_RESULTS_DIR = BENCH_DIR / "results"
GiB = 1 << 30
MiB = 1 << 20

# Default buffer of the copy-bandwidth measurement: far larger than any cache level.
DEFAULT_COPY_BYTES = {"cuda": 1 * GiB, "cpu": 256 * MiB}


# ----------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized(fn: Callable[[], Any], device: torch.device | str) -> Callable[[], Any]:
    """``fn`` followed by a device synchronisation on CUDA, so that a wall-clock timer (the
    pytest-benchmark suites') covers the kernels ``fn`` queued; ``fn`` itself elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return fn

    def call_and_wait():
        fn()
        torch.cuda.synchronize(device)
    return call_and_wait


def free(device: torch.device | str) -> None:
    """Release what a measurement left behind (Python garbage; on CUDA the caching allocator's
    free blocks), so that the next one starts from the same memory state."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


def device_kind(device: torch.device | str) -> str:
    """Short file-name-safe kind: ``cpu`` or the GPU's slugged name (``nvidia-h100-80gb-hbm3``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return slug or "cuda"


# ----------------------------------------------------------------------------------------------
# What a device runs: the backends worth timing, the sets of a suite
# ----------------------------------------------------------------------------------------------
def speed_backends(device: torch.device | str) -> list[str]:
    """Backends that run at native speed on ``device``: available, and not Triton's interpreter."""
    device = torch.device(device)
    return [b for b in available_backends(device) if not (b == "triton" and device.type != "cuda")]


def why_backend_skipped(backend: str | None, device: torch.device | str) -> str | None:
    """None when ``backend`` (None: a plain torch contender) is timed on ``device``, else why
    not."""
    device = torch.device(device)
    if backend is None or backend in speed_backends(device):
        return None
    if backend == "triton" and device.type != "cuda":
        return "Triton on the CPU is its interpreter, a correctness tool, not a speed path"
    return why_unavailable(backend, device) or "not a speed path on this device"


SetT = TypeVar("SetT")


@dataclass(frozen=True)
class DeviceSets(Generic[SetT]):
    """A suite's named sets (parameter sets, matrix sets) and which of them a device runs: every
    set, except that a GPU-only set is replaced on other devices by its smaller stand-in (a CPU
    would take minutes on the full one)."""
    kind: str                                     # "param set", "matrix set": for the messages
    builders: Mapping[str, Callable[[], SetT]]    # name -> the set, in run order
    cpu_stand_ins: Mapping[str, str]              # GPU-only set -> the set run instead elsewhere

    def __post_init__(self):
        for full, stand_in in self.cpu_stand_ins.items():
            for name in (full, stand_in):
                if name not in self.builders:
                    raise ValueError(f"{self.kind} {name!r} of the CPU stand-ins is not one of "
                                     f"{list(self.builders)}")

    def names_for(self, device: torch.device | str) -> list[str]:
        """The names of the sets run on ``device``, in run order."""
        left_out = (set(self.cpu_stand_ins.values()) if torch.device(device).type == "cuda"
                    else set(self.cpu_stand_ins))
        return [name for name in self.builders if name not in left_out]

    def for_device(self, device: torch.device | str) -> list[SetT]:
        return [self.builders[name]() for name in self.names_for(device)]

    def why_not_on(self, name: str, device: torch.device | str) -> str | None:
        """None when set ``name`` runs on ``device``, else the reason it does not."""
        if name not in self.builders:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {list(self.builders)}")
        if name in self.names_for(device):
            return None
        if name in self.cpu_stand_ins:
            return (f"the {self.kind} {name!r} runs on a GPU only; other devices run "
                    f"{self.cpu_stand_ins[name]!r} instead, to stay short")
        full = next(f for f, stand_in in self.cpu_stand_ins.items() if stand_in == name)
        return f"the {self.kind} {name!r} stands in for {full!r} off the GPU; a GPU runs {full!r}"


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------
def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cupy_version() -> str | None:
    if importlib.util.find_spec("cupy") is None:
        return None
    try:
        import cupy

        return cupy.__version__
    except Exception as exc:  # a broken CuPy install must not stop a benchmark
        return f"unimportable ({type(exc).__name__})"


def _cuda_version_string(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _cuda_driver_version() -> str | None:
    """The CUDA version the installed driver supports (cuDriverGetVersion), via libcuda."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        version = ctypes.c_int(0)
        if cuda.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value:
            return _cuda_version_string(version.value)
    return None


def _cupy_runtime_version() -> str | None:
    if importlib.util.find_spec("cupy") is None:
        return None
    try:
        import cupy

        return _cuda_version_string(cupy.cuda.runtime.runtimeGetVersion())
    except Exception:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=BENCH_DIR,
                             capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        commit = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=BENCH_DIR, capture_output=True, text=True, timeout=10)
        return commit + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _load_average() -> float | None:
    """1-minute load average when measuring: other work on the machine skews CPU timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """What a result was measured on. Contains no host name."""
    device = torch.device(device) if device is not None else default_device()
    env: dict[str, Any] = {
        "date_utc": utc_now().isoformat(timespec="seconds"),
        "device": str(device),
        "device_kind": device_kind(device),
        "device_name": device_name(device),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "load_avg_1m": _load_average(),
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _dist_version("triton", "pytorch-triton"),
        "cupy": _cupy_version(),
        "numpy": _dist_version("numpy"),
        "lowrank_kernels": _dist_version("lowrank-kernels", "lowrank_kernels"),
        "git_commit": _git_commit(),
        "torch_cuda_build": torch.version.cuda,
        "cuda_driver": None,
        "cuda_runtime": None,
        "env_LOWRANK_BACKEND": os.environ.get("LOWRANK_BACKEND"),
        "env_TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["cuda_driver"] = _cuda_driver_version()
        env["cuda_runtime"] = _cupy_runtime_version() or torch.version.cuda
        env["gpu_compute_capability"] = f"{props.major}.{props.minor}"
        env["gpu_sm_count"] = props.multi_processor_count
        env["gpu_memory_gib"] = round(props.total_memory / GiB, 1)
    return env


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of already sorted values."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize_ms(samples_ms: Iterable[float]) -> dict[str, Any]:
    s = sorted(samples_ms)
    q1, q3 = _quantile(s, 0.25), _quantile(s, 0.75)
    return {"median_ms": statistics.median(s), "min_ms": s[0], "max_ms": s[-1],
            "mean_ms": statistics.fmean(s), "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1,
            "repeat": len(s)}


def time_fn(fn: Callable[[], Any], *, warmup: int = 3, repeat: int = 20,
            device: torch.device | str | None = None) -> dict[str, Any]:
    """Time ``fn()`` ``repeat`` times after ``warmup`` untimed calls; statistics in milliseconds.

    CUDA: each call is bracketed by CUDA events recorded on the current stream, and the device is
    synchronised once at the end before the events are read, so back-to-back calls queue as they
    would in training (a call whose host-side launch cost exceeds its GPU time shows up as gaps
    between the events, i.e. it is measured, not hidden). CPU: ``time.perf_counter`` per call.

    Returns ``median_ms``, ``min_ms``, ``max_ms``, ``mean_ms``, ``q1_ms``, ``q3_ms``, ``iqr_ms``,
    ``repeat`` and ``samples_ms``.
    """
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    device = torch.device(device) if device is not None else default_device()
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) for start, end in zip(starts, ends)]
    else:
        samples = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    result = summarize_ms(samples)
    result["samples_ms"] = samples
    return result


def measure_copy_bandwidth(device: torch.device | str | None = None, nbytes: int | None = None, *,
                           warmup: int = 3, repeat: int = 10) -> dict[str, Any]:
    """Achieved device copy bandwidth of ``dst.copy_(src)`` on ``nbytes``-byte fp32 buffers.

    Counts read + write bytes (``2 * nbytes``) over the median time. Defaults: 1 GiB on a GPU,
    256 MiB on the CPU. Returns ``bytes_per_s``, ``gb_per_s`` (1e9 bytes), ``nbytes`` and the
    timing statistics.
    """
    device = torch.device(device) if device is not None else default_device()
    if nbytes is None:
        nbytes = DEFAULT_COPY_BYTES.get(device.type, 256 * MiB)
    numel = max(1, nbytes // 4)
    src = torch.ones(numel, dtype=torch.float32, device=device)  # touch every page now
    dst = torch.zeros_like(src)
    stats = time_fn(lambda: dst.copy_(src), warmup=warmup, repeat=repeat, device=device)
    moved = 2 * numel * 4
    bytes_per_s = moved / (stats["median_ms"] * 1e-3)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    stats.pop("samples_ms", None)
    return {"nbytes": numel * 4, "bytes_moved": moved, "bytes_per_s": bytes_per_s,
            "gb_per_s": bytes_per_s / 1e9, **stats}


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------
Column = tuple[str, str, str]  # (row key, header, format spec such as ".3f"; "" for str())


def format_cell(value: Any, spec: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and spec:
        return format(value, spec)
    if isinstance(value, int) and not isinstance(value, bool) and spec:
        return format(value, spec)
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub markdown table; numeric columns are right-aligned."""
    header = "| " + " | ".join(h for _, h, _ in columns) + " |"
    align = "|" + "|".join("---:" if spec else ":---" for _, _, spec in columns) + "|"
    body = ["| " + " | ".join(format_cell(row.get(key), spec) for key, _, spec in columns) + " |"
            for row in rows]
    return "\n".join([header, align, *body])


def environment_markdown(env: dict[str, Any]) -> str:
    return "\n".join(f"- **{k}**: {'—' if v is None else v}" for k, v in env.items())


def result_stem(name: str, device: torch.device | str, when: _dt.datetime | None = None) -> str:
    """``{name}_{device_kind}_{YYYY-MM-DD}T{HHMMSS}Z``: one file pair per run, never overwritten
    by a later run the same day."""
    when = when or utc_now()
    return f"{name}_{device_kind(device)}_{when.strftime('%Y-%m-%dT%H%M%SZ')}"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (torch.device, torch.dtype, Path)):
        return str(obj)
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return None
    return obj


def write_results(name: str, markdown: str, payload: dict[str, Any], *,
                  device: torch.device | str, out_dir: str | Path | None = None,
                  when: _dt.datetime | None = None) -> tuple[Path, Path]:
    """Write ``markdown`` to ``<stem>.md`` and ``payload`` to ``<stem>.json`` in ``out_dir``
    (default ``benchmarks/results/``); returns both paths."""
    out = Path(out_dir) if out_dir is not None else DEFAULT_RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    stem = result_stem(name, device, when)
    md_path, json_path = out / f"{stem}.md", out / f"{stem}.json"
    md_path.write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    json_path.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    return md_path, json_path

