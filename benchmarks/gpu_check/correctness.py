"""Stage 2 correctness checks of every op on every backend, beyond the unit tests.

    python3 benchmarks/gpu_check/correctness.py --part small    # fp64 references, repeats, views
    python3 benchmarks/gpu_check/correctness.py --part large    # one tensor above 2^31 elements

``--part small``, per op and backend:

* results against a float64 reference, with error bounds of the dtype's rounding;
* each case run twice from identical inputs: the two results bitwise equal (a race, or an
  uninitialised read, shows up as a difference);
* storage-offset-1 views (pointers that are not 16-byte aligned): still right, and whether they
  match the aligned run bit for bit is printed;
* sgd_step with ``found_inf`` set: every param, grad and momentum buffer bitwise unchanged;
* batched_eigh for n in {1, 2, 3, 33, 64, 70, 127, 128, 168, 238, 256}, float32 and float64
  (a size a backend does not take is skipped with the backend's own message; the dry run takes
  n in {1, 2, 3, 9}).

``--part large`` (GPU only): per kernel backend, one tensor above 2^31 elements per op (sgd_step: a
bfloat16 param of 2^31 + 7 elements; decay_outer_: a 46341 x 46341 float32 W; batched_eigh:
2^23 + 1 matrices of 16 x 16), checked everywhere against a small run or a float64 reference,
so that int32 offset overflow cannot hide. Exit status 1 when any check fails.
GPU_CHECK_DRY_RUN=1: tiny sizes, and the sizes the CPU interpreter runs in seconds.
"""
from __future__ import annotations

import argparse

import torch

import checks
from checks import ALPHA, DECAY, DEVICE, DRY_RUN, ON_GPU, Checks, bits_equal, decay_inputs

from lowrank_kernels import decay_outer_, fused_sgd_step_
from lowrank_kernels.backends import BACKENDS
from lowrank_kernels.ops.symmetric_eig import batched_eigh

# Per-element error bounds, |ours - ref| / (|ref| + scale) with scale the magnitude of the terms
# (see each check): a few roundings of the storage dtype (the CPU interpreter truncates bfloat16
# and float16 where a GPU rounds to nearest, so up to one ulp).
ELEMENT_LIMIT = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
EIGH_SIZES = (1, 2, 3, 33, 64, 70, 127, 128, 168, 238, 256)
EIGH_SIZES_DRY = (1, 2, 3, 9)           # the CPU interpreter takes many seconds at n = 33
EIGH_LIMIT = {torch.float32: (5e-5, 1e-4), torch.float64: (1e-11, 1e-10)}  # eigenvalues, residual


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def offset_view(t: torch.Tensor, offset: int = 1) -> torch.Tensor:
    """A copy of ``t`` at storage offset ``offset`` of a larger buffer: contiguous, but its data
    pointer is not 16-byte aligned."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    return view


def bound_err(actual: torch.Tensor, ref64: torch.Tensor, scale: torch.Tensor | float) -> float:
    """max |actual - ref| / (|ref| + scale), in float64."""
    err = (actual.double() - ref64).abs() / (ref64.abs() + scale)
    return float(err.max()) if err.numel() else 0.0


# ----------------------------------------------------------------------------------------------
# sgd_step
# ----------------------------------------------------------------------------------------------
SGD_FLAGS = {
    "momentum+coupled wd": dict(momentum=0.9, weight_decay=5e-4),
    "nesterov+decoupled wd+maximize": dict(momentum=0.9, nesterov=True, weight_decay=1e-2,
                                           decoupled_weight_decay=True, maximize=True),
    "no momentum+grad_scale": dict(weight_decay=5e-4, grad_scale=1024.0),
}


def sgd_shapes() -> list[tuple[int, ...]]:
    if DRY_RUN:
        return [(1,), (0,), (37,), (5, 9)]
    return [(1,), (0,), (3,), (4097,), (1000, 37), (64, 3, 3, 3), (1 << 20) + 3]


def sgd_case(dtype: torch.dtype, flags: dict, seed: int = 0):
    """(params, grads, bufs, first_step, kwargs) on the device, from a seeded CPU generator."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [s if isinstance(s, tuple) else (s,) for s in sgd_shapes()]
    grad_scale = flags.get("grad_scale")

    def draw(shape, std):
        return (torch.randn(shape, generator=gen) * std).to(DEVICE, dtype)

    params = [draw(s, 0.02) for s in shapes]
    grads = [draw(s, 0.01 * (grad_scale or 1.0)) for s in shapes]
    momentum = flags.get("momentum", 0.0)
    bufs = [draw(s, 0.01) for s in shapes] if momentum else None
    first = [i % 2 == 0 for i in range(len(shapes))]
    kwargs = {k: v for k, v in flags.items() if k != "grad_scale"}
    if grad_scale is not None:
        kwargs["grad_scale"] = torch.tensor(grad_scale, device=DEVICE)
    return params, grads, bufs, first, kwargs


def clone_all(tensors):
    return None if tensors is None else [t.clone() for t in tensors]


def sgd_run(backend, params, grads, bufs, first, kwargs, lr=0.1):
    fused_sgd_step_(params, grads, bufs, lr=lr, first_step=first, backend=backend, **kwargs)
    checks.synchronize()


def sgd_reference(params, grads, bufs, first, kwargs):
    """The torch backend in float64 on float64 copies."""
    p64, g64 = [p.double() for p in params], [g.double() for g in grads]
    b64 = None if bufs is None else [b.double() for b in bufs]
    sgd_run("torch", p64, g64, b64, first, kwargs)
    return p64, b64


def check_sgd_step(report: Checks, backend: str, dtype: torch.dtype, flag_name: str,
                   offset: bool = False) -> None:
    """float64 reference and a repeat; with ``offset``, the storage-offset-1 run instead (kept
    for the end: a misaligned access is a sticky CUDA error that ends every later check)."""
    flags = SGD_FLAGS[flag_name]
    label = f"sgd_step[{backend}] {dtype_name(dtype)} {flag_name}"
    params, grads, bufs, first, kwargs = sgd_case(dtype, flags)
    ref_p, ref_b = sgd_reference(params, grads, bufs, first, kwargs)
    if offset:
        check_sgd_step_offset(report, label, backend, dtype, params, grads, bufs, first, kwargs,
                              ref_p, ref_b)
        return
    runs = []
    for _ in range(2):
        p, b = clone_all(params), clone_all(bufs)
        sgd_run(backend, p, [g.clone() for g in grads], b, first, kwargs)
        runs.append((p, b))
    (p1, b1), (p2, b2) = runs
    # Scale: the magnitude of the terms of an update, so a result that cancels to ~0 is judged
    # by the rounding of its inputs, not of itself.
    err = max([bound_err(p, r, 0.02) for p, r in zip(p1, ref_p)]
              + ([bound_err(b, r, 0.01) for b, r in zip(b1, ref_b)] if b1 is not None else []))
    report.check(err <= ELEMENT_LIMIT[dtype], f"{label}: vs float64",
                 f"max element error {err:.1e} (limit {ELEMENT_LIMIT[dtype]:g})")
    same = all(bits_equal(x, y) for x, y in zip(p1, p2))
    if b1 is not None:
        same = same and all(bits_equal(x, y) for x, y in zip(b1, b2))
    report.check(same, f"{label}: run twice, bitwise equal")


def check_sgd_step_offset(report, label, backend, dtype, params, grads, bufs, first, kwargs,
                          ref_p, ref_b) -> None:
    aligned = clone_all(params)
    sgd_run(backend, aligned, [g.clone() for g in grads], clone_all(bufs), first, kwargs)
    p_off = [offset_view(p) for p in params]
    b_off = None if bufs is None else [offset_view(b) for b in bufs]
    sgd_run(backend, p_off, [offset_view(g) for g in grads], b_off, first, kwargs)
    err = max([bound_err(p, r, 0.02) for p, r in zip(p_off, ref_p)]
              + ([bound_err(b, r, 0.01) for b, r in zip(b_off, ref_b)] if b_off is not None else []))
    bitwise = all(bits_equal(x, y) for x, y in zip(p_off, aligned))
    report.check(err <= ELEMENT_LIMIT[dtype], f"{label}: storage offset 1",
                 f"max element error {err:.1e}; bitwise equal to the aligned run: "
                 f"{'yes' if bitwise else 'no'}")


def check_found_inf(report: Checks, backend: str, dtype: torch.dtype) -> None:
    params, grads, bufs, first, kwargs = sgd_case(dtype, SGD_FLAGS["momentum+coupled wd"])
    before = [t.clone() for t in params + grads + bufs]
    fused_sgd_step_(params, grads, bufs, lr=0.1, first_step=first, backend=backend,
                    found_inf=torch.ones((), device=DEVICE), **kwargs)
    checks.synchronize()
    unchanged = all(bits_equal(a, b) for a, b in zip(params + grads + bufs, before))
    report.check(unchanged, f"sgd_step[{backend}] {dtype_name(dtype)}: found_inf=1 leaves every "
                 "param, grad and momentum buffer bitwise unchanged")


# ----------------------------------------------------------------------------------------------
# decay_outer_
# ----------------------------------------------------------------------------------------------
def decay_problems() -> list[tuple[int, int, int]]:
    # Shapes chosen to hit both integer specialisations of a Triton kernel (multiples of 16 and
    # not) without a fresh autotuning for every K.
    if DRY_RUN:
        return [(40, 24, 1), (33, 17, 20)]
    return [(192, 160, 64), (129, 67, 1), (129, 67, 7), (129, 67, 300)]


def decay_reference(W, D, F):
    """(reference, scale): the float64 result and |decay W| + |alpha| |D|^T |F|, the magnitude of
    the terms that the kernels round."""
    W64, D64, F64 = W.double(), D.double(), F.double()
    ref = DECAY * W64 + ALPHA * (D64.T @ F64)
    scale = abs(DECAY) * W64.abs() + abs(ALPHA) * (D64.abs().T @ F64.abs())
    return ref, scale


def decay_err(W_out, ref, scale) -> float:
    err = (W_out.double() - ref).abs() / (ref.abs() + scale).clamp_min(1e-30)
    return float(err.max())


def check_decay_outer(report: Checks, backend: str, dtype: torch.dtype, m: int, n: int,
                      k: int, misaligned: bool) -> None:
    label = f"decay_outer_[{backend}] {dtype_name(dtype)} {m}x{n} K={k}"
    W, D, F = decay_inputs(m, n, k, dtype)
    ref, scale = decay_reference(W, D, F)
    limit = ELEMENT_LIMIT[dtype]
    if misaligned:  # only the offset run (kept for the end: see check_sgd_step)
        aligned = W.clone()
        decay_outer_(aligned, D, F, DECAY, ALPHA, backend=backend)
        out = offset_view(W)
        decay_outer_(out, offset_view(D), offset_view(F), DECAY, ALPHA, backend=backend)
        checks.synchronize()
        err = decay_err(out, ref, scale)
        report.check(err <= limit, f"{label}: storage offset 1 (W, D, F)",
                     f"max element error {err:.1e}; bitwise equal to the aligned run: "
                     f"{'yes' if bits_equal(out, aligned) else 'no'}")
        return
    outs = []
    for _ in range(2):
        out = W.clone()
        decay_outer_(out, D, F, DECAY, ALPHA, backend=backend)
        checks.synchronize()
        outs.append(out)
    err = decay_err(outs[0], ref, scale)
    report.check(err <= limit, f"{label}: vs float64", f"max element error {err:.1e} "
                 f"(limit {limit:g})")
    report.check(bits_equal(outs[0], outs[1]), f"{label}: run twice, bitwise equal")


# ----------------------------------------------------------------------------------------------
# batched_eigh
# ----------------------------------------------------------------------------------------------
def symmetric_batch(b: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """b symmetric matrices: even ones random symmetric (eigenvalues of both signs), odd ones
    Gram matrices X X^T (positive semi-definite, the spectra's use)."""
    gen = torch.Generator().manual_seed(seed + n)
    out = torch.empty(b, n, n, dtype=torch.float64)
    for i in range(b):
        x = torch.randn(n, n, generator=gen, dtype=torch.float64)
        out[i] = (x + x.T) / 2 if i % 2 == 0 else (x @ x.T) / n
    return out.to(DEVICE, dtype)


def eigh_errors(A: torch.Tensor, w: torch.Tensor, V: torch.Tensor, w_ref: torch.Tensor):
    """(eigenvalue error / ||A||_2, ||A V - V diag(w)||_F / ||A||_F, max |V^T V - I|)."""
    A64, w64, V64 = A.double(), w.double(), V.double()
    norm2 = w_ref.abs().amax(dim=-1).clamp_min(1e-300)
    value_err = float(((w64 - w_ref).abs().amax(dim=-1) / norm2).max())
    residual = (A64 @ V64 - V64 * w64[:, None, :]).flatten(1).norm(dim=-1)
    residual = float((residual / A64.flatten(1).norm(dim=-1).clamp_min(1e-300)).max())
    eye = torch.eye(A.shape[-1], dtype=torch.float64, device=A.device)
    orthogonality = float((V64.mT @ V64 - eye).abs().max())
    return value_err, residual, orthogonality


def check_eigh(report: Checks, backend: str, dtype: torch.dtype, n: int,
               offset: bool = False) -> None:
    label = f"batched_eigh[{backend}] {dtype_name(dtype)} n={n}"
    A = symmetric_batch(4, n, dtype)
    if offset:  # kept for the end: see check_sgd_step
        w, V = batched_eigh(A, backend=backend)
        w3, V3 = batched_eigh(offset_view(A), backend=backend)
        checks.synchronize()
        value_err, residual, _ = eigh_errors(A, w3, V3, torch.linalg.eigvalsh(A.double()))
        value_limit, residual_limit = EIGH_LIMIT[dtype]
        report.check(value_err <= value_limit and residual <= residual_limit,
                     f"{label}: storage offset 1", f"eigenvalue error {value_err:.1e}, residual "
                     f"{residual:.1e}; bitwise equal to the aligned run: "
                     f"{'yes' if bits_equal(w3, w) and bits_equal(V3, V) else 'no'}")
        return
    try:
        w, V = batched_eigh(A, backend=backend)
    except ValueError as exc:  # a size the backend does not take: its message says so
        if "up to n" in str(exc):
            report.skip(label, str(exc).splitlines()[0])
            return
        raise
    w2, V2 = batched_eigh(A.clone(), backend=backend)
    checks.synchronize()
    w_ref = torch.linalg.eigvalsh(A.double())
    value_err, residual, orthogonality = eigh_errors(A, w, V, w_ref)
    value_limit, residual_limit = EIGH_LIMIT[dtype]
    report.check(value_err <= value_limit and residual <= residual_limit
                 and orthogonality <= residual_limit, f"{label}: vs float64",
                 f"eigenvalue error / ||A||_2 {value_err:.1e} (limit {value_limit:g}), "
                 f"residual {residual:.1e}, |V^T V - I| {orthogonality:.1e} "
                 f"(limit {residual_limit:g})")
    report.check(bits_equal(w, w2) and bits_equal(V, V2), f"{label}: run twice, bitwise equal")


# ----------------------------------------------------------------------------------------------
# Above 2^31 elements (GPU only)
# ----------------------------------------------------------------------------------------------
BIG = (1 << 31) + 7
PERIOD = 4099                 # prime: the pattern's period, unrelated to any block size
CHUNK = 1 << 28               # elements compared at a time
BIG_SIDE = 46341              # decay_outer_'s W: 46341^2 = 2,147,488,281 elements > 2^31
BIG_EIGH_N = 16
BIG_EIGH_BATCH = (1 << 31) // (BIG_EIGH_N * BIG_EIGH_N) + 1   # b n^2 > 2^31


def periodic(values: torch.Tensor, numel: int) -> torch.Tensor:
    """A 1-D tensor of ``numel`` elements repeating ``values``."""
    reps = -(-numel // values.numel())
    return values.repeat(reps)[:numel].contiguous()


def compare_to_period(big: torch.Tensor, small: torch.Tensor, rtol: float):
    """(every |big[i] - small[i % P]| <= rtol |small[i % P]| + 1e-30, first index that is not
    (-1: none), every element bitwise equal). A skipped or doubly applied update is off by
    about lr * |update| / |param| (5% here), far beyond one bfloat16 ulp; the small run may take
    another code path (a masked tail), hence a tolerance of rounding rather than bit equality."""
    bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[big.dtype]
    ok, first_bad, bitwise = True, -1, True
    for start in range(0, big.numel(), CHUNK):
        stop = min(start + CHUNK, big.numel())
        index = torch.arange(start, stop, device=big.device) % small.numel()
        expected, got = small[index], big[start:stop]
        bitwise = bitwise and bool(torch.equal(got.view(bits), expected.view(bits)))
        bad = ((got.float() - expected.float()).abs()
               > rtol * expected.float().abs() + 1e-30).nonzero()
        if bad.numel() and ok:
            ok, first_bad = False, start + int(bad[0])
    return ok, first_bad, bitwise


def check_sgd_step_big(report: Checks, backend: str) -> None:
    label = f"sgd_step[{backend}] bfloat16 param of 2^31 + 7 elements"
    gen = torch.Generator().manual_seed(3)
    small = [(torch.randn(PERIOD, generator=gen) * std).to(DEVICE, torch.bfloat16)
             for std in (0.02, 0.01, 0.01)]
    kwargs = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, backend=backend)
    p, g, b = (periodic(t, BIG) for t in small)
    fused_sgd_step_([p], [g], [b], first_step=[False], **kwargs)
    p_s, g_s, b_s = (t.clone() for t in small)
    fused_sgd_step_([p_s], [g_s], [b_s], first_step=[False], **kwargs)
    checks.synchronize()
    rtol = 2.0 ** -7                                   # one bfloat16 ulp
    ok_p, bad_p, bits_p = compare_to_period(p, p_s, rtol)
    ok_b, bad_b, bits_b = compare_to_period(b, b_s, rtol)
    report.check(ok_p and ok_b, label, (
        f"every element within one bfloat16 ulp of the same backend's result on the pattern's "
        f"period ({PERIOD} elements); bitwise equal: {'yes' if bits_p and bits_b else 'no'}")
        if ok_p and ok_b else f"first differing element: param {bad_p}, momentum buffer {bad_b}")


def check_decay_outer_big(report: Checks, backend: str) -> None:
    m = n = BIG_SIDE
    k = 4
    label = f"decay_outer_[{backend}] float32 W {m} x {n} ({m * n:,} elements), K={k}"
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    W0 = torch.randn(m, n, generator=gen, device=DEVICE) * 0.02
    D = torch.randn(k, m, generator=gen, device=DEVICE) * 1e-2
    F = torch.randn(k, n, generator=gen, device=DEVICE)
    W = W0.clone()
    decay_outer_(W, D, F, DECAY, ALPHA, backend=backend)
    checks.synchronize()
    worst, rows = 0.0, 2048
    for r in range(0, m, rows):
        ref, scale = decay_reference(W0[r:r + rows], D[:, r:r + rows], F)
        worst = max(worst, decay_err(W[r:r + rows], ref, scale))
    report.check(worst <= ELEMENT_LIMIT[torch.float32], label,
                 f"every element vs float64: max element error {worst:.1e} "
                 f"(limit {ELEMENT_LIMIT[torch.float32]:g})")


def check_eigh_big(report: Checks, backend: str) -> None:
    n, b = BIG_EIGH_N, BIG_EIGH_BATCH
    label = f"batched_eigh[{backend}] float32 {b:,} matrices of {n} x {n}"
    small = symmetric_batch(7, n, torch.float32, seed=5)
    A = small.repeat(-(-b // 7), 1, 1)[:b].contiguous()
    w, V = batched_eigh(A, backend=backend)
    w_s, V_s = batched_eigh(small, backend=backend)
    checks.synchronize()
    index = torch.arange(b, device=DEVICE) % 7
    value_err = float((w - w_s[index]).abs().max() / w_s.abs().max())
    # Eigenvectors at both ends of the batch and around the 2^31-element boundary.
    boundary = min((1 << 31) // (n * n), b - 1)
    picks = torch.cat([torch.arange(0, 64), torch.arange(max(boundary - 64, 0), b)]).to(DEVICE)
    _, residual, orthogonality = eigh_errors(A[picks], w[picks], V[picks],
                                             torch.linalg.eigvalsh(A[picks].double()))
    ok = value_err <= 1e-6 and residual <= 1e-4 and orthogonality <= 1e-4
    report.check(ok, label, f"eigenvalues of every matrix vs the same backend on the 7 distinct "
                 f"ones: max error {value_err:.1e} (limit 1e-06); residual {residual:.1e}, "
                 f"|V^T V - I| {orthogonality:.1e} at both ends and the 2^31 boundary (limit 1e-04)")
    del A, w, V


# ----------------------------------------------------------------------------------------------
def part_small(report: Checks) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False      # IEEE fp32, the float32 contract
    # Every backend that runs here, torch included (it is an implementation too).
    for op in ("sgd_step", "decay_outer_", "batched_eigh"):
        names = checks.runnable(report, BACKENDS, op)  # the same list each time; skips per op
    sgd_dtypes = (torch.float32, torch.bfloat16) if DRY_RUN else (torch.float32, torch.bfloat16,
                                                                   torch.float16)
    for backend in names:
        for dtype in sgd_dtypes:
            for flag_name in SGD_FLAGS:
                report.run(f"sgd_step[{backend}] {dtype} {flag_name}",
                           lambda: check_sgd_step(report, backend, dtype, flag_name))
            report.run(f"sgd_step[{backend}] {dtype} found_inf",
                       lambda: check_found_inf(report, backend, dtype))
    for backend in names:
        for dtype in (torch.float32, torch.bfloat16):
            for m, n, k in decay_problems():
                report.run(f"decay_outer_[{backend}] {dtype} {m}x{n} K={k}",
                           lambda: check_decay_outer(report, backend, dtype, m, n, k, False))
    sizes = EIGH_SIZES_DRY if DRY_RUN else EIGH_SIZES
    if DRY_RUN:
        report.skip(f"batched_eigh n in {EIGH_SIZES[3:]}",
                    "dry run: the CPU interpreter is too slow for them; a GPU run checks them")
    for backend in names:
        for dtype in (torch.float32, torch.float64):
            for n in sizes:
                report.run(f"batched_eigh[{backend}] {dtype} n={n}",
                           lambda: check_eigh(report, backend, dtype, n))
    # Storage-offset-1 views last: a misaligned access is a sticky CUDA error.
    for backend in names:
        for dtype in sgd_dtypes:
            report.run(f"sgd_step[{backend}] {dtype} offset 1",
                       lambda: check_sgd_step(report, backend, dtype, "momentum+coupled wd",
                                              offset=True))
        m, n, k = decay_problems()[0]
        report.run(f"decay_outer_[{backend}] offset 1",
                   lambda: check_decay_outer(report, backend, torch.float32, m, n, k, True))
        for dtype in (torch.float32,) if DRY_RUN else (torch.float32, torch.float64):
            n = sizes[-1] if DRY_RUN else 33      # odd: the kernels pad it to even
            report.run(f"batched_eigh[{backend}] {dtype} n={n} offset 1",
                       lambda: check_eigh(report, backend, dtype, n, offset=True))


def part_large(report: Checks) -> None:
    label = "tensors above 2^31 elements (sgd_step, decay_outer_, batched_eigh)"
    if not ON_GPU:
        report.skip(label, "needs a GPU (tens of GB of device memory)")
        return
    free, _ = torch.cuda.mem_get_info()
    if free < 48 * 2**30:
        report.skip(label, f"needs about 48 GiB of free GPU memory, {free / 2**30:.0f} GiB free")
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    for backend in checks.runnable(report, checks.KERNEL_BACKENDS, label):
        report.run(f"sgd_step[{backend}] big", lambda: check_sgd_step_big(report, backend))
        report.run(f"decay_outer_[{backend}] big", lambda: check_decay_outer_big(report, backend))
        report.run(f"batched_eigh[{backend}] big", lambda: check_eigh_big(report, backend))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("small", "large"), required=True)
    args = ap.parse_args(argv)
    report = Checks(f"correctness --part {args.part}")
    (part_small if args.part == "small" else part_large)(report)
    return report.finish()


if __name__ == "__main__":
    raise SystemExit(main())
