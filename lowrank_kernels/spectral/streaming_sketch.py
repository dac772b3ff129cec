"""Rank tracking from a sketch kept current at every step: a streaming randomized sketch.

Per tracked weight W (d_out x d_in; a conv weight through its (c_out, c_in*kh*kw) view) the sketch
keeps ``Y = W Omega``, Omega a fixed d_in x (l + r) Gaussian matrix drawn from a seed (l = k +
oversample columns for the range, r = ``probes`` more for the error estimate), in float32, and
updates it at every optimizer step instead of recomputing it at each record:

    sketch = StreamingSketch(opt, k=64)      # opt = DecaySGD(..., factored=True, model=model)
    ...                                      # train: each opt.step() also steps the sketches
    sp = sketch.spectra()                    # top-k singular values of every tracked weight
    measures = all_measures(sp, eps=1e-3)    # the rank measures, from the sketch

Factored weights (``DecaySGD(factored=True)``). The step is ``W <- a W + b D^T F`` (D K x d_out,
F K x d_in) and every operation of ``factored_update_`` is linear and commutes with
right-multiplication by Omega (``lowrank_kernels/optim/factored_step.py``), so the sketch is
stepped by ``factored_update_`` itself, on ``(Y, Yb = buf Omega)`` with the factors ``(D, F
Omega)``, right after the weight's own step, with the factors that step used: exact for every
momentum form. Per step and weight: one ``F @ Omega`` matmul (K*d_in*(l+r) flops) and the weight's
launch sequence again on the small (d_out, l+r) sketch: one ``decay_outer_`` launch (two with
Nesterov momentum; torch, Triton or CUDA C++ like the weight's, the group's ``backend``), plus the
momentum forms' adds on (d_out, l+r) matrices. Nothing is fused into the weight's own launch: the
sketch is a separate, small launch. ``F @ Omega`` stays a plain matmul (cuBLAS / BLAS): fusing it
into the ``decay_outer_`` kernel would recompute it in every row block of Y or need a grid-wide
barrier, to save writing and reading K*(l+r) values, less than the K*d_in values of F that the
matmul reads anyway. The update is not free: its 2*K*(d_in + d_out)*(l+r) flops against the
step's 2*K*d_in*d_out came to 8-51% of the factored step on the CPU (Linear at batch 32 to a conv
with K = 512; ``benchmarks/results/streaming_sketch_2026-12-02.md``). It pays where records are
frequent and K small next to d_in and d_out.

Dense weights (a dense param group, a weight the factored mode left dense): the step reads the
gradient G, so the sketch is stepped by the same fused SGD step (``fused_sgd_step_``) on ``(Y, G
Omega, Yb)``, one d_out x d_in x (l+r) GEMM per step, from optimizer step hooks. That is the cost
of one ``W @ Omega`` per step, where recomputing the sketch at a record costs one per record: it
only pays when records are at least as frequent as steps; the benchmark section
``streaming_sketch`` measures it.

A record (``spectra``): Q = orth(Y[:, :l]) (LAPACK's Householder QR on the CPU, batched
CholeskyQR on a GPU, as the randomized tier's range finder in ``spectra.py``), ``B = Q^T W`` (the
one pass over W), the singular values (and vectors) of the small l x d_in matrices B by the exact
tier of ``singular_values`` (all weights batched by shape), ||W||_F (a norm reduction over W) and
the Frobenius residual sqrt(||W||_F^2 - ||B||_F^2). The a-posteriori estimate of Halko,
Martinsson and Tropp, "Finding structure with randomness" (sec. 4.3): with r Gaussian vectors
w_i independent of Q, ``||(I - QQ^T) W|| <= 10 sqrt(2/pi) max_i ||(I - QQ^T) W w_i||`` with
probability at least 1 - 10^-r. The w_i are the last r columns of Omega, so ``W w_i`` is
already in the sketch and the estimate costs no pass over W. The probes are fixed for the run;
the trajectory of W does not depend on them, so the bound holds at each record with that
probability. By Weyl's inequality it also bounds |s_i(B) - s_i(W)| for every i, since s_i(B) =
s_i(QQ^T W).

No power iteration: it would need passes over W at the record. For a spectrum that decays slowly
past k the top-k values are then less accurate than the randomized tier's (2 power iterations by
default); ``error_bound`` says how far off they can be, and oversampling is the lever.

Keeping it honest:
* ``drift()`` recomputes ``W @ Omega`` (and ``buf @ Omega``) and reports the relative difference;
  ``resync()`` recomputes the sketches from the weights.
* Before each step and at each record every weight is checked against what the sketch last saw:
  its shape, dtype, device, data pointer and version counter (every in-place write bumps it:
  ``model.load_state_dict``, a manual ``copy_``), and its momentum buffer (the same tensor, the
  same version: ``optimizer.load_state_dict`` replaces it). A weight changed behind the sketch's
  back is not an error inside ``optimizer.step()`` (which would leave the other weights
  unstepped): its sketch is marked stale and ``spectra()`` / ``drift()`` raise, naming it.
* ``state_dict()`` / ``load_state_dict()``: the seed (Omega is drawn again from it) and the
  sketches. Resume order: the model, the optimizer, then the sketch. Under data parallelism
  build the sketch after wrapping the model in DDP (which broadcasts rank 0's weights in place).

Limits: a weight replaced by a new Parameter object (``load_state_dict(assign=True)``) is not
seen (the optimizer keeps stepping the old one too); a bf16/fp16 weight is rounded at every step
while its float32 sketch is not, so ``drift()`` grows with the weight's rounding (exact for
float32 weights up to float32 rounding); ConvTranspose weights are refused (their matrix is not
the (shape[0], -1) view).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple

import torch
from torch import Tensor, nn

from ..ops.sgd_step import fused_sgd_step_
from ..optim.factored_step import factored_update_, sketch_factors
from .spectra import Spectra, orthonormalize, singular_values

# The constant of Halko, Martinsson and Tropp's a-posteriori bound (their eq. 4.3).
HMT_FACTOR = 10.0 * math.sqrt(2.0 / math.pi)


@dataclass
class SketchSpectra(Spectra):
    """``Spectra`` from the streaming sketch: ``values`` holds the top k, ``residual`` the
    Frobenius norm of what the basis Q misses, ``error_bound`` (b,) Halko-Martinsson-Tropp's
    bound on the spectral norm of that remainder (NaN without probes), which also bounds the
    absolute error of every value; ``names`` the tracked weights, in order."""

    error_bound: Tensor | None = None
    names: list[str] | None = None


class Drift(NamedTuple):
    """Relative Frobenius differences of the kept sketches from ones recomputed now."""

    weight: float                    # ||Y - W Omega|| / ||W Omega||
    momentum_buffer: float | None    # the same for buf Omega; None without a buffer sketch


def _scalar(value) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _matrix(weight: Tensor) -> Tensor:
    """The (d_out, d_in) matrix of a weight: a view when contiguous, else a copy."""
    return weight.reshape(weight.shape[0], -1)


def _omega_seed(seed: int, index: int) -> int:
    return (int(seed) * 1_000_003 + index) % (2 ** 63)


def _orthonormal_basis(y: Tensor) -> Tensor:
    """Orthonormal basis of the columns of a (g, m, l) stack, as the randomized tier does:
    LAPACK's Householder QR on the CPU, batched CholeskyQR (with its Householder fallback) on a
    GPU."""
    if y.device.type == "cpu":
        return torch.linalg.qr(y).Q
    return orthonormalize(y)


class _Entry:
    """One tracked weight: its Omega, its sketches and what the sketch last saw of it."""

    def __init__(self, name: str, weight: Tensor, index: int, factored: bool):
        self.name, self.weight, self.index, self.factored = name, weight, index, factored
        self.omega: Tensor | None = None
        self.y: Tensor | None = None
        self.yb: Tensor | None = None
        self.stale: str | None = None
        self.seen: tuple = ()
        self.buffer: weakref.ref | None = None
        self.buffer_version = 0
        self.first_step = False       # dense path: whether the step starts the buffer

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.weight.shape[0], math.prod(self.weight.shape[1:])

    def see(self, buffer: Tensor | None) -> None:
        """Remember the weight and its momentum buffer as they are now (after an update)."""
        w = self.weight
        self.seen = (tuple(w.shape), w.dtype, w.device, w.data_ptr(), w._version)
        self.buffer = None if buffer is None else weakref.ref(buffer)
        self.buffer_version = 0 if buffer is None else buffer._version

    def changed(self, buffer: Tensor | None) -> str | None:
        """Why the weight or its buffer is not what the sketch last saw, or None."""
        w = self.weight
        shape, dtype, device, ptr, version = self.seen
        if tuple(w.shape) != shape:
            return f"its shape changed from {shape} to {tuple(w.shape)}"
        if w.dtype != dtype or w.device != device:
            return f"it moved from {dtype} on {device} to {w.dtype} on {w.device}"
        if w.data_ptr() != ptr:
            return "its storage was replaced (param.data = ...)"
        if w._version != version:
            return ("it was written outside the optimizer step (version counter "
                    f"{version} -> {w._version}: model.load_state_dict, an in-place op)")
        if self.buffer is not None:
            if buffer is None or buffer is not self.buffer():
                return "its momentum buffer was replaced (optimizer.load_state_dict?)"
            if buffer._version != self.buffer_version:
                return "its momentum buffer was written outside the optimizer step"
        elif buffer is not None and self.yb is None:
            return "a momentum buffer appeared that the sketch never saw (optimizer.load_state_dict?)"
        return None


class StreamingSketch:
    """Streaming randomized sketches ``Y = W Omega`` of an optimizer's weights (module docstring).

    Args:
        optimizer: a ``DecaySGD`` (factored or dense); its steps keep the sketches current.
        weights: the weights to track: None (every weight the optimizer steps in factored form),
            or parameters, ``(name, param)`` pairs or a ``{name: param}`` mapping. A weight the
            optimizer steps densely is sketched through its gradient (a GEMM per step).
        k: number of singular values to report; the sketch has ``k + oversample`` range columns
            (at most min(d_out, d_in)) and ``probes`` more for the error estimate.
        seed: seed of the Gaussian test matrices (one stream per tracked weight).
        dtype: the sketches' dtype; float32 only.
    """

    def __init__(self, optimizer, weights=None, *, k: int = 64, oversample: int = 16,
                 probes: int = 5, seed: int = 0, dtype: torch.dtype = torch.float32):
        for label, value, low in (("k", k, 1), ("oversample", oversample, 0),
                                  ("probes", probes, 0), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"StreamingSketch: {label} must be an integer >= {low}, got "
                                 f"{value!r}")
        if dtype != torch.float32:
            raise ValueError(f"StreamingSketch: the sketches are kept in float32 (decay_outer_'s "
                             f"fp32 accumulation, float64 small problems at the record); got "
                             f"dtype={dtype}")
        if not hasattr(optimizer, "attach_sketch"):
            raise TypeError(f"StreamingSketch needs a lowrank_kernels.DecaySGD, got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        self.k, self.oversample, self.probes, self.seed = k, oversample, probes, seed
        self.dtype = dtype
        factored = set(optimizer.factored_parameters())
        named = self._named(weights, factored)
        self._entries: list[_Entry] = []
        self._by_weight: dict[Tensor, _Entry] = {}
        for i, (name, w) in enumerate(named):
            self._check_weight(name, w)
            if w in self._by_weight:
                raise ValueError(f"StreamingSketch: {name} is listed twice")
            entry = _Entry(name, w, i, w in factored)
            d_out, d_in = entry.matrix_shape
            if k > min(d_out, d_in):
                raise ValueError(f"StreamingSketch: k = {k} is larger than min(d_out, d_in) = "
                                 f"{min(d_out, d_in)} of {name} (matrix {d_out} x {d_in}); a "
                                 f"matrix has no more singular values than that")
            self._entries.append(entry)
            self._by_weight[w] = entry
        self._groups = self._group_of_weights()
        self._draw_omegas()
        self.resync()
        self._handles = [optimizer.register_step_pre_hook(self._before_step),
                         optimizer.register_step_post_hook(self._after_step)]
        optimizer.attach_sketch(self)

    # ------------------------------------------------------------------------------------------
    # Set-up
    # ------------------------------------------------------------------------------------------
    def _named(self, weights, factored: set) -> list[tuple[str, Tensor]]:
        names = {}
        model = getattr(self.optimizer, "_model", None)
        modules = {}
        if model is not None:
            for mname, module in model.named_modules():
                for pname, p in module.named_parameters(recurse=False):
                    names.setdefault(p, f"{mname}.{pname}" if mname else pname)
                    modules.setdefault(p, module)
        self._modules = modules
        if weights is None:
            picked = [p for g in self.optimizer.param_groups for p in g["params"] if p in factored]
            if not picked:
                raise ValueError("StreamingSketch: the optimizer steps no weight in factored form; "
                                 "pass weights= to sketch dense weights (each costs a "
                                 "d_out x d_in x (k + oversample) GEMM per step)")
            unique = list(dict.fromkeys(picked))
            return [(names.get(p, f"weight {i}"), p) for i, p in enumerate(unique)]
        if isinstance(weights, Mapping):
            return list(weights.items())
        out = []
        for i, item in enumerate(weights):
            if isinstance(item, tuple):
                out.append((str(item[0]), item[1]))
            else:
                out.append((names.get(item, f"weight {i}"), item))
        return out

    def _check_weight(self, name: str, w) -> None:
        if not isinstance(w, Tensor):
            raise TypeError(f"StreamingSketch: {name} is a {type(w).__name__}, not a tensor")
        if w.layout != torch.strided or w.is_complex() or not w.is_floating_point():
            raise TypeError(f"StreamingSketch: {name} must be a dense real floating-point tensor "
                            f"(got {w.dtype}, layout {w.layout})")
        if w.dim() < 2:
            raise ValueError(f"StreamingSketch: {name} has shape {tuple(w.shape)}; a sketch "
                             "tracks a matrix (a weight with 2 or more dims)")
        module = self._modules.get(w)
        if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            raise ValueError(f"StreamingSketch: {name} is a ConvTranspose weight, whose matrix "
                             "(c_out, c_in*k) is not its (shape[0], -1) view; not supported")

    def _group_of_weights(self) -> dict[Tensor, dict]:
        groups = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p in self._by_weight:
                    groups.setdefault(p, group)
        missing = [e.name for e in self._entries if e.weight not in groups]
        if missing:
            raise ValueError(f"StreamingSketch: {', '.join(missing)} not in the optimizer's "
                             "param groups")
        return groups

    def _width(self, entry: _Entry) -> int:
        return min(self.k + self.oversample, min(entry.matrix_shape))

    def _draw_omegas(self) -> None:
        # On the CPU from a seeded generator, then moved: the same Omega on every device.
        for e in self._entries:
            gen = torch.Generator().manual_seed(_omega_seed(self.seed, e.index))
            omega = torch.randn(e.matrix_shape[1], self._width(e) + self.probes, generator=gen,
                                dtype=self.dtype)
            e.omega = omega.to(e.weight.device)

    def _buffer(self, weight: Tensor) -> Tensor | None:
        state = self.optimizer.state.get(weight)
        return None if state is None else state.get("momentum_buffer")

    def factored_weights(self) -> list[Tensor]:
        """The tracked weights the optimizer steps in factored form (``attach_sketch`` reads it)."""
        return [e.weight for e in self._entries if e.factored]

    @property
    def names(self) -> list[str]:
        return [e.name for e in self._entries]

    def sketch(self, name_or_weight) -> Tensor:
        """The kept sketch ``Y = W Omega`` of one weight, (d_out, k + oversample + probes)."""
        return self._entry(name_or_weight).y

    def omega(self, name_or_weight) -> Tensor:
        """The fixed test matrix of one weight, (d_in, k + oversample + probes)."""
        return self._entry(name_or_weight).omega

    def _entry(self, key) -> _Entry:
        if isinstance(key, Tensor):
            if key in self._by_weight:
                return self._by_weight[key]
        else:
            for e in self._entries:
                if e.name == key:
                    return e
        raise KeyError(f"StreamingSketch: {key if isinstance(key, str) else 'this tensor'} is not "
                       f"tracked; tracked: {self.names}")

    # ------------------------------------------------------------------------------------------
    # Keeping the sketches current
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def factored_step_(self, weight: Tensor, factors, *, first_step: bool, group: dict) -> None:
        """Step the sketch of ``weight`` as its factored step just stepped it: called by
        ``DecaySGD._factored_step`` right after that step, with the factors it used (a (D, F)
        pair or None; an object with a ``.grad`` stands for a dense gradient)."""
        e = self._by_weight.get(weight)
        if e is None or e.stale is not None:
            return
        buffer = self._buffer(weight)
        momentum = float(group["momentum"])
        if momentum != 0 and e.yb is None:
            if not first_step:
                e.stale = "momentum was switched on after the sketch was made"
                return
            e.yb = torch.zeros_like(e.y)  # its first step sets it, as the buffer's
        hyper = dict(first_step=first_step, lr=_scalar(group["lr"]),
                     weight_decay=_scalar(group["weight_decay"]), momentum=momentum,
                     dampening=group["dampening"], nesterov=group["nesterov"],
                     maximize=group["maximize"],
                     decoupled_weight_decay=group["decoupled_weight_decay"],
                     backend=group["backend"])
        dense = getattr(factors, "grad", None)
        if isinstance(dense, Tensor):
            self._dense_update([e], [dense], [first_step], group, per_occurrence=False)
        else:
            factored_update_(e.y, sketch_factors(factors, e.omega), e.yb, **hyper)
        e.see(buffer)

    def _before_step(self, optimizer, args, kwargs) -> None:
        for e in self._entries:
            if e.stale is None:
                e.stale = e.changed(self._buffer(e.weight))
            if not e.factored:  # whether the dense step is about to start the buffer
                e.first_step = self._buffer(e.weight) is None

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        # The gradients the dense step used are still there (a closure's backward runs inside
        # step(), after the pre-hook).
        by_group: dict[int, list[_Entry]] = {}
        for e in self._entries:
            if not e.factored and e.weight.grad is not None and e.stale is None:
                by_group.setdefault(id(self._groups[e.weight]), []).append(e)
        for entries in by_group.values():
            group = self._groups[entries[0].weight]
            self._dense_update(entries, [e.weight.grad for e in entries],
                               [e.first_step for e in entries], group, per_occurrence=True)
            for e in entries:
                e.see(self._buffer(e.weight))

    def _dense_update(self, entries: list[_Entry], grads: list[Tensor], first: list[bool],
                      group: dict, per_occurrence: bool) -> None:
        """The dense step's rules on the sketches: ``fused_sgd_step_`` on (Y, G Omega, Yb), with
        ``per_occurrence`` each weight as many times as the group lists it (the dense step steps
        each occurrence)."""
        momentum = float(group["momentum"])
        ys, gs, bufs, flags = [], [], [], []
        for e, g, f in zip(entries, grads, first):
            if momentum != 0 and e.yb is None:
                if not f:
                    e.stale = "momentum was switched on after the sketch was made"
                    continue
                e.yb = torch.zeros_like(e.y)
            g_omega = torch.mm(_matrix(g).to(self.dtype), e.omega)
            times = sum(q is e.weight for q in group["params"]) if per_occurrence else 1
            ys += [e.y] * times
            gs += [g_omega] * times
            bufs += [e.yb] * times
            flags += [f] * times
        if not ys:
            return
        opt = self.optimizer
        fused_sgd_step_(ys, gs, bufs if momentum != 0 else None, lr=group["lr"],
                        weight_decay=_scalar(group["weight_decay"]), momentum=momentum,
                        dampening=group["dampening"], nesterov=group["nesterov"],
                        maximize=group["maximize"],
                        decoupled_weight_decay=group["decoupled_weight_decay"],
                        first_step=flags, grad_scale=getattr(opt, "grad_scale", None),
                        found_inf=getattr(opt, "found_inf", None), backend=group["backend"])

    @torch.no_grad()
    def resync(self, names: Iterable[str] | None = None) -> None:
        """Recompute the sketches from the weights (and momentum buffers) as they are now, and
        clear the stale marks: after changing a weight on purpose, or to drop the drift."""
        entries = self._entries if names is None else [self._entry(n) for n in names]
        for e in entries:
            buffer = self._buffer(e.weight)
            if e.omega.device != e.weight.device:
                e.omega = e.omega.to(e.weight.device)
            e.y = self._product(e.weight, e.omega)
            e.yb = None if buffer is None else self._product(buffer, e.omega)
            e.stale = None
            e.see(buffer)

    def _product(self, t: Tensor, omega: Tensor) -> Tensor:
        return torch.mm(_matrix(t.detach()).to(self.dtype), omega)

    def detach(self) -> None:
        """Stop keeping the sketches current (removes the optimizer hooks)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for p in self.factored_weights():
            listed = self.optimizer.__dict__.get("_sketches", {}).get(p, [])
            if self in listed:
                listed.remove(self)

    # ------------------------------------------------------------------------------------------
    # Correctness
    # ------------------------------------------------------------------------------------------
    def _check_current(self, what: str) -> None:
        problems = []
        for e in self._entries:
            reason = e.stale or e.changed(self._buffer(e.weight))
            if reason is not None:
                problems.append(f"{e.name}: {reason}")
        if problems:
            raise RuntimeError(f"StreamingSketch.{what}: the sketch no longer follows these "
                               f"weights: {'; '.join(problems)}. Call resync() to recompute "
                               "them from the weights (or load_state_dict() with the sketch "
                               "saved alongside them)")

    @torch.no_grad()
    def drift(self) -> dict[str, Drift]:
        """Per weight, how far the kept sketches are from ones recomputed now (one W @ Omega
        per weight): float32 rounding for float32 weights."""
        self._check_current("drift")
        out = {}
        for e in self._entries:
            out[e.name] = Drift(self._relative(e.y, self._product(e.weight, e.omega)),
                                None if e.yb is None else
                                self._relative(e.yb, self._product(self._buffer(e.weight),
                                                                   e.omega)))
        return out

    @staticmethod
    def _relative(kept: Tensor, fresh: Tensor) -> float:
        den = float(torch.linalg.vector_norm(fresh.double()))
        num = float(torch.linalg.vector_norm((kept - fresh).double()))
        return num / den if den > 0 else num

    def state_dict(self) -> dict[str, Any]:
        """The seed, the widths and each weight's sketches (Omega is drawn again from the seed)."""
        return {"seed": self.seed, "k": self.k, "oversample": self.oversample,
                "probes": self.probes,
                "sketches": [{"name": e.name, "matrix_shape": e.matrix_shape, "y": e.y,
                              "momentum_buffer": e.yb} for e in self._entries]}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load sketches saved with ``state_dict()``; load the model and the optimizer first (the
        sketch then takes the weights and buffers as they are as its starting point)."""
        for key in ("k", "oversample", "probes"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"StreamingSketch.load_state_dict: saved {key} = "
                                 f"{state.get(key)!r}, this sketch has {getattr(self, key)}")
        saved = list(state["sketches"])
        if [s["name"] for s in saved] != self.names:
            raise ValueError(f"StreamingSketch.load_state_dict: saved weights "
                             f"{[s['name'] for s in saved]} differ from the tracked {self.names}")
        for e, s in zip(self._entries, saved):
            width = self._width(e) + self.probes
            for key in ("y", "momentum_buffer"):
                t = s[key]
                if t is None:
                    continue
                if not isinstance(t, Tensor) or t.dtype != self.dtype \
                        or tuple(t.shape) != (e.matrix_shape[0], width):
                    got = (f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor)
                           else type(t).__name__)
                    raise ValueError(f"StreamingSketch.load_state_dict: {e.name}'s {key} sketch "
                                     f"must be float32 of shape ({e.matrix_shape[0]}, {width}), "
                                     f"got {got}")
        if int(state["seed"]) != self.seed:
            self.seed = int(state["seed"])
            self._draw_omegas()
        for e, s in zip(self._entries, saved):
            device = e.weight.device
            e.y = s["y"].to(device, copy=True)
            buffer = self._buffer(e.weight)
            if s["momentum_buffer"] is not None:
                e.yb = s["momentum_buffer"].to(device, copy=True)
            else:  # saved before the buffer existed: exact from the buffer, if there is one
                e.yb = None if buffer is None else self._product(buffer, e.omega)
            e.stale = None
            e.see(buffer)

    # ------------------------------------------------------------------------------------------
    # The record
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def spectra(self, return_vectors: bool = False, eps: float = 1e-3) -> SketchSpectra:
        """Top-k singular values of every tracked weight from its sketch (module docstring).

        ``vectors[i]`` (with ``return_vectors``) is (U (d_out, k), V (d_in, k)), float64 on the
        weight's device. ``complete[i]``: s_k <= eps * ||W||_F, i.e. every value a threshold rank
        of that eps counts is among the k. One pass over each W (B = Q^T W) and a norm reduction;
        the error estimate reads only the sketch."""
        if not (eps >= 0):
            raise ValueError(f"eps must be a non-negative number, got {eps}")
        self._check_current("spectra")
        k = self.k
        names = self.names
        # NaN/Inf in a weight reach B, which singular_values checks (naming the weight).
        weights = [_matrix(e.weight.detach()) for e in self._entries]
        groups: dict[tuple, list[int]] = {}
        for i, e in enumerate(self._entries):
            groups.setdefault((e.y.device, tuple(e.y.shape), self._width(e)), []).append(i)
        bases: list[Tensor | None] = [None] * len(self._entries)
        for (_, _, width), index in groups.items():
            q = _orthonormal_basis(torch.stack([self._entries[i].y[:, :width] for i in index]))
            for j, i in enumerate(index):
                bases[i] = q[j]
        small, frob, bound = [], [], []
        for e, w, q in zip(self._entries, weights, bases):
            small.append(q.T @ w.to(self.dtype))            # the one pass over W
            # As spectra.py: row norms in float32, their squares summed in float64.
            frob.append(torch.linalg.vector_norm(w.to(self.dtype), dim=1).double().pow(2).sum())
            if self.probes:
                p = e.y[:, self._width(e):]                 # W w_i, kept in the sketch
                rest = (p - q @ (q.T @ p)).double()
                bound.append(HMT_FACTOR * torch.linalg.vector_norm(rest, dim=0).max())
            else:
                bound.append(torch.full((), math.nan, dtype=torch.float64, device=w.device))
        sp = singular_values(small, method="exact", return_vectors=return_vectors, names=names)
        b = len(self._entries)
        frobenius = torch.stack([f.cpu() for f in frob]).sqrt()
        error_bound = torch.stack([t.cpu() for t in bound])
        values = torch.zeros(b, k, dtype=torch.float64)
        width = min(k, sp.values.shape[1])
        values[:, :width] = sp.values[:, :width]
        residual = (frobenius.pow(2) - sp.frobenius.pow(2)).clamp_min(0).sqrt()
        rank_bound = torch.tensor([min(e.matrix_shape) for e in self._entries], dtype=torch.long)
        complete = (values[:, -1] <= eps * frobenius) | (rank_bound <= k)
        vectors: list = [None] * b
        if return_vectors:
            for i, (q, pair) in enumerate(zip(bases, sp.vectors)):
                u, v = pair
                vectors[i] = (q.double() @ u[:, :k], v[:, :k])
        return SketchSpectra(values=values, rank_bound=rank_bound, frobenius=frobenius,
                             shapes=[e.matrix_shape for e in self._entries], single=False,
                             method="streaming", residual=residual, complete=complete,
                             vectors=vectors, error_bound=error_bound, names=names)
