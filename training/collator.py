"""Batching TraceExtract `samples` rows for μ0: query sampling, caption choice and training augmentation."""

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..dataset_builders.trace_extract import decode_depth_mm
from ..processing import Mu0Processor


def _to_numpy_image(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        array = image.numpy()
        return array.transpose(1, 2, 0) if array.ndim == 3 and array.shape[0] == 3 else array
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"))
    return np.asarray(image)


def _to_depth(depth_mm) -> np.ndarray:
    if isinstance(depth_mm, torch.Tensor):
        depth_mm = depth_mm.numpy()
    array = np.asarray(depth_mm).squeeze()
    return decode_depth_mm(array)


@dataclass
class Mu0TraceCollator:
    """Turns `samples` rows (PIL, numpy or torch-formatted) into `Mu0ForTracePrediction` batches.

    In training mode it draws N in [min_queries, max_queries] queries per row (moving points first), one caption
    whose frame range covers the row's frame, colour jitter, depth noise and dropout, and history dropout (all
    history of a row with `history_dropout`, else per query with `history_query_dropout`), as in the paper recipe.
    With `task_text_probability` p > 0, a row with task text uses it with probability p and otherwise draws as
    above; p = 0 (the default) is the released uniform draw, in which the task text is one caption among many.
    In evaluation mode it keeps the first `max_queries` queries, the row's task text, and no augmentation.
    Each row's randomness is a function of (`seed`, `epoch`, the row's episode and frame), not of a running
    generator: batches that a resumed run skips are never collated (and data loaders collate ahead of the step), so
    only this makes a resumed run draw what the uninterrupted one drew. `Mu0Trainer` sets `epoch` each epoch.
    """

    processor: Mu0Processor
    min_queries: int = 1
    max_queries: int = 64
    horizon: int = 32
    training: bool = True
    use_depth: bool = True
    depth_dropout: float = 0.7
    depth_noise_std: float = 0.01
    history_dropout: float = 0.5
    history_query_dropout: float = 0.3
    colour_jitter: float = 0.3
    task_text_probability: float = 0.0
    raw_future: bool = False
    seed: int = 0
    epoch: int = 0

    def __post_init__(self):
        if not 1 <= self.min_queries <= self.max_queries:
            raise ValueError(f"Need 1 <= min_queries <= max_queries, got {self.min_queries}, {self.max_queries}.")
        if not 0.0 <= self.task_text_probability <= 1.0:
            raise ValueError(f"task_text_probability must be in [0, 1], got {self.task_text_probability}.")

    def _row_rng(self, row: dict) -> np.random.Generator:
        identity = zlib.crc32(f"{row['episode_id']}/{int(row['frame_index'])}".encode())
        return np.random.default_rng([self.seed, self.epoch, identity])

    def _choose_queries(self, rng: np.random.Generator, moving: np.ndarray, valid: np.ndarray) -> np.ndarray:
        candidates = np.flatnonzero(valid)
        if candidates.size == 0:
            raise ValueError("A sample has no query with a valid future; filter such rows before training.")
        if not self.training:
            return candidates[: self.max_queries]
        count = int(rng.integers(self.min_queries, self.max_queries + 1))
        preferred = candidates[moving[candidates]]
        pool = preferred if preferred.size else candidates
        return rng.choice(pool, size=min(count, pool.size), replace=False)

    def _caption(self, rng: np.random.Generator, row: dict) -> str:
        captions = row.get("captions")
        captions = [] if captions is None else list(captions)
        task = row.get("task")
        if self.training and task and self.task_text_probability > 0 and rng.random() < self.task_text_probability:
            return task
        if self.training and captions:
            return captions[int(rng.integers(len(captions)))]["text"]
        return row.get("task") or (captions[0]["text"] if captions else "")

    def _jitter(self, rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
        strength = self.colour_jitter
        brightness, contrast, saturation = rng.uniform(1 - strength, 1 + strength, 3)
        value = image.astype(np.float32) * brightness
        value = (value - value.mean()) * contrast + value.mean()
        grey = value.mean(-1, keepdims=True)
        value = (value - grey) * saturation + grey
        return np.clip(value, 0, 255).astype(np.uint8)

    def __call__(self, rows: list[dict]):
        images, texts, points, depths, histories, history_masks, futures, future_masks, clusters = ([] for _ in range(9))
        future_key = "future_raw" if self.raw_future else "future"
        for row in rows:
            rng = self._row_rng(row) if self.training else None
            future = np.asarray(row[future_key], dtype=np.float64)[:, : self.horizon]
            future_valid = np.asarray(row[f"{future_key}_valid"], dtype=bool)[:, : self.horizon]
            chosen = self._choose_queries(rng, np.asarray(row["moving"], dtype=bool), future_valid.any(-1))
            image = _to_numpy_image(row["image"])
            depth = _to_depth(row["depth_mm"]) if self.use_depth else None
            if depth is not None and depth.shape != image.shape[:2]:
                depth = None  # the row has no depth map (a 1x1 placeholder)
            history_valid = np.asarray(row["history_valid"], dtype=bool)[chosen]
            if self.training:
                image = self._jitter(rng, image)
                if depth is not None:
                    depth = None if rng.random() < self.depth_dropout else depth + rng.normal(0, self.depth_noise_std, depth.shape)
                if rng.random() < self.history_dropout:
                    history_valid = np.zeros_like(history_valid)
                else:
                    history_valid = history_valid & (rng.random(len(chosen)) >= self.history_query_dropout)[:, None]
            uv = np.asarray(row["query_uv"], dtype=np.float64)[chosen]
            z = np.asarray(row["query_z"], dtype=np.float64)[chosen]
            images.append(image)
            texts.append(self._caption(rng, row))
            points.append(np.column_stack([uv, z]))
            depths.append(depth)
            histories.append(np.asarray(row["history"], dtype=np.float64)[chosen])
            history_masks.append(history_valid)
            futures.append(future[chosen])
            future_masks.append(future_valid[chosen])
            clusters.append(np.asarray(row["cluster_ids"])[chosen])
        return self.processor(
            images=images,
            text=texts,
            query_points=points,
            depth=depths if any(d is not None for d in depths) else None,
            history=histories,
            history_mask=history_masks,
            future=futures,
            future_mask=future_masks,
            cluster_ids=clusters,
        )


__all__ = ["Mu0TraceCollator"]
