"""The spectra benchmarks' matrix sets and contenders, shared by the pytest-benchmark suite and the
report.

Matrix sets (the weight matrices of real models, matricized as in DESIGN.md section 2: Linear
(out, in) as is, conv (c_out, c_in, kh, kw) -> (c_out, c_in*kh*kw)):

* ``resnet18_cifar``: the 21 weight matrices of the CIFAR ResNet-18 of ``param_sets.py``: the 20
  convolutions (3x3 stem, the 16 3x3 convs of the 8 basic blocks, the three 1x1 shortcut convs of
  stages 2-4) and the 512 -> 10 classifier. Twenty of them are the "conv" matrices; the classifier
  is kept because a rank tracker watches it too (it is a separate 10 x 512 shape group and costs
  little). 12 distinct shapes, 11.16M weights.
* ``transformer_d768``: the 48 matrices of a 12-layer, 768-wide Transformer (GPT-2 small's blocks):
  per layer the fused attention in_proj (2304 x 768), the attention out_proj (768 x 768) and the
  MLP's fc1 (3072 x 768) and fc2 (768 x 3072). Embeddings are left out (they are not what the
  papers track, and 50257 x 768 would dominate every timing). 3 shape groups after transposition
  (fc1 and fc2 share one), 84.9M weights. On a GPU only.
* ``transformer_d768_reduced``: its first 5 layers, 20 matrices with the same shapes: what the CPU
  runs instead (the full set takes seconds per call there); per-layer costs are the same, so times
  scale by 12/5.

Weights are "trained-like", not Gaussian: each W = U diag(s) V^T with random orthonormal U, V and
a spectrum that decays like a power law, s_i ~ i^-0.5, then collapses past a per-layer cut-off c
(factor exp(-(i/c)^2 / 2): the rank loss that SGD with weight decay causes, Galanti et al., "SGD
and Weight Decay Secretly Minimize the Rank of Your Neural Network"), over a noise floor at 1e-5
of s_1. The cut-off c = min(m, n) * 2^u, u uniform in [-6, -2.5], so the eps = 1e-3 threshold
ranks spread from a few to a few hundred, on both sides of k = 64. Built in float64 from a seeded
generator on the CPU, stored as float32 on the benchmark device: every run sees the same matrices.

Contenders, each timed end to end from the list of float32 matrices to the values of every
measure of ``lowrank_kernels.spectral.MEASURES`` (the baselines' singular values go through the
same measure code, via a ``Spectra`` built from them):

* ``ours_exact``: ``singular_values(method="exact")`` (float64 Gram matrix + eigvalsh per shape
  group) and ``all_measures``;
* ``ours_randomized``: ``method="randomized", k=64`` (oversample 16, 2 power iterations);
* ``ours_adaptive``: the same with ``adaptive=True`` (k doubles until s_k / ||W||_F < eps);
* ``svdvals_loop``: ``torch.linalg.svdvals`` per matrix, what research code does (anchor);
* ``svdvals_batched``: ``torch.linalg.svdvals`` on one stack per shape group (tall matrices
  transposed), the stacking included;
* ``svd_lowrank_q64``: ``torch.svd_lowrank(W, q=64, niter=2)`` per matrix (anchor of the
  randomized tier), plus ``torch.linalg.matrix_norm(W)`` for the measures;
* ``svd_lowrank_q80``: the same with q=80, the top 64 kept: the sketch width of ours (k + 16),
  for a comparison at equal accuracy;
* ``cupy_svd_loop``: ``cupy.linalg.svd(W, compute_uv=False)`` per matrix, GPU only.

Accuracy against float64 LAPACK (``torch.linalg.svdvals`` on the CPU of the float32 matrices cast
to float64, gesdd: bidiagonalisation, nothing shared with ours):
the largest relative error of s_i over the top 64 values (i <= min(64, r)) that lie above
eps * ||W||_F (the values a threshold rank counts; the noise floor below is excluded), and the
number of matrices whose ``threshold_rank(eps=1e-3)`` equals the reference's.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

import param_sets
from runner import DeviceSets

from lowrank_kernels.spectral import MEASURES, Spectra, all_measures, singular_values

K = 64                      # top-k of the randomized tier and of the accuracy column
OVERSAMPLE = 16             # ours: sketch width k + 16
POWER_ITERS = 2             # ours and torch.svd_lowrank (niter)
EPS = 1e-3                  # threshold_rank's eps
SEED = 0

Shape = tuple[int, int]


# ----------------------------------------------------------------------------------------------
# Matrix sets
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MatrixSet:
    name: str
    description: str
    shapes: tuple[tuple[str, Shape], ...]    # (layer name, matricized (out, in) shape)

    @property
    def n_matrices(self) -> int:
        return len(self.shapes)

    @property
    def n_weights(self) -> int:
        return sum(m * n for _, (m, n) in self.shapes)

    @property
    def n_shape_groups(self) -> int:
        return len({tuple(sorted(shape)) for _, shape in self.shapes})


def resnet18_cifar() -> MatrixSet:
    """The 20 convolutions and the classifier of the CIFAR ResNet-18 (21 matrices)."""
    shapes = []
    for name, shape in param_sets.resnet18_cifar_shapes():
        if len(shape) == 4:                                    # conv: (c_out, c_in*kh*kw)
            shapes.append((name, (shape[0], math.prod(shape[1:]))))
        elif len(shape) == 2:                                  # the classifier
            shapes.append((name, tuple(shape)))
    assert len(shapes) == 21  # 20 convs + fc
    return MatrixSet("resnet18_cifar", "CIFAR ResNet-18: 20 convs + fc", tuple(shapes))


def transformer(name: str, n_layers: int, d_model: int = 768) -> MatrixSet:
    """Attention in_proj, out_proj, MLP fc1 and fc2 of each of ``n_layers`` blocks."""
    shapes = [(layer, tuple(shape)) for layer, shape in
              param_sets.gpt2_shapes(n_layers=n_layers, d_model=d_model)
              if len(shape) == 2 and (".attn." in layer or ".mlp." in layer)]
    assert len(shapes) == 4 * n_layers
    what = f"{n_layers}-layer Transformer, d={d_model}: in_proj, out_proj, fc1, fc2"
    return MatrixSet(name, what, tuple(shapes))


def transformer_d768() -> MatrixSet:
    return transformer("transformer_d768", 12)


def transformer_d768_reduced() -> MatrixSet:
    return transformer("transformer_d768_reduced", 5)


ALL_MATRIX_SETS: dict[str, Callable[[], MatrixSet]] = {
    "resnet18_cifar": resnet18_cifar,
    "transformer_d768": transformer_d768,
    "transformer_d768_reduced": transformer_d768_reduced,
}


# Benchmarked on a device: ResNet-18 everywhere, the full Transformer on a GPU, its first 5 layers
# elsewhere.
MATRIX_SETS = DeviceSets("matrix set", ALL_MATRIX_SETS,
                         cpu_stand_ins={"transformer_d768": "transformer_d768_reduced"})


def trained_like_spectrum(r: int, generator: torch.Generator) -> torch.Tensor:
    """r descending singular values: power-law bulk, a collapse past a random cut-off, a floor."""
    i = torch.arange(1, r + 1, dtype=torch.float64)
    u = float(torch.empty((), dtype=torch.float64).uniform_(-6.0, -2.5, generator=generator))
    cutoff = max(r * 2.0 ** u, 1.0)
    floor = 1e-5 * (1.0 + 0.5 * torch.rand(r, generator=generator, dtype=torch.float64))
    s = i.pow(-0.5) * torch.exp(-0.5 * (i / cutoff) ** 2) + floor.sort(descending=True).values
    return s


@functools.lru_cache(maxsize=4)
def _host_matrices(name: str, seed: int) -> tuple[torch.Tensor, ...]:
    """The set's float32 matrices on the CPU (cached: building the orthonormal factors takes a
    few seconds for the Transformer)."""
    out = []
    for index, (_, (m, n)) in enumerate(ALL_MATRIX_SETS[name]().shapes):
        gen = torch.Generator().manual_seed(seed * 100_003 + index)
        r = min(m, n)
        s = trained_like_spectrum(r, gen)
        left = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64)).Q
        right = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64)).Q
        w = (left * s) @ right.T
        w *= 0.02 * math.sqrt(m * n) / float(s.norm())      # entries of std ~0.02, like trained nets
        out.append(w.to(torch.float32))
    return tuple(out)


def materialize(matrix_set: MatrixSet, device: torch.device | str, seed: int = SEED) -> list[torch.Tensor]:
    """The set's trained-like float32 matrices on ``device`` (the same on every device)."""
    return [w.to(device) for w in _host_matrices(matrix_set.name, seed)]


@functools.lru_cache(maxsize=4)
def _reference(name: str, seed: int) -> tuple[np.ndarray, ...]:
    # torch's CPU LAPACK (gesdd), not numpy's: numpy's OpenBLAS threads keep spinning after a
    # call and would slow the torch contenders timed next in the same process.
    return tuple(torch.linalg.svdvals(w.double()).numpy() for w in _host_matrices(name, seed))


def reference_values(matrix_set: MatrixSet, seed: int = SEED) -> list[np.ndarray]:
    """float64 LAPACK singular values (``torch.linalg.svdvals`` on the CPU, an SVD algorithm
    unrelated to ours) of the set's float32 matrices, descending."""
    return list(_reference(matrix_set.name, seed))


# ----------------------------------------------------------------------------------------------
# Contenders
# ----------------------------------------------------------------------------------------------
# The report's --headline rows: on the ResNet-18 set, ours exact and randomized against the
# svdvals loop and svd_lowrank (q = 64, and q = 80 for the comparison at equal accuracy).
HEADLINE = frozenset(("resnet18_cifar", key) for key in
                     ("ours_exact", "ours_randomized", "svdvals_loop", "svd_lowrank_q64",
                      "svd_lowrank_q80"))
Result = tuple[Spectra, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Contender:
    key: str                                   # pytest id / JSON key
    label: str                                 # table label
    tier: str                                  # "exact" (every value) or "randomized" (top k)
    run: Callable[[list[torch.Tensor]], Result]
    gpu_only: bool = False
    needs_module: str | None = None            # an optional package the contender imports


def spectra_from_values(values: list[torch.Tensor], frobenius: list[torch.Tensor],
                        shapes: list[Shape], method: str) -> Spectra:
    """A ``Spectra`` (host float64) from a baseline's per-matrix singular values and Frobenius
    norms, with one device-to-host copy, so its measures come from the same code as ours."""
    b = len(values)
    width = max((len(s) for s in values), default=0)
    device = values[0].device if b else torch.device("cpu")
    padded = torch.zeros(b, width, dtype=torch.float64, device=device)
    for i, s in enumerate(values):
        padded[i, :len(s)] = s
    frob = torch.stack([f.to(device=device, dtype=torch.float64) for f in frobenius])
    host = torch.cat([padded.reshape(-1), frob]).cpu()
    return Spectra(values=host[:b * width].reshape(b, width), frobenius=host[b * width:],
                   rank_bound=torch.tensor([min(shape) for shape in shapes], dtype=torch.long),
                   shapes=list(shapes), method=method)


def _measures(sp: Spectra) -> Result:
    return sp, all_measures(sp, MEASURES, eps=EPS)


def _ours(**kwargs) -> Callable[[list[torch.Tensor]], Result]:
    return lambda matrices: _measures(singular_values(matrices, **kwargs))


def _svdvals_loop(matrices: list[torch.Tensor]) -> Result:
    values = [torch.linalg.svdvals(w) for w in matrices]
    return _measures(spectra_from_values(values, [s.norm() for s in values],
                                         [tuple(w.shape) for w in matrices], "exact"))


def _svdvals_batched(matrices: list[torch.Tensor]) -> Result:
    groups: dict[Shape, list[int]] = {}
    for i, w in enumerate(matrices):
        groups.setdefault(tuple(sorted(w.shape)), []).append(i)
    values: list[torch.Tensor] = [None] * len(matrices)  # type: ignore[list-item]
    for index in groups.values():
        stack = torch.stack([matrices[i] if matrices[i].shape[0] <= matrices[i].shape[1]
                             else matrices[i].T for i in index])
        for i, s in zip(index, torch.linalg.svdvals(stack)):
            values[i] = s
    return _measures(spectra_from_values(values, [s.norm() for s in values],
                                         [tuple(w.shape) for w in matrices], "exact"))


def _svd_lowrank_loop(q: int, keep: int) -> Callable[[list[torch.Tensor]], Result]:
    def run(matrices: list[torch.Tensor]) -> Result:
        values, frobs = [], []
        for w in matrices:
            _, s, _ = torch.svd_lowrank(w, q=min(q, *w.shape), niter=POWER_ITERS)
            values.append(s[:keep])
            frobs.append(torch.linalg.matrix_norm(w))
        return _measures(spectra_from_values(values, frobs, [tuple(w.shape) for w in matrices],
                                             "randomized"))
    return run


def _cupy_svd_loop(matrices: list[torch.Tensor]) -> Result:
    import cupy

    values = []
    # CuPy runs on torch's current stream, so the event timing of the report brackets its work.
    with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        for w in matrices:
            s = cupy.linalg.svd(cupy.from_dlpack(w.detach().contiguous()), compute_uv=False)
            values.append(torch.from_dlpack(s))
    return _measures(spectra_from_values(values, [s.norm() for s in values],
                                         [tuple(w.shape) for w in matrices], "exact"))


CONTENDERS = (
    Contender("ours_exact", "ours exact", "exact", _ours(method="exact")),
    Contender("ours_randomized", f"ours randomized (k={K})", "randomized",
              _ours(method="randomized", k=K, oversample=OVERSAMPLE, power_iters=POWER_ITERS,
                    eps=EPS, seed=SEED)),
    Contender("ours_adaptive", f"ours randomized adaptive (k={K}+)", "randomized",
              _ours(method="randomized", k=K, oversample=OVERSAMPLE, power_iters=POWER_ITERS,
                    adaptive=True, eps=EPS, seed=SEED)),
    Contender("svdvals_loop", "torch.linalg.svdvals loop", "exact", _svdvals_loop),
    Contender("svdvals_batched", "torch.linalg.svdvals batched per shape", "exact",
              _svdvals_batched),
    Contender("svd_lowrank_q64", f"torch.svd_lowrank loop (q={K}, niter={POWER_ITERS})",
              "randomized", _svd_lowrank_loop(K, K)),
    Contender("svd_lowrank_q80", f"torch.svd_lowrank loop (q={K + OVERSAMPLE}, top {K})",
              "randomized", _svd_lowrank_loop(K + OVERSAMPLE, K)),
    Contender("cupy_svd_loop", "cupy.linalg.svd loop", "exact", _cupy_svd_loop, gpu_only=True,
              needs_module="cupy"),
)
BY_KEY = {c.key: c for c in CONTENDERS}
SVDVALS_LOOP, SVD_LOWRANK = "svdvals_loop", "svd_lowrank_q64"


def why_skipped(contender: Contender, device: torch.device | str) -> str | None:
    """None when the contender runs on ``device``, else the reason it does not."""
    device = torch.device(device)
    if contender.gpu_only and device.type != "cuda":
        return f"{contender.label} runs on a GPU only"
    if contender.needs_module and importlib.util.find_spec(contender.needs_module) is None:
        return f"{contender.needs_module} is not installed"
    return None


# ----------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------
def accuracy(result: Result, reference: list[np.ndarray], k: int = K,
             eps: float = EPS) -> dict[str, Any]:
    """Top-k relative error (values above eps * ||W||_F) and threshold-rank agreement of one
    contender's result against the float64 reference."""
    spectra, measures = result
    worst = 0.0
    agree = 0
    ranks = measures["threshold_rank"].reshape(-1).tolist()
    for i, ref in enumerate(reference):
        fro = float(np.sqrt((ref ** 2).sum()))
        n = min(k, len(ref))
        top = ref[:n]
        counted = top > eps * fro
        if counted.any():
            got = spectra.values[i, :n].numpy()
            worst = max(worst, float((np.abs(got - top)[counted] / top[counted]).max()))
        agree += int(ranks[i] == int((ref > eps * fro).sum()))
    return {"topk_rel_err": worst, "rank_agree": agree, "n_matrices": len(reference),
            "rank_agree_str": f"{agree}/{len(reference)}"}


