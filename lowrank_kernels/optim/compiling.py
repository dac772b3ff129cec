"""What the optimizer does differently while torch.compile traces it."""
from __future__ import annotations

import torch


def compiling() -> bool:
    """True while torch.compile traces (torch >= 2.3 has torch.compiler.is_compiling)."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def refuse_factored_under_compile() -> None:
    """The factored mode captures each layer's input and output gradient with module and tensor
    hooks that write into Python objects outside the graph, which a compiled graph cannot do;
    say so, rather than let the compiler fail on the hook's side effect."""
    if compiling():
        raise RuntimeError("DecaySGD(factored=True) cannot run inside torch.compile: its factors "
                           "are captured by module and tensor hooks outside the graph; compile "
                           "the model alone and call step() eagerly, or use factored=False")
