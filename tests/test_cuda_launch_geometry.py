"""Launch geometry of every CUDA launcher at the extremes, on the CPU.

No kernel runs here (no GPU): compile.launch is replaced by a recorder, and huge tensors are
'meta' tensors (shape without storage, data_ptr 0), so the launchers see tensors of more than 2^31
elements. The kernels' own index arithmetic for such sizes is 64-bit by construction (element and
matrix offsets are long long in csrc/); what is checked here is what the launchers pass: grids
within CUDA's limits, 64-bit sizes, the vector-path flag, and the dynamic shared-memory
attribute raised before a launch that needs more than 48 KiB.
"""
import contextlib
import sys
import types

import numpy as np
import pytest
import torch

from lowrank_kernels.kernels.cuda import compile as cuda_compile
from lowrank_kernels.kernels.cuda import decay_outer, sgd_step, symmetric_eig
from lowrank_kernels.ops import multi_tensor

BIG = 2**31 + 12345  # elements: beyond int32


@pytest.fixture
def launches(monkeypatch):
    """Replace compile.launch with a recorder that still applies the CUDA limits."""
    calls = []

    def record(filename, kernel, grid, block, args, device, shared_mem=0):
        cuda_compile.check_launch_geometry(kernel, grid, block)
        assert kernel in cuda_compile.KERNELS[filename], f"{kernel} not compiled from {filename}"
        calls.append(dict(filename=filename, kernel=kernel, grid=grid, block=block, args=args,
                          device=device, shared_mem=shared_mem))

    monkeypatch.setattr(cuda_compile, "launch", record)
    return calls


# ---------------------------------------------------------------------------------------------
# sgd_step
# ---------------------------------------------------------------------------------------------
def _sgd_tables(numels, pointers=None):
    pointers = pointers or [(4096 * (i + 1), 8192 * (i + 1), 0) for i in range(len(numels))]
    rows = [[p, g, b, n, 0] for (p, g, b), n in zip(pointers, numels)]
    return (torch.tensor(rows, dtype=torch.int64),
            multi_tensor.block_table(list(numels), sgd_step.CHUNK, torch.device("cpu")))


def _launch_sgd(tables, dtype, *, aligned, momentum=0.9):
    tensors, blocks = tables
    sgd_step.launch_sgd_step(tensors, blocks, dtype, 0.1, None, None, aligned=aligned,
                             weight_decay=1e-4, momentum=momentum, dampening=0.0,
                             nesterov=False, maximize=False, decoupled_weight_decay=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sgd_step_tensor_beyond_int32(launches, dtype):
    tables = _sgd_tables([BIG, 5])
    _launch_sgd(tables, dtype, aligned=True)
    (call,) = launches
    chunks = -(-BIG // sgd_step.CHUNK) + 1
    assert call["grid"] == (chunks,) and call["block"] == (sgd_step.THREADS,)
    chunk_arg = call["args"][-1]
    assert isinstance(chunk_arg, np.int64) and chunk_arg == sgd_step.CHUNK
    last_start = int(tables[1][-2, 1])  # the big tensor's last chunk starts beyond 2^31
    assert last_start >= 2**31 and tables[1].dtype == torch.int64
    assert call["kernel"] == {torch.float32: "sgd_step_f32", torch.bfloat16: "sgd_step_bf16",
                              torch.float16: "sgd_step_f16"}[dtype]


def test_sgd_step_aligned_flag_selects_the_vector_path(launches):
    tables = _sgd_tables([100, 33])
    _launch_sgd(tables, torch.float32, aligned=True)
    _launch_sgd(tables, torch.float32, aligned=False)
    _launch_sgd(tables, torch.float32, aligned=True, momentum=0.0)
    flags = [int(c["args"][10]) for c in launches]
    assert [f & sgd_step._ALIGNED for f in flags] == [sgd_step._ALIGNED, 0, sgd_step._ALIGNED]
    assert flags[0] & sgd_step._HAS_MOMENTUM and not flags[2] & sgd_step._HAS_MOMENTUM
    assert all(isinstance(c["args"][10], np.int32) for c in launches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sgd_step_chunk_is_whole_vectors(dtype):
    """Chunk starts of an aligned tensor stay 16-byte aligned: CHUNK is whole vectors."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert (sgd_step.CHUNK * itemsize) % sgd_step.VECTOR_BYTES == 0


def test_sgd_step_grid_limits():
    assert sgd_step.launch_geometry(cuda_compile.MAX_GRID[0]) == ((2**31 - 1,), (sgd_step.THREADS,))
    for bad in (0, 2**31):
        with pytest.raises(ValueError, match="chunks"):
            sgd_step.launch_geometry(bad)


def test_sgd_step_rejects_a_dtype_without_kernel():
    with pytest.raises(TypeError, match="float64"):
        _launch_sgd(_sgd_tables([10]), torch.float64, aligned=False)


# ---------------------------------------------------------------------------------------------
# decay_outer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decay_outer_matrix_beyond_int32(launches, dtype):
    m, n, k = 2**17, 2**16 + 3, 64  # m * n > 2^33
    W = torch.empty((m, n), dtype=dtype, device="meta")
    D = torch.empty((k, m), dtype=dtype, device="meta")
    F = torch.empty((k, n), dtype=dtype, device="meta")
    decay_outer.launch_decay_outer(W, D, F, 0.99, 0.5)
    (call,) = launches
    tiles = (m // decay_outer.TILE) * -(-n // decay_outer.TILE)
    assert call["grid"] == (tiles,) and call["block"] == (decay_outer.THREADS,)
    sizes = call["args"][3:6]
    assert all(isinstance(v, np.int64) for v in sizes) and [int(v) for v in sizes] == [m, n, k]
    flags = int(call["args"][8])
    # n * itemsize is not a multiple of 16 bytes: rows are not all aligned, no vector path.
    assert flags & decay_outer._VECTORIZED == 0 and flags & decay_outer._READ_W


def test_decay_outer_vector_flag_and_alpha_zero(launches):
    W = torch.empty((256, 512), device="meta")
    D = torch.empty((8, 256), device="meta")
    F = torch.empty((8, 512), device="meta")
    decay_outer.launch_decay_outer(W, D, F, 0.0, 0.0)
    (call,) = launches
    assert int(call["args"][5]) == 0  # alpha = 0: k = 0, D and F are not read
    assert int(call["args"][8]) == decay_outer._VECTORIZED  # decay = 0: W is not read


def test_decay_outer_grid_limits():
    assert decay_outer.launch_geometry(1, 1) == ((1,), (decay_outer.THREADS,))
    side = decay_outer.TILE * 2**16  # 2^32 tiles
    with pytest.raises(ValueError, match="thread blocks"):
        decay_outer.launch_geometry(side, side)


# ---------------------------------------------------------------------------------------------
# symmetric_eig
# ---------------------------------------------------------------------------------------------
def test_symmetric_eig_batch_beyond_int32(launches):
    b, n = 2**20 + 1, 64  # b * n * n > 2^32 elements
    a = torch.empty((b, n, n), dtype=torch.float32, device="meta")
    w, vt = symmetric_eig.launch_symmetric_eig(a, 10, 1e-7)
    (call,) = launches
    assert call["grid"] == (b,) and w.shape == (b, n) and vt.shape == (b, n, n)
    assert call["shared_mem"] == symmetric_eig.shared_bytes(n, torch.float32)
    assert isinstance(call["args"][3], np.int32) and int(call["args"][3]) == n


@pytest.mark.parametrize("n", [1, 2, 3, 33, 64, 127, 128, 238, 256])
def test_symmetric_eig_block_shape(n):
    grid, block, shared = symmetric_eig.launch_geometry(7, n, torch.float32)
    assert grid == (7,)
    assert block[0] % 32 == 0 and 32 <= block[0] <= symmetric_eig.MAX_THREADS
    assert shared == symmetric_eig.shared_bytes(n, torch.float32)


def test_symmetric_eig_padded_rows_in_shared_bytes():
    # n = 128: A is 128 x 129 (padded rows), 64 rotations (c, s, d), 32 reduction slots, 2 x 64 ints.
    assert symmetric_eig.shared_bytes(128, torch.float32) == (128 * 129 + 3 * 64 + 32) * 4 + 128 * 4
    assert symmetric_eig.shared_bytes(127, torch.float64) == (128 * 129 + 3 * 64 + 32) * 8 + 128 * 4


def test_symmetric_eig_limits_in_docstring_hold():
    """The module docstring's numbers: > 48 KiB beyond n 108 / 76, n <= 238 / 168 at 227 KiB."""
    limit_48k, h100 = 48 * 1024, 227 * 1024
    assert symmetric_eig._max_n(torch.float32, limit_48k) == 108
    assert symmetric_eig._max_n(torch.float64, limit_48k) == 76
    assert symmetric_eig._max_n(torch.float32, h100) == 238
    assert symmetric_eig._max_n(torch.float64, h100) == 168


def test_symmetric_eig_grid_limits_and_empty_batch(launches):
    with pytest.raises(ValueError, match="batch"):
        symmetric_eig.launch_geometry(2**31, 4, torch.float32)
    w, vt = symmetric_eig.launch_symmetric_eig(torch.empty((0, 5, 5), device="meta"), 10, 1e-7)
    assert launches == [] and w.shape == (0, 5) and vt.shape == (0, 5, 5)


# ---------------------------------------------------------------------------------------------
# compile.launch: limits, the shared-memory attribute, the caches
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,block", [((0,), (32,)), ((2**31,), (32,)), ((1, 65536), (32,)),
                                        ((1, 1, 65536), (32,)), ((1,), (1025,)),
                                        ((1,), (32, 32, 2)), ((1,), (1, 1, 65))])
def test_launch_geometry_limits(grid, block):
    with pytest.raises(ValueError, match="k:"):
        cuda_compile.check_launch_geometry("k", grid, block)


def test_launch_geometry_at_the_limits_is_accepted():
    cuda_compile.check_launch_geometry("k", (2**31 - 1, 65535, 65535), (1024,))
    cuda_compile.check_launch_geometry("k", (1,), (16, 16, 4))


class FakeFunction:
    """Stands for a cupy.RawKernel: records attribute writes and launches in order."""

    def __init__(self, static_shared=0):
        self.shared_size_bytes = static_shared
        self.events = []

    def __setattr__(self, name, value):
        if name == "max_dynamic_shared_size_bytes":
            self.events.append(("attribute", value))
        object.__setattr__(self, name, value)

    def __call__(self, grid, block, args, stream=None, shared_mem=0):
        self.events.append(("launch", shared_mem, stream))


def test_shared_memory_attribute_is_raised_once_before_the_launch(monkeypatch):
    function = FakeFunction()
    kernel = cuda_compile.LoadedKernel(function, contextlib.nullcontext(), shared_optin=227 * 1024)
    monkeypatch.setattr(cuda_compile, "loaded_kernel", lambda *key: kernel)
    monkeypatch.setattr(cuda_compile, "current_stream", lambda index: f"stream{index}")
    device = torch.device("cuda", 0)
    cuda_compile.launch("symmetric_eig.cu", "symmetric_eig_f32", (4,), (256,), (), device, 40_000)
    cuda_compile.launch("symmetric_eig.cu", "symmetric_eig_f32", (4,), (256,), (), device, 67_456)
    cuda_compile.launch("symmetric_eig.cu", "symmetric_eig_f32", (4,), (256,), (), device, 200_000)
    assert function.events == [("launch", 40_000, "stream0"), ("attribute", 227 * 1024),
                               ("launch", 67_456, "stream0"), ("launch", 200_000, "stream0")]
    with pytest.raises(ValueError, match="allows"):
        cuda_compile.launch("symmetric_eig.cu", "symmetric_eig_f32", (4,), (256,), (), device,
                            227 * 1024 + 1)
    assert len(function.events) == 4  # nothing launched


def test_static_shared_memory_counts_against_the_limits():
    function = FakeFunction(static_shared=16 * 1024)
    kernel = cuda_compile.LoadedKernel(function, contextlib.nullcontext(), shared_optin=100 * 1024)
    kernel((1,), (32,), (), None, 40 * 1024)  # 16 + 40 > 48 KiB: needs the attribute
    assert function.events[0] == ("attribute", 84 * 1024)
    with pytest.raises(ValueError):
        kernel((1,), (32,), (), None, 84 * 1024 + 1)


def _fake_cupy(monkeypatch, created):
    class Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def external_stream(pointer_value, index):
        created.append((pointer_value, index))
        return ("stream", pointer_value, index)

    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(Device=Device, ExternalStream=external_stream)
    monkeypatch.setitem(sys.modules, "cupy", cupy)


def test_stream_wrapper_cached_per_device_and_stream(monkeypatch):
    created = []
    _fake_cupy(monkeypatch, created)
    monkeypatch.setattr(cuda_compile, "_STREAMS", {})
    pointers = {0: 111, 1: 222}
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda index: types.SimpleNamespace(cuda_stream=pointers[index]))
    first = cuda_compile.current_stream(0)
    assert cuda_compile.current_stream(0) is first and first == ("stream", 111, 0)
    cuda_compile.current_stream(1)
    pointers[0] = 333  # torch switched streams: a new wrapper
    assert cuda_compile.current_stream(0) == ("stream", 333, 0)
    assert created == [(111, 0), (222, 1), (333, 0)]


def test_kernel_cached_per_file_name_and_device(monkeypatch):
    _fake_cupy(monkeypatch, [])
    monkeypatch.setattr(cuda_compile, "_KERNELS", {})
    monkeypatch.setattr(cuda_compile, "shared_memory_optin", lambda index: 100 * 1024)
    lookups = []

    class Module:
        def __init__(self, filename, index):
            self.filename, self.index = filename, index

        def get_function(self, name):
            lookups.append((self.filename, name, self.index))
            return FakeFunction()

    monkeypatch.setattr(cuda_compile, "load_module", Module)
    for _ in range(3):
        cuda_compile.loaded_kernel("sgd_step.cu", "sgd_step_f32", 0)
    cuda_compile.loaded_kernel("sgd_step.cu", "sgd_step_bf16", 0)
    cuda_compile.loaded_kernel("sgd_step.cu", "sgd_step_f32", 1)
    assert lookups == [("sgd_step.cu", "sgd_step_f32", 0), ("sgd_step.cu", "sgd_step_bf16", 0),
                       ("sgd_step.cu", "sgd_step_f32", 1)]
