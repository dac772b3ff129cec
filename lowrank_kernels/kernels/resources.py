"""What a compiled kernel uses: registers, spills, shared memory and the width of its global
memory accesses, read from ``ptxas -v`` and from the PTX text.

Shared by the ahead-of-time checks of both kernel families (``kernels/triton/aot.py`` and
``kernels/cuda/nvrtc_check.py``), which compile every variant for sm_90a and sm_80 without a GPU.
A memory-bound kernel should neither spill nor use scalar global accesses where 128-bit ones fit:
both are visible here before any GPU runs the kernel.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Global loads and stores in PTX: ld.global[.qualifiers][.v2|.v4].type / st.global...
# (ld.global.nc, ld.global.L1::evict_first, ld.global.v4.b32 ...). Predicated forms start "@%p".
_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
_VECTOR = re.compile(r"\.v(2|4|8)\b")
_WIDTH = re.compile(r"\.[bfsu](8|16|32|64)\b")


@dataclass
class AccessCounts:
    """Static counts of global accesses in one PTX entry (instructions, not executions)."""

    vector_loads: int = 0    # ld.global.v2/.v4: 64- or 128-bit per thread
    wide_loads: int = 0      # accesses of 128 bits per thread (v4 of 32-bit, v2 of 64-bit)
    scalar_loads: int = 0
    vector_stores: int = 0
    wide_stores: int = 0
    scalar_stores: int = 0


@dataclass
class KernelResources:
    """One compiled variant of one kernel for one architecture."""

    kernel: str
    variant: str
    arch: str
    registers: int | None = None
    spill_stores: int | None = None  # bytes
    spill_loads: int | None = None   # bytes
    stack: int | None = None         # bytes of stack frame (local memory)
    shared: int | None = None        # bytes of static shared memory (Triton: its whole use)
    access: AccessCounts = field(default_factory=AccessCounts)
    memory_bound: bool = False       # the report demands no spills and 128-bit accesses
    no_spills: bool = False          # spills are a defect (memory-bound, or pruned of them)
    error: str | None = None

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)

    def as_row(self) -> dict:
        row = asdict(self)
        row.update(row.pop("access"))
        return row


def count_global_accesses(ptx: str) -> AccessCounts:
    counts = AccessCounts()
    for match in _GLOBAL_ACCESS.finditer(ptx):
        kind, qualifiers = match.group(1), match.group(2)
        vector = _VECTOR.search(qualifiers)
        width = _WIDTH.search(qualifiers)
        lanes = int(vector.group(1)) if vector else 1
        bits = lanes * (int(width.group(1)) if width else 32)
        prefix = "loads" if kind == "ld" else "stores"
        if vector:
            setattr(counts, f"vector_{prefix}", getattr(counts, f"vector_{prefix}") + 1)
        else:
            setattr(counts, f"scalar_{prefix}", getattr(counts, f"scalar_{prefix}") + 1)
        if bits >= 128:
            setattr(counts, f"wide_{prefix}", getattr(counts, f"wide_{prefix}") + 1)
    return counts


# ptxas -v:  "ptxas info    : Compiling entry function 'NAME' for 'sm_90a'"
#            "ptxas info    : Function properties for NAME"
#            "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
#            "ptxas info    : Used 24 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]"
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas_verbose(log: str) -> dict[str, dict[str, int]]:
    """Per entry function: registers, stack, spill_stores, spill_loads, shared (bytes)."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = out.setdefault(entry.group(1), {})
            continue
        if current is None:
            continue
        frame = _FRAME.search(line)
        if frame:
            current.update(stack=int(frame.group(1)), spill_stores=int(frame.group(2)),
                           spill_loads=int(frame.group(3)))
        used = _USED.search(line)
        if used:
            current["registers"] = int(used.group(1))
            current["shared"] = int(used.group(2) or 0)
    return out


def find_ptxas(arch: str = "sm_90a") -> str | None:
    """The ptxas that Triton compiles with for ``arch`` (it bundles one), else the toolkit's."""
    capability = int(re.sub(r"\D", "", arch) or 90)
    try:
        from triton.backends.nvidia import compiler as nvidia

        try:  # Triton >= 3.7 picks a ptxas per architecture
            tool = nvidia.get_ptxas(capability)
        except TypeError:  # Triton 3.6: one ptxas
            tool = nvidia.get_ptxas()
        if tool is not None and Path(tool.path).exists():
            return str(tool.path)
    except Exception:  # noqa: BLE001 - no Triton or another layout: fall back to PATH
        pass
    return shutil.which("ptxas")


def ptxas_verbose(ptx: str, arch: str, ptxas: str | None = None) -> dict[str, dict[str, int]]:
    """Assemble ``ptx`` for ``arch`` (e.g. 'sm_90a') with ``ptxas -v`` and parse its report."""
    ptxas = ptxas or find_ptxas(arch)
    if ptxas is None:
        raise FileNotFoundError("ptxas not found (neither Triton's bundled one nor on PATH)")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        result = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(src), "-o",
                                 str(Path(tmp) / "kernel.cubin")],
                                capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}:\n{result.stderr.strip()}")
    return parse_ptxas_verbose(result.stdout + result.stderr)


def markdown_table(rows: list[KernelResources]) -> str:
    header = ("| kernel | variant | arch | regs | spill st/ld (B) | stack (B) | smem (B) "
              "| 128-bit ld | scalar ld | 128-bit st | scalar st | verdict |")
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        a = r.access
        lines.append(
            f"| {r.kernel} | {r.variant} | {r.arch} | {_fmt(r.registers)} | "
            f"{_fmt(r.spill_stores)}/{_fmt(r.spill_loads)} | {_fmt(r.stack)} | {_fmt(r.shared)} | "
            f"{a.wide_loads} | {a.scalar_loads} | {a.wide_stores} | {a.scalar_stores} | "
            f"{verdict(r)} |")
    return "\n".join(lines)


def is_defect(r: KernelResources) -> bool:
    """A compile error, spills where the kernel must have none, or a memory-bound kernel
    without 128-bit loads or stores; a few bytes of spills elsewhere are reported, not failed."""
    if r.error:
        return True
    if r.spills and (r.no_spills or r.memory_bound):
        return True
    return r.memory_bound and (r.access.wide_loads == 0 or r.access.wide_stores == 0)


def verdict(r: KernelResources) -> str:
    if r.error:
        return "COMPILE ERROR"
    problems = []
    if r.spills:
        problems.append("spills")
    if r.memory_bound and r.access.wide_loads == 0:
        problems.append("no 128-bit loads")
    if r.memory_bound and r.access.wide_stores == 0:
        problems.append("no 128-bit stores")
    return ", ".join(problems) if problems else "ok"


def _fmt(value) -> str:
    return "-" if value is None else str(value)
