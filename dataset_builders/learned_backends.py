"""Learned backends of TraceExtract stages 3 and 6: DINOv2 entity keypoints and VLM chunk captions.

Both take any compatible transformers model (tiny random ones in the tests, since no weights can be downloaded here)
and otherwise load `model_name_or_path`; a missing checkpoint is an error that names it, never a silent fallback to the
classical backends (`keypoints.grid_keypoints` / `motion_keypoints`, `captions.template_captions`).
Pixel convention: OpenCV, pixel centres at integer coordinates.
"""

import numpy as np

from .captions import STYLES, Caption, merge_captions
from .checkpoints import resolve_model_and_processor
from .keypoints import kmeans

FEATURE_BATCH_SIZE = 8  # sampled frames per DINOv2 forward pass
CANDIDATES_PER_POINT = 64  # entity pixels kept per requested keypoint before k-means (bounds k-means cost)
POWER_ITERATIONS = 20  # for the leading principal direction that orders entities before alternation

# The instruction styles of DESIGN stage 6; None = no word limit (max_new_tokens still bounds the length).
WORD_LIMITS = {"descriptive": None, "imperative": 30, "casual": 20}
PROMPTS = {
    "descriptive": "Describe in one sentence what the robot or person is doing with the objects in this image.",
    "imperative": "Write the instruction, in at most 30 words, that tells a robot to do what is being done in this "
    "image. Use the imperative mood.",
    "casual": "In at most 20 words, casually say what to do, as you would to a friend.",
}


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8 RGB, got shape {frames.shape} and dtype {frames.dtype}.")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"frames is empty (shape {frames.shape}): at least one frame of at least 1x1 pixel is needed.")
    return frames


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0..n-1 in order of first appearance, so label order is raster order of the first member."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def _group_sums(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    count = int(labels.max()) + 1
    sums = np.zeros((count, features.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, features)
    return sums, np.bincount(labels, minlength=count)


def _leading_coordinate(vectors: np.ndarray) -> np.ndarray:
    """Projection of each row onto the leading principal direction (power iteration, deterministic start)."""
    centred = vectors - vectors.mean(0)
    direction = centred[np.argmax(np.linalg.norm(centred, axis=1))]
    for _ in range(POWER_ITERATIONS):
        direction = centred.T @ (centred @ direction)
        direction = direction / max(np.linalg.norm(direction), 1e-12)
    return centred @ direction


def bipartite_merge(features: np.ndarray, threshold: float = 0.2) -> np.ndarray:
    """Group the patches of one frame into entities by ToMe-style bipartite soft matching; returns labels (P,).

    Exact rule, repeated in rounds: every entity's feature is the size-weighted mean of its patch features. The
    entities are ordered by their coordinate along the leading principal direction of these means (ties: raster
    order of their first patch) and alternately split into sets A and B. ToMe alternates in token (raster) order,
    which after one round can put all parts of an object into A, where they are never compared; ordering by
    feature puts similar entities next to each other, so they land on opposite sides. Each A entity is matched to
    its most cosine-similar B entity, and every pair whose cosine distance is below `threshold` is merged (several
    A entities may join one B). The rounds stop when one merges nothing (the entity count stopped shrinking) or
    one entity is left. Entities need not be spatially connected.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"features must be a non-empty (P, D) array, got shape {features.shape}.")
    labels = np.arange(len(features))
    while labels.max() > 0:
        sums, sizes = _group_sums(features, labels)
        means = _unit(sums / sizes[:, None])
        order = np.lexsort((np.arange(len(means)), _leading_coordinate(means)))
        side_a, side_b = order[0::2], order[1::2]
        similarity = means[side_a] @ means[side_b].T
        best = similarity.argmax(1)
        merge = 1.0 - similarity[np.arange(len(side_a)), best] < threshold
        if not merge.any():
            break
        target = np.arange(len(means))
        target[side_a[merge]] = side_b[best[merge]]
        labels = _relabel(target[labels])
    return labels


def merge_centroids(sums: np.ndarray, sizes: np.ndarray, threshold: float = 0.2) -> np.ndarray:
    """Greedily merge entity centroids (feature sums and patch counts) while the closest pair's cosine distance is
    below `threshold`, always merging the closest pair first; returns one contiguous label per entity.

    Used across frames (DESIGN stage 3: cross-frame centroid merging at cosine distance 0.2) and, since entities of
    the same frame are compared too, it also joins any same-frame entities that bipartite rounds left apart.
    """
    sums = np.array(sums, dtype=np.float64)
    sizes = np.array(sizes, dtype=np.float64)
    if sums.ndim != 2 or len(sums) == 0 or sizes.shape != (len(sums),):
        raise ValueError(f"sums must be a non-empty (E, D) array and sizes (E,), got {sums.shape} and {sizes.shape}.")
    labels = np.arange(len(sums))
    alive = np.ones(len(sums), dtype=bool)
    means = _unit(sums / sizes[:, None])
    similarity = means @ means.T
    np.fill_diagonal(similarity, -np.inf)
    while alive.sum() > 1:
        i, j = np.unravel_index(np.argmax(similarity), similarity.shape)
        if 1.0 - similarity[i, j] >= threshold:
            break
        sums[i] += sums[j]
        sizes[i] += sizes[j]
        labels[labels == j] = i
        alive[j] = False
        means[i] = _unit(sums[i] / sizes[i])
        row = np.where(alive, means @ means[i], -np.inf)
        row[i] = -np.inf
        similarity[i] = similarity[:, i] = row
        similarity[j] = similarity[:, j] = -np.inf
    return _relabel(labels)


def _patch_features(frames: np.ndarray, model, image_processor) -> tuple[np.ndarray, tuple[int, int]]:
    """DINOv2 patch features (F, gh * gw, D) of whole frames, resized (never cropped, so patches map back to
    pixels) to a patch grid whose short side has config.image_size // patch_size patches."""
    import torch

    height, width = frames.shape[1:3]
    patch = model.config.patch_size
    short = max(1, model.config.image_size // patch)
    long = max(1, round(short * max(height, width) / min(height, width)))
    grid = (short, long) if height <= width else (long, short)
    prefix = 1 + getattr(model.config, "num_register_tokens", 0)  # CLS, then register tokens, then patches
    parameter = next(model.parameters())
    model.eval()
    batches = []
    with torch.no_grad():
        for start in range(0, len(frames), FEATURE_BATCH_SIZE):
            inputs = image_processor(
                images=list(frames[start : start + FEATURE_BATCH_SIZE]),
                size={"height": grid[0] * patch, "width": grid[1] * patch},
                do_center_crop=False,
                return_tensors="pt",
            )
            pixel_values = inputs["pixel_values"].to(device=parameter.device, dtype=parameter.dtype)
            if pixel_values.shape[-2:] != (grid[0] * patch, grid[1] * patch):
                raise ValueError(
                    f"The image processor returned {tuple(pixel_values.shape[-2:])} images instead of the requested "
                    f"{(grid[0] * patch, grid[1] * patch)}: patches could not be mapped back to pixels."
                )
            hidden = model(pixel_values=pixel_values).last_hidden_state[:, prefix:]
            batches.append(hidden.float().cpu().numpy())
    return np.concatenate(batches), grid


def _points_in_entity(candidates: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` points spread over one entity's pixels: k-means over its pixel positions, each cluster represented
    by its member nearest the mean (so points stay on non-convex entities), topped up by farthest-point sampling
    if k-means leaves clusters empty. An entity with fewer pixels than `count` repeats pixels."""
    if len(candidates) < count:
        candidates = np.resize(candidates, (count, 2))
    elif len(candidates) > count * CANDIDATES_PER_POINT:
        candidates = candidates[rng.choice(len(candidates), count * CANDIDATES_PER_POINT, replace=False)]
    labels = kmeans(candidates, count, rng)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        mean = candidates[members].mean(0)
        chosen.append(members[np.argmin(((candidates[members] - mean) ** 2).sum(1))])
    while len(chosen) < count:
        distance = ((candidates[:, None] - candidates[chosen][None]) ** 2).sum(-1).min(1)
        chosen.append(int(np.argmax(distance)))
    return candidates[chosen]


def dino_keypoints(
    frames: np.ndarray,
    count_per_entity: int = 48,
    model=None,
    image_processor=None,
    model_name_or_path: str = "facebook/dinov2-base",
    frame_stride: int = 10,
    merge_threshold: float = 0.2,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Entity keypoints on frame 0 from DINOv2 patch features (DESIGN stage 3).

    Every `frame_stride`-th frame (frame 0 included) is embedded; its patches are grouped into entities by
    `bipartite_merge`, and the entities of all sampled frames are joined by `merge_centroids` (cosine distance below
    `merge_threshold`), so an entity of frame 0 is the same entity wherever it appears. Each entity present on
    frame 0 gets `count_per_entity` points, by k-means over the frame-0 pixels of its patches.

    `model` (a `Dinov2Model` or `Dinov2WithRegistersModel`) and `image_processor` are used when given; whichever is
    missing is loaded from `model_name_or_path`. `rng` drives k-means (seed 0 when None, so extraction is
    reproducible by default).

    Returns points (N, 2) float32 (x, y) pixels of frame 0 and cluster_ids (N,) int64, contiguous from 0 in raster
    order of each entity's first patch.
    """
    frames = _check_frames(frames)
    if count_per_entity < 1:
        raise ValueError(f"count_per_entity must be >= 1, got {count_per_entity}.")
    if frame_stride < 1:
        raise ValueError(f"frame_stride must be >= 1, got {frame_stride}.")
    if not 0.0 <= merge_threshold <= 2.0:
        raise ValueError(f"merge_threshold is a cosine distance in [0, 2], got {merge_threshold}.")
    from transformers import AutoImageProcessor, AutoModel

    model, image_processor = resolve_model_and_processor(
        model, image_processor, model_name_or_path, AutoModel, AutoImageProcessor, "DINOv2"
    )
    rng = np.random.default_rng(0) if rng is None else rng

    features, (grid_height, grid_width) = _patch_features(frames[::frame_stride], model, image_processor)
    if features.shape[1] != grid_height * grid_width:
        raise ValueError(
            f"The model returned {features.shape[1]} patch tokens for a {grid_height}x{grid_width} patch grid; "
            "expected a DINOv2-style model (CLS, optional register tokens, then one token per patch)."
        )
    frame_labels = [bipartite_merge(frame_features, merge_threshold) for frame_features in features]
    groups = [_group_sums(frame_features, labels) for frame_features, labels in zip(features, frame_labels)]
    sums, sizes = (np.concatenate(parts) for parts in zip(*groups))
    entity = merge_centroids(sums, sizes, merge_threshold)
    patch_entity = _relabel(entity[frame_labels[0]]).reshape(grid_height, grid_width)

    height, width = frames.shape[1:3]
    rows = np.minimum(((np.arange(height) + 0.5) * grid_height / height).astype(np.int64), grid_height - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * grid_width / width).astype(np.int64), grid_width - 1)
    pixel_entity = patch_entity[rows[:, None], cols[None, :]]
    points, cluster_ids = [], []
    for label in range(int(patch_entity.max()) + 1):
        ys, xs = np.nonzero(pixel_entity == label)
        points.append(_points_in_entity(np.stack([xs, ys], axis=1).astype(np.float64), count_per_entity, rng))
        cluster_ids.append(np.full(count_per_entity, label, dtype=np.int64))
    return np.concatenate(points).astype(np.float32), np.concatenate(cluster_ids)


def _prompt(processor, instruction: str) -> str:
    """The processor's chat template when it has one (instruction-tuned checkpoints), else the image token followed
    by the instruction (base checkpoints such as PaliGemma's)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_token = getattr(processor, "image_token", None)
    if image_token is None:
        raise ValueError(f"{type(processor).__name__} has neither a chat template nor an image_token for a prompt.")
    return f"{image_token}{instruction}"


def vlm_captions(
    events: list[tuple[int, int]],
    frames: np.ndarray,
    model=None,
    processor=None,
    model_name_or_path: str | None = None,
    max_new_tokens: int = 40,
) -> list[Caption]:
    """Hierarchical captions from an image-text-to-text model (DESIGN stage 6).

    For each chunk [start, end) the model sees the chunk's middle frame and is asked, in one greedy `generate` call
    per style, for a descriptive caption, an imperative instruction (truncated to 30 words) and a casual one
    (truncated to 20 words); whitespace is collapsed. The chunk captions come first, then `merge_captions` adds the
    pair, triple and segment captions. A caption with no text besides dots would break merging, so it raises.

    `model` and `processor` are used when given; whichever is missing is loaded from `model_name_or_path`
    (`AutoModelForImageTextToText` / `AutoProcessor`).
    """
    import torch

    frames = _check_frames(frames)
    for start, end in events:
        if not 0 <= start < end <= len(frames):
            raise ValueError(f"Event {(start, end)} is not a non-empty range within the {len(frames)} frames.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = resolve_model_and_processor(
        model, processor, model_name_or_path, AutoModelForImageTextToText, AutoProcessor, "captioning"
    )

    model.eval()
    prompts = {style: _prompt(processor, PROMPTS[style]) for style in STYLES}
    decoder_only = not getattr(model.config, "is_encoder_decoder", False)
    chunks = []
    for start, end in events:
        image = frames[(start + end - 1) // 2]
        captions = []
        for style in STYLES:
            inputs = processor(images=[image], text=prompts[style], return_tensors="pt").to(model.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new_tokens = output[:, inputs["input_ids"].shape[1] :] if decoder_only else output
            words = processor.batch_decode(new_tokens, skip_special_tokens=True)[0].split()
            text = " ".join(words[: WORD_LIMITS[style]])
            if not text.rstrip("."):
                raise ValueError(f"The captioner wrote no usable {style} caption for chunk {(start, end)}: {text!r}.")
            captions.append(Caption(text, style, "chunk", start, end))
        chunks.append(captions)
    return [caption for captions in chunks for caption in captions] + merge_captions(chunks)


__all__ = ["bipartite_merge", "dino_keypoints", "merge_centroids", "vlm_captions"]
