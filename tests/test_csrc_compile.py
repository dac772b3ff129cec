"""Every CUDA source in csrc/ compiles, without a GPU, both as the loader compiles it (NVRTC, the
very spec of kernels/cuda/compile.py) and with the local nvcc.

NVRTC comes from the nvidia-cuda-nvrtc wheel of the ``dev`` extra; the NVRTC tests skip only when
no NVRTC library can be loaded at all. For sm_90a and sm_80 they fail on a compile error, on a
kernel missing from the binary, on flush-to-zero arithmetic, on spills in a memory-bound kernel
and on sgd_step kernels without 128-bit global loads and stores.
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lowrank_kernels.kernels import resources
from lowrank_kernels.kernels.cuda import compile as cuda_compile
from lowrank_kernels.kernels.cuda import nvrtc, nvrtc_check
from lowrank_kernels.kernels.cuda.compile import csrc_dir

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCES = sorted(CSRC.glob("*.cu"))
CASES = [(s.name, arch) for s in SOURCES for arch in nvrtc_check.ARCHS]


def test_csrc_has_sources():
    assert SOURCES, f"no .cu files found in {CSRC}"
    assert csrc_dir().resolve() in (CSRC.resolve(), (Path(__file__).parents[1] / "lowrank_kernels" / "csrc").resolve())


def defined_kernels(text: str) -> set[str]:
    """Names of the extern "C" kernels a source defines, directly or through a DEFINE_ macro."""
    direct = re.findall(r'extern "C" __global__ void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(',
                        text)
    names = {name for name in direct if not name.startswith("__")}
    prefixes = {macro: re.search(r"(\w+)_##SUFFIX", text[at.end():]).group(1)
                for at in re.finditer(r"#define (DEFINE_\w+)\(SUFFIX", text) for macro in [at.group(1)]}
    for macro, suffix in re.findall(r"^(DEFINE_\w+)\((\w+),", text, re.M):
        names.add(f"{prefixes[macro]}_{suffix}")
    return names


def test_kernel_table_lists_every_kernel():
    """compile.KERNELS (the name expressions NVRTC checks) names every kernel of every source."""
    assert sorted(cuda_compile.KERNELS) == [s.name for s in SOURCES]
    for source in SOURCES:
        defined = defined_kernels(cuda_compile.inline_includes(source.name))
        assert defined == set(cuda_compile.KERNELS[source.name]), source.name


def test_headers_are_part_of_the_compiled_text(tmp_path):
    """An edit of an included header changes the spec's text, hence its cache key."""
    (tmp_path / "a.cuh").write_text("#pragma once\nint header_value = 1;\n")
    (tmp_path / "k.cu").write_text('#include "a.cuh"\n#include "a.cuh"\nint body = 2;\n')
    text = cuda_compile.inline_includes("k.cu", tmp_path)
    assert text.count("int header_value = 1;") == 1 and "int body = 2;" in text
    assert '#line 1 "a.cuh"' in text and '#line 3 "k.cu"' in text
    assert "pragma once" not in text
    (tmp_path / "a.cuh").write_text("#pragma once\nint header_value = 3;\n")
    assert cuda_compile.inline_includes("k.cu", tmp_path) != text


def _nvrtc_or_skip():
    try:
        nvrtc.version()
    except nvrtc.NvrtcUnavailable as error:
        pytest.skip(f"no NVRTC library could be loaded: {error}")


@pytest.mark.parametrize("filename,arch", CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_compiles_as_loaded_with_nvrtc(filename, arch):
    _nvrtc_or_skip()
    spec = cuda_compile.compile_spec(filename, arch)
    assert "-ftz=false" in spec.options and f"-arch={arch}" in spec.options
    assert "#include" not in spec.source, "the compiled text must be self-contained"
    rows = nvrtc_check.check_source(filename, arch)
    assert [r.kernel for r in rows] == list(cuda_compile.KERNELS[filename])
    for r in rows:
        assert r.error is None, f"{r.kernel} for {arch}:\n{r.error}"
        assert r.registers is not None and r.registers > 0, f"{r.kernel}: no ptxas report"
        if r.memory_bound:
            assert not r.spills, f"{r.kernel} ({arch}) spills: {r.spill_stores}/{r.spill_loads} B"
        if r.kernel.startswith("sgd_step"):
            assert r.access.wide_loads > 0 and r.access.wide_stores > 0, (
                f"{r.kernel} ({arch}): no 128-bit global accesses: {r.access}")
    program = nvrtc_check.compile_source(filename, arch)
    assert program.cubin, f"{filename}: NVRTC returned no cubin for {arch}"
    flushed = re.findall(r"^\s*[\w.]+\.ftz\.[\w.]+", program.ptx, re.M)
    assert not flushed, f"{filename} ({arch}) flushes subnormals: {flushed[:3]}"


def test_report_lists_every_kernel_and_architecture():
    _nvrtc_or_skip()
    rows = nvrtc_check.check_all()
    assert {(r.kernel, r.arch) for r in rows} == {
        (k, a) for ks in cuda_compile.KERNELS.values() for k in ks for a in nvrtc_check.ARCHS}
    table = resources.markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "COMPILE ERROR" not in table


def test_runtime_arch():
    supported = (75, 80, 86, 89, 90, 100, 120)
    assert cuda_compile.runtime_arch((9, 0), supported) == "sm_90a"  # what the check compiles
    assert cuda_compile.runtime_arch((8, 0), supported) == "sm_80"
    assert cuda_compile.runtime_arch((12, 1), supported) == "compute_120"  # PTX, driver JIT
    with pytest.raises(RuntimeError, match="compute capabilities"):
        cuda_compile.runtime_arch((7, 0), supported)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_compiles_with_nvcc(source, tmp_path):
    result = subprocess.run(
        ["nvcc", "-arch=sm_90a", "-cubin", "-std=c++17", f"-I{CSRC}", "-Xptxas", "-warn-spills",
         "-o", str(tmp_path / (source.stem + ".cubin")), str(source)],
        capture_output=True, text=True, timeout=300)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{output}"
    assert "warning" not in output.lower(), f"nvcc warnings on {source.name}:\n{output}"
    assert (tmp_path / (source.stem + ".cubin")).stat().st_size > 0
