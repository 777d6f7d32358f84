"""The authors' evaluation protocol (DESIGN §7) on any TraceExtract `samples` dataset, with tables, JSON and overlays.

Protocol: for every held-out episode the samples at frame offsets 4, 8 and 12 (the 5th, 9th and 13th earliest
sample frames of the episode, as the authors' `first_frame_offset=[4,8,12]`; an episode with fewer sample frames
contributes the offsets it has), 16 query points per sample drawn uniformly among the queries with a valid future
(seeded per sample, so the choice does not depend on dataset order), no depth input, no history, 5 samples per
query for the best-of-5 metrics, seed 0. `use_depth` and `use_history` switch the two inputs back on.
"""

import json
import os
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .collator import Mu0TraceCollator
from .metrics import COMPONENTS, DEFAULT_HORIZONS, displacement_errors
from .trainer import PredictionSet, constant_velocity, predict_dataset, sampler, zero_motion

PER_QUERY_COLUMNS = ("query_uv", "query_z", "history", "history_valid", "future", "future_valid", "future_raw",
                     "future_raw_valid", "track_ids", "cluster_ids", "moving")
TABLE_METRICS = ("ade", "fde", "min_ade", "min_fde", "mean_ade", "spread")
# Heuristic predictors, built from the processor's delta_scale.
HEURISTICS = {"zero_motion": lambda delta_scale: zero_motion, "constant_velocity": constant_velocity}


@dataclass
class EvaluationProtocol:
    frame_offsets: tuple[int, ...] = (4, 8, 12)
    num_queries: int = 16
    num_samples: int = 5
    seed: int = 0
    use_depth: bool = False
    use_history: bool = False
    batch_size: int = 8

    def __post_init__(self):
        if not self.frame_offsets or min(self.frame_offsets) < 0:
            raise ValueError(f"frame_offsets must be non-negative sample positions, got {self.frame_offsets}.")
        if self.num_queries < 1 or self.num_samples < 1 or self.batch_size < 1:
            raise ValueError("num_queries, num_samples and batch_size must be >= 1.")


def protocol_indices(
    episode_ids: list[str], frame_indices: list[int], frame_offsets: tuple[int, ...]
) -> tuple[list[int], dict[str, list[int]]]:
    """Rows at the given offsets into each episode's frame-sorted samples, and the offsets each episode lacks."""
    by_episode: dict[str, list[tuple[int, int]]] = {}
    for row, (episode, frame) in enumerate(zip(episode_ids, frame_indices)):
        by_episode.setdefault(episode, []).append((int(frame), row))
    chosen, missing = [], {}
    for episode in sorted(by_episode):
        slots = sorted(by_episode[episode])
        for offset in sorted(set(frame_offsets)):
            if offset < len(slots):
                chosen.append(slots[offset][1])
            else:
                missing.setdefault(episode, []).append(offset)
    return chosen, missing


def select_queries(row: dict, protocol: EvaluationProtocol) -> dict:
    """The row restricted to `num_queries` queries with a valid future (all of them when fewer), history hidden
    unless the protocol uses it."""
    valid = np.flatnonzero(np.asarray(row["future_valid"], dtype=bool).any(-1))
    if valid.size == 0:
        raise ValueError(f"Episode {row['episode_id']} frame {row['frame_index']} has no query with a valid future.")
    rng = np.random.default_rng([protocol.seed, int(row["frame_index"]), zlib.crc32(str(row["episode_id"]).encode())])
    chosen = np.sort(rng.choice(valid, size=min(protocol.num_queries, valid.size), replace=False))
    selected = dict(row)
    for column in PER_QUERY_COLUMNS:
        selected[column] = np.asarray(row[column])[chosen]
    if not protocol.use_history:
        selected["history_valid"] = np.zeros_like(selected["history_valid"])
    return selected


def protocol_samples(dataset, protocol: EvaluationProtocol) -> tuple[list[dict], dict[str, list[int]]]:
    """The protocol's rows (queries selected) of a local `samples` dataset or a streamed Hub one."""
    index = dataset.select_columns(["episode_id", "frame_index"])
    if hasattr(dataset, "select"):  # map-style: read two columns, then only the chosen rows
        rows, missing = protocol_indices(index["episode_id"], index["frame_index"], protocol.frame_offsets)
        chosen = dataset.with_format("numpy").select(rows)
        return [select_queries(row, protocol) for row in chosen], missing
    keys = [(row["episode_id"], row["frame_index"]) for row in index]  # streamed: one pass for the index
    rows, missing = protocol_indices(*zip(*keys), protocol.frame_offsets) if keys else ([], {})
    wanted = {keys[row] for row in rows}
    chosen = [row for row in dataset if (row["episode_id"], row["frame_index"]) in wanted]
    chosen.sort(key=lambda row: (row["episode_id"], row["frame_index"]))
    return [select_queries(row, protocol) for row in chosen], missing


def model_label(model) -> str:
    """A short name for a μ0 variant or baseline, used as its column in tables."""
    config = model.config
    if config.model_type != "mu0":
        return "tokenized_vlm" if config.model_type == "mu0_tokenized_trace" else config.model_type
    if config.trace_objective == "regression":
        return "regression"
    return "dense_flow" if config.trace_parameterisation == "dense" else "mu0"


def table_keys(horizons: tuple[int, ...] = DEFAULT_HORIZONS) -> list[str]:
    return [f"{component}/{metric}@{horizon}" for component in COMPONENTS for horizon in horizons for metric in TABLE_METRICS]


def format_metrics_table(results: dict[str, dict[str, float]], extra_rows: dict[str, dict[str, str]] | None = None,
                         keys: list[str] | None = None) -> str:
    """Markdown table with one column per method and one row per metric (u, v in [-1, 1], z in metres)."""
    methods = list(results)
    lines = ["| metric | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for key in keys or table_keys():
        values = [results[method].get(key) for method in methods]
        best = min((v for v in values if v is not None), default=None)
        cells = ["" if v is None else (f"**{v:.4f}**" if v == best and len(methods) > 1 else f"{v:.4f}") for v in values]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    for label, row in (extra_rows or {}).items():
        lines.append(f"| {label} | " + " | ".join(row.get(method, "") for method in methods) + " |")
    return "\n".join(lines)


def per_row_errors(predictions: PredictionSet, name: str, horizon: int) -> np.ndarray:
    """uv ADE of the first sample up to `horizon`, averaged over each row's queries (NaN for a row without any)."""
    traces = predictions.traces[name][:1, :, :horizon, :2]
    ade, _, query_valid = displacement_errors(traces, predictions.targets[:, :horizon, :2], predictions.valid[:, :horizon])
    weights = query_valid.float()
    num_rows = int(predictions.row_index.max()) + 1 if len(predictions.row_index) else 0
    totals = torch.zeros(num_rows).index_add_(0, predictions.row_index, ade[0] * weights)
    counts = torch.zeros(num_rows).index_add_(0, predictions.row_index, weights)
    return (totals / counts).numpy()


def to_pixels(uv: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Normalised (u, v) in [-1, 1] -> OpenCV pixel coordinates."""
    return ((uv.numpy() + 1) / 2 * [width, height] - 0.5).astype(np.float64)


def label_panel(panel: Image.Image, text: str) -> Image.Image:
    """White text on a black box in the panel's top-left corner, legible at any panel size."""
    font = ImageFont.load_default(size=max(10, panel.height // 32))
    margin = font.size // 2
    draw = ImageDraw.Draw(panel)
    left, top, right, bottom = draw.textbbox((margin, margin), text, font=font)
    draw.rectangle([left - margin // 2, top - margin // 2, right + margin // 2, bottom + margin // 2], fill=(0, 0, 0))
    draw.text((margin, margin), text, fill=(255, 255, 255), font=font)
    return panel


def save_overlay(row: dict, predictions: PredictionSet, name: str, row_number: int, path: str) -> str:
    """Ground truth (left) and the first predicted sample (right) over the row's frame, each panel labelled."""
    from ..processing.visualization import draw_traces

    image = np.asarray(row["image"].convert("RGB") if hasattr(row["image"], "convert") else row["image"])
    height, width = image.shape[:2]
    queries = (predictions.row_index == row_number) & predictions.query_mask
    now = to_pixels(predictions.anchors[queries, :2], height, width)
    panels = [
        draw_traces(image, to_pixels(predictions.targets[queries, :, :2], height, width),
                    predictions.valid[queries].numpy(), anchors=now, title="ground truth"),
        draw_traces(image, to_pixels(predictions.traces[name][0, queries, :, :2], height, width), anchors=now,
                    title=f"{name}, sample 1"),
    ]
    label_panel(panels[0], f"ground truth, frame {int(row['frame_index'])}")
    label_panel(panels[1], f"{name}, sample 1")
    canvas = Image.new("RGB", (panels[0].width * 2 + 8, panels[0].height), (255, 255, 255))
    canvas.paste(panels[0], (0, 0))
    canvas.paste(panels[1], (panels[0].width + 8, 0))
    canvas.save(path)
    return path


def identical_predictors(predictions: PredictionSet) -> list[str]:
    """A note for each predictor whose traces equal an earlier one's on every query (e.g. constant velocity without
    history is zero motion), so a table does not present one prediction as two results."""
    notes, names = [], list(predictions.traces)
    for index, name in enumerate(names):
        same = next((other for other in names[:index] if torch.equal(predictions.traces[other], predictions.traces[name])), None)
        if same is not None:
            reason = " (no history: no velocity to repeat)" if {name, same} == {"constant_velocity", "zero_motion"} else ""
            notes.append(f"{name} predicts exactly what {same} predicts{reason}.")
    return notes


def overlay_picks(errors: np.ndarray, count: int) -> list[tuple[str, int, int]]:
    """(kind, rank, row) of up to `count` worst and `count` best rows, never the same row twice: with few rows
    the worst take the upper half and the best the rest."""
    order = [int(row) for row in np.argsort(errors, kind="stable")]
    worst = min(count, (len(order) + 1) // 2)
    best = min(count, len(order) - worst)
    return [("worst", rank, order[-1 - rank]) for rank in range(worst)] + [("best", rank, order[rank]) for rank in range(best)]


def evaluate_models(
    models: dict,
    processor,
    dataset,
    protocol: EvaluationProtocol | None = None,
    heuristics: tuple[str, ...] = ("zero_motion", "constant_velocity"),
    output_dir: str | None = None,
    num_overlays: int = 3,
) -> dict:
    """Score models (μ0 and/or baselines, by name) and the chosen heuristics under the protocol on the same queries.

    The models share `processor` (the training statistics). With `output_dir`, writes `metrics.json` and overlays of
    the `num_overlays` worst and best samples of the first model (uv ADE at the full horizon, first sample).
    Returns the summary written to the JSON.
    """
    protocol = protocol or EvaluationProtocol()
    if not models:
        raise ValueError("Pass at least one model to evaluate.")
    without_depth = [name for name, model in models.items() if not model.config.use_depth]
    if protocol.use_depth and without_depth:
        raise ValueError(f"use_depth=True needs models built with use_depth=True; {without_depth} are not: evaluate "
                         "them without depth.")
    unknown = set(heuristics) - set(HEURISTICS)
    if unknown:
        raise ValueError(f"Unknown heuristics {sorted(unknown)}; choose from {sorted(HEURISTICS)}.")
    rows, missing = protocol_samples(dataset, protocol)
    if not rows:
        raise ValueError(f"No episode has a sample at frame offsets {protocol.frame_offsets}: the dataset is too short.")
    name = next(iter(models))
    collator = Mu0TraceCollator(processor, horizon=models[name].config.horizon, training=False,
                                use_depth=protocol.use_depth, max_queries=protocol.num_queries)
    predictors = {label: sampler(model.eval(), protocol.num_samples, protocol.seed) for label, model in models.items()}
    delta_scale = processor.require_delta_scale()
    predictors.update({heuristic: HEURISTICS[heuristic](delta_scale) for heuristic in heuristics})
    predictions = predict_dataset(predictors, rows, collator, delta_scale, protocol.batch_size)
    horizon = predictions.targets.shape[1]
    errors = per_row_errors(predictions, name, horizon)
    summary = {
        "protocol": asdict(protocol),
        "models": list(models),
        "num_samples": len(rows),
        "num_queries": int(predictions.query_mask.sum()),
        "episodes": len({row["episode_id"] for row in rows}),
        "missing_offsets": missing,
        "metrics": predictions.metrics(),
        "notes": identical_predictors(predictions),
        "seconds_per_sample": predictions.seconds_per_row,
        "per_sample": [
            {"episode_id": str(row["episode_id"]), "frame_index": int(row["frame_index"]), f"uv/ade@{horizon}": float(error)}
            for row, error in zip(rows, errors)
        ],
    }
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        summary["overlays"] = []
        for kind, rank, row_number in overlay_picks(errors, num_overlays):
            row = rows[row_number]
            filename = f"{kind}_{rank + 1}_{row['episode_id']}_f{int(row['frame_index']):06d}.png"
            save_overlay(row, predictions, name, int(row_number), os.path.join(output_dir, filename))
            summary["overlays"].append(filename)
        path = os.path.join(output_dir, "metrics.json")
        with open(path + ".tmp", "w") as handle:
            json.dump(summary, handle, indent=2)
        os.replace(path + ".tmp", path)
    return summary


__all__ = [
    "EvaluationProtocol",
    "evaluate_models",
    "format_metrics_table",
    "identical_predictors",
    "label_panel",
    "overlay_picks",
    "model_label",
    "protocol_indices",
    "protocol_samples",
    "select_queries",
]
