"""Showing predicted and ground-truth traces: time-coloured overlays (PIL), MP4 clips (PyAV), 3D plots (matplotlib)
and rerun recordings (`rerun` extra) that put the image, the traces and the depth in one 3D scene."""

import os
from fractions import Fraction

import numpy as np
from PIL import Image, ImageDraw

from .image_processing_mu0 import turbo_colormap


MIN_OVERLAY_SIDE = 480  # small frames are upscaled until their longer side reaches this; larger ones are kept


def overlay_scale(height: int, width: int) -> int:
    """The integer upscale of a frame for drawing: 1 for frames with a side of 480 px or more, enough to reach
    480 px for smaller ones (96² -> 5x), so the output is readable without being huge."""
    return max(1, -(-MIN_OVERLAY_SIDE // max(height, width)))


def time_colours(values: np.ndarray) -> np.ndarray:
    """The one colour scale for time in every figure: turbo from blue (0, now) to red (1, the last step), RGB in
    [0, 1]."""
    return turbo_colormap(0.1 + 0.85 * np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0))


def _legend_font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=max(10, round(size * 1.2)))


def _legend_box(canvas: Image.Image, labels: tuple[str, str], size: int) -> tuple[float, float]:
    """Width and height of the colour bar's box."""
    draw, font = ImageDraw.Draw(canvas), _legend_font(size)
    margin = max(3, size // 2)
    width = draw.textlength(labels[0], font=font) + size * 8 + draw.textlength(labels[1], font=font) + 4 * margin
    return width, font.size + 2 * margin


def _free_corner(canvas: Image.Image, box: tuple[float, float], points: np.ndarray, margin: int,
                 taken: tuple[str, ...] = ()) -> tuple[float, float]:
    """The top-left position of a `box` in the canvas corner covering the fewest of `points` (P, 2) (within
    `margin` of the box), then farthest from them, so a legend never hides the queries it explains."""
    width, height = box
    corners = {"bottom-left": (margin, canvas.height - height - margin),
               "bottom-right": (canvas.width - width - margin, canvas.height - height - margin),
               "top-right": (canvas.width - width - margin, margin), "top-left": (margin, margin)}
    finite = points[np.isfinite(points).all(-1)]

    def crowding(corner: tuple[float, float]) -> tuple[int, float]:
        left, top = corner
        # per point, its distance outside the box along x and y (0 inside)
        dx = np.maximum(np.maximum(left - finite[:, 0], finite[:, 0] - left - width), 0)
        dy = np.maximum(np.maximum(top - finite[:, 1], finite[:, 1] - top - height), 0)
        distance = np.hypot(dx, dy)
        return int((distance <= margin).sum()), -float(distance.min(initial=np.inf))

    return min((corner for name, corner in corners.items() if name not in taken), key=crowding)


def _draw_legend(canvas: Image.Image, labels: tuple[str, str], size: int, corner: tuple[float, float]) -> None:
    """A time colour bar with its end labels on a dark box whose top-left is `corner`."""
    font = _legend_font(size)
    draw = ImageDraw.Draw(canvas)
    bar_width, bar_height, margin = size * 8, max(3, size // 2), max(3, size // 2)
    left_width = draw.textlength(labels[0], font=font)
    box_width, box_height = _legend_box(canvas, labels, size)
    left, top = corner
    draw.rectangle([left, top, left + box_width, top + box_height], fill=(0, 0, 0))
    centre = top + box_height / 2
    draw.text((left + margin, centre), labels[0], fill=(255, 255, 255), font=font, anchor="lm")
    bar_left = left + 2 * margin + left_width
    colours = (time_colours(np.linspace(0, 1, bar_width)) * 255).astype(int)
    for offset, fill in enumerate(colours):
        draw.line([(bar_left + offset, centre - bar_height), (bar_left + offset, centre + bar_height)], fill=tuple(fill))
    draw.text((bar_left + bar_width + margin, centre), labels[1], fill=(255, 255, 255), font=font, anchor="lm")


def _draw_title(canvas: Image.Image, text: str, size: int) -> None:
    """A panel label ("ground truth", "mu0 prediction") in white on a dark box in the top-left corner."""
    font = _legend_font(size)
    margin = max(3, size // 2)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((2 * margin, 2 * margin), text, font=font)
    draw.rectangle([margin, margin, right + margin, bottom + margin], fill=(0, 0, 0))
    draw.text((2 * margin, 2 * margin), text, fill=(255, 255, 255), font=font)


def draw_traces(
    image,
    traces: np.ndarray,
    alive: np.ndarray | None = None,
    scale: int | None = None,
    line_width: int | None = None,
    dot_radius: int | None = None,
    colour: tuple[int, int, int] | None = None,
    anchors: np.ndarray | None = None,
    legend: bool = True,
    title: str | None = None,
) -> Image.Image:
    """Overlay pixel traces (N, H, 2) on an image: each segment coloured by time (`time_colours`: blue = now, red =
    the last step), a white start dot per query, and steps after a predicted stop (`alive` False) not drawn.

    Small frames are upscaled (`scale`, default `overlay_scale`) and lines and dots grow with the output size, so
    traces read the same on a 96² crop and a 960×540 photo. `colour` draws every trace in one colour instead.
    `anchors` (N, 2), the queries' current pixels, start each trace where its point is now (model traces begin one
    step later). `legend` adds the time colour bar, in the corner covering the fewest trace points; `title` labels
    the panel in its top-left corner (e.g. "ground truth" beside "prediction").
    """
    canvas = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    scale = overlay_scale(canvas.height, canvas.width) if scale is None else scale
    canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    size = max(canvas.size) / 320  # line width at this output size: 1.5 px at 480, 3 px at 960
    line_width = max(1, round(size)) if line_width is None else line_width
    dot_radius = max(2, round(2 * size)) if dot_radius is None else dot_radius
    traces = np.asarray(traces, dtype=np.float64)
    if traces.ndim != 3 or traces.shape[-1] != 2:
        raise ValueError(f"traces must be (N, H, 2) pixel positions, got {traces.shape}.")
    alive = np.ones(traces.shape[:2], dtype=bool) if alive is None else np.asarray(alive, dtype=bool)
    if alive.shape != traces.shape[:2]:
        raise ValueError(f"alive must be {traces.shape[:2]}, got {alive.shape}.")
    horizon = traces.shape[1]
    if anchors is not None:
        anchors = np.asarray(anchors, dtype=np.float64)
        if anchors.shape != (traces.shape[0], 2):
            raise ValueError(f"anchors must be ({traces.shape[0]}, 2), got {anchors.shape}.")
        traces = np.concatenate([anchors[:, None], traces], axis=1)
        alive = np.concatenate([np.ones_like(alive[:, :1]), alive], axis=1)
    draw = ImageDraw.Draw(canvas)
    points = (traces + 0.5) * scale  # pixel centres of the upscaled image
    steps = traces.shape[1]
    segment_colours = (time_colours(np.linspace(0, 1, max(steps - 1, 1))) * 255).astype(int)
    for trace, keep in zip(points, alive):
        for step in range(steps - 1):
            if not (keep[step] and keep[step + 1] and np.isfinite(trace[step : step + 2]).all()):
                break
            fill = colour or tuple(segment_colours[step])
            draw.line([tuple(trace[step]), tuple(trace[step + 1])], fill=fill, width=line_width, joint="curve")
    for trace in points:  # dots above every line, so crowded queries stay visible
        if np.isfinite(trace[0]).all():
            x, y = trace[0]
            draw.ellipse([x - dot_radius, y - dot_radius, x + dot_radius, y + dot_radius], fill=(255, 255, 255),
                         outline=(0, 0, 0), width=max(1, dot_radius // 3))
    text_size = max(6, round(max(canvas.size) / 64))
    if title:
        _draw_title(canvas, title, text_size)
    if legend and colour is None:
        labels = ("now" if anchors is not None else "+1", f"+{horizon} steps")
        drawn = points[np.concatenate([np.ones_like(alive[:, :1]), alive[:, 1:]], axis=1)]  # starts, and live steps
        corner = _free_corner(canvas, _legend_box(canvas, labels, text_size), drawn, max(3, text_size // 2) + dot_radius
                              + line_width, taken=("top-left",) if title else ())
        _draw_legend(canvas, labels, text_size, corner)
    return canvas


def write_video(frames: list[Image.Image], path: str, fps: float = 10.0) -> str:
    """H.264 MP4 via PyAV, written to a temp name and renamed when complete, so a crash never leaves a truncated
    file under the final name."""
    try:
        import av
    except ImportError as error:
        raise ImportError("Writing MP4 needs PyAV: pip install av") from error
    if not frames:
        raise ValueError("write_video needs at least one frame.")
    if any(frame.size != frames[0].size for frame in frames):
        raise ValueError(f"All frames must have the size of the first, {frames[0].size}.")
    width, height = (size - size % 2 for size in frames[0].size)  # H.264 wants even sides
    temporary = path + ".tmp.mp4"
    try:
        with av.open(temporary, "w") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for frame in frames:
                array = np.ascontiguousarray(np.asarray(frame.convert("RGB"))[:height, :width])
                container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
            container.mux(stream.encode())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def _strips(points: np.ndarray, valid: np.ndarray) -> list[np.ndarray]:
    """Each trace up to its first invalid or non-finite step; traces shorter than one segment are dropped."""
    strips = []
    for trace, keep in zip(points, valid & np.isfinite(points).all(-1)):
        length = len(keep) if keep.all() else int(np.argmin(keep))
        if length >= 2:
            strips.append(trace[:length])
    return strips


def _with_anchors(traces: np.ndarray, valid: np.ndarray, anchors: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if anchors is None:
        return traces, valid
    anchors = np.asarray(anchors, dtype=np.float64)
    if anchors.shape != (traces.shape[0], traces.shape[-1]):
        raise ValueError(f"anchors must be ({traces.shape[0]}, {traces.shape[-1]}) like the traces' steps, got {anchors.shape}.")
    return np.concatenate([anchors[:, None], traces], axis=1), np.concatenate([np.ones_like(valid[:, :1]), valid], axis=1)


def _lift(pixels_and_depth: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """(..., 3) pixel x, y and depth z to camera-frame XYZ in metres (OpenCV pixel centres and axes)."""
    x, y, z = np.moveaxis(pixels_and_depth, -1, 0)
    return np.stack([(x - intrinsics[0, 2]) / intrinsics[0, 0] * z, (y - intrinsics[1, 2]) / intrinsics[1, 1] * z, z], -1)


PREDICTED_COLOUR = (255, 140, 0)
GROUND_TRUTH_COLOUR = (80, 220, 255)


def to_rerun(
    image,
    traces: np.ndarray,
    path: str,
    alive: np.ndarray | None = None,
    ground_truth: np.ndarray | None = None,
    ground_truth_valid: np.ndarray | None = None,
    depth: np.ndarray | None = None,
    intrinsics: np.ndarray | None = None,
    anchors: np.ndarray | None = None,
    max_depth_points: int = 65_536,
    application_id: str = "mu0",
) -> str:
    """Save an image with its predicted (and optionally ground-truth) traces as a rerun recording (`.rrd`, open it
    with `rerun path.rrd`), written to a temp name and renamed when complete.

    traces / ground_truth: (N, H, 2) pixel positions, or (N, H, 3) with metric depth z as a third column.
    alive / ground_truth_valid: (N, H) steps to draw; a trace stops at its first False step.
    depth: (height, width) metric depth of the image; intrinsics: 3 × 3 pixel intrinsics.
    anchors: (N, 2) or (N, 3) current positions of the queries, prepended to both trace sets (model traces start
    one step after now).

    Entities: `world/camera/image` with the 2D strips `.../predicted` and `.../ground_truth` (and `.../depth`). With
    intrinsics, `world/camera` is an OpenCV pinhole at the origin and traces with depth become 3D line strips
    `world/predicted` and `world/ground_truth` in metres, the depth map a coloured point cloud `world/depth_points`.
    """
    try:
        import rerun as rr
    except ImportError as error:
        raise ImportError('to_rerun needs the rerun SDK: pip install "mu0[rerun]"') from error
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (height, width, 3) RGB, got {image.shape}.")
    sets = {}
    for name, values, valid in (("predicted", traces, alive), ("ground_truth", ground_truth, ground_truth_valid)):
        if values is None:
            continue
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 3 or values.shape[-1] not in (2, 3):
            raise ValueError(f"{name} traces must be (N, H, 2) pixels or (N, H, 3) pixels and depth, got {values.shape}.")
        valid = np.ones(values.shape[:2], dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        if valid.shape != values.shape[:2]:
            raise ValueError(f"The {name} validity mask must be {values.shape[:2]}, got {valid.shape}.")
        sets[name] = _with_anchors(values, valid, anchors)
    if intrinsics is not None:
        intrinsics = np.asarray(intrinsics, dtype=np.float64)
        if intrinsics.shape != (3, 3) or not np.isfinite(intrinsics).all():
            raise ValueError(f"intrinsics must be a finite 3 × 3 matrix, got shape {intrinsics.shape}.")
    if depth is not None:
        depth = np.asarray(depth, dtype=np.float32)
        if depth.shape != image.shape[:2]:
            raise ValueError(f"depth must match the image's (height, width) {image.shape[:2]}, got {depth.shape}.")

    height, width = image.shape[:2]
    temporary = path + ".tmp.rrd"
    recording = rr.RecordingStream(application_id)
    try:
        recording.save(temporary)
        recording.log("world", rr.ViewCoordinates.RDF, static=True)  # the current camera's frame: x right, y down
        if intrinsics is not None:
            recording.log("world/camera", rr.Pinhole(image_from_camera=intrinsics, resolution=[width, height],
                                                     camera_xyz=rr.ViewCoordinates.RDF), static=True)
        recording.log("world/camera/image", rr.Image(image), static=True)
        if depth is not None:
            recording.log("world/camera/image/depth", rr.DepthImage(np.nan_to_num(depth), meter=1.0), static=True)
        colours = {"predicted": PREDICTED_COLOUR, "ground_truth": GROUND_TRUTH_COLOUR}
        for name, (values, valid) in sets.items():
            strips = _strips(values[..., :2], valid)
            recording.log(f"world/camera/image/{name}", rr.LineStrips2D(strips, colors=colours[name], labels=name),
                          static=True)
            if intrinsics is not None and values.shape[-1] == 3:
                strips = _strips(_lift(values, intrinsics), valid & (values[..., 2] > 0))
                recording.log(f"world/{name}", rr.LineStrips3D(strips, colors=colours[name], labels=name), static=True)
        if depth is not None and intrinsics is not None:
            stride = max(1, int(np.ceil(np.sqrt(height * width / max_depth_points))))
            rows, columns = np.mgrid[0:height:stride, 0:width:stride]
            z = depth[rows, columns]
            keep = np.isfinite(z) & (z > 0)
            points = _lift(np.stack([columns[keep], rows[keep], z[keep]], -1).astype(np.float64), intrinsics)
            recording.log("world/depth_points", rr.Points3D(points, colors=image[rows[keep], columns[keep]]), static=True)
        recording.flush()
        recording.disconnect()
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def robust_limits(points: np.ndarray, percentiles: tuple[float, float] = (2.0, 98.0), margin: float = 0.1) -> np.ndarray:
    """(3, 2) axis limits of (P, 3) points with one common span: each axis centred on its percentile range, every
    axis as long as the longest such range plus a margin. Equal spans give equal aspect, and percentiles keep one
    far outlier (a stray 85 m depth) from squashing the rest into a dot."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    points = points[np.isfinite(points).all(-1)]
    if not len(points):
        return np.array([[-1.0, 1.0]] * 3)
    low, high = np.percentile(points, percentiles, axis=0)
    half = max(float((high - low).max()) * (0.5 + margin), 1e-3)
    centre = (low + high) / 2
    return np.stack([centre - half, centre + half], axis=-1)


def plot_traces_3d(traces: dict[str, np.ndarray], path: str, title: str = "") -> str:
    """Save a 3D plot of camera-frame traces: `traces` maps a label to (N, H, 3) arrays of (x, y, z) in metres.

    Segments are coloured by time on the overlays' scale (blue = first step, red = last, with a colour bar); labels
    differ by line style, and the first label (the reference, e.g. ground truth) is drawn widest and on top, so a
    prediction that follows it closely does not hide it. Axes are equal and limited to the 2nd-98th percentiles of
    the points (`robust_limits`).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.lines import Line2D
        from mpl_toolkits.mplot3d.art3d import Line3DCollection
    except ImportError as error:
        raise ImportError("plot_traces_3d needs matplotlib: pip install 'mu0[viz]'.") from error
    figure = plt.figure(figsize=(7, 5.5))
    axes = figure.add_subplot(projection="3d")
    axes.computed_zorder = False  # draw in the given zorder (the reference on top), not by depth
    styles = ("solid", "dashed", "dotted", "dashdot")
    plotted = {label: np.asarray(values, dtype=np.float64)[..., [0, 2, 1]] * [1.0, 1.0, -1.0]  # x, depth, up
               for label, values in traces.items()}
    limits = robust_limits(np.concatenate([values.reshape(-1, 3) for values in plotted.values()]))
    handles = []
    for rank, ((label, values), style) in enumerate(zip(plotted.items(), styles)):
        width, order = (2.5, 3 + len(plotted)) if rank == 0 else (1.5, 3 + len(plotted) - rank)
        for trace in values:
            steps = np.linspace(0, 1, max(len(trace) - 1, 1))
            inside = np.isfinite(trace).all(-1) & ((trace >= limits[:, 0]) & (trace <= limits[:, 1])).all(-1)
            drawn = inside[:-1] & inside[1:]  # segments beyond the limits are left out, not drawn across the box
            if drawn.any():
                segments = np.stack([trace[:-1], trace[1:]], axis=1)[drawn]
                axes.add_collection3d(Line3DCollection(segments, colors=time_colours(steps[drawn]), linestyles=style,
                                                       linewidths=width, zorder=order))
            if inside[0]:
                axes.scatter(*trace[0], color="black", s=6, zorder=order)
        handles.append(Line2D([], [], color="0.3", linestyle=style, linewidth=width, label=label))
    axes.set_xlim(*limits[0])
    axes.set_ylim(*limits[1])
    axes.set_zlim(*limits[2])
    axes.set_box_aspect((1, 1, 1))
    axes.set_xlabel("x (m)")
    axes.set_ylabel("z, depth (m)")
    axes.set_zlabel("up (m)")
    axes.legend(handles=handles, loc="upper left")
    mappable = plt.cm.ScalarMappable(cmap=ListedColormap(time_colours(np.linspace(0, 1, 256))))
    colour_bar = figure.colorbar(mappable, ax=axes, shrink=0.6, pad=0.1, ticks=[0, 1])
    colour_bar.ax.set_yticklabels(["first step", "last step"])
    axes.set_title(title)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


__all__ = ["draw_traces", "overlay_scale", "plot_traces_3d", "robust_limits", "time_colours", "to_rerun", "write_video"]


def visible_trails(pixels: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trails (M, T, 2) of the tracks valid at the window's last frame, from pixels (T, N, 2) and validity (T, N),
    newest first: `draw_traces` marks a trace's first point, which here is where the point is now.

    A trail starts where its track last became valid: earlier steps repeat that first position, so a point that
    was hidden for part of the window is still drawn (with a shorter trail) instead of being left out.
    Returns the trails and the (N,) mask of the tracks drawn.
    """
    pixels, valid = np.array(pixels, dtype=np.float32), np.array(valid, dtype=bool)
    for step in range(len(pixels) - 2, -1, -1):
        broken = ~(valid[step] & valid[step + 1])
        pixels[step, broken] = pixels[step + 1, broken]
        valid[step] &= valid[step + 1]
    shown = valid[-1]
    return pixels[::-1, shown].transpose(1, 0, 2), shown

