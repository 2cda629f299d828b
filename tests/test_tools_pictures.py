"""Pictures: grounding heat maps on one absolute scale, the report's metrics panels, and the demo
preview's Bengali (a real font, no missing glyphs)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from bimac.tools.ground import (
    COLOUR_MAP,
    DISPLAY_SIDE,
    display_image,
    overlay,
    save_heat_map,
    upsample,
)
from bimac.tools.plots import metric_panels, moving_average, plot_run


def test_heat_map_peak_lies_in_the_patch_box_of_the_noun():
    """A 7x7 grid whose best patch is (row 2, col 5), upsampled over a 448x336 picture: the
    hottest pixel lies inside that patch's box (64x48 pixels) and the scores are not rescaled."""
    heat = np.full((7, 7), 0.1, np.float32)
    heat[2, 5] = 0.8
    up = upsample(heat, (448, 336))
    assert up.shape == (336, 448)
    y, x = np.unravel_index(up.argmax(), up.shape)
    assert 5 * 64 <= x < 6 * 64 and 2 * 48 <= y < 3 * 48
    assert up.max() == pytest.approx(0.8, abs=0.02) and up.min() == pytest.approx(0.1, abs=1e-6)


def test_heat_map_colour_is_absolute_so_an_absent_object_shows_no_bright_spot():
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    # the model finds the noun nowhere: scores from 0.05 to 0.15 (stretched, 0.15 would be red)
    absent = np.tile(np.linspace(0.05, 0.15, 64, dtype=np.float32), (64, 1))
    present = absent.copy()
    present[10:20, 40:50] = 0.9
    a, p = overlay(grey, absent, alpha=0.5), overlay(grey, present, alpha=0.5)
    # the same score has the same colour in both maps (no per-map stretch to [0, 1])
    assert np.allclose(a[0, 0], p[0, 0])
    expected = 0.5 * (128 / 255) + 0.5 * np.array(colormaps[COLOUR_MAP](0.15)[:3])
    assert np.allclose(a[0, -1], expected, atol=1e-6)
    # jet's hot end is red, its cold end has none: the absent noun adds no red to the grey
    grey_red = 0.5 * 128 / 255
    assert a[..., 0].max() < grey_red + 0.01 and p[15, 45, 0] > grey_red + 0.4


def test_heat_map_picture_is_readable_for_a_64_pixel_thumbnail(tmp_path):
    thumb = Image.new("RGB", (64, 64), (200, 30, 30))
    assert display_image(thumb).size == (DISPLAY_SIDE, DISPLAY_SIDE)
    assert display_image(Image.new("RGB", (4000, 3000))).size == (
        DISPLAY_SIDE * 4 // 3,
        DISPLAY_SIDE,
    )
    heat = np.zeros((4, 4), np.float32)
    heat[1, 2] = 0.7
    save_heat_map(thumb, heat, "circle", tmp_path / "m.png")
    png = Image.open(tmp_path / "m.png")
    assert min(png.size) >= DISPLAY_SIDE and png.size[0] > png.size[1]  # colour bar at the side


def _log(tmp_path, steps=100):
    rng = np.random.default_rng(0)
    rows = []
    for s in range(1, steps + 1):
        cg = 5.0 / s
        rows.append(
            {
                "step": s,
                "loss": cg + 1.0,
                "losses": {"cg": cg, "mcl": 1.0},
                "metrics": {
                    "loss_cg": cg / 0.7,  # the unweighted copy of a loss term
                    "grounding_nouns": 27.0 + rng.normal(),
                    "pointing_game": float(
                        np.clip(0.3 + 0.2 * s / steps + rng.normal(0, 0.1), 0, 1)
                    ),
                    "grounding_pos": min(1.0, 0.01 * s),
                },
                "lr": 1e-3,
                "samples": 32 * s,
            }
        )
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return rows


def test_report_metrics_panels_split_by_scale_and_drop_repeated_losses(tmp_path):
    rows = _log(tmp_path)
    assert metric_panels(rows) == [
        ("metrics within [0, 1]", ["grounding_pos", "pointing_game"]),
        ("grounding_nouns", ["grounding_nouns"]),
    ]
    png = plot_run(tmp_path, tmp_path / "curves.png")
    assert Image.open(png).size[1] > Image.open(png).size[0] / 3  # two rows of panels


def test_moving_average_by_hand():
    values = np.array([1.0, 3.0, np.nan, 5.0, 7.0])
    # windows of 2 finite-or-not steps: [1], [1, 3], [3, nan], [nan, 5], [5, 7]
    assert np.allclose(moving_average(values, 2), [1.0, 2.0, 3.0, 5.0, 6.0])
    assert np.allclose(moving_average(values, 1)[[0, 1, 3, 4]], [1.0, 3.0, 5.0, 7.0])


def test_demo_preview_draws_bengali_with_a_font_that_has_its_glyphs(tmp_path):
    """No 'Glyph ... missing from font' warning while the preview grid with Bengali captions is
    drawn (matplotlib warns for every glyph it draws as a box)."""
    from cli.demo import preview_grid
    from shards.world import build

    build(tmp_path, "train", 4, 64, shard_size=4)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing from font.*")
        png = preview_grid(tmp_path / "00000.tar", tmp_path / "preview.png", n=4, cols=2)
    text = png.with_suffix(".txt").read_text(encoding="utf-8")
    assert any("\u0980" <= ch <= "\u09ff" for ch in text)  # Bengali was drawn
