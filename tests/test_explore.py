"""The interactive explorer, driven headless (Agg): state, widgets, saved output, and agreement with
the simulator."""
import math

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from matplotlib.backend_bases import MouseEvent  # noqa: E402
from PIL import Image  # noqa: E402

from lowrank_kernels.explore import PRESETS, Explorer, main, parse_args  # noqa: E402
from lowrank_kernels.simulate import simulate  # noqa: E402


def click(fig, ax):
    """Press and release the left mouse button at the centre of ``ax``, as a user would."""
    x, y = ax.transAxes.transform((0.5, 0.5))
    for name in ("button_press_event", "button_release_event"):
        fig.canvas.callbacks.process(name, MouseEvent(name, fig.canvas, x, y, button=1))


@pytest.fixture(scope="module")
def explorer():
    e = Explorer()
    e.build_figure(interactive=False)
    return e


def test_numbers_match_the_simulator():
    e = Explorer(size=14, batch_size=3, lr=0.2, lam=0.3, eps=1e-3, seed=7)
    e.step(25)
    sim = simulate(14, 14, 3, 0.2, 0.3, 25, eps=1e-3, seed=7, chunk_steps=1, record_every=1,
                   device="cpu")
    assert torch.equal(e.W, sim.W)
    shown = e.measures()
    assert shown["threshold_rank"] == int(sim.threshold_rank[-1])
    assert shown["effective_rank"] == pytest.approx(float(sim.effective_rank[-1]), abs=1e-12)
    assert shown["stable_rank"] == pytest.approx(float(sim.stable_rank[-1]), abs=1e-12)
    assert shown["bound"] == sim.bound and shown["window"] == sim.window
    assert shown["hard_cap"] == sim.hard_cap == 14
    assert [h["effective_rank"] for h in e.history] == pytest.approx(sim.effective_rank.tolist())
    text = e.readout()
    assert f"threshold rank (ε=1e-03): {int(sim.threshold_rank[-1])}" in text
    assert f"effective rank: {float(sim.effective_rank[-1]):.2f}" in text
    assert f"= {sim.bound:.1f}" in text
    # A new eps re-reads the stored spectra; the simulator at that eps agrees.
    assert e.set_params(eps=0.05)
    sim_eps = simulate(14, 14, 3, 0.2, 0.3, 25, eps=0.05, seed=7, chunk_steps=1, record_every=1,
                       device="cpu")
    assert e.measures()["threshold_rank"] == int(sim_eps.threshold_rank[-1])
    assert [e._threshold_rank(h) for h in e.history] == sim_eps.threshold_rank.tolist()


def test_timeline_weights_are_the_decay_powers():
    e = Explorer(batch_size=2, lr=0.1, lam=0.5, timeline=5)
    e.step(3)
    image = e.timeline_image()
    q = e.decay
    assert image.shape == (2, 5)
    assert math.isnan(image[0, 0]) and math.isnan(image[0, 1])
    assert image[0, 2:].tolist() == pytest.approx([q ** 2, q, 1.0])
    e.set_params(batch_size=1)
    e.step(3)
    assert e.measures()["hard_cap"] == 2 * 3 + 1 * 3
    image = e.timeline_image()  # the two-term updates keep their second row, the new ones do not
    assert image[0].tolist() == pytest.approx([q ** 4, q ** 3, q ** 2, q, 1.0])
    assert math.isnan(image[1, 4]) and image[1, 1] == pytest.approx(q ** 3)


def test_headless_figure_steps_and_draws(explorer):
    explorer.reset(0)
    click(explorer.fig, explorer.button_step.ax)
    click(explorer.fig, explorer.button_step.ax)
    assert explorer.t == 2 and len(explorer.history) == 3
    explorer.fig.canvas.draw()
    assert explorer.readout_text.get_text() == explorer.readout()
    assert "shrink 1−2μλ = 0.9800" in explorer.badge.get_text()
    click(explorer.fig, explorer.button_reset.ax)
    assert explorer.t == 0 and float(explorer.W.abs().max()) == 0
    click(explorer.fig, explorer.button_play.ax)
    assert explorer.playing and explorer.button_play.label.get_text() == "Pause"
    explorer._tick()
    assert explorer.t == 1
    click(explorer.fig, explorer.button_play.ax)
    assert not explorer.playing and explorer.button_play.label.get_text() == "Play"


@pytest.mark.parametrize("index", range(len(PRESETS)))
def test_preset_buttons_set_the_values(explorer, index):
    explorer.step(3)
    click(explorer.fig, explorer.preset_buttons[index].ax)
    p = PRESETS[index]
    assert (explorer.batch_size, explorer.lr, explorer.lam) == (p.batch_size, p.lr, p.lam)
    assert explorer.t == 0
    assert explorer.slider_b.val == p.batch_size
    assert explorer.slider_lr.val == pytest.approx(math.log10(p.lr))
    assert explorer.slider_lam.val == pytest.approx(math.log10(p.lam))
    assert explorer.message.startswith("Preset")
    assert f"{1 - 2 * p.lr * p.lam:.4f}" in explorer.badge.get_text()


def test_refused_settings_show_the_message(explorer):
    explorer.apply_preset(0)
    explorer.slider_lr.set_val(math.log10(0.9))
    assert explorer.lr == pytest.approx(0.9)
    explorer.slider_lam.set_val(0.0)  # lambda = 1: 1 - 2*0.9*1 < 0
    assert explorer.lam == pytest.approx(0.1), "a refused lambda was applied"
    assert explorer.slider_lam.val == pytest.approx(-1.0), "the slider did not snap back"
    shown = explorer.message_text.get_text()
    assert shown.startswith("Refused") and "<= 0" in shown
    assert explorer.message_text.get_color() == "#b00000"
    assert not explorer.set_params(lr=0.6, lam=0.9)
    assert explorer.lr == pytest.approx(0.9)
    assert not explorer.set_params(batch_size=0) and "B must be" in explorer.message
    # A valid change clears the message.
    explorer.slider_lam.set_val(math.log10(0.2))
    assert explorer.lam == pytest.approx(0.2) and explorer.message == ""
    # The far left of the lambda slider is lambda = 0 (no weight decay).
    explorer.slider_lam.set_val(-4.4)
    assert explorer.lam == 0 and explorer.decay == 1.0
    assert math.isinf(explorer.measures()["window"])


def test_eps_slider_and_seed_box(explorer):
    explorer.apply_preset(0)
    explorer.step(60)
    at_small_eps = explorer.measures()["threshold_rank"]
    explorer.slider_eps.set_val(-1.0)
    assert explorer.eps == pytest.approx(0.1)
    assert explorer.measures()["threshold_rank"] < at_small_eps
    assert "ε=1e-01" in explorer.readout_text.get_text()
    explorer.slider_eps.set_val(-3.0)
    explorer.seed_box.set_val("5")
    assert explorer.seed == 5 and explorer.t == 0
    explorer.seed_box.set_val("minus one")
    assert explorer.message.startswith("Refused: seed") and explorer.seed == 5


def test_saved_gif_has_one_frame_per_step(tmp_path):
    e = Explorer(batch_size=2)
    path = tmp_path / "out.gif"
    assert e.save(path, steps=4, dpi=30) == [path]
    with Image.open(path) as gif:
        assert gif.n_frames == 4
    e2 = Explorer()
    e2.save(tmp_path / "b.gif", steps=5, every=2, dpi=30)
    with Image.open(tmp_path / "b.gif") as gif:
        assert gif.n_frames == 3
    assert e2.t == 5


def test_saved_png_frames_and_screenshot(tmp_path):
    e = Explorer()
    frames = e.save(tmp_path / "frames", steps=2, dpi=30)
    assert [f.name for f in frames] == ["frame_00001.png", "frame_00002.png"]
    assert all(f.exists() for f in frames)
    shot = e.save(tmp_path / "shot.png", steps=3, dpi=30)[0]
    assert shot.exists() and e.t == 5
    with pytest.raises(FileNotFoundError, match="does not exist"):
        e.save(tmp_path / "missing" / "x.gif", steps=1)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        e.save(tmp_path / "x.gif", steps=0)


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli.gif"
    assert main(["--preset", "2", "--size", "8", "--save", str(out), "--steps", "3", "--dpi", "30"]) == 0
    with Image.open(out) as gif:
        assert gif.n_frames == 3
    printed = capsys.readouterr().out
    assert "B = 8, μ = 0.02, λ = 0.01" in printed and "step t = 3" in printed
    assert main(["--lr", "1", "--lam", "0.6", "--save", str(out)]) == 2
    assert "1 - 2·mu·lambda" in capsys.readouterr().err


def test_bad_construction():
    with pytest.raises(ValueError, match="size must be a positive integer"):
        Explorer(size=0)
    with pytest.raises(ValueError, match="Refused"):
        Explorer(lr=0.8, lam=0.8)
    with pytest.raises(ValueError, match="preset index"):
        Explorer().apply_preset(9)


def test_help_describes_the_presets_as_measured(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "very low rank" not in text
    assert "1: B=1, mu=0.10, lam=0.10 (shrink 0.98: threshold rank 14 of 14" in text
    e = Explorer(batch_size=1, lr=0.1, lam=0.1)
    e.step(150)
    assert e.measures()["threshold_rank"] == 14  # what the help says


def test_w_heat_map_has_a_colour_bar_following_its_scale(explorer):
    bar = explorer.im_w.colorbar
    assert bar is not None and bar.ax is explorer.ax_w_colorbar
    explorer.step(5)
    limit = float(abs(explorer.W.numpy()).max())
    assert bar.mappable.get_clim() == pytest.approx((-limit, limit))


def test_saved_pictures_have_no_widgets(tmp_path):
    e = Explorer(batch_size=2, lr=0.1, lam=0.1)
    e.save(tmp_path / "shot.png", steps=3, dpi=30)
    assert not hasattr(e, "slider_b") and not hasattr(e, "button_play")
    panels = {e.ax_w, e.ax_w_colorbar, e.ax_sv, e.ax_timeline, e.ax_history, e.ax_text}
    assert set(e.fig.axes) == panels  # no slider, button or text-box axes
    assert "B=2, μ=0.1, λ=0.1" in e.message_text.get_text()
