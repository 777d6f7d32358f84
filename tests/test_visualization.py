"""Trace overlays: what is drawn where, and done-truncation."""

import numpy as np
import pytest

from mu0.processing.image_processing_mu0 import turbo_colormap
from mu0.processing.visualization import draw_traces, plot_traces_3d


def test_overlay_draws_time_coloured_segments_and_start_dots():
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    trace = np.array([[[2.0, 8.0], [6.0, 8.0], [10.0, 8.0], [14.0, 8.0]]])
    canvas = np.asarray(draw_traces(image, trace, scale=4, dot_radius=2))
    assert canvas.shape == (64, 64, 3)
    assert tuple(canvas[34, 10]) == (255, 255, 255)  # start dot at pixel (2, 8) -> (10, 34) upscaled
    first = tuple((turbo_colormap(np.linspace(0.1, 0.95, 3)) * 255).astype(int)[0])
    last = tuple((turbo_colormap(np.linspace(0.1, 0.95, 3)) * 255).astype(int)[-1])
    assert tuple(canvas[34, 18]) == first and tuple(canvas[34, 50]) == last  # early blue, late red
    truncated = np.asarray(draw_traces(image, trace, alive=np.array([[True, True, False, False]]), scale=4, dot_radius=2))
    assert truncated[34, 50].sum() == 0  # nothing drawn after the predicted stop


def test_overlay_and_plot_errors(tmp_path):
    with pytest.raises(ValueError, match="traces"):
        draw_traces(np.zeros((8, 8, 3), np.uint8), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="alive"):
        draw_traces(np.zeros((8, 8, 3), np.uint8), np.zeros((1, 4, 2)), alive=np.ones((2, 4), bool))
    path = plot_traces_3d({"a": np.random.default_rng(0).normal(size=(3, 8, 3))}, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 5_000 and path.endswith("plot.png")


def test_anchors_start_each_trace_at_the_query():
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    trace = np.array([[[6.0, 8.0], [10.0, 8.0]]])
    canvas = np.asarray(draw_traces(image, trace, anchors=np.array([[2.0, 8.0]]), scale=4, dot_radius=2))
    assert tuple(canvas[34, 10]) == (255, 255, 255)  # the dot is at the anchor (2, 8), not at step 1 (6, 8)
    assert canvas[34, 18].sum() > 0  # and a segment joins the anchor to step 1
    with pytest.raises(ValueError, match="anchors"):
        draw_traces(image, trace, anchors=np.zeros((2, 2)))
