"""Factored mode under data parallelism: every rank steps each weight with all ranks' factors.

Data-parallel training (DDP) steps every rank with the mean over the n ranks of their local
gradients. In factored mode rank r's gradient of a weight is ``G_r = D_r^T F_r`` (``D_r``
(K_r, d_out), ``F_r`` (K_r, d_in), ``FactorCapture.factors()``), so the data-parallel gradient is
the product of the stacked factors::

    G = (1/n) sum_r D_r^T F_r = D^T F,      D = [D_1/n; ...; D_n/n],  F = [F_1; ...; F_n]

Each rank all-gathers the factors (n*K*(d_out + d_in) values instead of the d_out*d_in of the
dense gradient) and steps with ``factored_update_`` on the stacked factors, so every momentum form
stays exact. The 1/n goes into D as it is copied into the send buffer (one pass over K*d_out
values, a correctly rounded division as DDP's ``div_``, exact when n is a power of two); scaling
``alpha`` instead would need ``factored_update_`` to take a scale apart from ``lr``, which also
multiplies the weight decay and the momentum buffer.

Rules, per step and factored param group:

* Metadata first: one all-gather of each captured weight's local row count K_r (-1 where the
  rank's backward never reached the layer, 0 for a zero gradient) and its size. The row counts
  are read on the host (one sync per group per step: the shapes of what follows depend on them).
  Ranks may hold different K_r (a last, smaller batch): every rank sends K_max rows, the missing
  ones zero, which add exactly nothing to D^T F. A weight active on any rank is stepped on every
  rank (a rank without factors for it counts as a zero gradient, as DDP's unused parameters do);
  sizes that differ between ranks are an error (the ranks' models or groups differ).
* Per layer, where ``K_max * n * (d_out + d_in) >= d_out * d_in`` (convolutions with many output
  positions, large batches, many ranks) the factors are no smaller than the gradient: the rank
  forms its local dense gradient D_r^T F_r, divides it by n and all-reduces (sums) it, as DDP's
  default hook does, and steps with it through ``fused_sgd_step_`` with the same
  hyperparameters, the same momentum buffer and the same first-step rule (a buffer starts from
  the gradient). The rule also bounds the gathered buffer by the dense gradient's size.
* Batched collectives: per (device, dtype) bucket of a group's layers one all-gather of all
  gather-path layers' flattened factors and one all-reduce of all all-reduce-path layers'
  flattened gradients, so a step of a model in one factored group runs three collectives, not
  two per layer. They run synchronously in ``step()``, after backward (no overlap with it).

Why the optimizer's own collective and not a DDP communication hook: the factored weights have
``requires_grad`` off, so DDP's reducer never holds them (no bucket, no hook call for them), and a
comm hook receives a flat dense gradient bucket and must return one of the same size: it cannot
carry factors. The factors are complete when backward is, which is when ``step()`` runs. The
model's other parameters (biases, norm layers, weights left dense) still need DDP's all-reduce:
build the optimizer first, then wrap the model in DDP (DDP leaves out parameters that do not
require grad when it is built; a DDP built before the optimizer waits for the factored weights'
gradients and fails at the next forward, so ``model=`` a DDP is refused).

Traffic is counted from the tensors passed to the collectives (``CommunicationStats``, through
``DecaySGD.communication_stats()``); ``counting_allreduce_hook`` counts DDP's dense all-reduce the
same way, for comparison.

Limits: sharded weights (FSDP2, tensor parallelism: DTensors) are refused where the factors are
captured; GradScaler is refused as in a single process; the process group is the default one or
``DecaySGD(process_group=...)`` (a group of one rank steps each rank on its own).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..ops import sgd_step
from .factored_step import factored_update_

GATHER = "all_gather"
ALL_REDUCE = "all_reduce"


def gathers(rows_per_rank: int, world_size: int, d_out: int, d_in: int) -> bool:
    """The per-layer rule: all-gather the factors while they hold fewer values than the dense
    gradient, else all-reduce the dense gradient."""
    return rows_per_rank * world_size * (d_out + d_in) < d_out * d_in


def _distributed():
    return torch.distributed if torch.distributed.is_available() else None


def _all_gather_single(output: Tensor, input: Tensor, group) -> None:
    dist = torch.distributed
    # all_gather_single is torch 2.13's name; all_gather_into_tensor (deprecated there) before.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=group)


@dataclass
class DenseGradient:
    """A weight's data-parallel gradient formed densely (the all-reduce path), in its shape."""

    grad: Tensor


@dataclass(frozen=True)
class LayerTraffic:
    """One layer's share of a step's collectives, on this rank.

    ``sent_bytes``: the bytes of this layer's part of the tensor this rank passed in (its D and F
    rows, padding included, or its dense gradient); ``received_bytes``: of the collective's
    output (n times ``sent_bytes`` for the all-gather, the same buffer for the all-reduce)."""

    path: str
    rows_per_rank: int
    sent_bytes: int
    received_bytes: int


@dataclass
class CommunicationStats:
    """What the data-parallel factored step sent, counted from the tensors given to the
    collectives. ``layers``: each layer's traffic at its latest step, by parameter name;
    totals since construction (or ``reset``), the metadata exchange included and also shown
    apart."""

    world_size: int = 1
    exchanges: int = 0
    collectives: int = 0
    layers: dict[str, LayerTraffic] = field(default_factory=dict)
    sent_bytes: int = 0
    received_bytes: int = 0
    metadata_sent_bytes: int = 0

    def step_sent_bytes(self) -> int:
        """The factors and gradients of the layers' latest step (metadata not included)."""
        return sum(t.sent_bytes for t in self.layers.values())

    def reset(self) -> None:
        self.exchanges = self.collectives = 0
        self.sent_bytes = self.received_bytes = self.metadata_sent_bytes = 0
        self.layers.clear()

    def snapshot(self) -> "CommunicationStats":
        return CommunicationStats(self.world_size, self.exchanges, self.collectives,
                                  dict(self.layers), self.sent_bytes, self.received_bytes,
                                  self.metadata_sent_bytes)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class FactorExchange:
    """The exchange of a factored optimizer's factors across data-parallel ranks.

    ``active()``: torch.distributed is initialised and the group has more than one rank. Then,
    per factored group and step, ``exchange()`` runs the collectives and returns the weights to
    step; ``factors(p)`` hands out each weight's stacked factors (or ``DenseGradient``) once and
    ``update_`` steps it."""

    def __init__(self, process_group: Any = None):
        dist = _distributed()
        if process_group is not None and (dist is None
                                          or not isinstance(process_group, dist.ProcessGroup)):
            raise TypeError("DecaySGD: process_group must be a torch.distributed.ProcessGroup "
                            f"(or None for the default group), got {type(process_group).__name__}")
        self.process_group = process_group
        self._stats = CommunicationStats()
        self._results: dict[Tensor, Any] = {}
        self._names: dict[Tensor, str] | None = None

    def world_size(self) -> int:
        dist = _distributed()
        if dist is None or not dist.is_initialized():
            return 1
        size = dist.get_world_size(self.process_group)
        if size < 1:
            raise RuntimeError("DecaySGD: this rank is not a member of its process_group")
        return size

    def active(self) -> bool:
        return self.world_size() > 1

    def stats(self) -> CommunicationStats:
        self._stats.world_size = self.world_size()
        return self._stats.snapshot()

    def reset_stats(self) -> None:
        self._stats.reset()

    def check(self, model: nn.Module | None, stepping: list[Tensor]) -> None:
        """The checks that can fail before any rank steps: the model's wrapping and the
        devices the group's backend can communicate."""
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            raise RuntimeError(
                "DecaySGD(factored=True) under data parallelism: model= is a "
                "DistributedDataParallel built before the optimizer, so DDP's reducer waits for "
                "the gradients of the factored weights, which never come; pass the unwrapped "
                "model and wrap it in DDP after building DecaySGD (the factored weights then "
                "stay out of DDP, the other parameters are all-reduced by it)")
        backend = str(torch.distributed.get_backend(self.process_group)).lower()
        if backend == "nccl":
            off = sorted({str(p.device) for p in stepping if p.device.type != "cuda"})
            if off:
                raise RuntimeError(f"DecaySGD(factored=True): the process group's backend is "
                                   f"NCCL, which communicates CUDA tensors only; factored "
                                   f"weights are on {', '.join(off)}")

    def _name(self, p: Tensor, model: nn.Module | None) -> str:
        if self._names is None:
            self._names = {} if model is None else {q: n for n, q in model.named_parameters()}
        return self._names.get(p, f"weight {tuple(p.shape)}")

    # ------------------------------------------------------------------------------------------
    # One group's exchange
    # ------------------------------------------------------------------------------------------
    def exchange(self, stepping: list[Tensor], captures: dict, model: nn.Module | None
                 ) -> list[Tensor]:
        """Run one factored group's collectives. ``stepping``: every captured weight of the
        group, in group order (identical on every rank); returns those to step (active on some
        rank), repeats kept."""
        group, world = self.process_group, self.world_size()
        weights = list(dict.fromkeys(stepping))  # unique, in order
        self._results.clear()
        local: dict[Tensor, tuple[Tensor, Tensor] | None] = {}
        meta = []
        for p in weights:
            capture = captures[p]
            factors = capture.factors(dtype=p.dtype) if capture.active else None
            local[p] = factors
            rows = -1 if not capture.active else (0 if factors is None else factors[0].shape[0])
            meta.append((rows, p.numel()))
        device = weights[0].device
        sent = torch.tensor(meta, dtype=torch.int64, device=device).reshape(-1)
        gathered = torch.empty(world * sent.numel(), dtype=torch.int64, device=device)
        _all_gather_single(gathered, sent, group)
        self._count(sent, gathered, metadata=True)
        table = gathered.view(world, len(weights), 2).tolist()  # the one host sync

        gather_buckets: dict[tuple, list] = {}
        reduce_buckets: dict[tuple, list] = {}
        for i, p in enumerate(weights):
            rows = [table[r][i][0] for r in range(world)]
            sizes = {table[r][i][1] for r in range(world)}
            if len(sizes) != 1:
                raise RuntimeError(
                    f"DecaySGD(factored=True): {self._name(p, model)} has {sorted(sizes)} "
                    "elements on different ranks; every rank must hold the same model and "
                    "param groups")
            if max(rows) < 0:
                continue  # no rank's backward reached it: not stepped (no gradient anywhere)
            k_max = max(max(rows), 0)
            if k_max == 0:
                self._results[p] = None  # a zero gradient on every rank: decay and momentum only
                continue
            d_out = p.shape[0]
            d_in = p.numel() // d_out
            key = (p.device, p.dtype)
            if gathers(k_max, world, d_out, d_in):
                gather_buckets.setdefault(key, []).append((p, k_max, d_out, d_in))
            else:
                reduce_buckets.setdefault(key, []).append((p, d_out, d_in))
        for (dev, dtype), layers in gather_buckets.items():
            self._gather(layers, local, dev, dtype, world, group, model)
        for (dev, dtype), layers in reduce_buckets.items():
            self._all_reduce(layers, local, dev, dtype, world, group, model)
        self._stats.exchanges += 1
        return [p for p in stepping if p in self._results]

    def _gather(self, layers, local, device, dtype, world, group, model) -> None:
        size = sum(k * (d_out + d_in) for _, k, d_out, d_in in layers)
        send = torch.empty(size, dtype=dtype, device=device)
        spans, offset = [], 0
        for p, k, d_out, d_in in layers:
            d_part = send[offset:offset + k * d_out].view(k, d_out)
            f_part = send[offset + k * d_out:offset + k * (d_out + d_in)].view(k, d_in)
            factors = local[p]
            rows = 0 if factors is None else factors[0].shape[0]
            if rows:
                torch.div(factors[0], world, out=d_part[:rows])
                f_part[:rows].copy_(factors[1])
            d_part[rows:].zero_()
            f_part[rows:].zero_()
            spans.append((offset, k, d_out, d_in))
            offset += k * (d_out + d_in)
        received = torch.empty(world * size, dtype=dtype, device=device)
        _all_gather_single(received, send, group)
        self._count(send, received)
        by_rank = received.view(world, size)
        for (p, k, d_out, d_in), (start, _, _, _) in zip(layers, spans):
            D = by_rank[:, start:start + k * d_out].reshape(world * k, d_out)
            F = by_rank[:, start + k * d_out:start + k * (d_out + d_in)].reshape(world * k, d_in)
            self._results[p] = (D.contiguous(), F.contiguous())
            part = _nbytes(send[start:start + k * (d_out + d_in)])
            self._stats.layers[self._name(p, model)] = LayerTraffic(GATHER, k, part, world * part)

    def _all_reduce(self, layers, local, device, dtype, world, group, model) -> None:
        size = sum(d_out * d_in for _, d_out, d_in in layers)
        buffer = torch.empty(size, dtype=dtype, device=device)
        offset = 0
        grads = []
        for p, d_out, d_in in layers:
            grad = buffer[offset:offset + d_out * d_in].view(d_out, d_in)
            factors = local[p]
            if factors is None:
                grad.zero_()
            else:
                torch.mm(factors[0].t(), factors[1], out=grad)
            grads.append(grad)
            offset += d_out * d_in
        buffer.div_(world)  # before the sum, as DDP's default hook does (no overflow in 16 bits)
        torch.distributed.all_reduce(buffer, group=group)
        self._count(buffer, buffer)
        for (p, d_out, d_in), grad in zip(layers, grads):
            self._results[p] = DenseGradient(grad.view(p.shape))
            self._stats.layers[self._name(p, model)] = LayerTraffic(
                ALL_REDUCE, local[p][0].shape[0] if local[p] is not None else 0,
                _nbytes(grad), _nbytes(grad))

    def _count(self, sent: Tensor, received: Tensor, metadata: bool = False) -> None:
        self._stats.collectives += 1
        self._stats.sent_bytes += _nbytes(sent)
        self._stats.received_bytes += _nbytes(received)
        if metadata:
            self._stats.metadata_sent_bytes += _nbytes(sent)

    # ------------------------------------------------------------------------------------------
    # The step of one weight
    # ------------------------------------------------------------------------------------------
    def factors(self, p: Tensor):
        """The exchanged factors of ``p`` (a (D, F) pair, None for a zero gradient, or a
        ``DenseGradient``), handed out once: the buffers are freed with the step."""
        return self._results.pop(p)

    @staticmethod
    def update_(weight: Tensor, factors, momentum_buffer: Tensor | None, *, first_step: bool,
                lr: float, weight_decay: float, momentum: float, dampening: float,
                nesterov: bool, maximize: bool, decoupled_weight_decay: bool,
                backend: str | None = "auto") -> None:
        """``factored_update_``'s step, or for a ``DenseGradient`` the dense fused step with the
        same rules, hyperparameters and momentum buffer."""
        hyper = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, dampening=dampening,
                     nesterov=nesterov, maximize=maximize,
                     decoupled_weight_decay=decoupled_weight_decay, backend=backend)
        if not isinstance(factors, DenseGradient):
            factored_update_(weight, factors, momentum_buffer, first_step=first_step, **hyper)
            return
        sgd_step.fused_sgd_step_([weight], [factors.grad],
                                 None if momentum == 0 else [momentum_buffer],
                                 first_step=[first_step], **hyper)


# ----------------------------------------------------------------------------------------------
# The dense baseline: DDP's all-reduce, counted
# ----------------------------------------------------------------------------------------------
class DenseAllReduceCounter:
    """The state of ``counting_allreduce_hook``: the bytes of DDP's gradient buckets, counted
    from the tensors the hook all-reduces, in total and per parameter name (``model``'s names
    of the params in each bucket, from ``bucket.gradients()``, the bucket's views)."""

    def __init__(self, model: nn.Module | None = None, process_group: Any = None):
        self.process_group = process_group
        self._names = {} if model is None else {p: n for n, p in model.named_parameters()}
        self.calls = 0
        self.sent_bytes = 0
        self.layers: dict[str, int] = {}

    def add(self, bucket) -> None:
        self.calls += 1
        self.sent_bytes += _nbytes(bucket.buffer())
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            self.layers[self._names.get(p, f"param {tuple(p.shape)}")] = _nbytes(g)


def counting_allreduce_hook(counter: DenseAllReduceCounter, bucket):
    """DDP's default all-reduce (``allreduce_hook``: divide by n, sum), counting its bytes:
    ``ddp.register_comm_hook(DenseAllReduceCounter(model), counting_allreduce_hook)``."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    counter.add(bucket)
    return allreduce_hook(counter.process_group, bucket)
