"""The embedded end-to-end job: synthetic episodes -> statistics -> train a small μ0 -> evaluate -> save.

Needs no download: the episodes are rendered procedurally, the backbone is a small random SmolVLM-architecture
model and the tokenizer is character-level. What it shows is the whole pipeline working, and whether a μ0 trained
for a few minutes beats the zero-motion and constant-velocity predictions on held-out episodes.
"""

import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import Mu0ForTracePrediction, Mu0ImageProcessor, Mu0Processor, build_character_tokenizer
from ..dataset_builders.procedural import episode_to_samples, generate_episode
from ..dataset_builders.statistics import TraceStatistics
from ..presets import preset_config
from .metrics import constant_velocity_traces, trace_metrics, zero_motion_traces


@dataclass
class DemoSettings:
    train_episodes: int = 24
    eval_episodes: int = 6
    frames_per_episode: int = 8
    queries_per_sample: int = 16
    image_size: int = 96
    num_frames: int = 40
    steps: int = 400
    batch_size: int = 8
    learning_rate: float = 1e-3
    num_samples: int = 5
    preset: str = "tiny"
    seed: int = 0


QUICK = DemoSettings(train_episodes=4, eval_episodes=2, frames_per_episode=4, steps=30, num_frames=32)


def make_samples(seeds, settings: DemoSettings, desc: str) -> list[dict]:
    """Samples at evenly spaced frames of procedural episodes, keeping query points that lie inside the image."""
    samples = []
    for seed in tqdm(seeds, desc=desc, unit="episode"):
        episode = generate_episode(int(seed), num_frames=settings.num_frames, image_size=settings.image_size)
        frames = np.linspace(2, settings.num_frames - 8, settings.frames_per_episode).astype(int).tolist()
        for sample in episode_to_samples(episode, frames, num_queries=settings.queries_per_sample):
            inside = ((sample["query_uv"] >= -0.5) & (sample["query_uv"] <= settings.image_size - 0.5)).all(-1)
            if inside.any():
                samples.append({key: value[inside] if _per_query(key) else value for key, value in sample.items()})
    return samples


def _per_query(key: str) -> bool:
    return key in ("query_uv", "query_z", "future", "future_valid", "history", "history_valid", "cluster_ids", "moving", "point_indices")


def collate(processor: Mu0Processor, samples: list[dict], with_depth: bool = True):
    return processor(
        images=[s["image"] for s in samples],
        text=[s["task"] for s in samples],
        query_points=[np.column_stack([s["query_uv"], s["query_z"]]) for s in samples],
        depth=[s["depth"] for s in samples] if with_depth else None,
        history=[s["history"] for s in samples],
        history_mask=[s["history_valid"] for s in samples],
        future=[s["future"] for s in samples],
        future_mask=[s["future_valid"] for s in samples],
        cluster_ids=[s["cluster_ids"] for s in samples],
    )


def train(model, processor, samples, settings: DemoSettings) -> list[float]:
    rng = np.random.default_rng(settings.seed)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate, betas=(0.9, 0.95)
    )
    model.train()
    losses = []
    progress = tqdm(range(settings.steps), desc="training", unit="step")
    for _ in progress:
        batch = collate(processor, [samples[i] for i in rng.choice(len(samples), settings.batch_size)])
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return losses


@torch.no_grad()
def evaluate(model, processor, samples, settings: DemoSettings) -> dict[str, dict[str, float]]:
    """μ0 (best of `num_samples`) against zero motion and constant velocity, in normalised (u, v) and metric z."""
    model.eval()
    predictions = {"mu0": [], "zero_motion": [], "constant_velocity": []}
    targets, valids = [], []
    generator = torch.Generator().manual_seed(settings.seed)
    horizon = model.config.horizon
    for sample in tqdm(samples, desc="evaluating", unit="sample"):
        batch = collate(processor, [sample])
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "labels_mask", "cluster_ids")}
        traces = model.predict_traces(**inputs, num_samples=settings.num_samples, generator=generator).traces
        scale = processor.require_delta_scale()
        anchors = torch.cat([batch["query_points"], batch["query_depth"][..., None]], dim=-1)[0]
        predictions["mu0"].append(traces[0] * scale + anchors[None, :, None, :])
        targets.append(batch["labels"][0] * scale + anchors[:, None, :])
        valids.append(batch["labels_mask"][0])
        previous = batch["history"][0, :, 0] * scale + anchors
        predictions["zero_motion"].append(zero_motion_traces(anchors, horizon))
        predictions["constant_velocity"].append(
            constant_velocity_traces(anchors, previous, batch["history_mask"][0, :, 0], horizon)
        )
    target, valid = torch.cat(targets), torch.cat(valids)
    return {
        name: trace_metrics(torch.cat(values, dim=1), target, valid, horizons=(8, 16, 32))
        for name, values in predictions.items()
    }


def format_table(results: dict[str, dict[str, float]]) -> str:
    columns = ["uv/ade@32", "uv/fde@32", "uv/min_ade@32", "uv/min_fde@32", "depth/ade@32", "uvz/ade@32", "uvz/min_ade@32"]
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[c]:.4f}" for c in columns) + " |")
    return "\n".join(lines)


def run_demo(output_dir: str, settings: DemoSettings) -> dict:
    start = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)  # fail before minutes of work, not after
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    seeds = rng.permutation(10_000)[: settings.train_episodes + settings.eval_episodes]
    train_samples = make_samples(seeds[: settings.train_episodes], settings, "train episodes")
    eval_samples = make_samples(seeds[settings.train_episodes :], settings, "held-out episodes")

    statistics = TraceStatistics(seed=settings.seed)
    for sample in train_samples:
        statistics.add(sample["query_uv"], sample["query_z"], sample["future"], sample["future_valid"],
                       sample["image"].shape[:2], sample["depth"])
    config = preset_config(settings.preset)
    processor = Mu0Processor(
        Mu0ImageProcessor(image_size=config.image_size, dino_image_size=config.dino_image_size),
        build_character_tokenizer(),
        **statistics.compute(),
        history_length=config.history_length,
        horizon=config.horizon,
        max_prompt_length=config.max_prompt_length,
        max_queries=config.max_queries,
    )
    model = Mu0ForTracePrediction(config)
    losses = train(model, processor, train_samples, settings)
    results = evaluate(model, processor, eval_samples, settings)

    model_dir = os.path.join(output_dir, "model")
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    summary = {
        "settings": asdict(settings),
        "train_samples": len(train_samples),
        "eval_samples": len(eval_samples),
        "first_loss": float(np.mean(losses[:10])),
        "last_loss": float(np.mean(losses[-10:])),
        "metrics": results,
        "wall_time_s": time.perf_counter() - start,
    }
    with open(os.path.join(output_dir, "metrics.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary


__all__ = ["DemoSettings", "QUICK", "run_demo", "format_table", "evaluate", "train", "make_samples", "collate"]
