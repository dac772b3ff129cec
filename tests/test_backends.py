"""Backend selection: the per-op "auto" order and available_backends' default device.

Only the CUDA branch of "auto" looks at the order, so these tests stand in a CUDA device and
make every backend "available" by monkeypatching ``why_unavailable``: no GPU is needed.
"""
import pytest
import torch

from lowrank_kernels import backends
from lowrank_kernels.backends import (AUTO_ORDER, BACKENDS, DEFAULT_ORDER, auto_candidates,
                                      auto_order, available_backends, resolve_backend)

CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu_backends(monkeypatch):
    """Pretend a CUDA device on which the given backends (default: all) can run."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)

    def allow(*names):
        names = names or BACKENDS

        def why(backend, device):
            return None if backend in names else f"{backend} switched off by the test"

        monkeypatch.setattr(backends, "why_unavailable", why)

    allow()
    return allow


def test_every_order_names_the_kernel_backends_once():
    for op, by_variant in AUTO_ORDER.items():
        assert None in by_variant or by_variant, op
        for variant, order in by_variant.items():
            assert sorted(order) == ["cuda", "triton"], (op, variant, order)


def test_auto_order_per_op_and_dtype():
    assert auto_order("decay_outer", torch.bfloat16) == ("triton", "cuda")
    assert auto_order("decay_outer", "float32-tf32") == ("triton", "cuda")
    assert auto_order("decay_outer", torch.float32) == ("cuda", "triton")
    # An op's variant without an entry of its own takes the op's default, else DEFAULT_ORDER.
    assert auto_order("sgd_step", torch.float16) == AUTO_ORDER["sgd_step"][None]
    assert auto_order("decay_outer", torch.float16) == DEFAULT_ORDER
    assert auto_order() == DEFAULT_ORDER
    with pytest.raises(ValueError, match="unknown op 'matmul'"):
        auto_order("matmul")


def test_resolve_auto_follows_the_op_order(gpu_backends):
    assert resolve_backend("auto", CUDA, op="decay_outer", variant=torch.bfloat16) == "triton"
    assert resolve_backend("auto", CUDA, op="decay_outer", variant=torch.float32) == "cuda"
    assert resolve_backend(None, CUDA, op="symmetric_eig", variant=torch.float64) == "cuda"
    # The old two-argument call keeps the old order.
    assert resolve_backend("auto", CUDA) == "cuda"
    # An explicit name beats the order.
    assert resolve_backend("cuda", CUDA, op="decay_outer", variant=torch.bfloat16) == "cuda"


def test_resolve_auto_skips_what_cannot_run(gpu_backends):
    gpu_backends("torch", "cuda")  # no Triton
    assert resolve_backend("auto", CUDA, op="decay_outer", variant=torch.bfloat16) == "cuda"
    assert auto_candidates(CUDA, "decay_outer", torch.bfloat16) == ["cuda", "torch"]
    gpu_backends("torch")
    assert resolve_backend("auto", CUDA, op="decay_outer", variant=torch.bfloat16) == "torch"


def test_env_var_beats_the_order(gpu_backends, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    assert resolve_backend("auto", CUDA, op="decay_outer", variant=torch.bfloat16) == "cuda"


def test_cpu_is_always_torch_under_auto(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert resolve_backend("auto", "cpu", op="decay_outer", variant=torch.bfloat16) == "torch"
    assert auto_candidates("cpu", "decay_outer", torch.bfloat16) == ["torch"]


def test_decay_outer_asks_for_its_own_order(gpu_backends, monkeypatch):
    # The op passes its dtype (and the TF32 flag) as the order's variant.
    from lowrank_kernels.ops import decay_outer as op

    seen = []
    real = op.resolve_backend

    def spy(backend, device, op=None, variant=None):
        seen.append((op, variant))
        return real(backend, "cpu", op=op, variant=variant)

    monkeypatch.setattr(op, "resolve_backend", spy)
    for dtype in (torch.float32, torch.bfloat16):
        W = torch.zeros(3, 4, dtype=dtype)
        op.decay_outer_(W, torch.ones(2, 3, dtype=dtype), torch.ones(2, 4, dtype=dtype), 1.0, 1.0)
    assert seen == [("decay_outer", torch.float32), ("decay_outer", torch.bfloat16)]


def test_order_variant_of_float32_follows_the_tf32_flag():
    from lowrank_kernels.ops.decay_outer import _order_variant

    cuda_w = type("FakeCudaTensor", (), {"dtype": torch.float32, "device": CUDA})()
    matmul = torch.backends.cuda.matmul
    kept = matmul.allow_tf32
    try:
        matmul.allow_tf32 = True
        assert _order_variant(cuda_w) == "float32-tf32"
        assert _order_variant(torch.empty(2, 2)) == torch.float32  # CPU: no TF32
        matmul.allow_tf32 = False
        assert _order_variant(cuda_w) == torch.float32
    finally:
        matmul.allow_tf32 = kept
    assert _order_variant(torch.empty(2, 2, dtype=torch.bfloat16)) == torch.bfloat16


def test_symmetric_eig_falls_back_along_its_order(gpu_backends, monkeypatch):
    # Too large for the first kernel of the order: "auto" takes the next that fits, then torch.
    from lowrank_kernels.ops import symmetric_eig as op

    limits = {"cuda": 100, "triton": 256, "torch": 2**31 - 1}
    monkeypatch.setattr(op, "max_kernel_n", lambda name, dtype, device: limits[name])
    fake = type("FakeMatrices", (), {"device": CUDA, "dtype": torch.float32,
                                     "shape": (1, 200, 200)})()
    assert op._choose_backend("auto", fake) == "triton"
    fake.shape = (1, 300, 300)
    assert op._choose_backend("auto", fake) == "torch"
    with pytest.raises(ValueError, match="takes matrices up to n = 100"):
        op._choose_backend("cuda", fake)


def test_available_backends_defaults_to_the_current_device(monkeypatch):
    assert available_backends() == available_backends(backends.default_device())
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert backends.default_device().type == expected
    assert "torch" in available_backends()


def test_kernel_module_per_op_and_backend():
    launchers = {"sgd_step": "launch_sgd_step", "decay_outer": "launch_decay_outer",
                 "symmetric_eig": "launch_symmetric_eig"}
    assert set(launchers) == set(AUTO_ORDER)
    for op, launcher in launchers.items():
        for backend in backends.KERNEL_BACKENDS:
            module = backends.kernel_module(op, backend)
            assert module.__name__ == f"lowrank_kernels.kernels.{backend}.{op}"
            assert callable(getattr(module, launcher))
            assert backends.kernel_module(op, backend) is module  # imported once
    with pytest.raises(ValueError, match="unknown op 'matmul'"):
        backends.kernel_module("matmul", "triton")
    with pytest.raises(ValueError, match="backend 'torch' has no kernel module"):
        backends.kernel_module("sgd_step", "torch")


@pytest.mark.skipif("triton" not in available_backends("cpu"),
                    reason="the Triton interpreter is not available")
def test_every_op_imports_its_kernels_through_kernel_module(monkeypatch):
    from lowrank_kernels.ops import decay_outer, sgd_step, symmetric_eig

    asked = []

    def spy(op, backend):
        asked.append((op, backend))
        return backends.kernel_module(op, backend)

    for module in (sgd_step, decay_outer, symmetric_eig):
        monkeypatch.setattr(module, "kernel_module", spy)
    sgd_step.fused_sgd_step_([torch.zeros(4)], [torch.ones(4)], None, lr=0.5, backend="triton")
    W = torch.zeros(2, 3)
    decay_outer.decay_outer_(W, torch.ones(1, 2), torch.ones(1, 3), 1.0, 1.0, backend="triton")
    symmetric_eig.batched_eigh(torch.eye(2).expand(1, 2, 2), backend="triton")
    assert ("sgd_step", "triton") in asked and ("decay_outer", "triton") in asked
    assert ("symmetric_eig", "triton") in asked
    assert torch.equal(W, torch.ones(2, 3))
