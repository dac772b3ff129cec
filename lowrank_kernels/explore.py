"""The rank mechanism, live: a small weight matrix built step by step from rank-B updates under
weight decay.

    python -m lowrank_kernels.explore                      # interactive window
    python -m lowrank_kernels.explore --preset 2 --save out.gif --steps 200   # headless GIF
    python -m lowrank_kernels.explore --save frames/ --steps 50                # headless PNG frames
    python -m lowrank_kernels.explore --save shot.png --steps 300              # one screenshot

Every step is W <- (1 - 2*mu*lam) W - (mu/B) D^T F with fresh Gaussian factors D (B, m),
F (B, n), drawn and applied exactly as ``lowrank_kernels.simulate`` does (same random stream, same
fused op), so the explorer's numbers are the simulator's.

Panels: W as a heat map; the past updates as blocks (one row per rank-one term) whose brightness is
their current weight in W, the product of the shrink factors applied since (1 - 2*mu*lam)^age while
the settings stay put; the singular values s_i / ||W||_F as bars with the eps cut; the threshold,
effective and stable rank over time next to the theory's bound.

Controls: sliders for B, mu, lam (log scale; the far left of lam is lam = 0) and eps, Play/Pause,
Step, Reset, a seed box and the presets. Settings with 1 - 2*mu*lam <= 0 are refused with a message
and the sliders snap back.

What the presets really give: on a 14 x 14 matrix the first three reach threshold rank 13-14 at
eps = 1e-3 (their windows of hundreds of steps hold far more than 14 directions); only a shrink
factor near 0.1 (the fourth preset) brings the threshold rank down to about 3, and 1-2 at eps = 0.1.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from .ops.decay_outer import decay_outer_
from .simulate import GaussianFactors, check_decay, measure_snapshots, predict

try:
    import matplotlib
except ImportError as exc:  # pragma: no cover - matplotlib ships with the dev extra
    raise ImportError("the explorer needs matplotlib: pip install matplotlib") from exc


@dataclass(frozen=True)
class Preset:
    label: str
    batch_size: int
    lr: float
    lam: float
    note: str


PRESETS = (
    Preset("B=1 μ=.10 λ=.10", 1, 0.10, 0.10, "B=1, mu=0.10, lam=0.10 (shrink 0.98: threshold rank "
           "14 of 14 after 150 and 400 steps at eps=1e-3, effective rank about 10-11)"),
    Preset("B=8 μ=.02 λ=.01", 8, 0.02, 0.01, "B=8, mu=0.02, lam=0.01 (shrink 0.9996: threshold "
           "rank 14 of 14)"),
    Preset("B=14 μ=.10 λ=.10", 14, 0.10, 0.10, "B=14, mu=0.10, lam=0.10 (B=8+: more singular "
           "values light up at once; threshold rank 14 of 14)"),
    Preset("B=1 μ=.5 λ=.9", 1, 0.5, 0.9, "B=1, mu=0.5, lam=0.9 (shrink 0.1: threshold rank "
           "about 3 at eps=1e-3, 1-2 at eps=0.1)"),
)

HISTORY_LENGTH = 400          # steps kept for the rank-over-time panel
SV_FLOOR = 1e-8               # zero singular values are drawn at this height on the log axis
LAM_ZERO_BELOW = -4.25        # log10(lam) slider positions left of this mean lam = 0
NON_INTERACTIVE_BACKENDS = ("agg", "pdf", "ps", "svg", "pgf", "cairo", "template")


class Explorer:
    """The explorer's state and update logic; ``build_figure`` adds the matplotlib view.

    Everything but the figure works without a display: ``step``, ``set_params``,
    ``apply_preset``, ``reset``, ``measures`` and ``readout``.
    """

    def __init__(self, size: int = 14, batch_size: int = 1, lr: float = 0.1, lam: float = 0.1,
                 eps: float = 1e-3, seed: int = 0, timeline: int = 60):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        if isinstance(timeline, bool) or not isinstance(timeline, int) or timeline < 1:
            raise ValueError(f"timeline must be a positive integer, got {timeline!r}")
        self.size = size
        self.timeline_length = timeline
        self.batch_size, self.lr, self.lam, self.eps = 1, 0.1, 0.1, 1e-3
        self.message = ""
        self.message_is_error = False
        self.playing = False
        self.fig = None
        if not self.set_params(batch_size=batch_size, lr=lr, lam=lam, eps=eps):
            raise ValueError(self.message)
        self.reset(seed)

    # -- state ---------------------------------------------------------------------------------
    @property
    def decay(self) -> float:
        return 1.0 - 2.0 * self.lr * self.lam

    def reset(self, seed: int | None = None) -> None:
        """Start again from W = 0 (with a new seed when given)."""
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
            self.seed = seed
        self.W = torch.zeros((self.size, self.size), dtype=torch.float32)
        self.t = 0
        self.terms = 0  # rank-one terms added since the reset: W's exact rank is at most this
        self.generator = torch.Generator().manual_seed(self.seed)
        # Each past update: [step, number of rank-one terms, current weight in W].
        self.updates: deque[list] = deque(maxlen=self.timeline_length)
        self.history: deque[dict] = deque(maxlen=HISTORY_LENGTH)
        self._record([self.W.clone()])
        self._refresh_view()

    def set_params(self, batch_size: int | None = None, lr: float | None = None,
                   lam: float | None = None, eps: float | None = None) -> bool:
        """Change the settings (W is kept). Returns False, leaving everything as it was and
        setting ``message``, when the settings are invalid or make 1 - 2*mu*lam <= 0."""
        new_b = self.batch_size if batch_size is None else batch_size
        new_lr = self.lr if lr is None else lr
        new_lam = self.lam if lam is None else lam
        new_eps = self.eps if eps is None else eps
        problem = None
        if isinstance(new_b, bool) or not isinstance(new_b, int) or new_b < 1:
            problem = f"B must be a positive integer, got {new_b!r}"
        elif not (isinstance(new_lr, (int, float)) and math.isfinite(new_lr) and new_lr > 0):
            problem = f"mu must be a positive number, got {new_lr!r}"
        elif not (isinstance(new_lam, (int, float)) and math.isfinite(new_lam) and new_lam >= 0):
            problem = f"lambda must be a non-negative number, got {new_lam!r}"
        elif not (isinstance(new_eps, (int, float)) and 0 < new_eps < 1):
            problem = f"eps must be in (0, 1), got {new_eps!r}"
        else:
            try:
                check_decay(float(new_lr), float(new_lam))
            except ValueError:
                problem = (f"1 - 2·mu·lambda = 1 - 2·{new_lr:.3g}·{new_lam:.3g} = "
                           f"{1 - 2 * new_lr * new_lam:.3g} <= 0: W would flip sign every step "
                           "instead of shrinking. Keep mu·lambda < 0.5.")
        if problem is not None:
            self.message, self.message_is_error = f"Refused: {problem}", True
            self._refresh_view()
            return False
        self.batch_size, self.lr = int(new_b), float(new_lr)
        self.lam, self.eps = float(new_lam), float(new_eps)
        self.message, self.message_is_error = "", False
        self._refresh_view()
        return True

    def apply_preset(self, index: int) -> None:
        """Load preset ``index`` (0-based, see ``PRESETS``) and start again from W = 0."""
        if not (isinstance(index, int) and 0 <= index < len(PRESETS)):
            raise ValueError(f"preset index must be in 0..{len(PRESETS) - 1}, got {index!r}")
        p = PRESETS[index]
        self.set_params(batch_size=p.batch_size, lr=p.lr, lam=p.lam)
        self.reset()
        self.message, self.message_is_error = f"Preset: {p.note}", False
        self._refresh_view()

    def step(self, count: int = 1) -> None:
        """Apply ``count`` updates, exactly as ``simulate`` with ``chunk_steps=1`` does."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be a non-negative integer, got {count!r}")
        snapshots = []
        source = GaussianFactors(self.size, self.size, self.batch_size, self.generator, torch.float32)
        for _ in range(count):
            D, F = source.draw(1)
            decay_outer_(self.W, D[0], F[0], self.decay, -self.lr / self.batch_size, backend="torch")
            for update in self.updates:
                update[2] *= self.decay
            self.updates.append([self.t, self.batch_size, 1.0])
            self.t += 1
            self.terms += self.batch_size
            snapshots.append(self.W.clone())
        if snapshots:
            self._record(snapshots)
        self._refresh_view()

    def _record(self, snapshots) -> None:
        measured = measure_snapshots(torch.stack(snapshots), self.eps)
        first = self.t - len(snapshots) + 1 if self.t else 0
        for i in range(len(snapshots)):
            self.history.append({
                "step": first + i,
                "singular_values": measured["singular_values"][i],
                "frobenius": float(measured["frobenius"][i]),
                "effective_rank": float(measured["effective_rank"][i]),
                "stable_rank": float(measured["stable_rank"][i]),
                "recorded_eps": self.eps,
                "threshold_rank_at_recorded_eps": int(measured["threshold_rank"][i]),
            })

    def _threshold_rank(self, entry: dict) -> int:
        if entry["recorded_eps"] == self.eps:
            return entry["threshold_rank_at_recorded_eps"]
        # Same rule as spectral.threshold_rank: s_i / ||W||_F > eps.
        s, frob = entry["singular_values"], entry["frobenius"]
        return int((s / frob > self.eps).sum()) if frob > 0 else 0

    def measures(self) -> dict:
        """The current W's measures and the theory's prediction, as shown in the readout."""
        entry = self.history[-1]
        p = predict(self.size, self.size, self.batch_size, self.lr, self.lam, eps=self.eps)
        return {
            "step": self.t, "decay": self.decay, "threshold_rank": self._threshold_rank(entry),
            "effective_rank": entry["effective_rank"], "stable_rank": entry["stable_rank"],
            "singular_values": entry["singular_values"], "bound": p.bound, "window": p.window,
            "exact_window": p.exact_window, "hard_cap": min(self.size, self.terms), "eps": self.eps,
        }

    def readout(self) -> str:
        m = self.measures()
        window = "∞" if math.isinf(m["window"]) else f"{m['window']:.1f}"
        exact = "∞" if math.isinf(m["exact_window"]) else f"{m['exact_window']:.1f}"
        return "\n".join([
            f"step t = {m['step']}",
            f"B = {self.batch_size}, μ = {self.lr:.3g}, λ = {self.lam:.3g}",
            "",
            f"threshold rank (ε={self.eps:.0e}): {m['threshold_rank']}",
            f"effective rank: {m['effective_rank']:.2f}",
            f"stable rank: {m['stable_rank']:.2f}",
            "",
            f"bound min(m, n, B·log(1/ε)/(μλ)) = {m['bound']:.1f}",
            f"  window log(1/ε)/(μλ) = {window} steps",
            f"  an update's weight < ε after {exact} steps",
            f"  hard cap min(m, n, terms added) = {m['hard_cap']}",
        ])

    def timeline_image(self):
        """(rows, timeline) array of the past updates' current weights, oldest column first;
        NaN where there is no rank-one term (empty slots, or fewer terms at that step)."""
        import numpy as np

        rows = max([u[1] for u in self.updates] + [self.batch_size])
        image = np.full((rows, self.timeline_length), np.nan)
        offset = self.timeline_length - len(self.updates)
        for column, (_, terms, weight) in enumerate(self.updates):
            image[:terms, offset + column] = weight
        return image

    # -- view ----------------------------------------------------------------------------------
    def build_figure(self, interactive: bool = False, controls: bool = True):
        """Create the figure and its widgets. ``interactive=False`` makes a bare Agg figure (no
        display needed); ``True`` goes through pyplot so ``plt.show()`` opens a window.
        ``controls=False`` leaves the sliders and buttons out (a saved picture cannot use them)
        and gives the panels their room."""

        if interactive:
            import matplotlib.pyplot as plt

            fig = plt.figure(figsize=(13, 7.6))
        else:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure

            fig = Figure(figsize=(13, 7.6))
            FigureCanvasAgg(fig)
        self.fig = fig
        self._interactive = interactive
        self.controls = controls
        fig.suptitle("W[t+1] = (1 − 2μλ)·W[t] − (μ/B)·Σ δᵢfᵢᵀ : rank-B updates under weight decay",
                     fontsize=12)
        size = self.size
        # Panels; without the controls below them they take the figure's full height.
        low = 0.40 if controls else 0.10
        # W is drawn square: 0.25 of the width is 0.43 of the height; its colour bar matches it.
        w_box = (0.03, 0.44 if controls else 0.30, 0.25, 0.43)
        self.ax_w = fig.add_axes(w_box)
        self.ax_w_colorbar = fig.add_axes((0.29, w_box[1], 0.012, w_box[3]))
        self.ax_sv = fig.add_axes((0.36, 0.67 if controls else 0.58, 0.30, 0.23 if controls else 0.30))
        self.ax_timeline = fig.add_axes((0.36, low, 0.30, 0.19 if controls else 0.36))
        self.ax_history = fig.add_axes((0.72, 0.70, 0.26, 0.20))
        self.ax_text = fig.add_axes((0.72, 0.30 if controls else 0.10, 0.26, 0.30 if controls else 0.50))
        self.ax_text.axis("off")

        self.im_w = self.ax_w.imshow(self.W.numpy(), cmap="RdBu_r", vmin=-1, vmax=1,
                                     interpolation="nearest")
        self.ax_w.set_title(f"W ({size}×{size})", fontsize=10)
        self.ax_w.set_xticks([])
        self.ax_w.set_yticks([])
        # The colour scale follows W's largest |entry| (symmetric about 0): the bar says its size.
        fig.colorbar(self.im_w, cax=self.ax_w_colorbar)
        self.ax_w_colorbar.tick_params(labelsize=7)
        self.ax_w_colorbar.set_ylabel("W_ij", fontsize=8, labelpad=1)

        index = list(range(1, size + 1))
        self.bars = self.ax_sv.bar(index, [SV_FLOOR] * len(index), bottom=SV_FLOOR * 0.5,
                                   color="C0", width=0.8)
        self.ax_sv.set_yscale("log")
        self.ax_sv.set_ylim(1e-6, 1.5)
        self.ax_sv.set_xlim(0.4, len(index) + 0.6)
        self.eps_line = self.ax_sv.axhline(self.eps, color="C3", ls="--", lw=1.2)
        self.eps_label = self.ax_sv.text(0.98, 0.96, "", color="C3", ha="right", va="top",
                                         fontsize=8, transform=self.ax_sv.transAxes,
                                         bbox=dict(fc="white", ec="none", alpha=0.85))
        self.ax_sv.set_xlabel("i", fontsize=8, labelpad=1)
        self.ax_sv.tick_params(labelsize=8)

        cmap = matplotlib.colormaps["magma"].with_extremes(bad="#dddddd")
        self.im_timeline = self.ax_timeline.imshow(self.timeline_image(), cmap=cmap, vmin=0, vmax=1,
                                                   aspect="auto", interpolation="nearest")
        self.ax_timeline.set_title("past updates: brightness = current weight (1−2μλ)^age",
                                   fontsize=10)
        self.ax_timeline.set_xlabel("age (steps ago); green line: weight = ε", fontsize=8, labelpad=1)
        self.ax_timeline.set_ylabel("term i", fontsize=8)
        self.ax_timeline.tick_params(labelsize=8)
        self.eps_age_line = self.ax_timeline.axvline(-10, color="C2", lw=1.5)

        (self.line_threshold,) = self.ax_history.plot([], [], "C0-", lw=1.4, label="threshold rank")
        (self.line_effective,) = self.ax_history.plot([], [], "C1-", lw=1.4, label="effective rank")
        self.bound_line = self.ax_history.axhline(0, color="k", ls="--", lw=1, label="bound")
        self.ax_history.set_ylim(0, size * 1.08 + 0.5)
        self.ax_history.set_xlabel("step", fontsize=8, labelpad=1)
        self.ax_history.tick_params(labelsize=8)
        self.ax_history.legend(fontsize=7.5, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3,
                               frameon=False, handlelength=1.5, columnspacing=1.0)

        self.readout_text = self.ax_text.text(0, 1, "", va="top", ha="left", family="monospace",
                                              fontsize=9)
        self.badge = fig.text(0.72, 0.63, "", fontsize=11, weight="bold",
                              bbox=dict(boxstyle="round", fc="#d8f0d8", ec="#2a7a2a"))
        self.message_text = fig.text(0.03, 0.015, "", fontsize=9, color="#444444")

        self._syncing = False
        if controls:
            self._build_controls(fig, size)
        self.timer = fig.canvas.new_timer(interval=120)
        self.timer.add_callback(self._tick)
        self._refresh_view()
        return fig

    def _build_controls(self, fig, size: int) -> None:
        from matplotlib.widgets import Button, Slider, TextBox

        self.slider_b = Slider(fig.add_axes((0.08, 0.28, 0.22, 0.03)), "B", 1, max(14, size),
                               valinit=self.batch_size, valstep=1)
        self.slider_lr = Slider(fig.add_axes((0.08, 0.23, 0.22, 0.03)), "log10 μ", -3, 0,
                                valinit=math.log10(self.lr))
        self.slider_lam = Slider(fig.add_axes((0.08, 0.18, 0.22, 0.03)), "log10 λ", -4.5, 0,
                                 valinit=self._lam_to_slider(self.lam))
        self.slider_eps = Slider(fig.add_axes((0.08, 0.13, 0.22, 0.03)), "log10 ε", -6, -0.5,
                                 valinit=math.log10(self.eps))
        self.slider_b.on_changed(self._on_batch_slider)
        self.slider_lr.on_changed(self._on_lr_slider)
        self.slider_lam.on_changed(self._on_lam_slider)
        self.slider_eps.on_changed(self._on_eps_slider)

        self.button_play = Button(fig.add_axes((0.36, 0.25, 0.07, 0.05)), "Play")
        self.button_step = Button(fig.add_axes((0.44, 0.25, 0.07, 0.05)), "Step")
        self.button_reset = Button(fig.add_axes((0.52, 0.25, 0.07, 0.05)), "Reset")
        self.seed_box = TextBox(fig.add_axes((0.64, 0.25, 0.05, 0.05)), "seed ",
                                initial=str(self.seed))
        self.button_play.on_clicked(lambda _event: self.toggle_play())
        self.button_step.on_clicked(lambda _event: self.step())
        self.button_reset.on_clicked(lambda _event: self.reset())
        self.seed_box.on_submit(self._on_seed)
        self.preset_buttons = []
        for i, preset in enumerate(PRESETS):
            button = Button(fig.add_axes((0.36 + i * 0.085, 0.14, 0.08, 0.05)), preset.label)
            button.label.set_fontsize(7.5)
            button.on_clicked(lambda _event, i=i: self.apply_preset(i))
            self.preset_buttons.append(button)
        fig.text(0.36, 0.20, "presets (restart from W = 0):", fontsize=8)

    @staticmethod
    def _lam_to_slider(lam: float) -> float:
        return -4.5 if lam <= 0 else max(LAM_ZERO_BELOW, min(0.0, math.log10(lam)))

    @staticmethod
    def _slider_to_lam(value: float) -> float:
        return 0.0 if value < LAM_ZERO_BELOW else 10 ** value

    def toggle_play(self) -> None:
        self.playing = not self.playing
        if self.fig is not None:
            (self.timer.start if self.playing else self.timer.stop)()
            if self.controls:
                self.button_play.label.set_text("Pause" if self.playing else "Play")
            if self._interactive:
                self.fig.canvas.draw_idle()

    def _tick(self) -> None:
        if self.playing:
            self.step()

    # A refused value leaves the settings unchanged; _refresh_view then moves the slider back.
    def _on_batch_slider(self, value) -> None:
        if not self._syncing:
            self.set_params(batch_size=int(round(value)))

    def _on_lr_slider(self, value) -> None:
        if not self._syncing:
            self.set_params(lr=10 ** value)

    def _on_lam_slider(self, value) -> None:
        if not self._syncing:
            self.set_params(lam=self._slider_to_lam(value))

    def _on_eps_slider(self, value) -> None:
        if not self._syncing:
            self.set_params(eps=10 ** value)

    def _on_seed(self, text: str) -> None:
        if self._syncing:
            return
        try:
            seed = int(text.strip())
            if seed < 0:
                raise ValueError
        except ValueError:
            self.message, self.message_is_error = (f"Refused: seed must be a non-negative integer, "
                                                   f"got {text!r}"), True
            self._refresh_view()
            return
        self.reset(seed)

    def _sync_controls(self) -> None:
        """Move the widgets onto the current settings (after a preset, a reset or a refused
        value) without their callbacks acting on it."""
        if not self.controls:
            return
        self._syncing = True
        try:
            for slider, value in ((self.slider_b, self.batch_size),
                                  (self.slider_lr, math.log10(self.lr)),
                                  (self.slider_lam, self._lam_to_slider(self.lam)),
                                  (self.slider_eps, math.log10(self.eps))):
                if slider.val != value:
                    slider.set_val(value)
            if self.seed_box.text != str(self.seed):
                self.seed_box.set_val(str(self.seed))
        finally:
            self._syncing = False

    def _refresh_view(self) -> None:
        if self.fig is None:
            return
        if not self._syncing:
            self._sync_controls()
        if self.controls:
            self.slider_lr.valtext.set_text(f"{self.lr:.3g}")
            self.slider_lam.valtext.set_text("0 (no decay)" if self.lam == 0 else f"{self.lam:.3g}")
            self.slider_eps.valtext.set_text(f"{self.eps:.0e}")

        m = self.measures()
        w = self.W.numpy()
        limit = float(abs(w).max()) or 1.0
        self.im_w.set_data(w)
        self.im_w.set_clim(-limit, limit)

        s = m["singular_values"]
        frob = self.history[-1]["frobenius"]
        ratios = (s / frob).tolist() if frob > 0 else [0.0] * len(s)
        for bar, r in zip(self.bars, ratios):
            height = max(r, SV_FLOOR)
            bar.set_y(SV_FLOOR * 0.5)
            bar.set_height(height - SV_FLOOR * 0.5)
            bar.set_color("C0" if r > self.eps else "#bbbbbb")
        self.eps_line.set_ydata([self.eps, self.eps])
        self.eps_label.set_text(f"red: ε = {self.eps:.0e} cut, {m['threshold_rank']} above")
        self.ax_sv.set_title(f"singular values sᵢ/‖W‖_F  (threshold rank {m['threshold_rank']})",
                             fontsize=10)

        image = self.timeline_image()
        self.im_timeline.set_data(image)
        self.im_timeline.set_extent((-0.5, self.timeline_length - 0.5, image.shape[0] - 0.5, -0.5))
        ticks = [c for c in range(self.timeline_length - 1, -1, -10)]
        self.ax_timeline.set_xticks(ticks)
        self.ax_timeline.set_xticklabels([str(self.timeline_length - 1 - c) for c in ticks])
        self.ax_timeline.set_yticks(range(image.shape[0]) if image.shape[0] <= 16 else [])
        self.ax_timeline.set_yticklabels([str(i + 1) for i in range(image.shape[0])]
                                         if image.shape[0] <= 16 else [])
        exact = m["exact_window"]
        # Where an update's weight drops below eps, when that age is on the timeline.
        self.eps_age_line.set_xdata([self.timeline_length - 1 - exact] * 2 if exact < self.timeline_length
                                    else [-10, -10])

        steps = [e["step"] for e in self.history]
        self.line_threshold.set_data(steps, [self._threshold_rank(e) for e in self.history])
        self.line_effective.set_data(steps, [e["effective_rank"] for e in self.history])
        self.bound_line.set_ydata([m["bound"], m["bound"]])
        self.ax_history.set_xlim(steps[0], max(steps[-1], steps[0] + 10))

        self.readout_text.set_text(self.readout())
        self.badge.set_text(f"shrink 1−2μλ = {self.decay:.4f}")
        idle = ("Step or Play to add rank-B updates; sliders change the settings live." if self.controls
                else f"B={self.batch_size}, μ={self.lr:g}, λ={self.lam:g}, ε={self.eps:.0e}, seed {self.seed}, "
                     f"after {self.history[-1]['step']} steps")
        self.message_text.set_text(self.message or idle)
        self.message_text.set_color("#b00000" if self.message_is_error else "#444444")
        self.message_text.set_weight("bold" if self.message_is_error else "normal")
        if self._interactive:
            # An Agg canvas would draw right here; headless output draws once per frame instead.
            self.fig.canvas.draw_idle()

    # -- headless output -----------------------------------------------------------------------
    def save(self, path, steps: int, every: int = 1, fps: int = 10, dpi: int = 80) -> list[Path]:
        """Render ``steps`` steps without a display and return the files written.

        ``*.gif``: one animation with a frame after every ``every`` steps (ceil(steps/every)
        frames). ``*.png``: one screenshot after all the steps. Anything else: a directory of PNG
        frames ``frame_00001.png``, ... (created if needed).
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        path = Path(path)
        if self.fig is None:
            self.build_figure(interactive=False, controls=False)
        chunks = [min(every, steps - done) for done in range(0, steps, every)]
        if path.suffix.lower() == ".png":
            if not path.parent.exists():
                raise FileNotFoundError(f"directory {path.parent} does not exist")
            self.step(steps)
            self.fig.savefig(path, dpi=dpi)
            return [path]
        if path.suffix.lower() == ".gif":
            from matplotlib.animation import PillowWriter

            if not path.parent.exists():
                raise FileNotFoundError(f"directory {path.parent} does not exist")
            writer = PillowWriter(fps=fps)
            with writer.saving(self.fig, str(path), dpi):
                for count in chunks:
                    self.step(count)
                    writer.grab_frame()
            return [path]
        path.mkdir(parents=True, exist_ok=True)
        written = []
        for i, count in enumerate(chunks, start=1):
            self.step(count)
            frame = path / f"frame_{i:05d}.png"
            self.fig.savefig(frame, dpi=dpi)
            written.append(frame)
        return written


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m lowrank_kernels.explore",
        description="Watch SGD with weight decay build a low-rank matrix from rank-B updates.")
    ap.add_argument("--size", type=int, default=14, help="W is size x size (default 14)")
    ap.add_argument("--preset", type=int, choices=range(1, len(PRESETS) + 1), default=None,
                    help="; ".join(f"{i + 1}: {p.note}" for i, p in enumerate(PRESETS)))
    ap.add_argument("--batch-size", "-B", type=int, default=None, help="B (default 1)")
    ap.add_argument("--lr", type=float, default=None, help="mu (default 0.1)")
    ap.add_argument("--lam", type=float, default=None,
                    help="the papers' lambda = PyTorch weight_decay / 2 (default 0.1)")
    ap.add_argument("--eps", type=float, default=1e-3, help="threshold-rank cut (default 1e-3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", type=Path, default=None,
                    help="render headless instead of opening a window: out.gif (animation), "
                         "out.png (screenshot after --steps) or a directory (PNG frames)")
    ap.add_argument("--steps", type=int, default=100, help="steps to render with --save")
    ap.add_argument("--every", type=int, default=1, help="steps per frame with --save")
    ap.add_argument("--fps", type=int, default=10)
    ap.add_argument("--dpi", type=int, default=80)
    return ap.parse_args(argv)


def make_explorer(args: argparse.Namespace) -> Explorer:
    preset = PRESETS[args.preset - 1] if args.preset else None
    explorer = Explorer(
        size=args.size,
        batch_size=args.batch_size or (preset.batch_size if preset else 1),
        lr=args.lr if args.lr is not None else (preset.lr if preset else 0.1),
        lam=args.lam if args.lam is not None else (preset.lam if preset else 0.1),
        eps=args.eps, seed=args.seed)
    if preset:
        explorer.message = f"Preset: {preset.note}"
    return explorer


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        explorer = make_explorer(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.save is not None:
        try:
            written = explorer.save(args.save, args.steps, every=args.every, fps=args.fps,
                                    dpi=args.dpi)
        except (ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {written[0] if len(written) == 1 else f'{len(written)} frames to {args.save}'}"
              f"\n{explorer.readout()}")
        return 0
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    if backend.lower() in NON_INTERACTIVE_BACKENDS:
        print(f"error: matplotlib has no interactive backend here (got {backend!r}: no display?); "
              "render headless with --save out.gif --steps N", file=sys.stderr)
        return 2
    explorer.build_figure(interactive=True)
    plt.show()
    return 0


if __name__ == "__main__":
    sys.exit(main())
