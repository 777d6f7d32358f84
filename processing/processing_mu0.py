"""Mu0Processor: images, depth, prompts, query points and trace statistics in; model tensors out; traces back out.

Traces are (u, v, z): u, v the pixel position normalised to [-1, 1] by width and height, z metric depth, all in the
camera of the current frame. Pixel coordinates follow OpenCV (pixel centres at integers), so the image spans
x in [-0.5, W - 0.5] and u = 2 (x + 0.5) / W - 1 spans [-1, 1] edge to edge. The model works on anchor-relative deltas divided by the per-axis `delta_scale`
(95th percentile of |delta| over the training set); the statistics travel with the processor and are never defaulted.
"""

import logging

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_mu0 import to_float_image

logger = logging.getLogger(__name__)

DEFAULT_TASK = "predict future trajectory"


# the rank of each per-image input: with one image, a nested list of this rank is that image's array, not a batch
PER_IMAGE_RANK = {"query_points": 2, "depth": 2, "history": 3, "history_mask": 2, "future": 3, "future_mask": 2,
                  "cluster_ids": 1}


def _is_one_array(value: list | tuple, rank: int) -> bool:
    """Whether `value` (a list) is a single regular array of `rank`, e.g. `[[40, 50], [60, 30]]` as query points."""
    try:
        return np.ndim(np.asarray(value, dtype=object if rank == 1 else None)) == rank and (
            rank != 1 or all(np.ndim(item) == 0 for item in value))
    except ValueError:  # ragged: a list of per-image arrays of different sizes
        return False


def _as_float_array(value, name: str, index: int) -> np.ndarray:
    array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} of sample {index} contain NaN or inf values.")
    return array


class Mu0Processor(ProcessorMixin):
    r"""
    Builds [`Mu0ForTracePrediction`] inputs and maps its outputs back to pixels and metres.

    Args:
        image_processor ([`Mu0ImageProcessor`]): RGB, DINOv2 and depth images.
        tokenizer: the backbone's tokenizer.
        delta_scale (`list[float]`, *optional*): per-axis (u, v, z) scale of anchor-relative deltas.
        depth_log_range (`list[float]`, *optional*): log depth (p1, p99) used to colour depth maps.
        image_ranges (`dict`, *optional*): the training frames' mean intensity (p1, p99, in [0, 1]) and height and
            width (min, max); with `depth_log_range`, inputs far outside them log a warning.
        history_length (`int`, defaults to 8), horizon (`int`, defaults to 32): trace lengths.
        max_prompt_length (`int`, defaults to 48): prompt tokens, padded to this length.
        max_queries (`int`, defaults to 256): most query points per image.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        delta_scale: list[float] | None = None,
        depth_log_range: list[float] | None = None,
        image_ranges: dict | None = None,
        history_length: int = 8,
        horizon: int = 32,
        max_prompt_length: int = 48,
        max_queries: int = 256,
        **kwargs,
    ):
        for name, value, least in (("history_length", history_length, 0), ("horizon", horizon, 1),
                                   ("max_prompt_length", max_prompt_length, 1), ("max_queries", max_queries, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise ValueError(f"Mu0Processor {name} must be an integer >= {least}, got {value!r} (from the "
                                 "processor config).")
        if delta_scale is not None:
            if not isinstance(delta_scale, (list, tuple, np.ndarray)) or not all(
                    isinstance(value, (int, float, np.number)) and not isinstance(value, bool) for value in delta_scale):
                raise ValueError(f"delta_scale must be three positive finite numbers (u, v, z), got {delta_scale!r}.")
            delta_scale = [float(value) for value in delta_scale]
            if len(delta_scale) != 3 or not all(np.isfinite(delta_scale)) or min(delta_scale) <= 0:
                raise ValueError(f"delta_scale must be three positive finite numbers (u, v, z), got {delta_scale}.")
        if depth_log_range is not None:
            if not isinstance(depth_log_range, (list, tuple, np.ndarray)) or not all(
                    isinstance(value, (int, float, np.number)) and not isinstance(value, bool) for value in depth_log_range):
                raise ValueError(f"depth_log_range must be (log p1, log p99) with p1 < p99, got {depth_log_range!r}.")
            depth_log_range = [float(value) for value in depth_log_range]
            if len(depth_log_range) != 2 or not all(np.isfinite(depth_log_range)) or not depth_log_range[0] < depth_log_range[1]:
                raise ValueError(f"depth_log_range must be (log p1, log p99) with p1 < p99, got {depth_log_range}.")
        self.delta_scale = delta_scale
        self.depth_log_range = depth_log_range
        self.image_ranges = image_ranges
        self.history_length = history_length
        self.horizon = horizon
        self.max_prompt_length = max_prompt_length
        self.max_queries = max_queries
        self._reported_training_prompt = False
        super().__init__(image_processor, tokenizer, **kwargs)

    # ------------------------------------------------------------------------------------------ statistics
    def require_delta_scale(self) -> torch.Tensor:
        if self.delta_scale is None:
            raise ValueError(
                "Mu0Processor has no `delta_scale` statistic (per-axis 95th percentile of |future - anchor|). Load a "
                "processor saved with its training statistics, or set `processor.delta_scale` from the dataset's "
                "statistics file."
            )
        return torch.tensor(self.delta_scale, dtype=torch.float32)

    def warn_outside_training_domain(self, images: list, depth=None, query_points=None) -> None:
        """Log a warning, on every call where it applies, when inputs are far from the training data: median depth
        (depth maps and query z) more than 2x beyond the training p1-p99 range, frames more than 2x larger or smaller
        than the training frames, or mean intensity 0.2 beyond the training p1-p99 range."""
        problems = {}
        if self.depth_log_range is not None:
            values = [np.asarray(points, dtype=np.float64)[:, 2] for points in query_points or []
                      if np.ndim(points) == 2 and np.shape(points)[1] == 3]
            values += [np.asarray(d, dtype=np.float64).ravel() for d in depth or [] if d is not None]
            values = np.concatenate(values) if values else np.zeros(0)
            values = values[np.isfinite(values) & (values > 0)]
            low, high = np.exp(self.depth_log_range)
            if values.size and not low / 2 <= np.median(values) <= high * 2:
                problems["depth"] = (f"median input depth {np.median(values):.2f} m (range {values.min():.2f}-"
                                     f"{values.max():.2f} m) against {low:.2f}-{high:.2f} m in training (p1-p99)")
        if self.image_ranges is not None:
            heights, widths = self.image_ranges["height"], self.image_ranges["width"]
            for image in images:
                height, width = self._image_size(image)
                if max(height, width) > 2 * max(heights[1], widths[1]) or max(height, width) < max(heights[0], widths[0]) / 2:
                    problems["size"] = (f"{width}x{height} frames against {widths[0]}-{widths[1]} x "
                                        f"{heights[0]}-{heights[1]} in training")
                low, high = self.image_ranges["mean_intensity"]
                intensity = float(to_float_image(image).mean())
                if not low - 0.2 <= intensity <= high + 0.2:
                    problems["intensity"] = f"mean intensity {intensity:.2f} against {low:.2f}-{high:.2f} in training"
        for text in problems.values():  # on every call: each caller (each visitor of `mu0 app`) needs to see it
            logger.warning("Input outside this checkpoint's training data: %s. Predictions may be unreliable.", text)

    def warn_about_lost_prompt_text(self, prompts: list[str], training: bool = False) -> None:
        """The model sees at most `max_prompt_length` tokens, and characters the tokenizer does not know as `<unk>`:
        say so, since the caller's records (e.g. `traces.json`) keep the full prompt.

        Inference reports every call. Training batches (`training`) report the first such prompt only: merged
        captions often run past the window, and one line per batch would bury the training log.
        """
        if training and self._reported_training_prompt:
            return
        unknown = self.tokenizer.unk_token_id
        suffix = " (reported once per processor while training)" if training else ""
        for prompt, ids in zip(prompts, self.tokenizer(prompts)["input_ids"]):
            problems = []
            if len(ids) > self.max_prompt_length:
                problems.append(f"The prompt is {len(ids)} tokens long; the model reads only the first "
                                f"{self.max_prompt_length}: {self.tokenizer.decode(ids[: self.max_prompt_length])!r}.")
            lost = sum(token == unknown for token in ids[: self.max_prompt_length]) if unknown is not None else 0
            if lost:
                problems.append(f"{lost} of the prompt's {min(len(ids), self.max_prompt_length)} tokens are unknown to "
                                f"this tokenizer (read as {self.tokenizer.unk_token}): {prompt!r}.")
            for problem in problems:
                logger.warning("%s%s", problem, suffix)
            if problems and training:
                self._reported_training_prompt = True
                return

    @staticmethod
    def prompt(task: str | None) -> str:
        task = (task or "").strip()
        return f"Task: {task or DEFAULT_TASK}\n"

    # ----------------------------------------------------------------------------------------------- inputs
    def __call__(
        self,
        images=None,
        text: str | list[str | None] | None = None,
        query_points=None,
        points_normalized: bool = False,
        depth=None,
        history=None,
        history_mask=None,
        future=None,
        future_mask=None,
        cluster_ids=None,
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        r"""
        images: one image or a list (PIL, uint8 (H, W, 3) or float in [0, 1]).
        text: the instruction per image (None or "" uses the default prompt).
        query_points: per image, an (N, 2) array of (x, y) pixels, or (u, v) in [-1, 1] with `points_normalized`;
            (N, 3) adds each point's current metric depth z, needed for history, future and metric output.
        depth: per image, an (H, W) metric depth map or None.
        history / history_mask: per image (N, h, 3) past (x, y, z) positions, most recent first, in the same
            units as `query_points`, and their validity (N, h). The output `history` is oldest first and relative to
            the current point in (u, v) units and metres (not divided by `delta_scale`), zero where invalid.
        future / future_mask: per image (N, H, 3) future positions in the current camera and validity (N, H):
            turned into training `labels` / `labels_mask`.
        cluster_ids: per image (N,) entity ids (-1 for none) for the rigidity loss.
        """
        if images is None or query_points is None:
            raise ValueError("Mu0Processor needs `images` and `query_points`.")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        batch_size = len(images)
        texts = [text] * batch_size if text is None or isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not all(task is None or isinstance(task, str) for task in texts):
            raise ValueError(f"text must be a string, None, or a list of them (one per image), got {text!r}.")
        texts = list(texts)
        per_image = {"text": texts, "query_points": query_points, "depth": depth, "history": history,
                     "history_mask": history_mask, "future": future, "future_mask": future_mask,
                     "cluster_ids": cluster_ids}
        for name, value in per_image.items():
            if value is not None and name != "text" and (not isinstance(value, (list, tuple))
                                                         or batch_size == 1 and _is_one_array(value, PER_IMAGE_RANK[name])):
                per_image[name] = [value] if batch_size == 1 else value
            if per_image[name] is not None and len(per_image[name]) != batch_size:
                raise ValueError(f"Got {len(per_image[name])} entries in `{name}` for {batch_size} images.")

        self.warn_outside_training_domain(images, per_image["depth"], per_image["query_points"])
        data = self.encode_images_and_prompts(images, texts, per_image["depth"], training=future is not None)
        image_sizes = [tuple(size) for size in data["image_sizes"].tolist()]
        data.update(self._encode_queries(per_image, image_sizes, points_normalized))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def encode_images_and_prompts(
        self, images: list, texts: list[str | None], depth=None, training: bool = False
    ) -> dict[str, torch.Tensor]:
        """Backbone, DINOv2 and depth pixels plus the padded prompt: the inputs shared by traces and actions.
        `training` marks a training batch (see `warn_about_lost_prompt_text`)."""
        image_features = self.image_processor(images, depth=depth, depth_log_range=self.depth_log_range, return_tensors="pt")
        prompts = [self.prompt(task) for task in texts]
        self.warn_about_lost_prompt_text(prompts, training)
        text_features = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.max_prompt_length,
            return_tensors="pt",
        )
        return {
            **image_features,
            "input_ids": text_features["input_ids"],
            "attention_mask": text_features["attention_mask"],
            "image_sizes": torch.tensor([self._image_size(image) for image in images], dtype=torch.long),
        }

    @staticmethod
    def _image_size(image) -> tuple[int, int]:
        if hasattr(image, "size") and not hasattr(image, "shape"):
            width, height = image.size
            return height, width
        shape = tuple(image.shape)
        return (shape[1], shape[2]) if isinstance(image, torch.Tensor) and shape[0] == 3 else (shape[0], shape[1])

    def _normalize_points(self, points: np.ndarray, size: tuple[int, int], normalized: bool) -> np.ndarray:
        points = points.copy()
        if not normalized:
            height, width = size
            points[..., 0] = (points[..., 0] + 0.5) / width * 2 - 1
            points[..., 1] = (points[..., 1] + 0.5) / height * 2 - 1
        return points

    def _encode_queries(self, per_image: dict, image_sizes: list, normalized: bool) -> dict[str, torch.Tensor]:
        batch_size = len(image_sizes)
        points = [_as_float_array(p, "query_points", i) for i, p in enumerate(per_image["query_points"])]
        counts = [len(p) for p in points]
        for index, (p, count) in enumerate(zip(points, counts)):
            if count == 0:
                raise ValueError(f"Sample {index} has no query points; pass at least one.")
            if count > self.max_queries:
                raise ValueError(f"Sample {index} has {count} query points; at most max_queries={self.max_queries}.")
            if p.ndim != 2 or p.shape[1] not in (2, 3):
                raise ValueError(f"query_points of sample {index} must be (N, 2) or (N, 3), got {p.shape}.")
        num_queries = max(counts)
        query_mask = torch.zeros(batch_size, num_queries, dtype=torch.bool)
        uv = torch.zeros(batch_size, num_queries, 2)
        anchor_z = torch.zeros(batch_size, num_queries)
        widths = {p.shape[1] for p in points}
        if len(widths) > 1:
            raise ValueError("Mix of (N, 2) and (N, 3) query points: give every image's points with depth, or none.")
        has_depth = widths == {3}
        for index, (p, size) in enumerate(zip(points, image_sizes)):
            normalized_points = self._normalize_points(p, size, normalized)
            outside = np.abs(normalized_points[:, :2]) > 1
            if outside.any():
                first = int(np.argwhere(outside.any(-1))[0, 0])
                raise ValueError(
                    f"Query point {first} of sample {index} ({p[first, :2].tolist()}) lies outside the "
                    f"{size[1]}x{size[0]} image."
                )
            if has_depth and not (p[:, 2] > 0).all():
                first = int(np.argwhere(p[:, 2] <= 0)[0, 0])
                raise ValueError(
                    f"query_points of sample {index}: depth z must be positive metres; point {first} has z={p[first, 2]}."
                )
            query_mask[index, : len(p)] = True
            uv[index, : len(p)] = torch.from_numpy(normalized_points[:, :2]).float()
            if has_depth:
                anchor_z[index, : len(p)] = torch.from_numpy(p[:, 2]).float()
        data = {"query_points": uv, "query_mask": query_mask}
        if has_depth:
            data["query_depth"] = anchor_z
        anchors = torch.cat([uv, anchor_z[..., None]], dim=-1)
        for name, mask_name, length, out_name in (
            ("history", "history_mask", self.history_length, "history"),
            ("future", "future_mask", self.horizon, "labels"),
        ):
            if per_image[name] is None:
                continue
            if not has_depth:
                raise ValueError(f"`{name}` needs each query point's current depth: pass query_points as (N, 3).")
            if per_image[mask_name] is None:
                raise ValueError(f"`{name}` was given without `{mask_name}`.")
            deltas, mask = self._encode_deltas(
                per_image[name], per_image[mask_name], anchors, counts, image_sizes, normalized, length, name
            )
            if name == "history":
                # The released history token reads the past oldest first, in (u, v) units and metres, unscaled.
                deltas, mask = deltas.flip(2) * self.require_delta_scale(), mask.flip(2)
            data[out_name] = deltas
            data["labels_mask" if out_name == "labels" else "history_mask"] = mask
        if per_image["cluster_ids"] is not None:
            cluster_ids = torch.full((batch_size, num_queries), -1, dtype=torch.long)
            for index, ids in enumerate(per_image["cluster_ids"]):
                ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
                if ids.shape != (counts[index],):
                    raise ValueError(f"cluster_ids of sample {index} must have shape ({counts[index]},).")
                cluster_ids[index, : counts[index]] = ids
            data["cluster_ids"] = cluster_ids
        return data

    def _encode_deltas(self, values, masks, anchors, counts, image_sizes, normalized, length, name):
        """Absolute positions (N, L, 3) to anchor-relative deltas divided by `delta_scale`; invalid steps become 0."""
        scale = self.require_delta_scale()
        batch_size, num_queries = anchors.shape[:2]
        deltas = torch.zeros(batch_size, num_queries, length, 3)
        valid = torch.zeros(batch_size, num_queries, length, dtype=torch.bool)
        for index, (value, mask) in enumerate(zip(values, masks)):
            value = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64)
            mask = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask, dtype=bool)
            count = counts[index]
            if value.shape != (count, length, 3) or mask.shape != (count, length):
                raise ValueError(
                    f"`{name}` of sample {index} must be ({count}, {length}, 3) with a ({count}, {length}) mask, one "
                    f"row per query point; got {value.shape} and {mask.shape}."
                )
            mask = mask & np.isfinite(value).all(-1)
            value = self._normalize_points(np.where(mask[..., None], value, 0.0), image_sizes[index], normalized)
            relative = torch.from_numpy(value).float() - anchors[index, :count, None, :]
            deltas[index, :count] = torch.where(torch.from_numpy(mask)[..., None], relative / scale, 0.0)
            valid[index, :count] = torch.from_numpy(mask)
        return deltas, valid

    # ---------------------------------------------------------------------------------------------- outputs
    def post_process_traces(
        self,
        traces: torch.Tensor,
        query_points: torch.Tensor,
        image_sizes: torch.Tensor,
        query_depth: torch.Tensor | None = None,
        intrinsics: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        r"""
        traces: model output (B, S, N, H, 3) in normalised deltas. query_points: (B, N, 2) normalised (u, v).
        image_sizes: (B, 2) as (height, width). query_depth: (B, N) current z in metres (needed for z and XYZ).
        intrinsics: (B, 3, 3) pixel intrinsics of the original image (needed for XYZ).

        Returns `uvz` (normalised u, v and metric z, (B, S, N, H, 3)), `pixels` (B, S, N, H, 2) and, with
        intrinsics, `xyz` metric camera-frame points (B, S, N, H, 3).
        """
        scale = self.require_delta_scale().to(traces.device)
        anchors = torch.cat(
            [query_points.float(), torch.zeros_like(query_points[..., :1]) if query_depth is None else query_depth[..., None].float()],
            dim=-1,
        )
        uvz = traces.float() * scale + anchors[:, None, :, None, :]
        sizes = image_sizes.to(traces.device).float()
        width, height = sizes[:, 1], sizes[:, 0]
        pixels = torch.stack(
            [
                (uvz[..., 0] + 1) / 2 * width[:, None, None, None] - 0.5,
                (uvz[..., 1] + 1) / 2 * height[:, None, None, None] - 0.5,
            ],
            dim=-1,
        )
        output = {"pixels": pixels}
        if query_depth is None:
            if intrinsics is not None:
                raise ValueError("Metric XYZ needs `query_depth` (each query's current depth) as well as intrinsics.")
            output["uv"] = uvz[..., :2]
            return output
        output["uvz"] = uvz
        if intrinsics is not None:
            intrinsics = intrinsics.to(traces.device).float()
            if intrinsics.shape[-2:] != (3, 3) or not torch.isfinite(intrinsics).all():
                raise ValueError("intrinsics must be finite (B, 3, 3) matrices.")
            fx, fy = intrinsics[:, 0, 0], intrinsics[:, 1, 1]
            if not ((fx > 0) & (fy > 0)).all():
                raise ValueError(f"intrinsics must have positive focal lengths fx = K[0, 0] and fy = K[1, 1], got "
                                 f"fx={fx.tolist()}, fy={fy.tolist()}.")
            cx, cy = intrinsics[:, 0, 2], intrinsics[:, 1, 2]
            view = (slice(None), None, None, None)
            x = (pixels[..., 0] - cx[view]) / fx[view] * uvz[..., 2]
            y = (pixels[..., 1] - cy[view]) / fy[view] * uvz[..., 2]
            output["xyz"] = torch.stack([x, y, uvz[..., 2]], dim=-1)
        return output


__all__ = ["Mu0Processor"]
