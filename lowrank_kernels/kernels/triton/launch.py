"""What every Triton launcher of this package does the same way (the device switch is
``lowrank_kernels.execution.on_device``, shared with the ops)."""
from __future__ import annotations

# Multiply-adds contract to FMAs, as nvcc and NVRTC do by default for the CUDA kernels (and for
# torch's own CUDA kernels). Said explicitly: Triton 3.9 warns that its default will change in
# 3.10, and the rounding of every kernel must not change with the Triton version.
FP_FUSION = True
