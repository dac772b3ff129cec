"""What the optimizer does differently while torch.compile traces it."""
from __future__ import annotations

from ..execution import compiling


def refuse_factored_under_compile() -> None:
    """The factored mode captures each layer's input and output gradient with module and tensor
    hooks that write into Python objects outside the graph, which a compiled graph cannot do;
    say so, rather than let the compiler fail on the hook's side effect."""
    if compiling():
        raise RuntimeError("DecaySGD(factored=True) cannot run inside torch.compile: its factors "
                           "are captured by module and tensor hooks outside the graph; compile "
                           "the model alone and call step() eagerly, or use factored=False")
