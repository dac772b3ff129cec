"""Multi-tensor launch tables: how one kernel launch covers every tensor of a (device, dtype) group.

A launch is described by two int64 tables on the tensors' device:

* the *tensor table*, one row per tensor: the data pointers of the tensors the kernel touches
  (e.g. param, grad, momentum buffer), the element count, and one per-tensor flag;
* the *block table*, one row per program: (tensor row, first element of its chunk).

Each program handles ``chunk`` consecutive elements of one tensor, so a launch has
sum(ceil(numel / chunk)) programs whatever the number of tensors (PyTorch's
``multi_tensor_apply`` and apex's FusedSGD use the same idea with a fixed-size argument struct;
a table in device memory has no size limit).

Both tables are cached on the device, keyed by their content: the block table depends only on the
element counts, and the tensor table's pointers stay the same from step to step as long as the
caching allocator hands the gradients back at the same addresses, so a steady-state step copies
nothing from the host. A changed pointer simply makes a new table (a table is a pure function of
its key, so an address that the allocator reuses for another tensor never makes it stale).

CUDA graphs. Making a table copies it from pinned host memory; inside a graph capture that copy
would become a node of the graph that every replay re-runs from a host buffer the allocator may
hand to someone else, so a table is never made during a capture: a cache miss there raises
``TableMissDuringCapture``. Before capturing a step, run warm-up steps eagerly with the very
tensors the graph will use (PyTorch gives the same advice for its capturable optimizers): the
warm-up makes the tables, the capture finds them. With momentum that means two steps, since a
buffer's first step (initialised from the gradient) is a flag in the tensor table, so the first
step's table is not the steady-state one. The gradients must keep their addresses into the
capture: zero them in place (``optimizer.zero_grad(set_to_none=False)``) rather than setting them
to None, since a gradient that backward allocates inside the capture comes from the graph's pool
at an address the warm-up never saw. A table found during a capture is pinned: the LRU never
evicts it, as the graph reads it on every replay.

Streams: a table is copied on the current stream of its first use. A later step on another
stream must be ordered after that stream anyway (it reads the parameters the first one wrote), and
that ordering covers the copy.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

_TABLE_CACHE_SIZE = 64


class TableMissDuringCapture(RuntimeError):
    """A launch table was needed for the first time while a CUDA graph was being captured."""


def capture_underway(device: torch.device) -> bool:
    """True when the current stream of ``device`` is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class _DeviceTableCache:
    """Least-recently-used map from a table's content (a hashable key) to its device copy.

    Entries used during a CUDA graph capture are pinned (never evicted) and never created."""

    def __init__(self, size: int, kind: str):
        self.size = size
        self.kind = kind
        self.tables: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self.pinned: set[tuple] = set()

    def get_or_make(self, key: tuple, device: torch.device, make) -> torch.Tensor:
        capturing = capture_underway(device)
        table = self.tables.get(key)
        if table is not None:
            self.tables.move_to_end(key)
            if capturing:
                self.pinned.add(key)
            return table
        if capturing:
            raise TableMissDuringCapture(
                f"the {self.kind} table of this launch is not on {device} yet, and making it "
                "during CUDA graph capture would record a copy from host memory that replays "
                "read again after it was reused. Run warm-up steps eagerly before capturing (two "
                "with momentum: a buffer's first step has a table of its own), with the tensors "
                "the graph will use, and keep the gradients' addresses into the capture "
                "(zero_grad(set_to_none=False)); see lowrank_kernels/ops/multi_tensor.py")
        table = self.tables[key] = make()
        self._evict(keep=key)
        return table

    def _evict(self, keep: tuple) -> None:
        # The least recently used entries go first; pinned ones (a captured graph reads them)
        # stay, so the cache can grow past its size by at most the number of pinned tables.
        for old in list(self.tables):
            if len(self.tables) <= self.size:
                return
            if old not in self.pinned and old != keep:
                del self.tables[old]


_BLOCK_TABLES = _DeviceTableCache(_TABLE_CACHE_SIZE, "block")
_TENSOR_TABLES = _DeviceTableCache(_TABLE_CACHE_SIZE, "tensor")


def is_flat(t: torch.Tensor) -> bool:
    """True when the tensor's elements fill one gap-free span of memory starting at data_ptr()."""
    if t.is_contiguous():
        return True
    # Non-overlapping and dense: sorted by stride, each dimension's stride is the product of the
    # sizes of the dimensions inside it (channels_last, transposes, permutations).
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def flat_compatible(tensors: list[torch.Tensor]) -> bool:
    """True when all tensors are flat and laid out alike, so element i of one matches element i
    of the others when each is read as a flat array (contiguous, channels_last, transposed...)."""
    first = tensors[0]
    return all(is_flat(t) and t.stride() == first.stride() for t in tensors)


def block_table(numels: list[int], chunk: int, device: torch.device) -> torch.Tensor:
    """(n_programs, 2) int64: row i = (tensor index, start element) of program i."""

    def make():
        counts = np.asarray(numels, dtype=np.int64)
        chunks = (counts + chunk - 1) // chunk
        tensor_index = np.repeat(np.arange(len(numels), dtype=np.int64), chunks)
        first_chunk_of_tensor = np.repeat(np.cumsum(chunks) - chunks, chunks)
        start = (np.arange(int(chunks.sum()), dtype=np.int64) - first_chunk_of_tensor) * chunk
        return to_device(torch.from_numpy(np.stack([tensor_index, start], axis=1).copy()), device)

    return _BLOCK_TABLES.get_or_make((tuple(numels), chunk, device), device, make)


def tensor_table(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """(n_tensors, n_columns) int64 table of pointers, counts and flags, on ``device``."""
    key = (device, len(rows[0]) if rows else 0, tuple(value for row in rows for value in row))
    return _TENSOR_TABLES.get_or_make(
        key, device, lambda: to_device(torch.tensor(rows, dtype=torch.int64), device))


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        # Pinned staging lets the copy run asynchronously; PyTorch's caching host allocator keeps
        # the pinned block alive until the copy on the current stream has finished.
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
