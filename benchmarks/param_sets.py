"""Parameter sets the optimizer benchmarks step over: real models' tensor shapes, no models.

* ``resnet18_cifar``: the 62 parameter tensors of a CIFAR ResNet-18 (11.17M params): many small
  tensors, where launch and per-tensor overheads matter.
* ``large``: GPT-2 small's 148 tensors (124.4M params): few big tensors, memory-bound. GPU only.
* ``large_reduced``: the same layer shapes with 2 blocks and an 8192-token vocabulary (21.3M
  params): what the CPU runs instead of ``large``, to keep the run short.

``python benchmarks/param_sets.py`` prints the counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from runner import DeviceSets

Shape = tuple[int, ...]

RESNET18_CIFAR_TENSORS = 62


@dataclass(frozen=True)
class ParamSet:
    name: str
    description: str
    shapes: tuple[tuple[str, Shape], ...]  # (parameter name, shape), in model order

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def n_params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes)


# ----------------------------------------------------------------------------------------------
# CIFAR ResNet-18
# ----------------------------------------------------------------------------------------------
def resnet18_cifar_shapes(num_classes: int = 10) -> list[tuple[str, Shape]]:
    """Parameter shapes of the CIFAR ResNet-18 (He et al. 2016, as in kuangliu/pytorch-cifar).

    3x3 stem conv (3 -> 64) + BN, no max-pool; four stages of two BasicBlocks (3x3 conv + BN,
    3x3 conv + BN) of widths 64, 128, 256, 512, the first block of stages 2-4 with stride 2 and a
    1x1 conv + BN shortcut; global average pool and a 512 -> ``num_classes`` linear layer. Convs
    have no bias; each BN has a weight and a bias. 62 tensors, 11,173,962 params for 10 classes.
    """
    shapes: list[tuple[str, Shape]] = []

    def conv_bn(prefix: str, c_in: int, c_out: int, k: int, bn: str) -> None:
        shapes.append((f"{prefix}.weight", (c_out, c_in, k, k)))
        shapes.append((f"{bn}.weight", (c_out,)))
        shapes.append((f"{bn}.bias", (c_out,)))

    conv_bn("conv1", 3, 64, 3, "bn1")
    c_in = 64
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{stage}.{block}"
            conv_bn(f"{p}.conv1", c_in, width, 3, f"{p}.bn1")
            conv_bn(f"{p}.conv2", width, width, 3, f"{p}.bn2")
            if block == 0 and c_in != width:  # stride-2 downsampling block: 1x1 conv shortcut
                conv_bn(f"{p}.shortcut.0", c_in, width, 1, f"{p}.shortcut.1")
            c_in = width
    shapes.append(("linear.weight", (num_classes, 512)))
    shapes.append(("linear.bias", (num_classes,)))
    assert len(shapes) == RESNET18_CIFAR_TENSORS, len(shapes)
    return shapes


# ----------------------------------------------------------------------------------------------
# Transformer (GPT-2 small layout, nn.Linear weights stored as (out, in))
# ----------------------------------------------------------------------------------------------
def gpt2_shapes(n_layers: int = 12, d_model: int = 768, vocab: int = 50257, n_ctx: int = 1024,
                d_ff: int | None = None) -> list[tuple[str, Shape]]:
    """Parameter shapes of a GPT-2-style decoder (tied output embedding)."""
    d_ff = d_ff or 4 * d_model
    shapes: list[tuple[str, Shape]] = [("wte.weight", (vocab, d_model)),
                                       ("wpe.weight", (n_ctx, d_model))]
    for i in range(n_layers):
        p = f"h.{i}"
        shapes += [
            (f"{p}.ln_1.weight", (d_model,)), (f"{p}.ln_1.bias", (d_model,)),
            (f"{p}.attn.c_attn.weight", (3 * d_model, d_model)), (f"{p}.attn.c_attn.bias", (3 * d_model,)),
            (f"{p}.attn.c_proj.weight", (d_model, d_model)), (f"{p}.attn.c_proj.bias", (d_model,)),
            (f"{p}.ln_2.weight", (d_model,)), (f"{p}.ln_2.bias", (d_model,)),
            (f"{p}.mlp.c_fc.weight", (d_ff, d_model)), (f"{p}.mlp.c_fc.bias", (d_ff,)),
            (f"{p}.mlp.c_proj.weight", (d_model, d_ff)), (f"{p}.mlp.c_proj.bias", (d_model,)),
        ]
    shapes += [("ln_f.weight", (d_model,)), ("ln_f.bias", (d_model,))]
    return shapes


def large_shapes() -> list[tuple[str, Shape]]:
    """GPT-2 small: 148 tensors, 124,439,808 params (~0.5 GB of fp32 weights)."""
    return gpt2_shapes()


def large_reduced_shapes() -> list[tuple[str, Shape]]:
    """The large set's layer shapes, 2 blocks and an 8192-token vocabulary: 28 tensors, 21.3M
    params. Run on the CPU instead of ``large_shapes()``."""
    return gpt2_shapes(n_layers=2, vocab=8192)


# ----------------------------------------------------------------------------------------------
# Registry and materialisation
# ----------------------------------------------------------------------------------------------
def resnet18_cifar() -> ParamSet:
    return ParamSet("resnet18_cifar", "CIFAR ResNet-18", tuple(resnet18_cifar_shapes()))


def large() -> ParamSet:
    return ParamSet("large", "GPT-2 small (12 blocks, d=768, vocab 50257)", tuple(large_shapes()))


def large_reduced() -> ParamSet:
    return ParamSet("large_reduced", "GPT-2 layout, 2 blocks, vocab 8192",
                    tuple(large_reduced_shapes()))


ALL_PARAM_SETS = {"resnet18_cifar": resnet18_cifar, "large": large, "large_reduced": large_reduced}
# Benchmarked on a device: ResNet-18 everywhere, the 124M set on a GPU, its reduced form elsewhere.
PARAM_SETS = DeviceSets("param set", ALL_PARAM_SETS, cpu_stand_ins={"large": "large_reduced"})


def materialize(param_set: ParamSet | list[tuple[str, Shape]], device: torch.device | str,
                dtype: torch.dtype = torch.float32, seed: int = 0,
                grad_scale: float = 1e-2) -> list[torch.nn.Parameter]:
    """Parameters of the set's shapes on ``device``, each with a random ``.grad`` of its shape.

    Weights ~ N(0, 0.02^2), grads ~ N(0, grad_scale^2): ordinary magnitudes (no denormals, no
    overflow over thousands of steps), drawn on the device from a seeded generator.
    """
    shapes = param_set.shapes if isinstance(param_set, ParamSet) else param_set
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    params = []
    for _, shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device, dtype=dtype) * 0.02)
        p.grad = torch.randn(shape, generator=gen, device=device, dtype=dtype) * grad_scale
        params.append(p)
    return params


def main() -> None:
    for name, make in ALL_PARAM_SETS.items():
        ps = make()
        print(f"{name:15s} {ps.n_tensors:4d} tensors {ps.n_params:>13,d} params  ({ps.description})")
    rn = resnet18_cifar()
    assert rn.n_tensors == RESNET18_CIFAR_TENSORS
    assert rn.n_params == 11_173_962, rn.n_params
    assert large().n_params == 124_439_808, large().n_params


if __name__ == "__main__":
    main()
