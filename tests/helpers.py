"""Shared test helpers."""
import torch

# (rtol, atol) against an fp32-exact reference, by parameter dtype: a few ulps of the dtype.
TOLERANCE = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}


def assert_close_verbose(actual, expected, rtol, atol, name="tensor", max_report=5):
    """torch.testing-style closeness check whose message names the worst offending indices."""
    actual_f = actual.detach().double().cpu()
    expected_f = expected.detach().double().cpu()
    assert actual_f.shape == expected_f.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual_f - expected_f).abs()
    bad = diff > atol + rtol * expected_f.abs()
    bad |= torch.isnan(actual_f) != torch.isnan(expected_f)
    if bad.any():
        idx = bad.nonzero()[:max_report]
        rows = [f"  {tuple(i.tolist())}: got {actual_f[tuple(i)].item():.8g}, "
                f"expected {expected_f[tuple(i)].item():.8g}" for i in idx]
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements differ "
                             f"(rtol={rtol}, atol={atol}, max abs diff {diff.max().item():.3g}):\n"
                             + "\n".join(rows))


def run_ranks(script, world: int, argv_of_rank, timeout_s: float, label: str = "ranks") -> None:
    """Run ``script`` as ``world`` processes (``python script *argv_of_rank(rank, port)``) that
    meet at a TCPStore held here, on a port the OS picked (so no port can collide); fail the test
    with every rank's output when one fails or they do not finish within ``timeout_s``."""
    import os
    import subprocess
    import sys
    from datetime import timedelta

    import pytest

    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=60))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), *map(str, argv_of_rank(rank, store.port))],
                              env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for rank in range(world)]

    def output(outputs) -> str:
        return "\n".join(f"--- rank {rank} (exit {proc.returncode}) stderr:\n{err[-6000:]}"
                         f"\n--- stdout:\n{out[-2000:]}"
                         for rank, (proc, (out, err)) in enumerate(zip(procs, outputs)))

    try:
        outputs = [proc.communicate(timeout=timeout_s) for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        outputs = [proc.communicate() for proc in procs]
        pytest.fail(f"the {label} did not finish within {timeout_s} s:\n" + output(outputs))
    if any(proc.returncode != 0 for proc in procs):
        pytest.fail(f"one of the {label} failed:\n" + output(outputs))


def join_ranks(rank: int, world: int, store_port: int) -> None:
    """In a process started by ``run_ranks``: one thread, and join the gloo group at the parent's
    store."""
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))


def error_of(action) -> str | None:
    """``"Type: message"`` of what ``action()`` raises, None when it returns."""
    try:
        action()
    except Exception as exc:  # the tests read the type and the message
        return f"{type(exc).__name__}: {exc}"
    return None
