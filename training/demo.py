"""The embedded end-to-end job: procedural episodes -> TraceExtract -> train a small μ0 -> evaluate -> save, with
overlays, a 3D plot and an MP4 of predicted-vs-ground-truth traces on held-out frames.

Needs no download: the episodes are rendered procedurally, the backbone is a small random SmolVLM-architecture
model and the tokenizer is character-level. It shows the whole pipeline working, and whether a μ0 trained for a
few minutes beats the zero-motion and constant-velocity predictions on held-out episodes.
"""

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image


@dataclass
class DemoSettings:
    train_episodes: int = 150  # data is cheap, steps are not (docs/training.md, "Learning curves")
    eval_episodes: int = 6
    num_frames: int = 40
    image_size: int = 96
    frame_stride: int = 2
    steps: int = 3000
    num_samples: int = 5
    instruction_frames: int = 16
    recipe: str = "tiny-cpu"
    seed: int = 0


QUICK = DemoSettings(train_episodes=4, eval_episodes=2, num_frames=32, frame_stride=4, steps=30, instruction_frames=2)
VIDEO_FRAMES = 48  # held-out frames in overlays.mp4: 12 s at VIDEO_FPS
VIDEO_FPS = 4.0
TABLE_COLUMNS = ("uv/ade@32", "uv/mean_ade@32", "uv/min_ade@32", "uv/min_fde@32", "uv/spread@32", "depth/min_ade@32",
                 "uvz/min_ade@32")


def format_table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| method | " + " | ".join(TABLE_COLUMNS) + " |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for name, metrics in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[c]:.4f}" for c in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def compare_frames(model, processor, collator, rows: list[dict], seed: int) -> tuple[list[Image.Image], dict]:
    """Ground truth (left) and μ0's first sample (right) over each row's frame, and the first row's traces in
    metres (camera frame) for a 3D plot."""
    import torch

    from ..processing.visualization import draw_traces
    from .evaluation import label_panel

    batch = collator(rows)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "labels_mask", "cluster_ids")}
    with torch.no_grad():
        prediction = model.predict_traces(**inputs, generator=torch.Generator().manual_seed(seed))
    intrinsics = torch.stack([torch.as_tensor(np.asarray(row["intrinsics"]), dtype=torch.float32) for row in rows])
    anchors = (batch["query_points"], batch["image_sizes"], batch["query_depth"], intrinsics)
    predicted = processor.post_process_traces(prediction.traces, *anchors)
    truth = processor.post_process_traces(batch["labels"][:, None], *anchors)
    canvases = []
    for index, row in enumerate(rows):
        real = batch["query_mask"][index].numpy()
        image = np.asarray(row["image"])
        height, width = batch["image_sizes"][index].tolist()
        now = ((batch["query_points"][index].numpy()[real] + 1) / 2 * [width, height] - 0.5)  # query pixels at t
        panels = [
            draw_traces(image, truth["pixels"][index, 0].numpy()[real], batch["labels_mask"][index].numpy()[real], anchors=now),
            draw_traces(image, predicted["pixels"][index, 0].numpy()[real], prediction.alive_mask[index, 0].numpy()[real],
                        anchors=now),
        ]
        label_panel(panels[0], f"ground truth, frame {int(row['frame_index'])}")
        label_panel(panels[1], "mu0 prediction")
        canvas = Image.new("RGB", (panels[0].width * 2 + 8, panels[0].height), (255, 255, 255))
        canvas.paste(panels[0], (0, 0))
        canvas.paste(panels[1], (panels[0].width + 8, 0))
        canvases.append(canvas)
    real = batch["query_mask"][0].numpy()
    return canvases, {"ground truth": truth["xyz"][0, 0].numpy()[real], "μ0": predicted["xyz"][0, 0].numpy()[real]}


def save_visualisations(model, processor, collator, rows: list[dict], video_rows: list[dict], output_dir: str,
                        seed: int) -> list[str]:
    """Overlay PNGs of `rows`, a 3D plot in metres of the first, and an MP4 stepping through `video_rows`."""
    from ..processing.visualization import plot_traces_3d, write_video

    canvases, traces_3d = compare_frames(model, processor, collator, rows, seed)
    paths = []
    for index, canvas in enumerate(canvases):
        paths.append(os.path.join(output_dir, f"overlay_{index}.png"))
        canvas.save(paths[-1])
    paths.append(plot_traces_3d(traces_3d, os.path.join(output_dir, "traces_3d.png"), title=str(rows[0]["task"])))
    frames = []
    for start in range(0, len(video_rows), 8):  # batches of 8 keep memory flat
        frames += compare_frames(model, processor, collator, video_rows[start : start + 8], seed)[0]
    paths.append(write_video(frames, os.path.join(output_dir, "overlays.mp4"), fps=VIDEO_FPS))
    return paths


def _save_directory(write, path: str) -> str:
    """Run `write(temporary_path)` and move the result to `path` only once it is complete."""
    temporary = path + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    write(temporary)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(temporary, path)
    return path


def save_frames(rows: list[dict], directory: str) -> list[str]:
    """Each row's raw frame as `frame_<k>.png`, with its metric depth (`frame_<k>_depth.npy`, metres) and pixel
    intrinsics (`frame_<k>_K.json`): the inputs `mu0 predict --image --depth --intrinsics` takes."""
    from ..dataset_builders.trace_extract import decode_depth_mm

    def write(folder: str) -> None:
        os.makedirs(folder)
        for index, row in enumerate(rows):
            Image.fromarray(np.asarray(row["image"], dtype=np.uint8)).save(os.path.join(folder, f"frame_{index}.png"))
            np.save(os.path.join(folder, f"frame_{index}_depth.npy"), decode_depth_mm(row["depth_mm"]))
            with open(os.path.join(folder, f"frame_{index}_K.json"), "w") as handle:
                json.dump(np.asarray(row["intrinsics"], dtype=float).tolist(), handle)

    _save_directory(write, directory)
    return sorted(os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(".png"))


def directory_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


@contextlib.contextmanager
def only_stage_progress_bars():
    """Hide the per-step bars of `datasets` (generating, filtering, saving) and of transformers (loading and writing
    weights) while the demo runs: TraceExtract and the trainer each draw one bar per long stage. The demo downloads
    nothing, so no download bar is lost."""
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets_bars = not datasets.utils.are_progress_bars_disabled()
    transformers_bars = transformers_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_bars:
            datasets.enable_progress_bars()
        if transformers_bars:
            transformers_logging.enable_progress_bar()


def run_demo(output_dir: str, settings: DemoSettings) -> dict:
    """Write `output_dir/{model, eval, episodes, frames}`, the figures and `metrics.json`; the extraction work folder,
    the `datasets` Arrow cache and the trainer's checkpoints live in a temporary folder removed at the end."""
    from ..dataset_builders.extraction import SYNTHETIC_RETARGET_STEP
    from ..dataset_builders.sources import procedural_refs
    from ..dataset_builders.trace_extract import TraceExtract
    from .evaluation import EvaluationProtocol, evaluate_models
    from .instruction import draw_two_instructions, instruction_following, instruction_frames
    from .pretrain import hold_out_episodes, load_recipe, make_trainer, save_samples

    start = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)  # fail before minutes of work, not after
    with only_stage_progress_bars(), tempfile.TemporaryDirectory(prefix="mu0-demo-") as scratch:
        builders = {
            name: TraceExtract(
                config_name=name,
                source="procedural",
                num_episodes=settings.train_episodes + settings.eval_episodes,
                seed=settings.seed,
                num_frames=settings.num_frames,
                image_size=settings.image_size,
                cache_dir=os.path.join(scratch, "cache"),
                work_dir=os.path.join(scratch, "trace_extract"),  # both configurations share one extraction
                settings={"frame_stride": settings.frame_stride, "retarget_step": SYNTHETIC_RETARGET_STEP},
            )
            for name in ("samples", "episodes")
        }
        builders["samples"].download_and_prepare()
        train, evaluation = hold_out_episodes(builders["samples"].as_dataset(split="train"), settings.eval_episodes)
        held_out = set(evaluation.unique("episode_id"))
        statistics = builders["samples"].compute_statistics(sorted(set(train.unique("episode_id"))))
        builders["episodes"].download_and_prepare()
        episodes = builders["episodes"].as_dataset(split="train")
        episodes = episodes.select([i for i, name in enumerate(episodes["episode_id"]) if name in held_out])
        written = {
            "eval": _save_directory(lambda path: save_samples(evaluation, statistics, path),
                                    os.path.join(output_dir, "eval")),
            "episodes": _save_directory(episodes.save_to_disk, os.path.join(output_dir, "episodes")),
        }

        recipe = load_recipe(settings.recipe)
        # the model is saved once, below; ten loss lines per run
        recipe["training"].update(seed=settings.seed, save_strategy="no", logging_steps=max(1, settings.steps // 10))
        trainer = make_trainer(recipe, train, statistics, os.path.join(scratch, "trainer"), max_steps=settings.steps)
        trainer.train()
        model, processor = trainer.model.eval(), trainer.processing_class
        # the protocol `mu0 evaluate` applies to eval/ by default, so both print the same numbers
        scored = evaluate_models({"mu0": model}, processor, evaluation,
                                 EvaluationProtocol(num_samples=settings.num_samples))

        # instruction following on frames of procedural episodes that neither training nor eval/ used
        used = {ref.seed for ref in procedural_refs(settings.train_episodes + settings.eval_episodes, settings.seed)}
        candidates = [ref.seed for ref in procedural_refs(len(used) + settings.instruction_frames, settings.seed + 1)]
        frames_for_instructions = instruction_frames([seed for seed in candidates if seed not in used][
            : settings.instruction_frames], num_frames=settings.num_frames, image_size=settings.image_size)
        instruction = {
            "mu0": instruction_following(model, processor, frames_for_instructions, settings.num_samples),
            "mu0, empty prompt": instruction_following(model, processor, frames_for_instructions, settings.num_samples,
                                                        empty_prompt=True),
        }
        two_instructions = draw_two_instructions(model, processor, frames_for_instructions[0],
                                                 os.path.join(output_dir, "two_instructions.png"),
                                                 num_samples=settings.num_samples)

        shown = evaluation.with_format("numpy")
        examples = [shown[i] for i in range(0, len(shown), max(1, len(shown) // 4))][:4]
        frames = save_frames(examples, os.path.join(output_dir, "frames"))
        figures = save_visualisations(model, processor, trainer.eval_collator, examples,
                                      [shown[i] for i in range(min(len(shown), VIDEO_FRAMES))], output_dir,
                                      settings.seed)
        model_dir = os.path.join(output_dir, "model")
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        train_samples, eval_samples = len(train), len(evaluation)
    summary = {
        "settings": asdict(settings),
        "train_samples": train_samples,
        "eval_samples": eval_samples,
        "eval_episodes": sorted(held_out),
        "statistics": statistics,
        "first_loss": losses[0] if losses else float("nan"),
        "last_loss": losses[-1] if losses else float("nan"),
        "protocol": scored["protocol"],
        "scored_samples": scored["num_samples"],
        "missing_offsets": scored["missing_offsets"],
        "metrics": scored["metrics"],
        "notes": scored["notes"],
        "instruction_following": instruction,
        "figures": [os.path.basename(path) for path in [two_instructions, *figures[:-1]]],
        "video": os.path.basename(figures[-1]),
        "frames": [os.path.relpath(path, output_dir) for path in frames],
        "datasets": {name: os.path.relpath(path, output_dir) for name, path in written.items()},
        "wall_time_s": time.perf_counter() - start,
    }
    with open(os.path.join(output_dir, "metrics.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    summary["output_bytes"] = directory_size(output_dir)
    return summary


__all__ = ["DemoSettings", "QUICK", "compare_frames", "format_table", "run_demo"]
