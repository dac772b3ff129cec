"""The rank mechanism of SGD with weight decay, simulated on one matrix at kernel speed.

One weight matrix under mini-batch SGD with L2 weight decay (DESIGN.md section 1):

    W[t+1] = (1 - 2*mu*lam) * W[t] - mu * G[t],      G[t] = (1/B) * sum_{k < B*R} delta_k f_k^T

``lam`` is the papers' weight decay: the loss carries ``lam * ||W||_F^2``, so the shrink per step is
``1 - 2*mu*lam`` and PyTorch's ``weight_decay`` is ``2*lam``. G is scaled like the gradient of a
mean loss over a batch of B examples, each contributing R outer products (R = 1 for a Linear
layer, the number of output positions for a convolution, the number of tokens for an attention
projection), so rank(G) <= B*R. Every step is one call of the fused op
``decay_outer_(W, D, F, 1 - 2*mu*lam, -mu/B)`` with D (B*R, m) holding the delta_k and F (B*R, n)
the f_k.

Unrolling the recursion, an update made ``a`` steps ago is weighted by (1 - 2*mu*lam)^a, so W is a
sliding window of recent low-rank updates and its eps-rank is bounded by about
``B * R * log(1/eps) / (mu*lam)`` (Galanti, Siegel, Gupte and Poggio, "SGD and Weight Decay Secretly
Minimize the Rank of Your Neural Network"). ``predict`` returns that window and bound together with
the exact number of steps until an update's weight falls below eps,
``log(1/eps) / -log(1 - 2*mu*lam)``, which is about half the papers' window: the bound is an upper
bound, and the measured ranks sit below it.

Random stream (reproducible, and what the tests replay): one ``torch.Generator`` on the
simulation's device, seeded with ``seed``, draws in this order: W[0] (``init="gaussian"``), the
subspace bases (``gradient="fixed-basis"``), then for each chunk of ``c`` steps
``randn((c, K, m))`` and ``randn((c, K, n))`` in float32 (K = B*R), step j of the chunk taking row j.
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .ops.decay_outer import DTYPES, _launch, check_inputs, choose_backend, decay_outer_
from .spectral import all_measures, singular_values

GRADIENTS = ("gaussian", "fixed-basis")
INITS = ("zero", "gaussian")
RECORDED_MEASURES = ("threshold_rank", "effective_rank", "stable_rank")
# Memory the simulation may hold at once for the random factors of a chunk and for the W snapshots
# waiting for one batched spectral computation.
_FACTOR_BUDGET = {"cuda": 256 << 20, "cpu": 32 << 20}
_SNAPSHOT_BUDGET = {"cuda": 2 << 30, "cpu": 256 << 20}
_MAX_SNAPSHOT_BATCH = 256


# ----------------------------------------------------------------------------------------------
# The theory's prediction
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankPrediction:
    """What the theory says about the eps-rank of W (see the module docstring).

    decay: the shrink per step, 1 - 2*mu*lam.
    window: the papers' memory window log(1/eps) / (mu*lam) (inf without weight decay).
    exact_window: steps until an update's weight (1 - 2*mu*lam)^age falls below eps,
        log(1/eps) / -log(1 - 2*mu*lam); about window / 2.
    bound: min(m, n, B*R*window), the papers' bound on the steady-state eps-rank.
    hard_cap: min(m, n, rank(W[0]) + steps*B*R), what the exact rank can never exceed after
        ``steps`` steps (None when steps is not given).
    """

    decay: float
    window: float
    exact_window: float
    bound: float
    hard_cap: int | None


def _check_integer(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_real(name: str, value, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if not positive and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_decay(lr: float, weight_decay_lam: float) -> float:
    """Return the shrink factor 1 - 2*lr*lam, refusing settings where it is not positive.

    At 1 - 2*mu*lam <= 0 every step flips the sign of W (or zeroes it): the recursion no longer
    describes weight decay and the sliding-window picture breaks down.
    """
    decay = 1.0 - 2.0 * lr * weight_decay_lam
    if decay <= 0:
        raise ValueError(
            f"the shrink factor 1 - 2*mu*lam = 1 - 2*{lr:g}*{weight_decay_lam:g} = {decay:.4g} is "
            "not positive: each step would flip the sign of W rather than shrink it; keep "
            f"mu*lam < 0.5 (lam here is the papers' lam, PyTorch's weight_decay / 2)")
    return decay


def _check_eps(eps) -> float:
    eps = _check_real("eps", eps, positive=True)
    if eps >= 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    return eps


def predict(m: int, n: int, batch_size: int, lr: float, weight_decay_lam: float, *,
            eps: float = 1e-3, R: int = 1, steps: int | None = None,
            initial_rank: int = 0) -> RankPrediction:
    """The theory's window and rank bound for an (m, n) matrix (see ``RankPrediction``)."""
    m, n = _check_integer("m", m, 1), _check_integer("n", n, 1)
    batch_size, R = _check_integer("batch_size", batch_size, 1), _check_integer("R", R, 1)
    lr = _check_real("lr", lr, positive=True)
    lam = _check_real("weight_decay_lam", weight_decay_lam, positive=False)
    eps = _check_eps(eps)
    decay = check_decay(lr, lam)
    if lam == 0:
        window = exact_window = math.inf
    else:
        window = math.log(1 / eps) / (lr * lam)
        exact_window = math.log(1 / eps) / -math.log(decay)
    bound = float(min(m, n, batch_size * R * window))
    hard_cap = None
    if steps is not None:
        steps = _check_integer("steps", steps, 0)
        hard_cap = int(min(m, n, initial_rank + steps * batch_size * R))
    return RankPrediction(decay=decay, window=window, exact_window=exact_window, bound=bound,
                          hard_cap=hard_cap)


# ----------------------------------------------------------------------------------------------
# Where the per-step factors come from
# ----------------------------------------------------------------------------------------------
class GaussianFactors:
    """delta_k ~ N(0, I_m), f_k ~ N(0, I_n), independent across k and steps: the isotropic model
    of the papers' argument, where K = B*R fresh directions arrive every step."""

    def __init__(self, m: int, n: int, rows: int, generator: torch.Generator, dtype: torch.dtype):
        self.m, self.n, self.rows = m, n, rows
        self.generator, self.dtype = generator, dtype

    def draw(self, count: int) -> tuple[Tensor, Tensor]:
        """(count, K, m) and (count, K, n) factors for ``count`` consecutive steps."""
        device = self.generator.device
        D = torch.randn((count, self.rows, self.m), generator=self.generator, device=device)
        F = torch.randn((count, self.rows, self.n), generator=self.generator, device=device)
        return D.to(self.dtype), F.to(self.dtype)


class FixedBasisFactors(GaussianFactors):
    """delta_k and f_k drawn from fixed ``basis_dim``-dimensional subspaces (orthonormal bases
    drawn once, Gaussian coefficients every step, scaled by sqrt(m / basis_dim) and
    sqrt(n / basis_dim) so the factor norms match the Gaussian model). Every update then lies in
    the same small subspace, as when a layer's gradients stay aligned with a few directions, and
    rank(W) <= rank(W[0]) + basis_dim however long the window."""

    def __init__(self, m: int, n: int, rows: int, generator: torch.Generator, dtype: torch.dtype,
                 basis_dim: int):
        super().__init__(m, n, rows, generator, dtype)
        device = generator.device
        self.basis_dim = basis_dim
        left = torch.randn((m, basis_dim), generator=generator, device=device, dtype=torch.float64)
        right = torch.randn((n, basis_dim), generator=generator, device=device, dtype=torch.float64)
        self.left = (torch.linalg.qr(left).Q.T * math.sqrt(m / basis_dim)).float()
        self.right = (torch.linalg.qr(right).Q.T * math.sqrt(n / basis_dim)).float()

    def draw(self, count: int) -> tuple[Tensor, Tensor]:
        device = self.generator.device
        a = torch.randn((count, self.rows, self.basis_dim), generator=self.generator, device=device)
        b = torch.randn((count, self.rows, self.basis_dim), generator=self.generator, device=device)
        return (a @ self.left).to(self.dtype), (b @ self.right).to(self.dtype)


def _check_returned(name: str, t, shape: tuple[int, int], device: torch.device, step: int) -> None:
    where = f"gradient callable at step {step}"
    if not isinstance(t, Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{where}: {name} must be a dense tensor, got layout {t.layout}")
    if t.is_complex() or not t.is_floating_point():
        raise TypeError(f"{where}: {name} must be real floating point, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, expected {shape}")
    if t.device != device:
        raise ValueError(f"{where}: {name} is on {t.device}, the simulation runs on {device}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{where}: {name} contains NaN or Inf")


class CallableGradient:
    """A user function ``fn(step, generator)`` returning the step's factors ``(D, F)``, D (K, m),
    F (K, n), 1 <= K <= B*R (the update is -mu/B * D^T F, as for the built-in models), or the
    gradient G (m, n) itself (the update is -mu * G; the bound then assumes rank(G) <= B*R).
    Returned tensors must be on the simulation's device; they are cast to its dtype and checked
    for NaN/Inf every step (one host synchronisation per step: this path runs at Python speed)."""

    def __init__(self, fn: Callable, m: int, n: int, max_rows: int, device: torch.device,
                 dtype: torch.dtype, generator: torch.Generator):
        self.fn, self.m, self.n, self.max_rows = fn, m, n, max_rows
        self.device, self.dtype, self.generator = device, dtype, generator

    def __call__(self, step: int) -> Tensor | tuple[Tensor, Tensor]:
        """The step's dense G (m, n), or its factors (D, F)."""
        out = self.fn(step, self.generator)
        if isinstance(out, Tensor):
            _check_returned("G", out, (self.m, self.n), self.device, step)
            return out.to(self.dtype)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(f"gradient callable at step {step} must return (D, F) or a tensor G, "
                            f"got {type(out).__name__}")
        D, F = out
        rows = D.shape[0] if isinstance(D, Tensor) and D.dim() == 2 else -1
        if rows < 1 or rows > self.max_rows:
            shape = tuple(D.shape) if isinstance(D, Tensor) else type(D).__name__
            raise ValueError(f"gradient callable at step {step}: D must be (K, m) = (K, {self.m}) "
                             f"with 1 <= K <= batch_size*R = {self.max_rows}, got {shape}")
        _check_returned("D", D, (rows, self.m), self.device, step)
        _check_returned("F", F, (rows, self.n), self.device, step)
        return D.to(self.dtype).contiguous(), F.to(self.dtype).contiguous()


# ----------------------------------------------------------------------------------------------
# Spectra of the recorded snapshots
# ----------------------------------------------------------------------------------------------
def measure_snapshots(stack: Tensor, eps: float) -> dict[str, Tensor]:
    """Singular values (b, min(m, n)), Frobenius norms (b,) and the recorded measures (b,) of a
    (b, m, n) stack, from one batched exact spectral computation (float64)."""
    spectra = singular_values(stack, method="exact")
    out = all_measures(spectra, RECORDED_MEASURES, eps=eps)
    out["singular_values"] = spectra.values
    out["frobenius"] = spectra.frobenius
    return out


# ----------------------------------------------------------------------------------------------
# The result
# ----------------------------------------------------------------------------------------------
@dataclass(repr=False)
class SimulationResult:
    """What ``simulate`` recorded.

    steps: (records,) the step t of each record (W[t], after t updates; 0 is W[0]).
    threshold_rank, effective_rank, stable_rank: (records,) the measures of W at those steps
        (DESIGN.md section 2; threshold rank at the simulation's eps).
    singular_values: (records, min(m, n)) float64, descending.
    W: the final W[steps] (on the simulation's device, in its dtype).
    window, exact_window, bound, hard_cap, decay: the theory's prediction (``RankPrediction``).
    config: the arguments of the run. timing: seconds spent in total, updating and recording.
    """

    steps: Tensor
    threshold_rank: Tensor
    effective_rank: Tensor
    stable_rank: Tensor
    singular_values: Tensor
    W: Tensor
    window: float
    exact_window: float
    bound: float
    hard_cap: int
    decay: float
    config: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)

    def steady_state_rank(self, measure: str = "threshold_rank", fraction: float = 0.25) -> float:
        """Mean of ``measure`` over the last ``fraction`` of the records (at least one)."""
        if measure not in RECORDED_MEASURES:
            raise ValueError(f"measure must be one of {RECORDED_MEASURES}, got {measure!r}")
        if not (0 < fraction <= 1):
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        values = getattr(self, measure)
        count = max(1, math.ceil(fraction * len(values)))
        return float(values[-count:].double().mean())

    def summary(self) -> str:
        c = self.config
        window = "inf" if math.isinf(self.window) else f"{self.window:.1f}"
        return (f"W {c['m']}x{c['n']}, B={c['batch_size']}, R={c['R']}, mu={c['lr']:g}, "
                f"lam={c['weight_decay_lam']:g}, eps={c['eps']:g}, {c['steps']} steps: "
                f"final threshold rank {int(self.threshold_rank[-1])}, effective rank "
                f"{float(self.effective_rank[-1]):.2f}, stable rank {float(self.stable_rank[-1]):.2f}; "
                f"steady-state threshold rank {self.steady_state_rank():.1f} vs bound "
                f"{self.bound:.1f} (window {window} steps, decay {self.decay:.4g})")

    def __repr__(self) -> str:
        return f"SimulationResult({len(self.steps)} records; {self.summary()})"


# ----------------------------------------------------------------------------------------------
# The simulation
# ----------------------------------------------------------------------------------------------
def _resolve_device(device, W0) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(W0, Tensor):
        return W0.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _initial_matrix(W0, m, n, dtype, device, generator) -> tuple[Tensor, int]:
    """W[0] as a fresh contiguous tensor, and an upper bound on its rank."""
    if isinstance(W0, str):
        if W0 == "zero":
            return torch.zeros((m, n), dtype=dtype, device=device), 0
        if W0 == "gaussian":
            # Entries N(0, 1/n): PyTorch's default Linear scale up to a constant.
            w = torch.randn((m, n), generator=generator, device=device) / math.sqrt(n)
            return w.to(dtype).contiguous(), min(m, n)
        raise ValueError(f"init must be one of {INITS} or a tensor (m, n), got {W0!r}")
    if not isinstance(W0, Tensor):
        raise TypeError(f"init must be one of {INITS} or a tensor, got {type(W0).__name__}")
    if W0.layout != torch.strided:
        raise TypeError(f"init tensor must be dense, got layout {W0.layout}")
    if W0.is_complex() or not W0.is_floating_point():
        raise TypeError(f"init tensor must be real floating point, got {W0.dtype}")
    if tuple(W0.shape) != (m, n):
        raise ValueError(f"init tensor has shape {tuple(W0.shape)}, expected (m, n) = {(m, n)}")
    if not bool(torch.isfinite(W0).all()):
        raise ValueError("init tensor contains NaN or Inf")
    w = W0.detach().to(device=device, dtype=dtype).clone(memory_format=torch.contiguous_format)
    # The hard cap takes a non-zero W[0] as full rank (an upper bound; no SVD needed).
    return w, (min(m, n) if bool(w.any()) else 0)


def _auto_chunk(steps: int, rows: int, m: int, n: int, device: torch.device) -> int:
    per_step = rows * (m + n) * 4
    budget = _FACTOR_BUDGET["cuda" if device.type == "cuda" else "cpu"]
    return max(1, min(steps, budget // per_step))


def _auto_snapshot_batch(m: int, n: int, element_size: int, device: torch.device) -> int:
    # A snapshot, its float64 copy and the float64 Gram matrix of its short side.
    per_snapshot = m * n * (element_size + 8) + 2 * 8 * min(m, n) ** 2
    budget = _SNAPSHOT_BUDGET["cuda" if device.type == "cuda" else "cpu"]
    return max(1, min(_MAX_SNAPSHOT_BATCH, budget // per_snapshot))


def simulate(m: int, n: int, batch_size: int, lr: float, weight_decay_lam: float, steps: int, *,
             eps: float = 1e-3, R: int = 1, gradient: str | Callable = "gaussian",
             init: str | Tensor = "zero", seed: int = 0, device=None,
             record_every: int | None = None, record_start: int = 0,
             dtype: torch.dtype = torch.float32,
             basis_dim: int | None = None, chunk_steps: int | None = None,
             backend: str | None = "auto") -> SimulationResult:
    """Run ``W[t+1] = (1 - 2*lr*lam) W[t] - lr * G[t]`` for ``steps`` steps and record its spectrum.

    m, n: the shape of W. batch_size (B), R: G[t] = (1/B) * D^T F has K = B*R rank-one terms.
    lr (mu), weight_decay_lam (lam, the papers' lam = PyTorch's weight_decay / 2): the shrink per
    step is 1 - 2*lr*lam, which must be positive.
    gradient: "gaussian" (fresh N(0, I) factors every step), "fixed-basis" (factors in fixed
    ``basis_dim``-dimensional subspaces, default min(m, n) // 4; see ``FixedBasisFactors``) or a
    callable ``fn(step, generator) -> (D, F) or G`` (see ``CallableGradient``).
    init: W[0]: "zero", "gaussian" (entries N(0, 1/n)) or a tensor (m, n) (copied, never modified).
    record_every, record_start: record W[t] for the multiples t of record_every from record_start
    on, and the last step (default: every step up to 256 steps, else about 256 records in all);
    a later record_start skips the transient when only the steady state matters.
    device: default init's device when init is a tensor, else CUDA when available, else CPU.
    dtype: float32 or bfloat16 (the fused op's dtypes). chunk_steps: how many steps' factors are
    drawn at once (default: what fits in a few hundred MB). backend: the fused op's backend.

    Returns a ``SimulationResult``: the recorded measures and singular values, the final W and the
    theory's prediction (window, bound, hard cap).
    """
    m, n = _check_integer("m", m, 1), _check_integer("n", n, 1)
    batch_size, R = _check_integer("batch_size", batch_size, 1), _check_integer("R", R, 1)
    steps = _check_integer("steps", steps, 0)
    seed = _check_integer("seed", seed, 0)
    lr = _check_real("lr", lr, positive=True)
    lam = _check_real("weight_decay_lam", weight_decay_lam, positive=False)
    eps = _check_eps(eps)
    decay = check_decay(lr, lam)
    if record_every is None:
        record_every = max(1, math.ceil(steps / 256))
    record_every = _check_integer("record_every", record_every, 1)
    record_start = _check_integer("record_start", record_start, 0)
    if record_start > steps:
        raise ValueError(f"record_start = {record_start} is after the last step ({steps})")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16 (the fused op's dtypes), "
                         f"got {dtype}")
    if chunk_steps is not None:
        chunk_steps = _check_integer("chunk_steps", chunk_steps, 1)
    if not (callable(gradient) or (isinstance(gradient, str) and gradient in GRADIENTS)):
        raise ValueError(f"gradient must be one of {GRADIENTS} or a callable, got {gradient!r}")
    if basis_dim is not None:
        if gradient != "fixed-basis":
            raise ValueError("basis_dim applies to gradient='fixed-basis' only")
        basis_dim = _check_integer("basis_dim", basis_dim, 1)
        if basis_dim > min(m, n):
            raise ValueError(f"basis_dim = {basis_dim} exceeds min(m, n) = {min(m, n)}")
    device = _resolve_device(device, init)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available")

    rows = batch_size * R
    generator = torch.Generator(device=device).manual_seed(seed)
    W, initial_rank = _initial_matrix(init, m, n, dtype, device, generator)
    prediction = predict(m, n, batch_size, lr, lam, eps=eps, R=R, steps=steps,
                         initial_rank=initial_rank)
    alpha = -lr / batch_size
    if callable(gradient):
        source = CallableGradient(gradient, m, n, rows, device, dtype, generator)
    elif gradient == "fixed-basis":
        dim = basis_dim if basis_dim is not None else max(1, min(m, n) // 4)
        basis_dim = dim
        source = FixedBasisFactors(m, n, rows, generator, dtype, dim)
    else:
        source = GaussianFactors(m, n, rows, generator, dtype)
    chunk = chunk_steps or _auto_chunk(steps, rows, m, n, device)
    snapshot_batch = _auto_snapshot_batch(m, n, W.element_size(), device)

    recorded_steps: list[int] = []
    snapshots: list[Tensor] = []
    parts: dict[str, list[Tensor]] = {name: [] for name in (*RECORDED_MEASURES, "singular_values")}
    record_seconds = 0.0

    def flush() -> None:
        nonlocal record_seconds
        if not snapshots:
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # queued updates are not charged to the recording
        t0 = time.perf_counter()
        first = recorded_steps[len(recorded_steps) - len(snapshots)]
        try:
            measured = measure_snapshots(torch.stack(snapshots), eps)
        except ValueError as exc:
            raise ValueError(f"the spectrum of W between steps {first} and {recorded_steps[-1]} "
                             f"could not be computed: {exc}") from exc
        for name, part in parts.items():
            part.append(measured[name].cpu())
        snapshots.clear()
        record_seconds += time.perf_counter() - t0

    def record(t: int) -> None:
        recorded_steps.append(t)
        snapshots.append(W.clone())
        if len(snapshots) >= snapshot_batch:
            flush()

    start = time.perf_counter()
    with torch.no_grad():
        if record_start == 0:
            record(0)
        t = 0
        drawn_backend = None  # chosen once the first drawn factors pass decay_outer_'s checks
        while t < steps:
            count = min(chunk, steps - t)
            factors = None if callable(gradient) else source.draw(count)
            if factors is not None and drawn_backend is None:
                # Every draw has the same shapes, dtype and device, in fresh memory: one check
                # covers the whole run, and the loop launches without per-step checks.
                check_inputs(W, factors[0][0], factors[1][0], decay, alpha)
                drawn_backend = choose_backend(W, backend)
                decay, alpha = float(decay), float(alpha)
            for j in range(count):
                if factors is not None:
                    _launch(drawn_backend, W, factors[0][j], factors[1][j], decay, alpha)
                else:
                    update = source(t)
                    if isinstance(update, Tensor):  # a dense G: two passes over W
                        W.mul_(decay).add_(update, alpha=-lr)
                    else:
                        decay_outer_(W, *update, decay, alpha, backend=backend)
                t += 1
                if (t % record_every == 0 and t >= record_start) or t == steps:
                    record(t)
        flush()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start

    config = dict(m=m, n=n, batch_size=batch_size, lr=lr, weight_decay_lam=lam, steps=steps,
                  eps=eps, R=R, gradient=gradient if isinstance(gradient, str) else "callable",
                  init=init if isinstance(init, str) else "tensor", seed=seed, device=str(device),
                  record_every=record_every, record_start=record_start,
                  dtype=str(dtype).replace("torch.", ""), basis_dim=basis_dim, chunk_steps=chunk, backend=backend)
    return SimulationResult(
        steps=torch.tensor(recorded_steps, dtype=torch.long),
        threshold_rank=torch.cat(parts["threshold_rank"]),
        effective_rank=torch.cat(parts["effective_rank"]),
        stable_rank=torch.cat(parts["stable_rank"]),
        singular_values=torch.cat(parts["singular_values"]),
        W=W, window=prediction.window, exact_window=prediction.exact_window,
        bound=prediction.bound, hard_cap=prediction.hard_cap, decay=decay, config=config,
        timing={"total_s": elapsed, "record_s": record_seconds,
                "update_s": max(0.0, elapsed - record_seconds)})


# ----------------------------------------------------------------------------------------------
# Sweeps: steady-state rank against the bound
# ----------------------------------------------------------------------------------------------
SWEEP_COLUMNS = (
    ("batch_size", "B", "d"), ("lr", "mu", "g"), ("weight_decay_lam", "lam", "g"),
    ("decay", "1-2*mu*lam", ".4f"), ("window", "window log(1/eps)/(mu*lam)", ".1f"),
    ("bound", "bound min(m,n,B*R*window)", ".1f"), ("steps", "steps", "d"),
    ("threshold_rank", "steady threshold rank", ".1f"), ("effective_rank", "steady eff. rank", ".2f"),
    ("stable_rank", "steady stable rank", ".2f"), ("fraction_of_bound", "threshold / bound", ".2f"),
)


def _sweep_steps(exact_window: float, settle: float, min_steps: int, max_steps: int) -> int:
    if math.isinf(exact_window):
        return max_steps
    return int(min(max_steps, max(min_steps, math.ceil(settle * exact_window))))


def sweep(batch_sizes: Sequence[int], lrs: Sequence[float], weight_decay_lams: Sequence[float], *,
          m: int = 128, n: int | None = None, R: int = 1, eps: float = 1e-3,
          steps: int | None = None, settle: float = 3.0, min_steps: int = 100,
          max_steps: int = 5000, records: int = 32, fraction: float = 0.25,
          gradient: str | Callable = "gaussian", seed: int = 0, device=None,
          dtype: torch.dtype = torch.float32, backend: str | None = "auto") -> list[dict[str, Any]]:
    """Simulate every (B, mu, lam) of the grid and tabulate the steady-state rank against the bound.

    Each run lasts ``steps`` steps, or by default ``settle`` times the exact window (clamped to
    [min_steps, max_steps]; runs without weight decay take max_steps), records about ``records``
    snapshots in its last ``fraction`` of steps only and averages the measures over them. Every run
    uses the same seed. Settings with 1 - 2*mu*lam <= 0 are refused before anything runs.
    From W[0] = 0 the ranks depend on mu and lam only through mu*lam (mu alone scales W), so grid
    points with equal mu*lam and B give equal ranks.
    Returns one row (dict) per setting; ``format_sweep_table`` and ``plot_sweep`` present them.
    """
    n = m if n is None else n
    grid = [(b, mu, lam) for b in batch_sizes for mu in lrs for lam in weight_decay_lams]
    if not grid:
        raise ValueError("the grid is empty: give at least one batch size, lr and weight decay")
    _check_integer("records", records, 1)
    if not (0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    predictions = []
    for b, mu, lam in grid:
        try:
            predictions.append(predict(m, n, b, mu, lam, eps=eps, R=R))
        except ValueError as exc:
            raise ValueError(f"grid point B={b}, mu={mu}, lam={lam}: {exc}") from exc
    rows = []
    for (b, mu, lam), p in zip(grid, predictions):
        run_steps = steps if steps is not None else _sweep_steps(p.exact_window, settle,
                                                                 min_steps, max_steps)
        every = max(1, math.floor(fraction * run_steps / records))
        start = math.ceil((1 - fraction) * run_steps)
        result = simulate(m, n, b, mu, lam, run_steps, eps=eps, R=R, gradient=gradient, seed=seed,
                          device=device, record_every=every, record_start=start, dtype=dtype,
                          backend=backend)
        tail = result.steps >= start
        row = dict(m=m, n=n, R=R, eps=eps, batch_size=b, lr=float(mu), weight_decay_lam=float(lam),
                   decay=p.decay, window=p.window, exact_window=p.exact_window, bound=p.bound,
                   x=b * R * p.window, steps=run_steps, records=int(tail.sum()),
                   seconds=result.timing["total_s"])
        for name in RECORDED_MEASURES:
            row[name] = float(getattr(result, name)[tail].double().mean())
        row["fraction_of_bound"] = row["threshold_rank"] / p.bound
        rows.append(row)
    return rows


def _cell(value, spec: str) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def format_sweep_table(rows: Sequence[dict[str, Any]]) -> str:
    """The sweep's rows as a markdown table (steady-state measures against the bound)."""
    header = "| " + " | ".join(h for _, h, _ in SWEEP_COLUMNS) + " |"
    rule = "| " + " | ".join("---:" for _ in SWEEP_COLUMNS) + " |"
    body = ["| " + " | ".join(_cell(r[k], spec) for k, _, spec in SWEEP_COLUMNS) + " |" for r in rows]
    return "\n".join([header, rule, *body])


def plot_sweep(rows: Sequence[dict[str, Any]], path=None, *, ax=None, title: str | None = None):
    """Measured steady-state rank against B*R*log(1/eps)/(mu*lam) on log axes, with the bound.

    Filled markers: threshold rank, hollow: effective rank, coloured by B. Lines: the papers'
    bound y = x, the exact-window estimate y = x/2 (see ``predict``), the cap min(m, n).
    Saves to ``path`` when given; returns the figure.
    """
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plot_sweep needs matplotlib: pip install matplotlib") from exc

    rows = [r for r in rows if math.isfinite(r["x"])]
    if not rows:
        raise ValueError("no rows with a finite window (weight decay > 0) to plot")
    if ax is None:
        # A bare Figure, not pyplot: nothing stays open in pyplot's registry after saving.
        fig = Figure(figsize=(6.4, 4.8), dpi=100)
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    batch_sizes = sorted({r["batch_size"] for r in rows})
    colours = matplotlib.colormaps["viridis"]
    for i, b in enumerate(batch_sizes):
        colour = colours(i / max(1, len(batch_sizes) - 1) * 0.9)
        sel = [r for r in rows if r["batch_size"] == b]
        ax.scatter([r["x"] for r in sel], [r["threshold_rank"] for r in sel], color=colour,
                   s=28, label=f"B={b}: threshold rank", zorder=3)
        ax.scatter([r["x"] for r in sel], [r["effective_rank"] for r in sel], facecolors="none",
                   edgecolors=colour, s=28, label=f"B={b}: effective rank", zorder=3)
    xs = [r["x"] for r in rows]
    lo, hi = min(xs) / 1.5, max(xs) * 1.5
    cap = min(min(r["m"], r["n"]) for r in rows)
    line_x = torch.logspace(math.log10(lo), math.log10(hi), 100).tolist()
    ax.plot(line_x, [min(x, cap) for x in line_x], "k-", lw=1.2,
            label="bound min(m, n, B·R·log(1/ε)/(μλ))")
    ax.plot(line_x, [min(x / 2, cap) for x in line_x], "k--", lw=1,
            label="exact window ≈ bound / 2")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("B·R·log(1/ε)/(μλ)")
    ax.set_ylabel("steady-state rank of W")
    eps = rows[0]["eps"]
    ax.set_title(title or f"Rank of W ({rows[0]['m']}×{rows[0]['n']}) vs the window bound, ε={eps:g}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=1)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
