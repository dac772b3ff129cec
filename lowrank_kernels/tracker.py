"""Rank tracking during training: the measures of DESIGN.md section 2, for every weight matrix of a
model, every ``every`` optimizer steps, from one batched spectral computation per record.

    tracker = RankTracker(model, every=100, log_dir="runs/ranks")
    tracker.attach(optimizer)              # records after optimizer.step() 0, 100, 200, ...
    ...
    print(tracker.format_summary())
    tracker.plot("average_rank", "average_rank.png")

What is kept:

* ``history``: one record per (step, layer): ``{"step", "layer", <measure>: value, ...}``, plus
  ``"alignment"`` and ``"next_layer"`` (Yunis et al.'s alignment with the next layer) where
  ``alignment=True`` and the layer's outputs feed the next tracked layer.
* ``spectra[layer]``: ``[(step, numpy array of singular values), ...]`` (``keep_spectra``).
* ``average_threshold_rank()``: the mean threshold rank over all tracked layers, or a subset
  (``average_over``); ``galanti_resnet18_layers`` picks Galanti et al.'s ResNet-18 set.
* With ``log_dir``: ``ranks.jsonl`` (one JSON record per line), ``ranks.csv`` and, when the
  ``tensorboard`` package is installed, TensorBoard scalars.

Step numbering: the ``i``-th call of ``step()`` (0-based) records when ``i % every == 0``, under
step ``i``; with ``attach``, ``i`` is the number of optimizer steps taken before the current one.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
import warnings
from typing import Callable, Iterable, Sequence, Union

import numpy as np
import torch
from torch import nn

from .spectral import MEASURES, all_measures, singular_values, tracked_matrices
from .spectral.alignment import input_directions
from .spectral.matricize import matricize

DEFAULT_MEASURES = ("threshold_rank", "effective_rank", "normalized_effective_rank", "stable_rank",
                    "spectral_norm", "frobenius_norm")
PLOT_KINDS = ("singular_values", "effective_rank_heatmap", "average_rank", "alignment")
METHODS = ("auto", "exact", "randomized")
ALIGNMENT_TOP = 10  # Yunis et al.: mean of A_ii over the top 10 pairs
SPECTRUM_EDGE = 32  # singular-value plots of wider layers draw the top and bottom this many

LayerSubset = Union[None, str, Iterable[str], Callable[[str], bool]]

_BLOCK_CONV = re.compile(r"(?:^|\.)layer\d+\.\d+\.conv\d+\.weight$")
_STEM_CONV = re.compile(r"(?:^|\.)conv1\.weight$")


def galanti_resnet18_layers(names) -> list[str]:
    """Galanti et al.'s ResNet-18 average-rank set from a list of parameter names: the stem conv
    (``conv1.weight``) and the convs of the basic blocks (``layerX.Y.convZ.weight``), 17 matrices
    for a ResNet-18; shortcuts (``shortcut``/``downsample``) and the classifier are left out.

    ``names`` may also be a model (its parameter names are used). A common prefix such as
    ``module.`` is allowed. Returns the names in their original order.
    """
    if isinstance(names, nn.Module):
        names = [name for name, _ in names.named_parameters()]
    names = list(names)
    picked = []
    for name in names:
        if _BLOCK_CONV.search(name):
            picked.append(name)
        elif _STEM_CONV.search(name) and not re.search(r"(?:^|\.)layer\d+\.", name):
            picked.append(name)
    if not picked:
        raise ValueError("no ResNet layer names found: expected 'conv1.weight' and "
                         f"'layerX.Y.convZ.weight' names, got {names[:8]}{' ...' if len(names) > 8 else ''}")
    return picked


def _format_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        magnitude = abs(float(value))
        if magnitude != 0 and (magnitude >= 1e5 or magnitude < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4f}"
    if isinstance(value, (tuple, list, torch.Size)):
        return "x".join(str(int(v)) for v in value)
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """An aligned text table of ``rows`` (dicts): text left-aligned, numbers right-aligned;
    shapes print as ``64x3x3x3``. ``columns`` defaults to the keys of the first row."""
    if columns is None:
        columns = list(rows[0]) if rows else []
    cells = [[_format_value(row.get(col)) for col in columns] for row in rows]
    numeric = [all(isinstance(row.get(col), (int, float, np.integer, np.floating)) or row.get(col) is None
                   for row in rows) and not all(row.get(col) is None for row in rows) for col in columns]
    widths = [max([len(col)] + [len(line[j]) for line in cells]) for j, col in enumerate(columns)]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(columns), line(["-" * w for w in widths])]
    out += [line(values) for values in cells]
    return "\n".join(out)


def _to_python(value: torch.Tensor):
    """A 0-d tensor as an int (ranks) or a float."""
    value = value.item()
    return int(value) if isinstance(value, (bool, int)) else float(value)


class RankTracker:
    """Records rank measures of a model's weight matrices during training.

    Args:
        model: the model; its Linear, ConvNd, ConvTransposeNd, MultiheadAttention and Embedding
            weights are tracked (``lowrank_kernels.spectral.tracked_matrices``).
        every: record every ``every``-th call of ``step()``, starting with the first.
        measures: names from ``lowrank_kernels.spectral.MEASURES``.
        method: "exact" (every singular value), "randomized" (adaptive top-k: the threshold rank
            is exact, effective rank and nuclear norm see the top values only), or "auto": exact
            on the CPU or when every matrix is small (min side <= 2 * k), randomized otherwise.
        eps: the threshold of ``threshold_rank``/``relative_rank`` (and of the adaptive tier).
        log_dir: when given, append records to ``ranks.jsonl`` and ``ranks.csv`` there, and write
            TensorBoard scalars when the ``tensorboard`` package is installed.
        include, exclude: pick layers (a name substring, a list of them, or f(name, module)).
        k: starting number of singular values for the randomized tier.
        alignment: also record the alignment of each layer with the next tracked layer, where
            the next layer's inputs are this layer's outputs (pairs that do not chain are skipped).
        keep_spectra: keep every recorded spectrum in ``spectra``.
        average_over: default layer subset of ``average_threshold_rank``: exact names, a name
            substring, or f(name) -> bool; None = every tracked layer.
    """

    def __init__(self, model: nn.Module, every: int = 100, measures: Sequence[str] = DEFAULT_MEASURES,
                 method: str = "auto", eps: float = 1e-3, log_dir: str | os.PathLike | None = None,
                 include=None, exclude=None, k: int = 64, alignment: bool = False,
                 keep_spectra: bool = True, average_over: LayerSubset = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if isinstance(measures, str):
            measures = (measures,)
        measures = tuple(measures)
        unknown = [m for m in measures if m not in MEASURES]
        if unknown:
            raise ValueError(f"unknown measure(s) {unknown}; choose from {list(MEASURES)}")
        if not measures:
            raise ValueError(f"measures is empty; choose from {list(MEASURES)}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not (eps >= 0):
            raise ValueError(f"eps must be a non-negative number, got {eps}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        self.model = model
        self.every = every
        self.measures = measures
        self.method = method
        self.eps = float(eps)
        self.k = k
        self.alignment = bool(alignment)
        self.keep_spectra = bool(keep_spectra)
        self.tracked = tracked_matrices(model, include, exclude)
        if not self.tracked:
            raise ValueError(f"{type(model).__name__} has no trackable weight matrices (Linear, ConvNd, "
                             "ConvTransposeNd, MultiheadAttention, Embedding)"
                             + (" left after include/exclude" if include is not None or exclude is not None else ""))
        self.layer_names = [t.name for t in self.tracked]
        self.shapes = {t.name: tuple(t.param.shape) for t in self.tracked}
        self.pairs = self._chained_pairs() if self.alignment else []
        self.average_over = average_over
        self._average_names = self._select(average_over)  # validates now

        self.history: list[dict] = []
        self.spectra: dict[str, list[tuple[int, np.ndarray]]] = {name: [] for name in self.layer_names}
        self.last_method: str | None = None
        self._step = 0

        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self._writer = None
        if self.log_dir is not None:
            os.makedirs(self.log_dir, exist_ok=True)
            self._check_csv_header()
            self._writer = self._open_tensorboard()

    # ----------------------------------------------------------------------------- layer sets
    def _chained_pairs(self) -> list[tuple[int, int]]:
        """(i, i + 1) for consecutive Linear/conv layers whose shapes chain."""
        pairs = []
        for i in range(len(self.tracked) - 1):
            a, b = self.tracked[i], self.tracked[i + 1]
            if a.kind not in ("linear", "conv") or b.kind not in ("linear", "conv"):
                continue
            if getattr(a.module, "groups", 1) != 1 or getattr(b.module, "groups", 1) != 1:
                continue
            if a.param.shape[0] == b.param.shape[1]:
                pairs.append((i, i + 1))
        return pairs

    def _select(self, subset: LayerSubset) -> list[str]:
        if subset is None:
            return list(self.layer_names)
        if isinstance(subset, str):
            picked = [n for n in self.layer_names if subset in n]
        elif callable(subset):
            picked = []
            for name in self.layer_names:
                keep = subset(name)
                if not isinstance(keep, (bool, np.bool_)):
                    raise TypeError("average_over as a callable must be f(name) -> bool; to pick names "
                                    "with a helper, pass its result, e.g. "
                                    "average_over=galanti_resnet18_layers(tracker.layer_names)")
                if keep:
                    picked.append(name)
        else:
            wanted = set(subset)
            missing = sorted(n for n in wanted if n not in self.shapes)
            if missing:
                raise ValueError(f"average_over names {missing} are not tracked layers; "
                                 f"tracked: {self.layer_names}")
            picked = [n for n in self.layer_names if n in wanted]
        if not picked:
            raise ValueError(f"average_over={subset!r} selects no tracked layer; tracked: {self.layer_names}")
        return picked

    # ----------------------------------------------------------------------------- recording
    def resolve_method(self, matrices: Sequence[torch.Tensor] | None = None) -> str:
        """The spectral tier a record would use now ("exact" or "randomized")."""
        if self.method != "auto":
            return self.method
        matrices = self._matrices() if matrices is None else matrices
        on_cpu = all(w.device.type == "cpu" for w in matrices)
        small = all(min(w.shape) <= 2 * self.k for w in matrices)
        return "exact" if on_cpu or small else "randomized"

    @staticmethod
    def _param(tracked) -> torch.Tensor:
        # Re-read the parameter from its module: load_state_dict(assign=True) and the like
        # replace the Parameter object.
        return getattr(tracked.module, tracked.name.rsplit(".", 1)[-1])

    def _matrices(self) -> list[torch.Tensor]:
        return [matricize(self._param(t).detach(), t.kind) for t in self.tracked]

    def step(self) -> list[dict] | None:
        """Count one training step; record when the count is a multiple of ``every`` (the first
        call included). Returns the new records, or None when nothing was recorded."""
        step = self._step
        self._step += 1
        if step % self.every == 0:
            return self.record(step)
        return None

    def attach(self, optimizer: torch.optim.Optimizer):
        """Call ``step()`` after every ``optimizer.step()``; returns the hook's handle
        (``handle.remove()`` detaches). When the run's length is not a multiple of ``every``,
        ``finish()`` (or ``close()``, or leaving a ``with`` block) records the last step."""
        if not hasattr(optimizer, "register_step_post_hook"):
            raise TypeError(f"{type(optimizer).__name__} has no register_step_post_hook; "
                            "call tracker.step() after each optimizer step instead")
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())

    @torch.no_grad()
    def record(self, step: int | None = None) -> list[dict]:
        """Record every measure of every tracked layer now, under ``step`` (default: the number of
        ``step()`` calls so far). One batched spectral computation for all layers."""
        step = self._step if step is None else int(step)
        matrices = self._matrices()
        method = self.resolve_method(matrices)
        kwargs = dict(method=method, return_vectors=bool(self.pairs))
        if method == "randomized":
            kwargs.update(k=self.k, adaptive=True, eps=self.eps)
        spectra = singular_values(matrices, names=self.layer_names, **kwargs)
        values = all_measures(spectra, self.measures, eps=self.eps)
        self.last_method = method

        records = []
        for i, name in enumerate(self.layer_names):
            rec = {"step": step, "layer": name}
            rec.update({m: _to_python(values[m][i]) for m in self.measures})
            records.append(rec)
        for i, j in self.pairs:
            records[i]["alignment"] = self._alignment(spectra, i, j)
            records[i]["next_layer"] = self.layer_names[j]
        if self.keep_spectra:
            for i, name in enumerate(self.layer_names):
                s = spectra.values[i, :int(spectra.rank_bound[i])].numpy().copy()
                if method == "randomized":  # top-k only: drop the zero padding
                    s = s[:int(np.count_nonzero(s))] if s.size and s[-1] == 0 else s
                self.spectra[name].append((step, s))
        del spectra
        self.history.extend(records)
        if self.log_dir is not None:
            self._log(records, step)
        return records

    def _alignment(self, spectra, i: int, j: int) -> float:
        """Yunis et al.'s alignment of layer i with layer j, from the shared singular vectors
        (the computation of ``lowrank_kernels.spectral.alignment``)."""
        u, _ = spectra.vectors[i]
        _, v_next = spectra.vectors[j]
        k = min(ALIGNMENT_TOP, u.shape[1], v_next.shape[1])
        if k == 0:
            return 0.0
        directions = input_directions(v_next[:, :k], self._param(self.tracked[j]))
        a = (u[:, :k].transpose(0, 1).to(directions.dtype) @ directions).abs()
        return float(a.diagonal().mean())

    # ----------------------------------------------------------------------------- queries
    @property
    def steps(self) -> list[int]:
        """The recorded steps, in order (each once)."""
        return list(dict.fromkeys(rec["step"] for rec in self.history))

    def _records_at(self, step: int) -> list[dict]:
        """The records of one step, one per layer (the latest where a step was recorded twice)."""
        latest = {rec["layer"]: rec for rec in self.history if rec["step"] == step}
        return [latest[name] for name in self.layer_names if name in latest]

    def _resolve_step(self, step: int) -> int:
        steps = self.steps
        if not steps:
            raise RuntimeError("nothing recorded yet: call tracker.step() or tracker.record() first")
        if step < 0:
            if -step > len(steps):
                raise IndexError(f"step index {step} out of range: {len(steps)} recorded steps")
            return steps[step]
        if step not in steps:
            raise KeyError(f"step {step} was not recorded; recorded steps: {steps}")
        return step

    def average_threshold_rank(self, average_over: LayerSubset = None) -> list[tuple[int, float]]:
        """[(step, mean threshold rank over the layers)] for every recorded step.

        ``average_over``: exact layer names, a name substring, or f(name) -> bool; default the
        tracker's ``average_over`` (all tracked layers unless set), e.g.
        ``galanti_resnet18_layers(tracker.layer_names)`` for Galanti et al.'s ResNet-18 figure.
        """
        if "threshold_rank" not in self.measures:
            raise ValueError("threshold_rank is not among the tracked measures; add it to measures=")
        names = self._average_names if average_over is None else self._select(average_over)
        chosen = set(names)
        ranks: dict[int, dict[str, int]] = {}
        for rec in self.history:  # a step recorded twice counts once, with its latest values
            if rec["layer"] in chosen:
                ranks.setdefault(rec["step"], {})[rec["layer"]] = rec["threshold_rank"]
        return [(step, float(np.mean(list(v.values())))) for step, v in ranks.items()]

    def summary(self, step: int = -1) -> list[dict]:
        """Per-layer table of one recorded step: ``[{"layer", "shape", <measures>, ...}]``.
        ``step``: a recorded step number, or a negative index (-1 = the latest)."""
        step = self._resolve_step(step)
        rows = []
        for rec in self._records_at(step):
            row = {"layer": rec["layer"], "shape": self.shapes[rec["layer"]]}
            row.update({m: rec[m] for m in self.measures})
            if self.alignment:
                row["alignment"] = rec.get("alignment")
            rows.append(row)
        return rows

    def format_summary(self, step: int = -1) -> str:
        """``summary(step)`` as an aligned text table, with the step and the average threshold rank."""
        step = self._resolve_step(step)
        rows = self.summary(step)
        text = [f"step {step} ({self.last_method or self.method} spectra, eps={self.eps:g})",
                format_table(rows)]
        if "threshold_rank" in self.measures:
            avg = dict(self.average_threshold_rank())[step]
            text.append(f"average threshold_rank over {len(self._average_names)} layers: {avg:.4f}")
        return "\n".join(text)

    # ----------------------------------------------------------------------------- logging
    def _csv_columns(self) -> list[str]:
        return ["step", "layer", *self.measures] + (["alignment", "next_layer"] if self.alignment else [])

    def _check_csv_header(self):
        path = os.path.join(self.log_dir, "ranks.csv")
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            if header != self._csv_columns():
                raise ValueError(f"{path} exists with columns {header}, but this tracker writes "
                                 f"{self._csv_columns()}; use another log_dir or remove the file")

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None  # tensorboard is optional
        except Exception as err:  # a broken install (protobuf mismatch and the like)
            warnings.warn(f"TensorBoard logging disabled: {err}", stacklevel=3)
            return None
        return SummaryWriter(log_dir=self.log_dir)

    def _log(self, records: list[dict], step: int):
        with open(os.path.join(self.log_dir, "ranks.jsonl"), "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        path = os.path.join(self.log_dir, "ranks.csv")
        columns = self._csv_columns()
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows(records)
        if self._writer is not None:
            for rec in records:
                for m in self.measures:
                    self._writer.add_scalar(f"{m}/{rec['layer']}", rec[m], step)
                if "alignment" in rec:
                    self._writer.add_scalar(f"alignment/{rec['layer']}", rec["alignment"], step)
            if "threshold_rank" in self.measures:
                self._writer.add_scalar("average_threshold_rank", dict(self.average_threshold_rank())[step], step)
            self._writer.flush()

    def finish(self) -> list[dict] | None:
        """Record the latest counted step when ``step()`` skipped it (a run whose length is not a
        multiple of ``every``), so that the history ends with the final weights. Returns the new
        records, or None when the last step is already recorded or nothing was counted."""
        last = self._step - 1
        if last < 0 or (self.history and self.history[-1]["step"] == last):
            return None
        return self.record(last)

    def state_dict(self) -> dict:
        """What a resumed run needs to continue this tracker exactly: the history, the kept
        spectra (as tensors, loadable with ``torch.load(weights_only=True)``), the step count and
        the last method."""
        return {"history": [dict(rec) for rec in self.history],
                "spectra": {name: [(step, torch.from_numpy(np.asarray(s)).clone()) for step, s in series]
                            for name, series in self.spectra.items()},
                "step": self._step, "last_method": self.last_method}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s result (of a tracker of the same layers)."""
        unknown = sorted({rec["layer"] for rec in state["history"]} - set(self.layer_names))
        if unknown:
            raise ValueError(f"the saved tracker state records layers {unknown} that this tracker does "
                             f"not track; tracked: {self.layer_names}")
        self.history = [dict(rec) for rec in state["history"]]
        self.spectra = {name: [] for name in self.layer_names}
        for name, series in state["spectra"].items():
            self.spectra[name] = [(int(step), np.asarray(s.numpy() if isinstance(s, torch.Tensor) else s))
                                  for step, s in series]
        self._step = int(state.get("step", self.steps[-1] + 1 if self.history else 0))
        self.last_method = state.get("last_method")

    def close(self):
        """Record the last step if ``step()`` skipped it (``finish()``), then close the
        TensorBoard writer (the CSV and JSONL files are closed after every record)."""
        self.finish()
        self._close_writer()

    def _close_writer(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:  # the run failed: close the writer, record nothing more
            self._close_writer()
        else:
            self.close()

    # ----------------------------------------------------------------------------- plots
    def plot(self, kind: str, path: str | os.PathLike | None = None, layer: str | None = None, *,
             by: str = "step", top: int | None = None, average_over: LayerSubset = None):
        """Plot the history; returns the matplotlib Figure and saves it to ``path`` when given.

        kind:
          * "singular_values": one layer's spectrum over time (``layer``, default the first).
            ``by="step"``: s_i against the step, one line per i, darker = larger (Yunis et al.);
            ``by="index"``: s_i against i, one line per record, darker = later (Galanti et al.).
            ``top`` limits the number of values shown; without it, a layer of more than 64 values
            shows its top 32 and bottom 32 over the steps. Log-scale y, with the threshold-rank
            cut eps * ||W||_F dashed.
          * "effective_rank_heatmap": normalized effective rank, layers x recorded steps.
          * "average_rank": average threshold rank against the step (``average_over``).
          * "alignment": alignment with the next layer against the step, one line per pair
            (``layer`` picks one).
        """
        if kind not in PLOT_KINDS:
            raise ValueError(f"unknown plot kind {kind!r}; choose from {list(PLOT_KINDS)}")
        if not self.history:
            raise RuntimeError("nothing recorded yet: call tracker.step() or tracker.record() before plotting")
        fig = _new_figure()
        ax = fig.add_subplot(1, 1, 1)
        getattr(self, f"_plot_{kind}")(fig, ax, layer=layer, by=by, top=top, average_over=average_over)
        fig.tight_layout()
        if path is not None:
            fig.savefig(os.fspath(path), dpi=120)
        return fig

    def _check_layer(self, layer):
        if layer is not None and layer not in self.shapes:
            raise ValueError(f"unknown layer {layer!r}; tracked: {self.layer_names}")

    def _threshold_line(self, layer: str) -> list[tuple[int, float]]:
        """(step, eps * ||W||_F) of a layer's records: the threshold-rank cut."""
        frobenius = {rec["step"]: rec["frobenius_norm"] for rec in self.history
                     if rec["layer"] == layer and "frobenius_norm" in rec}
        return [(step, self.eps * frobenius.get(step, float(np.sqrt(np.sum(np.square(s))))))
                for step, s in self.spectra[layer]]

    def _plot_singular_values(self, fig, ax, layer, by, top, **_):
        from matplotlib import cm
        if not self.keep_spectra:
            raise ValueError("singular-value plots need keep_spectra=True")
        if by not in ("step", "index"):
            raise ValueError(f"by must be 'step' or 'index', got {by!r}")
        self._check_layer(layer)
        layer = layer or self.layer_names[0]
        series = self.spectra[layer]
        width = max((len(s) for _, s in series), default=0)
        if top is not None:
            width = min(width, int(top))
        table = np.full((len(series), width), np.nan)
        for row, (_, s) in enumerate(series):
            n = min(len(s), width)
            table[row, :n] = s[:n]
        table[table <= 0] = np.nan  # zeros cannot be drawn on a log scale
        steps = [step for step, _ in series]
        cmap = _shades("Blues")  # light to dark
        shown = f"{layer} {_format_value(self.shapes[layer])}"
        threshold = self._threshold_line(layer)
        if by == "step":
            # Hundreds of lines are a solid band: a wide layer shows its largest and smallest
            # values, where the rank's fall happens, next to the threshold they fall under.
            index = np.arange(width)
            if top is None and width > 2 * SPECTRUM_EDGE:
                index = np.concatenate([index[:SPECTRUM_EDGE], index[-SPECTRUM_EDGE:]])
                shown += f": top {SPECTRUM_EDGE} and bottom {SPECTRUM_EDGE} of {width} values"
            marker = "o" if len(steps) == 1 else None
            for i in index[::-1]:  # darker = larger (smaller index), drawn on top
                ax.plot(steps, table[:, i], color=cmap(1.0 - i / max(width - 1, 1)), lw=1, marker=marker, ms=3)
            ax.plot([t for t, _ in threshold], [v for _, v in threshold], color="tab:red", ls="--", lw=1.5,
                    label=f"threshold eps*||W||_F (eps={self.eps:g})")
            ax.set_xlabel("step")
            fig.colorbar(cm.ScalarMappable(norm=_norm(1, max(width, 1)), cmap=cmap.reversed()), ax=ax,
                         label="singular value index (darker = larger)")
            _integer_steps(ax)
        else:
            index = np.arange(1, width + 1)
            first, last = min(steps), max(steps)
            for row, step in enumerate(steps):
                shade = (step - first) / (last - first) if last > first else 1.0
                ax.plot(index, table[row], color=cmap(shade), lw=1)
            if threshold:
                ax.axhline(threshold[-1][1], color="tab:red", ls="--", lw=1.5,
                           label=f"threshold eps*||W||_F at step {threshold[-1][0]} (eps={self.eps:g})")
            ax.set_xlabel("index i")
            fig.colorbar(cm.ScalarMappable(norm=_norm(first, last), cmap=cmap), ax=ax,
                         label="step (darker = later)")
        ax.set_yscale("log")
        ax.set_ylabel("singular value $s_i$")
        ax.legend(fontsize=7, loc="lower left")
        ax.set_title(shown, fontsize=9)

    def _plot_effective_rank_heatmap(self, fig, ax, **_):
        if "normalized_effective_rank" not in self.measures:
            raise ValueError("the heatmap needs normalized_effective_rank among the measures")
        steps = self.steps
        grid = np.full((len(self.layer_names), len(steps)), np.nan)
        row_of = {n: r for r, n in enumerate(self.layer_names)}
        col_of = {s: c for c, s in enumerate(steps)}
        for rec in self.history:
            grid[row_of[rec["layer"]], col_of[rec["step"]]] = rec["normalized_effective_rank"]
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(self.layer_names)))
        ax.set_yticklabels(self.layer_names, fontsize=max(4, 9 - len(self.layer_names) // 10))
        ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int))
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(steps[t]) for t in ticks])
        ax.set_xlabel("step")
        ax.set_title("normalized effective rank")
        fig.colorbar(image, ax=ax)

    def _plot_average_rank(self, fig, ax, average_over, **_):
        series = self.average_threshold_rank(average_over)
        steps, values = zip(*series)
        ax.plot(steps, values, marker="o" if len(steps) == 1 else None)
        count = len(self._average_names if average_over is None else self._select(average_over))
        _integer_steps(ax)
        ax.set_xlabel("step")
        ax.set_ylabel(f"average threshold rank (eps={self.eps:g})")
        ax.set_title(f"average threshold rank over {count} layers")

    def _plot_alignment(self, fig, ax, layer, **_):
        if not self.alignment:
            raise ValueError("alignment was not recorded; create the tracker with alignment=True")
        if not self.pairs:
            raise ValueError("no consecutive tracked layers chain, so there is no alignment to plot")
        self._check_layer(layer)
        lines: dict[str, list[tuple[int, float]]] = {}
        for rec in self.history:
            if "alignment" in rec and (layer is None or rec["layer"] == layer):
                lines.setdefault(f"{rec['layer']} -> {rec['next_layer']}", []).append((rec["step"], rec["alignment"]))
        if not lines:
            raise ValueError(f"layer {layer!r} has no alignment record (its outputs do not feed the next tracked layer)")
        for label, points in lines.items():
            steps, values = zip(*points)
            ax.plot(steps, values, label=label, marker="o" if len(steps) == 1 else None)
        _integer_steps(ax)
        ax.set_xlabel("step")
        ax.set_ylabel(f"alignment (mean of top-{ALIGNMENT_TOP} A_ii)")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)


def colormap(name: str):
    """A matplotlib colormap by name, on every matplotlib version."""
    import matplotlib
    if hasattr(matplotlib, "colormaps"):  # matplotlib >= 3.5
        return matplotlib.colormaps[name]
    from matplotlib import cm
    return cm.get_cmap(name)


def _shades(name: str):
    """The darker 70% of a sequential colormap: the lightest end is invisible on white."""
    from matplotlib.colors import ListedColormap
    return ListedColormap(colormap(name)(np.linspace(0.3, 1.0, 256)), name=f"{name}_dark")


def _integer_steps(ax):
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _norm(lo, hi):
    from matplotlib.colors import Normalize
    return Normalize(vmin=lo, vmax=hi if hi != lo else lo + 1)


def agg_figure(width: float, height: float, layout: str | None = None):
    """A bare Figure on the Agg canvas: no display, no pyplot state (the training harness and the
    sweep pictures draw through it too). ``layout``: None or "constrained"."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure(layout=...) is matplotlib >= 3.5; older versions take constrained_layout=True.
    try:
        fig = Figure(figsize=(width, height), layout=layout)
    except TypeError:
        fig = Figure(figsize=(width, height), constrained_layout=layout == "constrained")
    FigureCanvasAgg(fig)
    return fig


def _new_figure():
    """A Figure that needs no display: through pyplot when the user already uses pyplot (so the
    figure shows in their session), else ``agg_figure`` (no global state)."""
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt
        return plt.figure(figsize=(7, 4.5))
    return agg_figure(7, 4.5)
