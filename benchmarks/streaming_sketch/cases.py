"""The streaming sketch's benchmark cases, shared by the pytest-benchmark suite and the report.

Two measurements (``lowrank_kernels/spectral/streaming_sketch.py``), sketch width k + oversample
= 64 + 16 range columns and 5 probe columns:

* **per record**, on the trained-like matrices of the spectra benchmarks (``spectra/cases.py``:
  ResNet-18's convs and fc, the Transformer's in_proj, out_proj, fc1, fc2), the matrices whose
  short side exceeds k + oversample = 80 (the randomized tier computes the others exactly, and a
  sketch cannot hold k = 64 values of them): ResNet-18's 14 convs of stages 2-4 (its stem, stage
  1, the stage-2 shortcut and the 10 x 512 fc are left out), every Transformer matrix.
  Contenders, each from the list of float32 matrices (for the sketch: its kept Y) to every
  measure of ``MEASURES``:

  * ``randomized_q2``: ``singular_values(method="randomized", k=64, oversample=16,
    power_iters=2)``, the randomized tier as it is used (the anchor);
  * ``randomized_q0``: the same without power iterations, the sketch's accuracy class;
  * ``streaming``: ``StreamingSketch.spectra()`` on sketches kept by the optimizer (built once,
    untimed: in training they are there already);
  * ``exact``: ``singular_values(method="exact")``, also the accuracy reference.

* **per step**, one weight of a realistic layer with its K = B*R factor rows: the factored step
  of W (``factored_update_``, momentum 0: one pass over W), the sketch's update (``F @ Omega``
  and ``factored_update_`` on the (d_out, 85) sketch: what the hook adds to the step), the dense
  path's update (``G @ Omega`` and the fused SGD step on the sketch) and ``W @ Omega`` (what a
  record recomputes instead of keeping Y), and one record of that W by the randomized tier and
  by the streaming sketch, so that the notes can say after how many steps the sketch's update
  has cost what it saves at a record. Backends: the speed paths of the device (on the CPU
  torch only: Triton there is its interpreter, the CUDA kernels need a GPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from spectra import cases as spectra_cases

from lowrank_kernels import DecaySGD, fused_sgd_step_
from lowrank_kernels.backends import BACKENDS
from lowrank_kernels.optim.factored_step import factored_update_, sketch_factors
from lowrank_kernels.spectral import MEASURES, all_measures, singular_values
from lowrank_kernels.spectral.streaming_sketch import StreamingSketch

K = 64
OVERSAMPLE = 16
PROBES = 5
POWER_ITERS = 2          # the randomized tier's default
EPS = 1e-3
SEED = 0
WIDTH = K + OVERSAMPLE + PROBES
LR, WEIGHT_DECAY = 0.1, 5e-4
RECORD_EVERY = 100       # the tracking period the notes amortise a record over


# ----------------------------------------------------------------------------------------------
# Per record
# ----------------------------------------------------------------------------------------------
MATRIX_SETS = spectra_cases.MATRIX_SETS


def sketched_matrices(matrix_set, device) -> tuple[list[str], list[torch.Tensor], list]:
    """(names, float32 matrices on ``device``, float64 reference values) of the set's matrices
    whose short side exceeds k + oversample."""
    matrices = spectra_cases.materialize(matrix_set, device)
    keep = [i for i, (_, shape) in enumerate(matrix_set.shapes) if min(shape) > K + OVERSAMPLE]
    names = [matrix_set.shapes[i][0] for i in keep]
    return names, [matrices[i] for i in keep], keep


def kept_sketch(names, matrices) -> StreamingSketch:
    """A StreamingSketch of ``matrices`` (as the weights of a dense DecaySGD), its Y computed."""
    params = [nn.Parameter(w, requires_grad=False) for w in matrices]
    opt = DecaySGD(params, lr=LR)
    return StreamingSketch(opt, list(zip(names, params)), k=K, oversample=OVERSAMPLE,
                           probes=PROBES, seed=SEED)


@dataclass(frozen=True)
class RecordContender:
    key: str
    label: str
    make: Callable[[list[str], list[torch.Tensor]], Callable[[], tuple]]


def _tier(**kwargs):
    def make(names, matrices):
        def run():
            sp = singular_values(matrices, names=names, **kwargs)
            return sp, all_measures(sp, MEASURES, eps=EPS)
        return run
    return make


def _streaming(names, matrices):
    sketch = kept_sketch(names, matrices)

    def run():
        sp = sketch.spectra(eps=EPS)
        return sp, all_measures(sp, MEASURES, eps=EPS)
    return run


# The exact tier first: its first call is the accuracy reference of the others.
RECORD_CONTENDERS = (
    RecordContender("exact", "exact tier", _tier(method="exact")),
    RecordContender("randomized_q2", f"randomized tier (k={K}, q={POWER_ITERS})",
                    _tier(method="randomized", k=K, oversample=OVERSAMPLE,
                          power_iters=POWER_ITERS, seed=SEED)),
    RecordContender("randomized_q0", f"randomized tier (k={K}, q=0)",
                    _tier(method="randomized", k=K, oversample=OVERSAMPLE, power_iters=0,
                          seed=SEED)),
    RecordContender("streaming", f"streaming sketch record (k={K})", _streaming),
)
RECORD_BY_KEY = {c.key: c for c in RECORD_CONTENDERS}
RECORD_ANCHOR = "randomized_q2"


def accuracy(result: tuple, exact_values: torch.Tensor, exact_frobenius: torch.Tensor) -> dict:
    """Largest relative error of the top-k values above eps * ||W||_F against the exact tier, and
    the matrices whose threshold rank equals the exact tier's."""
    sp, measures = result
    worst, agree = 0.0, 0
    ranks = measures["threshold_rank"].reshape(-1).tolist()
    for i in range(len(sp)):
        ref = exact_values[i, :K]
        counted = ref > EPS * exact_frobenius[i]
        if bool(counted.any()):
            err = (sp.values[i, :K] - ref).abs()[counted] / ref[counted]
            worst = max(worst, float(err.max()))
        ref_rank = int((exact_values[i] > EPS * exact_frobenius[i]).sum())
        agree += int(ranks[i] == ref_rank)
    out = {"topk_rel_err": worst, "rank_agree_str": f"{agree}/{len(sp)}"}
    bound = getattr(sp, "error_bound", None)
    if bound is not None:
        out["bound_over_s1"] = float((bound / sp.values[:, 0]).max())
    return out


# ----------------------------------------------------------------------------------------------
# Per step
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layer:
    name: str
    d_out: int
    d_in: int
    rows: int            # K = B * R


def layers_for(device: torch.device) -> tuple[Layer, ...]:
    if device.type == "cuda":
        return (Layer("MLP Linear(4096, 4096), batch 32", 4096, 4096, 32),
                Layer("Transformer fc1 3072 x 768, 8 x 512 tokens", 3072, 768, 4096),
                Layer("ResNet-18 stage-3 conv 256 x 2304, batch 128 (R = 64)", 256, 2304, 8192),
                Layer("ResNet-18 stage-4 conv 512 x 4608, batch 128 (R = 16)", 512, 4608, 2048))
    return (Layer("MLP Linear(2048, 2048), batch 32", 2048, 2048, 32),
            Layer("Transformer fc1 3072 x 768, 4 x 128 tokens", 3072, 768, 512),
            Layer("ResNet-18 stage-3 conv 256 x 2304, batch 8 (R = 64)", 256, 2304, 512),
            Layer("ResNet-18 stage-4 conv 512 x 4608, batch 8 (R = 16)", 512, 4608, 128))


@dataclass(frozen=True)
class StepContender:
    key: str
    label: str
    kind: str    # "weight_step", "sketch_step", "dense_sketch", "recompute", "record_*"
    backend: str | None = None   # None: a torch-only row


STEP_CONTENDERS = (
    tuple(StepContender(f"weight_step_{b}", f"W factored step [{b}]", "weight_step", b)
          for b in BACKENDS)
    + tuple(StepContender(f"sketch_step_{b}", f"sketch update, factored [{b}]", "sketch_step", b)
            for b in BACKENDS)
    + (StepContender("dense_sketch", "sketch update, dense (G @ Omega + step)", "dense_sketch",
                     "torch"),
       StepContender("recompute", "W @ Omega (recomputed at a record)", "recompute"),
       StepContender("record_randomized", f"record of W: randomized tier (q={POWER_ITERS})",
                     "record_randomized"),
       StepContender("record_streaming", "record of W: streaming sketch", "record_streaming"))
)
STEP_BY_KEY = {c.key: c for c in STEP_CONTENDERS}


def make_step(contender: StepContender, layer: Layer, device: torch.device) -> Callable[[], None]:
    """The call timed for one (contender, layer): float32, seeded, on ``device``."""
    g = torch.Generator(device=device).manual_seed(1)
    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device) * scale
    w = randn(layer.d_out, layer.d_in, scale=0.02)
    D = randn(layer.rows, layer.d_out, scale=1e-3)
    F = randn(layer.rows, layer.d_in)
    omega = randn(layer.d_in, WIDTH)
    hyper = dict(first_step=False, lr=LR, weight_decay=WEIGHT_DECAY, momentum=0.0,
                 dampening=0.0, nesterov=False, maximize=False, decoupled_weight_decay=False,
                 backend=contender.backend)
    if contender.kind == "weight_step":
        return lambda: factored_update_(w, (D, F), None, **hyper)
    if contender.kind == "sketch_step":
        y = w @ omega
        return lambda: factored_update_(y, sketch_factors((D, F), omega), None, **hyper)
    if contender.kind == "dense_sketch":
        y, grad = w @ omega, D.T @ F
        return lambda: fused_sgd_step_([y], [torch.mm(grad, omega)], None, lr=LR,
                                       weight_decay=WEIGHT_DECAY, backend="torch")
    if contender.kind == "recompute":
        return lambda: torch.mm(w, omega)
    if contender.kind == "record_randomized":
        return lambda: singular_values([w], method="randomized", k=K, oversample=OVERSAMPLE,
                                       power_iters=POWER_ITERS, seed=SEED)
    if contender.kind == "record_streaming":
        sketch = kept_sketch(["w"], [w])
        return sketch.spectra
    raise ValueError(f"unknown contender kind {contender.kind!r}")


def step_flops(contender: StepContender, layer: Layer) -> int:
    m, n, k = layer.d_out, layer.d_in, layer.rows
    l = K + OVERSAMPLE
    return {"weight_step": 2 * m * n * k, "sketch_step": 2 * k * (n + m) * WIDTH,
            "dense_sketch": 2 * m * n * WIDTH, "recompute": 2 * m * n * WIDTH,
            # 2 + 2q products with the l-column sketch / basis; the streaming record's one
            "record_randomized": (2 + 2 * POWER_ITERS) * 2 * m * n * l,
            "record_streaming": 2 * m * n * l}[contender.kind]
