"""lowrank-kernels: fused GPU kernels for the spectral side of deep-learning training.

Set TRITON_INTERPRET=1 before importing this package to run the Triton kernels on the CPU.
"""
from .backends import BackendUnavailableError, available_backends, resolve_backend
from .ops.decay_outer import decay_outer_
from .ops.sgd_step import fused_sgd_step_
from .optim.decay_sgd import DecaySGD
from .simulate import SimulationResult, predict, simulate, sweep
from .spectral.gradient_rank import gradient_rank
from .tracker import RankTracker, galanti_resnet18_layers

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DecaySGD",
    "RankTracker",
    "SimulationResult",
    "available_backends",
    "decay_outer_",
    "fused_sgd_step_",
    "galanti_resnet18_layers",
    "gradient_rank",
    "predict",
    "resolve_backend",
    "simulate",
    "sweep",
]
