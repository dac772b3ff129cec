"""The scripts in examples/ run as a user runs them (a subprocess, short settings) and write what
they promise."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_example(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    script = ROOT / "examples" / name
    assert script.is_file(), f"missing example {script}"
    return subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_spectra_of_a_model_writes_its_picture(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "pictures" / "spectra.png"
    done = run_example("spectra_of_a_model.py", "--steps", "120", "--every", "40", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    # The per-layer tables of both runs, every Linear layer in them, and the picture.
    assert done.stdout.count("average threshold_rank over 4 layers") == 2, done.stdout[-2000:]
    for layer in ("fc1.weight", "fc2.weight", "fc3.weight", "out.weight"):
        assert layer in done.stdout
    assert f"wrote {out}" in done.stdout
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    import matplotlib.image

    height, width = matplotlib.image.imread(out).shape[:2]
    assert width > 2 * height > 300  # the three panels side by side


def test_spectra_of_a_model_rejects_bad_arguments(tmp_path):
    done = run_example("spectra_of_a_model.py", "--steps", "0", "--out", str(tmp_path / "x.png"))
    assert done.returncode != 0
    assert "--steps" in done.stderr
    assert not (tmp_path / "x.png").exists()
