"""What a training run is set up with: processes and devices, seeds and determinism, the model
module, the optimizer and the learning-rate schedule."""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lowrank_kernels import DecaySGD
from training import data as data_mod
from training.settings import ConfigError


@dataclass
class Distributed:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def process_rank() -> int:
    """This process's rank under torchrun (0 when not distributed), before the group is joined."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device_flag: str) -> tuple[Distributed, torch.device]:
    """Join the process group that torchrun describes through WORLD_SIZE/RANK/LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), resolve_device(device_flag)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_flag == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = resolve_device(device_flag)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        initialized_here = True
    return Distributed(dist.get_world_size(), dist.get_rank(), local_rank, initialized_here), device


def resolve_device(flag: str) -> torch.device:
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(flag)
    except RuntimeError as err:
        raise ConfigError(f"--device {flag!r} is not a device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {flag}: CUDA is not available on this machine")
    return device


def check_preconditions(cfg: dict) -> None:
    """What every run with these settings needs from the machine, checked without loading
    anything: the device exists, and the CIFAR-10 files are there when ``--dataset cifar10``
    asks for them. Raises ConfigError or data.DatasetError."""
    resolve_device(cfg["device"])
    if cfg["dataset"] == "cifar10" and data_mod.find_cifar10(cfg["data"]) is None:
        data_mod.load_dataset("cifar10", cfg["data"])  # raises the error naming every place searched
    if cfg["dataset"] == "auto" and cfg["data"] is not None:
        data_mod.find_cifar10(cfg["data"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_determinism(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        # cuBLAS needs this before its first use to give reproducible results.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic


def lr_factor_fn(cfg: dict, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step ``step`` (0-based): linear warm-up over
    ``warmup_epochs``, then constant, multistep (x gamma once each milestone epoch is complete,
    as MultiStepLR stepped per epoch) or cosine to zero at the last step."""
    total = cfg["epochs"] * steps_per_epoch
    warmup = int(round(cfg["warmup_epochs"] * steps_per_epoch))
    schedule, milestones, gamma = cfg["schedule"], list(cfg["milestones"] or []), cfg["gamma"]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "multistep":
            epoch = step // steps_per_epoch
            return gamma ** sum(1 for m in milestones if epoch >= m)
        if schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def make_optimizer(cfg: dict, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
                  nesterov=cfg["nesterov"])
    if cfg["optimizer"] == "sgd":
        # The anchor of the benchmarks: PyTorch's fused kernel on CUDA, its default elsewhere.
        if device.type == "cuda":
            kwargs["fused"] = True
        return torch.optim.SGD(model.parameters(), **kwargs)
    if cfg["factored"]:  # Linear/Conv2d weights stepped from their captured factors
        return DecaySGD(model.parameters(), backend=cfg["backend"], factored=True, model=model,
                        **kwargs)
    return DecaySGD(model.parameters(), backend=cfg["backend"], **kwargs)


def model_options(cfg: dict) -> dict:
    return {key: cfg[key] for key in ("depth", "width", "batchnorm") if cfg[key] is not None}


def import_model_module(name: str) -> None:
    """Import a module (dotted name, looked up from the current directory too) or a .py file, for
    the models it registers."""
    try:
        if name.endswith(".py"):
            path = Path(name).resolve()
            if not path.is_file():
                raise ConfigError(f"--model-module {name}: no such file")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.append(os.getcwd())
            importlib.import_module(name)
    except ImportError as err:
        raise ConfigError(f"--model-module {name}: {err}") from err
