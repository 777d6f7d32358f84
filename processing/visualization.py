"""Drawing predicted and ground-truth traces: time-coloured overlays (PIL only) and 3D plots (matplotlib, `viz` extra)."""

import numpy as np
from PIL import Image, ImageDraw

from .image_processing_mu0 import turbo_colormap


def draw_traces(
    image,
    traces: np.ndarray,
    alive: np.ndarray | None = None,
    scale: int = 4,
    line_width: int = 2,
    dot_radius: int = 3,
    colour: tuple[int, int, int] | None = None,
    anchors: np.ndarray | None = None,
) -> Image.Image:
    """Overlay pixel traces (N, H, 2) on an image: each segment coloured by time (turbo, blue = now, red = last),
    a white start dot per query, and steps after a predicted stop (`alive` False) not drawn.

    The image is upscaled by `scale` first so traces of small frames stay readable. `colour` draws every trace in
    one colour instead (e.g. ground truth in white next to a prediction). `anchors` (N, 2), the queries' current
    pixels, start each trace where its point is now (model traces begin one step later).
    """
    canvas = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    traces = np.asarray(traces, dtype=np.float64)
    if traces.ndim != 3 or traces.shape[-1] != 2:
        raise ValueError(f"traces must be (N, H, 2) pixel positions, got {traces.shape}.")
    alive = np.ones(traces.shape[:2], dtype=bool) if alive is None else np.asarray(alive, dtype=bool)
    if alive.shape != traces.shape[:2]:
        raise ValueError(f"alive must be {traces.shape[:2]}, got {alive.shape}.")
    if anchors is not None:
        anchors = np.asarray(anchors, dtype=np.float64)
        if anchors.shape != (traces.shape[0], 2):
            raise ValueError(f"anchors must be ({traces.shape[0]}, 2), got {anchors.shape}.")
        traces = np.concatenate([anchors[:, None], traces], axis=1)
        alive = np.concatenate([np.ones_like(alive[:, :1]), alive], axis=1)
    draw = ImageDraw.Draw(canvas)
    points = (traces + 0.5) * scale  # pixel centres of the upscaled image
    steps = traces.shape[1]
    segment_colours = (turbo_colormap(np.linspace(0.1, 0.95, max(steps - 1, 1))) * 255).astype(int)
    for trace, keep in zip(points, alive):
        for step in range(steps - 1):
            if not (keep[step] and keep[step + 1] and np.isfinite(trace[step : step + 2]).all()):
                break
            fill = colour or tuple(segment_colours[step])
            draw.line([tuple(trace[step]), tuple(trace[step + 1])], fill=fill, width=line_width)
        if np.isfinite(trace[0]).all():
            x, y = trace[0]
            draw.ellipse([x - dot_radius, y - dot_radius, x + dot_radius, y + dot_radius], fill=(255, 255, 255),
                         outline=(0, 0, 0))
    return canvas


def write_video(frames: list[Image.Image], path: str, fps: float = 10.0) -> str:
    """H.264 MP4 via PyAV (the `extract` extra), written to a temp name and renamed when complete."""
    try:
        import av
    except ImportError as error:
        raise ImportError("Writing MP4 needs PyAV: pip install 'mu0[extract]'.") from error
    import os

    width, height = (size - size % 2 for size in frames[0].size)  # H.264 wants even sides
    temporary = path + ".tmp.mp4"
    with av.open(temporary, "w") as container:
        stream = container.add_stream("libx264", rate=max(1, round(fps)))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            array = np.asarray(frame.convert("RGB"))[:height, :width]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    os.replace(temporary, path)
    return path


def plot_traces_3d(traces: dict[str, np.ndarray], path: str, title: str = "") -> str:
    """Save a 3D plot of camera-frame traces: `traces` maps a label to (N, H, 3) arrays of (x, y, z) in metres."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plot_traces_3d needs matplotlib: pip install 'mu0[viz]'.") from error
    figure = plt.figure(figsize=(6, 5))
    axes = figure.add_subplot(projection="3d")
    for (label, values), style in zip(traces.items(), ("-", "--", ":", "-.")):
        for index, trace in enumerate(np.asarray(values)):
            finite = np.isfinite(trace).all(-1)
            axes.plot(trace[finite, 0], trace[finite, 2], -trace[finite, 1], style, linewidth=1,
                      color=f"C{list(traces).index(label)}", label=label if index == 0 else None)
    axes.set_xlabel("x (m)")
    axes.set_ylabel("z, depth (m)")
    axes.set_zlabel("up (m)")
    axes.legend()
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


__all__ = ["draw_traces", "plot_traces_3d", "write_video"]
