"""Stage 1: what the check runs on: versions, the device, and whether each backend can run.

    python3 benchmarks/gpu_check/environment.py

Prints ``key: value`` lines (``benchmarks/runner.environment``, the report's own record, plus
the GPU's L2 size and the backends' availability). Exit status 0 unless torch cannot be used.
"""
from __future__ import annotations

import sys
from pathlib import Path

import checks  # noqa: F401 - sets up the interpreter flag and the import path first
from checks import DEVICE, DRY_RUN

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import runner  # noqa: E402
import torch  # noqa: E402

from lowrank_kernels.backends import BACKENDS  # noqa: E402


def main() -> int:
    env = runner.environment(DEVICE)
    env["dry_run"] = DRY_RUN
    if DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(DEVICE)
        env["gpu_l2_cache_mib"] = round(getattr(props, "L2_cache_size", 0) / 2**20, 1)
    for backend in BACKENDS:
        env[f"backend_{backend}"] = checks.why_backend_skipped(backend) or "runs"
    for key, value in env.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
