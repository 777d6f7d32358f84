"""A browser demo of μ0 (Gradio): upload an image or take a frame from a video, click to add query points or pick a
grid, type an instruction, and get the overlay, a 3D plot (given depth and intrinsics) and the traces as JSON.

`mu0 app --model PATH_OR_REPO` launches it. The same file is a Hugging Face Space: copy it as `app.py` beside a
`requirements.txt` holding `mu0[app]` and set the Space variable `MU0_MODEL` to the checkpoint (see
docs/quickstart.md). Imports are absolute (`mu0....`) so the file also runs outside the package.
"""

import contextlib
import functools
import json
import logging
import os
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from mu0.processing.visualization import draw_traces, overlay_scale, plot_traces_3d
from mu0.training.cli import grid_points, load_depth_map, load_intrinsics

MODEL_VARIABLE = "MU0_MODEL"


def load_model(model: str):
    """The model (eval mode) and processor of a saved folder or Hub repo."""
    from mu0 import Mu0ForTracePrediction, Mu0Processor

    return Mu0ForTracePrediction.from_pretrained(model).eval(), Mu0Processor.from_pretrained(model)


def video_frame(path: str, index: int) -> np.ndarray:
    """Frame `index` (0-based) of a video as uint8 RGB."""
    import av

    count = 0
    try:
        with av.open(path) as container:
            for count, frame in enumerate(container.decode(video=0), start=1):
                if count - 1 == index:
                    return frame.to_ndarray(format="rgb24")
    except (av.FFmpegError, ValueError, OSError) as error:
        raise ValueError(f"The video {os.path.basename(path)!r} cannot be read: {error}") from None
    raise ValueError(f"The video has {count} frames (0 to {count - 1}); frame {index} does not exist.")


def page_inputs(depth_file: str | None, intrinsics_file: str | None, height: int, width: int):
    """The uploaded depth map and intrinsics, checked as `mu0 predict` checks them (messages name the upload)."""
    depth = None if depth_file is None else load_depth_map(depth_file, height, width, name="The depth map")
    intrinsics = None if intrinsics_file is None else load_intrinsics(intrinsics_file, name="The intrinsics file")
    return depth, intrinsics


def shown_on_the_page(handler):
    """Gradio shows any error but `gr.Error` as a bare "Error": raise the message itself as a `gr.Error`."""
    import gradio as gr

    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, OSError, RuntimeError) as error:
            raise gr.Error(str(error)) from error

    return wrapped


def mark_points(image: np.ndarray, points: list[tuple[float, float]]) -> np.ndarray:
    """The image with a ring at each query point, sized like the overlay's dots."""
    canvas = Image.fromarray(image)
    radius = max(3, round(max(canvas.size) / 120))
    draw = ImageDraw.Draw(canvas)
    for x, y in points:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=(255, 255, 255), width=max(1, radius // 2))
        draw.ellipse([x - radius - 1, y - radius - 1, x + radius + 1, y + radius + 1], outline=(0, 0, 0))
    return np.asarray(canvas)


def predict(model, processor, image: np.ndarray, points: list[tuple[float, float]], prompt: str = "", samples: int = 1,
            seed: int = 0, depth: np.ndarray | None = None, intrinsics: np.ndarray | None = None) -> dict:
    """Traces for `points` (pixels) on `image`: the overlay of the first sample, the JSON-ready result and, with
    metric depth and 3 x 3 intrinsics, camera-frame XYZ in metres."""
    import torch

    if not points:
        raise ValueError("No query points: click on the image or pick a grid.")
    if len(points) > processor.max_queries:
        raise ValueError(f"{len(points)} query points, but this model takes at most {processor.max_queries}.")
    height, width = image.shape[:2]
    query = np.array(points, dtype=np.float64)
    if (depth is None) != (intrinsics is None):
        raise ValueError("Depth and intrinsics go together (metric traces need both).")
    if depth is not None:
        if depth.shape != (height, width):
            raise ValueError(f"The depth map is {depth.shape}, the image ({height}, {width}).")
        rows = np.clip(np.round(query[:, 1]).astype(int), 0, height - 1)
        columns = np.clip(np.round(query[:, 0]).astype(int), 0, width - 1)
        query = np.column_stack([query, depth[rows, columns]])
    inputs = processor(images=image, text=prompt, query_points=query,
                       depth=depth if depth is not None and model.config.use_depth else None)
    with torch.no_grad():
        prediction = model.predict_traces(**inputs, num_samples=samples, generator=torch.Generator().manual_seed(seed))
    camera = None if intrinsics is None else torch.tensor(intrinsics, dtype=torch.float32)[None]
    traces = processor.post_process_traces(prediction.traces, inputs["query_points"], inputs["image_sizes"],
                                            inputs.get("query_depth"), camera)
    alive = prediction.alive_mask[0]
    result = {"prompt": prompt, "query_points": [list(point) for point in points], "pixels": traces["pixels"][0].tolist(),
              "alive": alive.tolist()}
    if "xyz" in traces:
        result["xyz_m"] = traces["xyz"][0].tolist()
    overlay = draw_traces(image, traces["pixels"][0, 0].numpy(), alive[0].numpy(), anchors=np.array(points))
    return {"overlay": overlay, "result": result, "xyz": traces["xyz"][0].numpy() if "xyz" in traces else None}


@contextlib.contextmanager
def warnings_logged():
    """Collect the processor's training-domain warnings while the block runs, to show them in the page."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    source = logging.getLogger("mu0.processing.processing_mu0")
    source.addHandler(handler)
    try:
        yield messages
    finally:
        source.removeHandler(handler)


def build_app(model_name: str):
    """The Gradio Blocks app for the checkpoint `model_name` (a folder or Hub repo)."""
    import gradio as gr

    model, processor = load_model(model_name)
    largest_grid = int(np.sqrt(processor.max_queries))
    output_dir = tempfile.mkdtemp(prefix="mu0-app-")

    @shown_on_the_page
    def take_frame(video, index):
        if not video:
            raise gr.Error("Upload a video first.")
        frame = video_frame(video, int(index))
        return frame, frame, [], "Frame loaded: click on it to add query points."

    def add_point(original, points, event: gr.SelectData):
        if original is None:
            raise gr.Error("Upload an image first.")
        points = [*points, (float(event.index[0]), float(event.index[1]))]
        return mark_points(original, points), points, f"{len(points)} query points"

    @shown_on_the_page
    def run(original, points, grid, prompt, samples, depth_file, intrinsics_file):
        if original is None:
            raise gr.Error("Upload an image or take a frame from a video first.")
        height, width = original.shape[:2]
        queries = points if int(grid) == 0 else grid_points(int(grid), height, width)
        depth, intrinsics = page_inputs(depth_file, intrinsics_file, height, width)
        with warnings_logged() as domain_warnings:
            output = predict(model, processor, original, queries, prompt, int(samples), depth=depth,
                             intrinsics=intrinsics)
        path = os.path.join(output_dir, "traces.json")
        with open(path, "w") as handle:
            json.dump(output["result"], handle)
        plot = None
        if output["xyz"] is not None:
            plot = plot_traces_3d({f"sample {s}": output["xyz"][s] for s in range(int(samples))},
                                  os.path.join(output_dir, "traces_3d.png"), title=prompt)
        note = "" if plot else " Add a depth map (.npy, metres) and intrinsics (JSON 3x3) for metric 3D traces."
        warning = "".join(f"\n\n**Warning:** {message}" for message in domain_warnings)
        return output["overlay"], plot, path, f"{len(queries)} query points, {int(samples)} samples.{note}{warning}"

    with gr.Blocks(title="μ0 trace prediction") as app:
        gr.Markdown(f"# μ0: where will these points move?\nCheckpoint `{model_name}`. Click on the image to add "
                    "query points (or pick a grid), type an instruction and press **Predict**. Traces are coloured "
                    "by time, blue (now) to red (+32 steps).")
        original, points = gr.State(None), gr.State([])
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image (click to add query points)", type="numpy", sources=["upload"],
                                 elem_id="mu0-input")
                with gr.Accordion("Or take a frame from a video", open=False):
                    video = gr.Video(label="Video", sources=["upload"])
                    frame_index = gr.Number(label="Frame", value=0, precision=0, minimum=0)
                    take = gr.Button("Use this frame")
                grid = gr.Slider(0, largest_grid, value=0, step=1, label=f"Grid N x N (0: the clicked points; at most "
                                 f"{largest_grid})")
                prompt = gr.Textbox(label="Instruction", value="", placeholder="push the red block")
                samples = gr.Slider(1, 8, value=1, step=1, label="Samples")
                with gr.Accordion("Depth and intrinsics (for metric 3D traces)", open=False):
                    depth_file = gr.File(label="Depth map (.npy, metres, H x W)", file_types=[".npy"], type="filepath")
                    intrinsics_file = gr.File(label="Intrinsics (JSON 3x3, pixels)", file_types=[".json"], type="filepath")
                with gr.Row():
                    clear = gr.Button("Clear points")
                    submit = gr.Button("Predict", variant="primary", elem_id="mu0-predict")
            with gr.Column():
                status = gr.Markdown("Upload an image to start.", elem_id="mu0-status")
                overlay = gr.Image(label="Predicted traces", type="pil", interactive=False, elem_id="mu0-overlay")
                plot = gr.Image(label="3D traces (metres)", type="filepath", interactive=False)
                download = gr.File(label="traces.json", interactive=False)

        image.upload(lambda value: (value, [], "Click on the image to add query points."), image, [original, points, status])
        image.select(add_point, [original, points], [image, points, status])
        take.click(take_frame, [video, frame_index], [image, original, points, status])
        clear.click(lambda value: (value, [], "Points cleared."), original, [image, points, status])
        submit.click(run, [original, points, grid, prompt, samples, depth_file, intrinsics_file],
                     [overlay, plot, download, status])
    return app


def launch(model_name: str, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    build_app(model_name).launch(server_name=host, server_port=port, share=share)


if __name__ == "__main__":  # a Hugging Face Space runs this file as app.py
    if not os.environ.get(MODEL_VARIABLE):
        raise SystemExit(f"Set {MODEL_VARIABLE} to a μ0 checkpoint (a Hub repo or folder).")
    launch(os.environ[MODEL_VARIABLE], host=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
           port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
