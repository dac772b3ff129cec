"""Every Triton kernel variant compiles for real GPUs (sm_90a, sm_80) without a GPU.

The interpreter that runs the other Triton tests on the CPU accepts programs the real compiler
rejects and shows neither register spills nor the width of memory accesses; this test runs
Triton's real compiler on every variant the launchers can emit (``kernels/triton/aot.py``), in a
subprocess without TRITON_INTERPRET, and holds the results to the rules of the resource report.
Compiled rows are cached on disk (``$LOWRANK_AOT_CACHE`` or ~/.cache/lowrank-kernels/aot), so
only the first run on a machine pays the compiles (about a minute on 2 cores).
"""
import json
import os
import subprocess
import sys

import pytest

from lowrank_kernels.kernels.resources import count_global_accesses, parse_ptxas_verbose

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launchers pass it explicitly anyway
    result = subprocess.run([sys.executable, "-m", "lowrank_kernels.kernels.triton.aot",
                             "--json", str(out)], capture_output=True, text=True, env=env,
                            timeout=1500)
    assert out.exists(), f"the ahead-of-time check wrote nothing:\n{result.stderr[-4000:]}"
    return json.loads(out.read_text()), result


def test_every_variant_compiles_for_both_architectures(rows):
    data, result = rows
    errors = [f"{r['kernel']} {r['variant']} {r['arch']}: {r['error']}" for r in data if r["error"]]
    assert not errors, "compile errors:\n" + "\n".join(errors)
    assert result.returncode == 0, result.stderr[-4000:]
    by_kernel = {}
    for r in data:
        by_kernel.setdefault(r["kernel"], set()).add((r["variant"], r["arch"]))
    assert set(by_kernel) == {"triton:sgd_step", "triton:decay_outer", "triton:symmetric_eig"}
    for kernel, variants in by_kernel.items():
        archs = {arch for _, arch in variants}
        assert archs == {"sm_90a", "sm_80"}, (kernel, archs)
        names = {name for name, _ in variants}
        assert all((name, arch) in variants for name in names for arch in archs), kernel
    # 3 dtypes x {plain, momentum} x {aligned, any}; every decay_outer precision and shape class.
    assert len({n for n, _ in by_kernel["triton:sgd_step"]}) == 12
    decay_names = {n for n, _ in by_kernel["triton:decay_outer"]}
    for prefix in ("float32-ieee-256x512", "float32-tf32-256x512", "bfloat16-default-256x512",
                   "float32-ieee-10x100", "float32-tf32-10x100", "bfloat16-default-10x100"):
        assert any(n.startswith(prefix) for n in decay_names), prefix


def test_step_and_rank_b_update_never_spill(rows):
    data, _ = rows
    spilling = [f"{r['kernel']} {r['variant']} {r['arch']}: {r['spill_stores']}/{r['spill_loads']} B"
                for r in data if r["no_spills"] and (r["spill_stores"] or r["spill_loads"])]
    assert {r["kernel"] for r in data if r["no_spills"]} == {"triton:sgd_step",
                                                              "triton:decay_outer"}
    assert not spilling, "variants that spill registers:\n" + "\n".join(spilling)


def test_aligned_step_uses_128_bit_loads_and_stores(rows):
    data, _ = rows
    aligned = [r for r in data if r["kernel"] == "triton:sgd_step" and "-aligned" in r["variant"]]
    assert len(aligned) == 12
    for r in aligned:
        streams = 3 if "-momentum-" in r["variant"] else 2  # param, grad (, momentum buffer)
        assert r["wide_loads"] >= streams, r
        assert r["wide_stores"] >= streams - 1, r


def test_access_counter_reads_ptx_widths():
    ptx = """
        ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
        @%p1 ld.global.L1::evict_first.b32 %r5, [ %rd2 + 0 ];
        ld.global.nc.v2.f32 {%f1, %f2}, [%rd3];
        st.global.v2.b64 [ %rd4 + 0 ], { %rd5, %rd6 };
        st.global.b16 [ %rd7 + 0 ], %rs1;
    """
    c = count_global_accesses(ptx)
    assert (c.vector_loads, c.wide_loads, c.scalar_loads) == (2, 1, 1)
    assert (c.vector_stores, c.wide_stores, c.scalar_stores) == (1, 1, 1)


def test_ptxas_report_parser():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k1' for 'sm_90a'
ptxas info    : Function properties for k1
    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 72 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'k2' for 'sm_90a'
ptxas info    : Function properties for k2
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers, 380 bytes cmem[0]
"""
    info = parse_ptxas_verbose(log)
    assert info["k1"] == dict(stack=8, spill_stores=12, spill_loads=4, registers=72, shared=2048)
    assert info["k2"] == dict(stack=0, spill_stores=0, spill_loads=0, registers=24, shared=0)
