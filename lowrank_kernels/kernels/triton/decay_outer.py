"""Triton kernel of ``decay_outer_`` (semantics: lowrank_kernels/ops/decay_outer.py).

    W <- decay * W + alpha * D^T F          W (m, n), D (K, m), F (K, n), all contiguous

One program per BLOCK_M x BLOCK_N tile of W. It accumulates the tile of D^T F in fp32 registers
over K in BLOCK_K chunks with ``tl.dot`` (tensor cores for bfloat16), then reads the W tile once
and writes it once. Out-of-range rows, columns and K (tl.dot needs a K chunk of at least 16, so
K = 1 is a chunk of 16 with 15 masked zero rows) are masked loads of zero, and masked stores.

Special values follow ``torch.addmm_`` (BLAS): ``decay == 0`` never reads W (NaN/Inf in W do not
propagate) and ``alpha == 0`` never reads D or F.

float32 precision: ``tl.dot`` runs in IEEE fp32 unless ``torch.backends.cuda.matmul.allow_tf32``
is True, in which case it uses TF32 tensor cores, the same rule torch.addmm_ follows on CUDA, so
the two agree to fp32 rounding by default.

On a GPU the tile shape is autotuned once per (M, N, K rounded up to a power of two, dtype);
tuning runs the kernel several times, so W is saved and restored around it (``restore_value``),
and later calls of the same shape launch the chosen configuration directly. Make one call before
capturing a CUDA graph. Under TRITON_INTERPRET=1 (CPU tensors) one small fixed configuration
runs instead, with bfloat16 operands widened to fp32 before ``tl.dot`` (the interpreter's dot
would multiply their raw bit patterns; widening is exact). Large K is a loop over K inside each
program (no split-K): enough programs exist whenever W has at least a few hundred tiles.
"""
from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from ...backends import triton_interpreter_enabled
from ...execution import on_device
from .launch import FP_FUSION

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}

# Interpreter (CPU) configuration: small tiles so that small test matrices still span several.
INTERPRETER_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16)


def _config(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                         num_warps=warps, num_stages=stages)


# Candidates for the GPU: large tiles for the memory-bound small-K case (fewer, longer programs,
# wide coalesced W rows), narrower ones for more programs when W is small, and BLOCK_K from 16
# (K <= 16, no wasted padding) to 64 (large K, fewer loop trips).
_GPU_CONFIGS = [
    _config(128, 128, 16, 8, 2),
    _config(64, 128, 16, 4, 2),
    _config(64, 64, 16, 4, 2),
    _config(128, 128, 32, 8, 3),
    _config(128, 128, 64, 8, 3),
    _config(128, 256, 32, 8, 3),
    _config(64, 128, 32, 4, 3),
    _config(64, 128, 64, 4, 4),
    _config(128, 64, 32, 4, 3),
    _config(64, 64, 32, 4, 4),
]


# Largest tile side or K chunk of any configuration (bounds the int32 offsets in a tile).
MAX_BLOCK = max(max(c.kwargs.values()) for c in _GPU_CONFIGS)


def _tile(c) -> tuple[int, int, int, int, int]:
    kw = c.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_warps, c.num_stages


# Configurations that spill registers, from the ahead-of-time compile of every configuration for
# sm_90a and sm_80 (``python -m lowrank_kernels.kernels.triton.aot --kernel decay_outer``, Triton
# 3.6 and 3.9; the CI test fails if a configuration the pruner keeps spills):
# * IEEE float32 (tl.dot on the CUDA cores, operands in registers): every BLOCK_K = 32 tile but
#   64x64 spills somewhere, so IEEE keeps BLOCK_K = 16;
# * TF32: 128x256x32 and 64x128x64 (4 warps, 4 stages) spill;
# * W's sides not both divisible by 16 (Triton then cannot vectorise the rows and keeps a mask and
#   an address per element): every tile above 64x64 spills, for every dtype.
_TF32_SPILLS = {(128, 256, 32, 8, 3), (64, 128, 64, 4, 4)}
_SMALL_TILE = 64 * 64


def _prune_configs(configs, named_args, **kwargs):
    """The autotuner's candidates for one problem: no K chunk wider than K needs (all-padding
    work), and none of the configurations known to spill for this precision and W shape (above);
    at least one is always kept."""
    k_bucket = named_args["K_BUCKET"]
    precision = kwargs.get("INPUT_PRECISION")
    divisible = named_args["M"] % 16 == 0 and named_args["N"] % 16 == 0
    kept = []
    for c in configs:
        bm, bn, bk, _, _ = tile = _tile(c)
        if bk > max(16, k_bucket):
            continue
        if precision == "ieee" and bk > 16:
            continue
        if precision == "tf32" and tile in _TF32_SPILLS:
            continue
        if not divisible and bm * bn > _SMALL_TILE:
            continue
        kept.append(c)
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"],
                                                c.kwargs["BLOCK_K"]))]


# K and K_BUCKET are loop and mask bounds (and the autotune key), read_w a 0/1 flag: Triton's
# specialisation of integers on divisibility by 16 and on the value 1 would only multiply the
# compiled kernels.
@triton.jit(do_not_specialize=["K", "K_BUCKET", "read_w"])
def _decay_outer_kernel(
    w_ptr, d_ptr, f_ptr,
    M, N, K, K_BUCKET,
    decay, alpha, read_w,
    DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, WIDEN_OPERANDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # Consecutive programs share a row band of W, hence the same D columns (reused from L2).
    row0 = (pid // tiles_n) * BLOCK_M
    col0 = (pid % tiles_n) * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    in_m = rm < M - row0
    in_n = rn < N - col0

    # Addresses are a 64-bit scalar base per tile plus int32 offsets inside the tile (the
    # launcher keeps BLOCK * max(M, N) below 2^31): per-element 64-bit pointers would take two
    # registers each, for the whole K loop.
    d_offsets = rk[None, :] * M + rm[:, None]  # D^T tile (BLOCK_M, BLOCK_K): D[k, m], m-contiguous
    f_offsets = rk[:, None] * N + rn[None, :]
    d_base = d_ptr + row0
    f_base = f_ptr + col0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        a = tl.load(d_base + d_offsets, mask=(rk[None, :] < k_left) & in_m[:, None], other=0.0)
        b = tl.load(f_base + f_offsets, mask=(rk[:, None] < k_left) & in_n[None, :], other=0.0)
        if WIDEN_OPERANDS:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
        d_base += BLOCK_K * M
        f_base += BLOCK_K * N

    w_ptrs = (w_ptr + row0.to(tl.int64) * N + col0) + (rm[:, None] * N + rn[None, :])
    w_mask = in_m[:, None] & in_n[None, :]
    if read_w != 0:  # a uniform branch: decay == 0 never reads W (BLAS beta = 0)
        w = tl.load(w_ptrs, mask=w_mask, other=0.0, eviction_policy="evict_first")
        out = decay * w.to(tl.float32) + alpha * acc
    else:
        out = alpha * acc
    tl.store(w_ptrs, out.to(DTYPE), mask=w_mask, eviction_policy="evict_first")


_decay_outer_tuned = triton.autotune(
    # INPUT_PRECISION changes the kernel (and which tiles the pruner keeps) and read_w the bytes
    # moved, so a config tuned for one variant must not be handed to the other.
    configs=_GPU_CONFIGS, key=["M", "N", "K_BUCKET", "INPUT_PRECISION", "read_w"],
    restore_value=["w_ptr"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_decay_outer_kernel)


def _tf32_enabled() -> bool:
    with warnings.catch_warnings():  # newer torch steers towards fp32_precision; same answer
        warnings.simplefilter("ignore")
        return bool(torch.backends.cuda.matmul.allow_tf32)


def input_precision(dtype: torch.dtype, device: torch.device) -> str | None:
    """tl.dot's input precision for float32: IEEE unless torch allows TF32 matmuls (on CUDA).
    None (Triton's default) for bfloat16, whose products are exact on tensor cores anyway."""
    if dtype != torch.float32:
        return None
    return "tf32" if device.type == "cuda" and _tf32_enabled() else "ieee"


# Tuned launch settings per problem, so that only the first call of a shape goes through the
# autotuner (whose per-call bookkeeping costs host time comparable to a small-K kernel).
_TUNED: dict[tuple, dict] = {}


def _launch_kwargs(config) -> dict:
    if hasattr(config, "all_kwargs"):
        return config.all_kwargs()
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def launch_arguments(W: torch.Tensor, D: torch.Tensor, F: torch.Tensor, decay: float,
                     alpha: float) -> tuple[tuple, dict]:
    """(positional args, variant keywords) of ``_decay_outer_kernel`` for one call: the one place
    where the op's arguments become the kernel's, shared by the launcher and the ahead-of-time
    check. The tile configuration is added by the autotuner (GPU) or INTERPRETER_CONFIG."""
    m, n = W.shape
    k = D.shape[0] if alpha != 0.0 else 0  # alpha = 0: D and F are never read
    k_bucket = triton.next_power_of_2(max(k, 1))
    interpreted = W.device.type != "cuda" and triton_interpreter_enabled()
    variant = dict(
        DTYPE=_TL_DTYPE[W.dtype], INPUT_PRECISION=input_precision(W.dtype, W.device),
        # The interpreter's tl.dot multiplies bfloat16 operands as their raw 16-bit patterns;
        # widened to fp32 first, the products are exact, as on tensor cores.
        WIDEN_OPERANDS=interpreted and W.dtype != torch.float32,
        enable_fp_fusion=FP_FUSION,
    )
    return (W, D, F, m, n, k, k_bucket, float(decay), float(alpha), int(decay != 0.0)), variant


def launch_decay_outer(W: torch.Tensor, D: torch.Tensor, F: torch.Tensor, decay: float,
                       alpha: float) -> None:
    """In place ``W <- decay * W + alpha * D^T F``; W, D, F contiguous, one dtype and device,
    checked by the op."""
    m, n = W.shape
    if max(m, n) * MAX_BLOCK >= 2**31:
        raise ValueError(f"decay_outer_: the Triton kernel indexes tiles with 32-bit offsets and "
                         f"takes m, n < {2**31 // MAX_BLOCK}, got W of shape {(m, n)}; use "
                         "backend='cuda' or 'torch'")
    args, common = launch_arguments(W, D, F, decay, alpha)
    if W.device.type != "cuda" and triton_interpreter_enabled():
        cfg = INTERPRETER_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _decay_outer_kernel[grid](*args, **common, **cfg, num_warps=4, num_stages=1)
        return

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    key = (W.device.index, W.dtype, m, n, args[6], args[9], *common.values())
    with on_device(W.device):
        tuned = _TUNED.get(key)
        if tuned is None:
            _decay_outer_tuned[grid](*args, **common)
            _TUNED[key] = _launch_kwargs(_decay_outer_tuned.best_config)
        else:
            _decay_outer_kernel[grid(tuned)](*args, **common, **tuned)


def aot_variants():
    """Every kernel the launcher can emit on a GPU, as (name, args, kwargs) of real launches built
    by ``launch_arguments`` on small CPU stand-ins (the compiler reads only dtypes, 16-byte
    alignment and the integers' specialisation), one per autotune configuration that the pruner
    keeps for some K. Each is compiled by the ahead-of-time check (``aot.py``).

    W's sides are specialised by Triton on divisibility by 16 (they are D's and F's row strides),
    so the pruner's choice is compiled for both classes: sides divisible by 16, and sides that
    are not (a 10-class classifier), whose per-element addressing needs the smaller tiles."""
    cases = [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.bfloat16, None)]
    for dtype, precision in cases:
        for m, n in ((256, 512), (10, 100)):
            W = torch.zeros((m, n), dtype=dtype)
            configs = {}
            for k in (1, 32, 128):  # K chunk needs: 16 (K <= 16), 32, 64 (every config)
                named = dict(K_BUCKET=triton.next_power_of_2(k), M=m, N=n)
                for c in _prune_configs(_GPU_CONFIGS, named, INPUT_PRECISION=precision):
                    configs[_config_name(c)] = c
            chosen = sorted(configs.items())
            D = torch.zeros((128, m), dtype=dtype)
            F = torch.zeros((128, n), dtype=dtype)
            args, variant = launch_arguments(W, D, F, 0.9, -0.1)
            # The CPU stand-ins would say "ieee" and, under the interpreter, widen bf16: a GPU
            # launch has the precision torch allows and never widens.
            variant.update(INPUT_PRECISION=precision, WIDEN_OPERANDS=False)
            for name, c in chosen:
                label = f"{str(dtype).removeprefix('torch.')}-{precision or 'default'}-{m}x{n}-{name}"
                yield label, args, {**variant, **_launch_kwargs(c)}


def _config_name(c) -> str:
    kw = c.kwargs
    return (f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}-w{c.num_warps}s{c.num_stages}")

