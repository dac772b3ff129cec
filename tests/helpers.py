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
