"""The staged GPU check (benchmarks/gpu_check.sh) rehearsed on the CPU: its dry run goes through
every stage, writes a summary naming each one, stays within the 8 result files that come back
from the GPU machine, and exits 0 when nothing failed. Also: the report's headline selection
names only contenders that exist, and its context picks the rows and names the timer that the
stage scripts' --headline/--rest/--timer ask for."""
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
MAX_RESULT_FILES = 8


@contextmanager
def benchmarks_importable():
    """The benchmarks' modules (runner, report_core, the op packages) importable, as report.py and
    the benchmark conftest make them."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        yield
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc, out


def test_dry_run_passes_and_names_every_stage(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary
    stages = re.findall(r"^\| (\d) \| [^|]+ \| (passed|failed|timed out|skipped) \|", summary,
                        flags=re.M)
    assert {stage for stage, _ in stages} == {"1", "2", "3", "4"}, summary
    assert not [s for s in stages if s[1] in ("failed", "timed out")], summary
    for stage in "1234":
        assert re.search(rf"{stage}: (passed|skipped);", summary), summary
    # The stages that need a GPU say so.
    assert re.search(r"compute-sanitizer racecheck \| skipped \| .*needs a GPU", summary), summary
    assert re.search(r"rest of the report \| skipped \| .*needs a GPU", summary), summary


def test_dry_run_writes_at_most_eight_files(dry_run):
    _, out = dry_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= MAX_RESULT_FILES, [p.name for p in files]
    smoke = (out / "1_environment_smoke.log").read_text()
    assert "PASS" in smoke and "smoke summary - " in smoke, smoke[-2000:]
    correctness = (out / "2_correctness.log").read_text()
    assert "found_inf=1 leaves every param" in correctness, correctness[-2000:]
    assert "storage offset 1" in correctness, correctness[-2000:]
    assert "FAIL" not in correctness, correctness[-3000:]


def test_headline_selection_names_real_contenders():
    with benchmarks_importable():
        from decay_outer import cases as decay_outer_cases
        from sgd_step import cases as sgd_step_cases
        from spectra import cases as spectra_cases
        from training_step import cases as training_cases
    assert sgd_step_cases.HEADLINE <= set(sgd_step_cases.BY_KEY)
    assert "sgd_fused" in sgd_step_cases.HEADLINE
    assert decay_outer_cases.HEADLINE_CONTENDERS <= set(decay_outer_cases.BY_KEY)
    assert {(d, k) for d, k in decay_outer_cases.HEADLINE_PROBLEMS} <= {
        (d, k) for d in decay_outer_cases.DTYPES for k in decay_outer_cases.KS}
    keys = {c.key for c in spectra_cases.CONTENDERS}
    assert {key for _, key in spectra_cases.HEADLINE} <= keys
    assert {name for name, _ in spectra_cases.HEADLINE} <= set(spectra_cases.ALL_MATRIX_SETS)
    assert training_cases.HEADLINE <= set(training_cases.BY_KEY)


def test_report_context_selects_rows_and_names_its_timer():
    pytest.importorskip("triton.testing")
    with benchmarks_importable():
        from report_core import Context
    settings = dict(quick=True, warmup=3, repeat=20, copy={"bytes_per_s": 1e9}, env={})
    headline = Context(device=torch.device("cuda", 0), rows="headline", timer="do_bench",
                       **settings)
    assert headline.wants(headline=True) and not headline.wants(headline=False)
    rest = Context(device=torch.device("cpu"), rows="rest", **settings)
    assert rest.wants(headline=False) and not rest.wants(headline=True)
    # On a GPU the notes name do_bench and its budgets instead of call counts; elsewhere the
    # timer falls back to per-call timing and the notes say so.
    assert headline.uses_do_bench
    note = headline.timing_note("steps")
    assert "triton.testing.do_bench" in note and "25 ms of warm-up steps" in note, note
    assert "untimed" not in note, note
    cpu = Context(device=torch.device("cpu"), timer="do_bench", **settings)
    assert not cpu.uses_do_bench
    assert cpu.timing_note("steps") == "3 untimed + 20 timed steps per row"
    with pytest.raises(ValueError, match="row selection 'best'"):
        Context(device=torch.device("cpu"), rows="best", **settings)
    with pytest.raises(ValueError, match="timer 'wall'"):
        Context(device=torch.device("cpu"), timer="wall", **settings)
