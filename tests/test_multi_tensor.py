"""Unit tests of the multi-tensor launch tables (lowrank_kernels/ops/multi_tensor.py)."""
import pytest
import torch

from lowrank_kernels.ops import multi_tensor
from lowrank_kernels.ops.multi_tensor import block_table, flat_compatible, is_flat, tensor_table

CHUNK = 16384


def rows(table):
    return [tuple(r) for r in table.cpu().tolist()]


# ----------------------------------------------------------------------------------------------
# block_table
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("numels, expected", [
    ([5, 40000], [(0, 0), (1, 0), (1, 16384), (1, 32768)]),
    # A zero-size entry gets no program (the op drops them before calling, but the table copes).
    ([5, 0, 40000], [(0, 0), (2, 0), (2, 16384), (2, 32768)]),
    ([16384], [(0, 0)]),
    ([16385], [(0, 0), (0, 16384)]),
    ([1, 1, 1], [(0, 0), (1, 0), (2, 0)]),
    ([32768, 3], [(0, 0), (0, 16384), (1, 0)]),
    ([40000, 5], [(0, 0), (0, 16384), (0, 32768), (1, 0)]),
])
def test_block_table_rows(numels, expected, device):
    table = block_table(numels, CHUNK, device)
    assert table.dtype == torch.int64
    assert table.device.type == device.type
    assert table.shape == (len(expected), 2)
    assert rows(table) == expected


def test_block_table_small_chunk_matches_bruteforce(device):
    numels, chunk = [7, 3, 0, 10, 1], 4
    expected = [(i, s) for i, n in enumerate(numels) for s in range(0, n, chunk)]
    assert rows(block_table(numels, chunk, device)) == expected
    # Every element of every tensor is covered exactly once.
    covered = {(i, s + k) for i, s in expected for k in range(chunk) if s + k < numels[i]}
    assert covered == {(i, e) for i, n in enumerate(numels) for e in range(n)}


def test_block_table_empty(device):
    table = block_table([], CHUNK, device)
    assert table.dtype == torch.int64
    assert table.numel() == 0


def test_block_table_cache_returns_same_object(device):
    numels = [123, 4567, 89]
    first = block_table(numels, CHUNK, device)
    again = block_table(list(numels), CHUNK, device)
    assert again is first
    # A different chunk size or different counts is a different table.
    other_chunk = block_table(numels, 64, device)
    assert other_chunk is not first
    assert rows(other_chunk) != rows(first)
    other_counts = block_table([123, 4567, 90], CHUNK, device)
    assert other_counts is not first


def test_block_table_cache_is_bounded_lru(device):
    # Through the public function only: many distinct tables evict the least recently used one,
    # while one touched all along stays cached.
    oldest = block_table([1000001], CHUNK, device)
    kept = block_table([1000002], CHUNK, device)
    for i in range(300):
        block_table([2000000 + i], CHUNK, device)
        if i % 8 == 0:
            assert block_table([1000002], CHUNK, device) is kept
    rebuilt = block_table([1000001], CHUNK, device)
    assert rebuilt is not oldest  # evicted, then rebuilt
    assert rows(rebuilt) == rows(oldest) == [(0, s) for s in range(0, 1000001, CHUNK)]


def test_tensor_table(device):
    table = tensor_table([[1, 2, 3, 4, 0], [5, 6, 0, 7, 1]], device)
    assert table.dtype == torch.int64
    assert table.device.type == device.type
    assert table.cpu().tolist() == [[1, 2, 3, 4, 0], [5, 6, 0, 7, 1]]
    big = 2**62 + 12345  # pointers survive as exact int64
    assert tensor_table([[big, 0, 0, 1, 0]], device).cpu()[0, 0].item() == big


def test_tensor_table_cache(device):
    rows_a = [[11, 12, 13, 100, 1], [21, 22, 23, 200, 0]]
    first = tensor_table(rows_a, device)
    assert tensor_table([list(r) for r in rows_a], device) is first
    # Any changed value (a pointer, a count, a first-step flag) is a different table.
    for changed in ([[11, 12, 13, 100, 0], [21, 22, 23, 200, 0]],
                    [[11, 12, 13, 100, 1], [21, 99, 23, 200, 0]],
                    [[11, 12, 13, 101, 1], [21, 22, 23, 200, 0]]):
        other = tensor_table(changed, device)
        assert other is not first
        assert other.cpu().tolist() == changed
    assert first.cpu().tolist() == rows_a  # the cached table was not modified


def test_tensor_table_cache_keeps_the_shape(device):
    # Same values, another number of columns: a different table, not the cached one.
    wide = tensor_table([[31, 32, 33, 34, 35, 36]], device)
    assert wide.shape == (1, 6)
    narrow = tensor_table([[31, 32, 33], [34, 35, 36]], device)
    assert narrow.shape == (2, 3)


# ----------------------------------------------------------------------------------------------
# is_flat / flat_compatible
# ----------------------------------------------------------------------------------------------
def _layouts():
    base = torch.randn(4, 6)
    return {
        "contiguous": (base, True),
        "transposed": (torch.randn(6, 4).t(), True),
        "permuted_3d": (torch.randn(2, 3, 4).permute(2, 0, 1), True),
        "channels_last": (torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last), True),
        "row_slice": (base[1:3], True),  # contiguous, with a storage offset
        "column_slice": (base[:, :3], False),
        "strided_slice": (base[:, ::2], False),
        "strided_rows": (base[::2], False),
        "expanded": (torch.randn(4, 1).expand(4, 6), False),
        "overlapping": (torch.randn(10).as_strided((3, 3), (1, 1)), False),
        "size_one_dims": (torch.randn(1, 5, 1), True),
        "empty": (torch.randn(0, 3), True),
        "scalar": (torch.tensor(1.0), True),
    }


@pytest.mark.parametrize("name", list(_layouts()))
def test_is_flat(name):
    t, expected = _layouts()[name]
    assert is_flat(t) is expected


def test_is_flat_span_matches_memory():
    # A flat tensor's elements are exactly the numel() elements starting at data_ptr().
    for name, (t, flat) in _layouts().items():
        if not flat or t.numel() == 0:
            continue
        span = torch.empty(0).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),))
        assert sorted(span.tolist()) == sorted(t.flatten().tolist()), name


def test_flat_compatible():
    a = torch.randn(4, 6)
    t = torch.randn(6, 4).t()
    cl = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert flat_compatible([a, torch.randn(4, 6), torch.zeros(4, 6)])
    assert flat_compatible([t, torch.randn(6, 4).t()])
    assert flat_compatible([cl, torch.zeros_like(cl)])
    # Same shape, different layouts: element i of the flat arrays would not match.
    assert not flat_compatible([t, torch.randn(4, 6)])
    assert not flat_compatible([cl, torch.randn(2, 3, 4, 5)])
    assert not flat_compatible([torch.randn(2, 3, 4, 5), cl])
    # A non-flat member spoils the group even when strides agree.
    s = torch.randn(4, 12)[:, ::2]
    assert not flat_compatible([s, torch.randn(4, 12)[:, ::2]])
    assert not flat_compatible([a[:, ::2], torch.randn(4, 3)])
    assert flat_compatible([a])
    assert not flat_compatible([a[:, ::2]])


# ----------------------------------------------------------------------------------------------
# CUDA graph capture: no table is made during a capture, and tables a capture used stay cached
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def capturing(monkeypatch):
    """Switch the capture probe of multi_tensor on and off (a capture needs a GPU; the cache's
    rules do not)."""
    state = {"on": False}
    monkeypatch.setattr(multi_tensor, "capture_underway", lambda device: state["on"])

    def set_capturing(on: bool):
        state["on"] = on

    return set_capturing


def test_table_miss_during_capture_raises(device, capturing):
    capturing(True)
    with pytest.raises(multi_tensor.TableMissDuringCapture, match="Run warm-up steps eagerly"):
        tensor_table([[3001, 3002, 0, 10, 0]], device)
    with pytest.raises(multi_tensor.TableMissDuringCapture, match="block table"):
        block_table([3003], CHUNK, device)
    # Nothing was made: outside the capture the tables are built as usual.
    capturing(False)
    assert tensor_table([[3001, 3002, 0, 10, 0]], device).cpu().tolist() == [[3001, 3002, 0, 10, 0]]


def test_warm_up_then_capture_finds_the_tables(device, capturing):
    rows_ = [[4001, 4002, 4003, 70000, 1]]
    warm_tensors = tensor_table(rows_, device)
    warm_blocks = block_table([70000], CHUNK, device)
    capturing(True)
    assert tensor_table(rows_, device) is warm_tensors
    assert block_table([70000], CHUNK, device) is warm_blocks


def test_tables_used_in_a_capture_are_never_evicted(device, capturing):
    captured = block_table([5000001], CHUNK, device)
    capturing(True)
    assert block_table([5000001], CHUNK, device) is captured  # pinned from here on
    capturing(False)
    for i in range(3 * multi_tensor._TABLE_CACHE_SIZE):  # enough to evict any unpinned table
        block_table([6000000 + i], CHUNK, device)
    capturing(True)  # a replay-era capture (or the graph itself) still finds the same table
    assert block_table([5000001], CHUNK, device) is captured
    capturing(False)
    # The cache stays bounded apart from the pinned tables.
    assert len(multi_tensor._BLOCK_TABLES.tables) <= (multi_tensor._TABLE_CACHE_SIZE
                                                      + len(multi_tensor._BLOCK_TABLES.pinned))


def test_capture_probe_asks_torch_only_for_cuda_devices(monkeypatch):
    calls = []

    def probe():
        calls.append(1)
        return True

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", probe)
    assert multi_tensor.capture_underway(torch.device("cuda", 0)) is True
    assert multi_tensor.capture_underway(torch.device("cpu")) is False
    assert calls == [1]
