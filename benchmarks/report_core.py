"""The report's framework: the timing context, a section's table, and the registry of sections.

A section is a function taking the ``Context`` and returning a ``Section`` (title, columns, rows,
notes). Each op keeps its section in the ``section.py`` of its folder (``<op>/section.py``),
registered with::

    @register_section("my_op")
    def my_op_section(ctx: Context) -> Section:
        ...

and ``report.py`` imports those modules in ``SECTION_MODULES`` order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

import runner

# (warmup, repeat) calls per measurement, by device type and --quick.
TIMING = {
    ("cuda", False): (10, 100), ("cuda", True): (3, 20),
    ("cpu", False): (3, 30), ("cpu", True): (1, 5),
}


@dataclass
class Context:
    device: torch.device
    quick: bool
    warmup: int
    repeat: int
    copy: dict[str, Any]              # runner.measure_copy_bandwidth() of this device
    env: dict[str, Any]

    @property
    def copy_bytes_per_s(self) -> float:
        return self.copy["bytes_per_s"]

    def time(self, fn: Callable[[], Any]) -> dict[str, Any]:
        return runner.time_fn(fn, warmup=self.warmup, repeat=self.repeat, device=self.device)


@dataclass
class Section:
    name: str
    title: str
    columns: list[runner.Column]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        parts = [f"## {self.title}", "", runner.markdown_table(self.rows, self.columns)]
        if self.notes:
            parts += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(parts)


SECTIONS: dict[str, Callable[[Context], Section]] = {}


def register_section(name: str):
    def decorate(fn: Callable[[Context], Section]) -> Callable[[Context], Section]:
        if name in SECTIONS:
            raise ValueError(f"report section {name!r} registered twice")
        SECTIONS[name] = fn
        return fn
    return decorate


# An error's message in a row's note is cut to its first line and this many characters.
NOTE_ERROR_CHARS = 160


def skip_note(reason: str | BaseException) -> str:
    """The note of a row that was not timed: ``skipped:`` and the reason, or the error that stopped
    it (its type and the first line of its message)."""
    if isinstance(reason, BaseException):
        reason = f"{type(reason).__name__}: {reason}".splitlines()[0][:NOTE_ERROR_CHARS]
    return f"skipped: {reason}"


def add_ratios(rows: list[dict[str, Any]], anchors: Mapping[str, str],
               value: str = "median_ms") -> None:
    """Fill the "×" columns: for each ``column: anchor key`` pair, ``row[column]`` = the anchor
    row's ``value`` / this row's (> 1: this row is faster), None where either was not measured.
    Rows are matched by their ``"key"``."""
    measured = {r["key"]: r[value] for r in rows if r.get(value) is not None}
    for r in rows:
        for column, anchor in anchors.items():
            r[column] = (measured[anchor] / r[value]
                         if anchor in measured and r.get(value) is not None else None)
