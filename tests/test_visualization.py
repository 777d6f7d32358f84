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


def test_video_is_written_atomically_and_decodes(tmp_path):
    import av
    from PIL import Image

    from mu0.processing.visualization import write_video

    frames = [Image.new("RGB", (33, 20), (value, 0, 0)) for value in range(0, 250, 50)]
    path = write_video(frames, str(tmp_path / "clip.mp4"), fps=2.5)
    with av.open(path) as video:
        decoded = list(video.decode(video=0))
        assert video.streams.video[0].average_rate == 2.5
    assert len(decoded) == 5 and (decoded[0].width, decoded[0].height) == (32, 20)  # odd width cropped to even
    assert abs(int(decoded[-1].to_ndarray(format="rgb24")[..., 0].mean()) - 200) < 10
    with pytest.raises(ValueError, match="size"):
        write_video([frames[0], Image.new("RGB", (8, 8))], str(tmp_path / "bad.mp4"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # nothing half-written left behind


def read_recording(path) -> dict:
    """Entity path -> {column name: first row's value} of a saved rerun recording."""
    from rerun.chunk import RrdReader

    entities = {}
    for chunk in RrdReader(str(path)).stream().to_chunks():
        batch = chunk.to_record_batch()
        entities.setdefault(str(chunk.entity_path), {}).update(
            {name: batch.column(name)[0].as_py() for name in batch.schema.names if ":" in name})
    return entities


def test_rerun_recording_holds_image_traces_and_metric_3d(tmp_path):
    from mu0.processing.visualization import to_rerun

    image = np.zeros((24, 32, 3), dtype=np.uint8)
    image[:, :, 1] = 200
    intrinsics = np.array([[40.0, 0, 15.5], [0, 40.0, 11.5], [0, 0, 1]])
    depth = np.full((24, 32), 2.0, dtype=np.float32)
    depth[0, 0] = np.nan  # invalid depth is left out of the point cloud
    predicted = np.array([[[4.0, 5.0, 2.0], [6.0, 5.0, 2.0], [8.0, 5.0, 2.0]],
                          [[20.0, 10.0, 1.0], [20.0, 12.0, 1.0], [20.0, 14.0, 1.0]]])
    alive = np.array([[True, True, True], [True, False, False]])  # the second prediction stops after one step
    anchors = np.array([[2.0, 5.0, 2.0], [20.0, 8.0, 1.0]])
    path = to_rerun(image, predicted, str(tmp_path / "scene.rrd"), alive=alive, ground_truth=predicted + 1.0,
                    depth=depth, intrinsics=intrinsics, anchors=anchors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.rrd"]
    entities = read_recording(path)
    assert {"/world/camera", "/world/camera/image", "/world/camera/image/depth", "/world/camera/image/predicted",
            "/world/camera/image/ground_truth", "/world/predicted", "/world/ground_truth", "/world/depth_points"} <= set(entities)
    strips_2d = entities["/world/camera/image/predicted"]["LineStrips2D:strips"]
    np.testing.assert_allclose(strips_2d[0], [[2, 5], [4, 5], [6, 5], [8, 5]])  # anchor, then the three steps
    np.testing.assert_allclose(strips_2d[1], [[20, 8], [20, 10]])
    assert len(entities["/world/camera/image/ground_truth"]["LineStrips2D:strips"]) == 2
    strips_3d = np.asarray(entities["/world/predicted"]["LineStrips3D:strips"][0])
    np.testing.assert_allclose(strips_3d[-1], [(8 - 15.5) / 40 * 2, (5 - 11.5) / 40 * 2, 2.0], rtol=1e-6)
    points = np.asarray(entities["/world/depth_points"]["Points3D:positions"])
    assert len(points) == 24 * 32 - 1 and np.allclose(points[:, 2], 2.0)
    stored = np.asarray(entities["/world/camera"]["Pinhole:image_from_camera"]).reshape(3, 3)
    np.testing.assert_allclose(stored.T, intrinsics)  # rerun stores the matrix column-major


def test_rerun_export_errors(tmp_path, monkeypatch):
    import sys

    from mu0.processing.visualization import to_rerun

    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="depth must match"):
        to_rerun(image, np.zeros((1, 3, 2)), str(tmp_path / "a.rrd"), depth=np.ones((4, 4)))
    with pytest.raises(ValueError, match="validity mask"):
        to_rerun(image, np.zeros((1, 3, 2)), str(tmp_path / "a.rrd"), alive=np.ones((2, 3), bool))
    monkeypatch.setitem(sys.modules, "rerun", None)
    with pytest.raises(ImportError, match=r'pip install "mu0\[rerun\]"'):
        to_rerun(image, np.zeros((1, 3, 2)), str(tmp_path / "a.rrd"))
    assert not list(tmp_path.iterdir())


def _line_thickness(canvas: np.ndarray, column: int) -> int:
    return int((canvas[:, column].sum(-1) > 0).sum())


@pytest.mark.parametrize(("height", "width", "size", "thickness"), [(96, 96, (480, 480), 2), (540, 960, (960, 540), 3)])
def test_output_size_line_width_and_dots_scale_with_the_image(height, width, size, thickness):
    from mu0.processing.visualization import overlay_scale

    image = np.zeros((height, width, 3), dtype=np.uint8)
    y = height / 2
    trace = np.array([[[width * 0.2, y], [width * 0.5, y], [width * 0.8, y]]])
    canvas = np.asarray(draw_traces(image, trace, legend=False))
    assert (canvas.shape[1], canvas.shape[0]) == size  # small frames upscaled, large ones kept (never a fixed 4x)
    scale = overlay_scale(height, width)
    assert _line_thickness(canvas, int(width * 0.65 * scale)) == thickness
    dot = canvas[:, int((width * 0.2 + 0.5) * scale)]
    white = (dot == 255).all(-1).sum()
    assert white >= 2 * thickness  # the start dot is wider than the line it starts


def test_legend_shows_the_time_scale_from_blue_to_red():
    from mu0.processing.visualization import time_colours

    first, last = time_colours(np.array([0.0, 1.0]))
    assert first[2] > first[0] and last[0] > last[2]  # blue now, red at the last step
    image = np.full((540, 960, 3), 128, dtype=np.uint8)
    trace = np.array([[[100.0, 100.0], [200.0, 100.0]]])
    with_legend = np.asarray(draw_traces(image, trace))
    without = np.asarray(draw_traces(image, trace, legend=False))
    corner = with_legend[-80:].reshape(-1, 3).astype(int)  # a bottom corner: the trace is near the top-left
    assert (without[-80:] == 128).all()
    assert ((corner[:, 2] - corner[:, 0]) > 120).any() and ((corner[:, 0] - corner[:, 2]) > 120).any()


def test_3d_limits_ignore_a_far_outlier_and_share_one_span():
    from mu0.processing.visualization import robust_limits

    rng = np.random.default_rng(0)
    points = np.column_stack([rng.uniform(-0.3, 0.3, 500), rng.uniform(-0.1, 0.1, 500), rng.uniform(0.4, 1.0, 500)])
    points[0, 2] = 85.0  # one stray far depth
    limits = robust_limits(points)
    spans = limits[:, 1] - limits[:, 0]
    np.testing.assert_allclose(spans, spans[0])  # equal aspect
    assert limits[2, 1] < 2.0 and limits[2, 0] < 0.45 and limits[0, 0] < -0.28 and limits[0, 1] > 0.28


def test_the_legend_takes_the_corner_free_of_traces_and_panels_get_a_title():
    """The colour bar sat in the bottom-left corner over the grid points there; evaluation panels had no label."""
    image = np.full((96, 96, 3), 128, dtype=np.uint8)
    anchors = np.array([[x, y] for x in range(6, 96, 12) for y in range(54, 96, 12)], dtype=np.float64)
    traces = anchors[:, None] + np.linspace(1, 4, 8)[None, :, None] * [1.0, -0.5]
    with_legend = np.asarray(draw_traces(image, traces, anchors=anchors, title="ground truth"))
    without = np.asarray(draw_traces(image, traces, anchors=anchors, legend=False))
    height, width = with_legend.shape[:2]
    bottom = slice(height // 2, height)
    np.testing.assert_array_equal(with_legend[bottom], without[bottom])  # no trace in the lower half is covered
    top_right = with_legend[: height // 8, width // 2 :].reshape(-1, 3).astype(int)
    assert ((top_right[:, 2] - top_right[:, 0]) > 120).any() and ((top_right[:, 0] - top_right[:, 2]) > 120).any()
    top_left = with_legend[: height // 12, : width // 3]
    assert (top_left == 0).all(-1).mean() > 0.1 and (top_left > 200).all(-1).any()  # light text on a black box
    assert (without[: height // 12, : width // 3] == 128).all()


def test_the_3d_reference_is_drawn_widest_and_on_top(tmp_path, monkeypatch):
    """In traces_3d.png the ground truth was hidden under μ0's lines."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    truth = np.random.default_rng(0).normal(size=(3, 8, 3)) * 0.1 + [0, 0, 1]
    plot_traces_3d({"ground truth": truth, "mu0": truth + 0.001}, str(tmp_path / "plot.png"))
    axes = figures[0].axes[0]
    from mpl_toolkits.mplot3d.art3d import Line3DCollection

    lines = [collection for collection in axes.collections if isinstance(collection, Line3DCollection)]
    widest = max(lines, key=lambda collection: collection.get_linewidths()[0])
    assert not axes.computed_zorder and widest.get_linewidths()[0] > 2
    assert all(widest.get_zorder() > other.get_zorder() for other in lines if other.get_linewidths()[0] < 2)


def test_visible_trails_start_where_a_track_became_visible_and_skip_hidden_ones():
    from mu0.processing.visualization import visible_trails

    steps = np.arange(4, dtype=np.float32)
    pixels = np.stack([np.stack([steps, steps * 2], -1)] * 3, axis=1)  # (T=4, N=3, 2)
    valid = np.array([[True, False, True], [True, False, True], [True, True, True], [True, True, False]])
    trails, shown = visible_trails(pixels, valid)
    assert shown.tolist() == [True, True, False]  # the third track is hidden at the last frame
    np.testing.assert_array_equal(trails[0], pixels[::-1, 0])  # visible throughout: the whole trail, newest first
    np.testing.assert_array_equal(trails[1], [[3, 6], [2, 4], [2, 4], [2, 4]])  # visible from step 2 on

