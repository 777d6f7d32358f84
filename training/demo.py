"""The embedded end-to-end job: procedural episodes -> TraceExtract -> train a small μ0 -> evaluate -> save, with
overlays, a 3D plot and an MP4 of predicted-vs-ground-truth traces on held-out frames.

Needs no download: the episodes are rendered procedurally, the backbone is a small random SmolVLM-architecture
model and the tokenizer is character-level. It shows the whole pipeline working, and whether a μ0 trained for a
few minutes beats the zero-motion and constant-velocity predictions on held-out episodes.
"""

import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..dataset_builders.extraction import SYNTHETIC_RETARGET_STEP
from ..dataset_builders.trace_extract import TraceExtract
from ..processing.visualization import draw_traces, plot_traces_3d, write_video
from .pretrain import load_recipe, make_trainer
from .trainer import constant_velocity, evaluate_predictors, sampler, zero_motion


@dataclass
class DemoSettings:
    train_episodes: int = 24
    eval_episodes: int = 6
    num_frames: int = 40
    image_size: int = 96
    frame_stride: int = 2
    steps: int = 3000
    num_samples: int = 5
    recipe: str = "tiny-cpu"
    seed: int = 0


QUICK = DemoSettings(train_episodes=4, eval_episodes=2, num_frames=32, frame_stride=4, steps=30)
VIDEO_FRAMES = 48  # held-out frames in overlays.mp4: 12 s at VIDEO_FPS
VIDEO_FPS = 4.0
TABLE_COLUMNS = ("uv/ade@32", "uv/fde@32", "uv/min_ade@32", "uv/min_fde@32", "depth/ade@32", "uvz/ade@32", "uvz/min_ade@32")


def format_table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| method | " + " | ".join(TABLE_COLUMNS) + " |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for name, metrics in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[c]:.4f}" for c in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def _labelled(panel: Image.Image, text: str) -> Image.Image:
    draw = ImageDraw.Draw(panel)
    left, top, right, bottom = draw.textbbox((4, 4), text)
    draw.rectangle([left - 2, top - 2, right + 2, bottom + 2], fill=(0, 0, 0))
    draw.text((4, 4), text, fill=(255, 255, 255))
    return panel


@torch.no_grad()
def compare_frames(model, processor, collator, rows: list[dict], seed: int) -> tuple[list[Image.Image], dict]:
    """Ground truth (left) and μ0's first sample (right) over each row's frame, and the first row's traces in
    metres (camera frame) for a 3D plot."""
    batch = collator(rows)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "labels_mask", "cluster_ids")}
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
        _labelled(panels[0], f"ground truth, frame {int(row['frame_index'])}")
        _labelled(panels[1], "mu0 prediction")
        canvas = Image.new("RGB", (panels[0].width * 2 + 8, panels[0].height), (255, 255, 255))
        canvas.paste(panels[0], (0, 0))
        canvas.paste(panels[1], (panels[0].width + 8, 0))
        canvases.append(canvas)
    real = batch["query_mask"][0].numpy()
    return canvases, {"ground truth": truth["xyz"][0, 0].numpy()[real], "μ0": predicted["xyz"][0, 0].numpy()[real]}


def save_visualisations(model, processor, collator, rows: list[dict], video_rows: list[dict], output_dir: str,
                        seed: int) -> list[str]:
    """Overlay PNGs of `rows`, a 3D plot in metres of the first, and an MP4 stepping through `video_rows`."""
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


def run_demo(output_dir: str, settings: DemoSettings) -> dict:
    start = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)  # fail before minutes of work, not after
    builder = TraceExtract(
        config_name="samples",
        source="procedural",
        num_episodes=settings.train_episodes + settings.eval_episodes,
        seed=settings.seed,
        num_frames=settings.num_frames,
        image_size=settings.image_size,
        cache_dir=os.path.join(output_dir, "cache"),
        work_dir=os.path.join(output_dir, "trace_extract"),
        settings={"frame_stride": settings.frame_stride, "retarget_step": SYNTHETIC_RETARGET_STEP},
    )
    builder.download_and_prepare()
    samples = builder.as_dataset(split="train")
    episode_ids = sorted(set(samples["episode_id"]))
    held_out = set(episode_ids[-settings.eval_episodes :])
    train = samples.filter(lambda episode_id: episode_id not in held_out, input_columns="episode_id")
    evaluation = samples.filter(lambda episode_id: episode_id in held_out, input_columns="episode_id")
    statistics = builder.compute_statistics(sorted(set(episode_ids) - held_out))

    recipe = load_recipe(settings.recipe)
    recipe["training"]["seed"] = settings.seed
    trainer = make_trainer(recipe, train, statistics, os.path.join(output_dir, "checkpoints"), max_steps=settings.steps)
    trainer.train()
    model, processor = trainer.model.eval(), trainer.processing_class
    delta_scale = processor.require_delta_scale()
    results = evaluate_predictors(
        {"mu0": sampler(model, settings.num_samples, settings.seed), "zero_motion": zero_motion,
         "constant_velocity": constant_velocity(delta_scale)},
        evaluation.with_format("numpy"),
        trainer.eval_collator,
        delta_scale,
    )

    shown = evaluation.with_format("numpy")
    figures = save_visualisations(model, processor, trainer.eval_collator,
                                  [shown[i] for i in range(0, len(shown), max(1, len(shown) // 4))][:4],
                                  [shown[i] for i in range(min(len(shown), VIDEO_FRAMES))], output_dir, settings.seed)

    model_dir = os.path.join(output_dir, "model")
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {
        "settings": asdict(settings),
        "train_samples": len(train),
        "eval_samples": len(evaluation),
        "statistics": statistics,
        "first_loss": losses[0] if losses else float("nan"),
        "last_loss": losses[-1] if losses else float("nan"),
        "metrics": results,
        "figures": [os.path.basename(path) for path in figures[:-1]],
        "video": os.path.basename(figures[-1]),
        "wall_time_s": time.perf_counter() - start,
    }
    with open(os.path.join(output_dir, "metrics.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary


__all__ = ["DemoSettings", "QUICK", "compare_frames", "format_table", "run_demo"]
