"""The report's framework: the context (timing settings, the row selection, the timer), a section's
table and its helpers, and the registry of sections.

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
# Which rows a run times: every row, only the headline rows (--headline), or the others (--rest).
ROW_SELECTIONS = ("all", "headline", "rest")
# How ``Context.time`` times a row on a GPU: CUDA events around each call (runner.time_fn), or
# triton.testing.do_bench (the L2 flushed before each call).
TIMERS = ("events", "do_bench")
# triton.testing.do_bench's budgets in ms (warm-up, timed calls), by --quick.
DO_BENCH_MS = {True: (25, 100), False: (50, 400)}


@dataclass
class Context:
    device: torch.device
    quick: bool
    warmup: int
    repeat: int
    copy: dict[str, Any]              # runner.measure_copy_bandwidth() of this device
    env: dict[str, Any]
    rows: str = "all"                 # one of ROW_SELECTIONS
    timer: str = "events"             # one of TIMERS

    def __post_init__(self):
        if self.rows not in ROW_SELECTIONS:
            raise ValueError(f"row selection {self.rows!r} is not one of {ROW_SELECTIONS}")
        if self.timer not in TIMERS:
            raise ValueError(f"timer {self.timer!r} is not one of {TIMERS}")
        if self.uses_do_bench:
            try:  # fail now, not after the first sections
                import triton.testing  # noqa: F401
            except ImportError as exc:
                raise ValueError(f"timer 'do_bench' needs triton.testing, which does not import "
                                 f"here: {exc}") from exc

    @property
    def copy_bytes_per_s(self) -> float:
        return self.copy["bytes_per_s"]

    @property
    def uses_do_bench(self) -> bool:
        """Whether ``time`` uses triton.testing.do_bench (asked for, and on a GPU)."""
        return self.timer == "do_bench" and self.device.type == "cuda"

    def wants(self, headline: bool) -> bool:
        """Whether a row (a headline row or not) belongs to this run's selection."""
        return self.rows == "all" or (self.rows == "headline") == headline

    def time(self, fn: Callable[[], Any]) -> dict[str, Any]:
        """Statistics of ``fn``'s time per call (``runner.time_fn``'s keys), with this run's timer."""
        if not self.uses_do_bench:
            return runner.time_fn(fn, warmup=self.warmup, repeat=self.repeat, device=self.device)
        from triton.testing import do_bench  # a GPU timer: flushes the L2 before every call

        warmup_ms, rep_ms = DO_BENCH_MS[self.quick]
        samples = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        stats = runner.summarize_ms(samples)
        stats.update(samples_ms=list(samples), timer="do_bench")
        return stats

    def timing_note(self, calls: str = "calls") -> str:
        """How ``time`` timed each row, for a section's notes (``calls``: what one call is)."""
        if self.uses_do_bench:
            warmup_ms, rep_ms = DO_BENCH_MS[self.quick]
            return (f"triton.testing.do_bench per row: {warmup_ms} ms of warm-up {calls}, then "
                    f"{rep_ms} ms of timed {calls}, each after a 256 MB write that flushes the L2 "
                    "(CUDA events around each)")
        return f"{self.warmup} untimed + {self.repeat} timed {calls} per row"


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
