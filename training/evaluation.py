"""Test-set evaluation and the sums a data-parallel run reduces over its processes."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from training import data as data_mod
from training.runtime import Distributed


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics (each rank's last forward updated its own)."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def sum_over_ranks(totals: torch.Tensor, count: int, distributed: Distributed) -> tuple[float, float, int]:
    """(loss sum, correct, examples) over every process."""
    values = torch.cat([totals, torch.tensor([float(count)], dtype=torch.float64, device=totals.device)])
    if distributed.active:
        dist.all_reduce(values)
    loss_sum, correct, count = values.tolist()
    return loss_sum, correct, int(count)


@torch.no_grad()
def evaluate(model: nn.Module, loader: data_mod.DeviceLoader, autocast, distributed: Distributed,
             device: torch.device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over the whole test set, summed across ranks."""
    model.eval()
    # Sums stay on the device (no per-batch synchronisation); the count is known on the host.
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    count = 0
    for x, y in loader.epoch(0):
        with autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        totals += torch.stack([loss.double(), (logits.argmax(1) == y).sum().double()])
        count += y.numel()
    loss_sum, correct, count = sum_over_ranks(totals, count, distributed)
    return loss_sum / count, correct / count


def layer_measures(records: list[dict], measures) -> dict:
    """{layer: {measure: value}} of one tracker record; ``alignment`` (with the next layer) is
    one more measure where the tracker recorded it."""
    return {rec["layer"]: {m: rec[m] for m in (*measures, "alignment") if m in rec} for rec in records}
