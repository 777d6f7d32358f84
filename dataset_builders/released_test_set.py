"""The authors' released test set (TraceExtract output, `test_set/<group>/<episode>/`) as μ0 `samples` rows.

Each episode folder holds `images.npy` (T, H, W, 3) uint8, `depth.npy` (T, H, W) float16 metres, `cameras.npz`
(intrinsics, world-to-camera extrinsics) and `samples/`: per sample frame `frame_indices[i]` the rows
`offsets[i]:offsets[i+1]` of `traj` (N, 1 + F, 3) and `traj_history` (N, 1 + h, 3), index 0 = frame t, in frame-t
pixels (x, y) and metres (z), padded with -inf, with `valid_steps*` masks, plus `cluster_ids` and `is_moving`.
Optional `curated_training_texts.json` gives instructions over frame ranges.

A sample frame is usable when it has at least `min_moving` moving rows (the released evaluation's `n_min=16`), so
the protocol's frame offsets 4/8/12 pick the 5th/9th/13th usable frame, as released. TraceExtract pixels have
x = 0 at the left edge and the released model normalises u = 2x/W - 1, while μ0 rows use OpenCV centres
(u = 2(x + 0.5)/W - 1): rows store x - 0.5 and y - 0.5, so the normalised coordinates are the released ones.
"""

import glob
import hashlib
import json
import os
from collections.abc import Iterator

import datasets
import numpy as np

from .extraction import ExtractionSettings
from .trace_extract import _encode_depth_mm, sample_features

REQUIRED_FILES = ("images.npy", "samples/frame_indices.npy", "samples/offsets.npy", "samples/traj.npy",
                  "samples/traj_history.npy", "samples/valid_steps.npy", "samples/valid_steps_history.npy")


def episode_dirs(root: str) -> list[str]:
    """Episode folders `root/<group>/<episode>/` in sorted order (the released `sorted(glob("test_set/*/*"))`)."""
    found = sorted(path for path in glob.glob(os.path.join(root, "*", "*"))
                   if os.path.isfile(os.path.join(path, "samples", "frame_indices.npy")))
    if not found:
        raise FileNotFoundError(f"No TraceExtract episodes under {root}: expected {root}/<group>/<episode>/samples/.")
    return found


def is_trace_extract_tree(path: str) -> bool:
    return os.path.isdir(path) and bool(glob.glob(os.path.join(path, "*", "*", "samples", "frame_indices.npy")))


def _pixels(values: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TraceExtract (x, y, z) -> μ0 rows: OpenCV pixel centres, invalid or non-finite steps zeroed and masked."""
    valid = valid & np.isfinite(values).all(-1)
    values = np.where(valid[..., None], values - np.array([0.5, 0.5, 0.0], dtype=np.float32), 0.0)
    return values.astype(np.float32), valid


def _captions(directory: str) -> list[dict]:
    path = os.path.join(directory, "curated_training_texts.json")
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        texts = json.load(handle)
    captions = []
    for level, key in (("chunk", "chunk_texts"), ("merged", "merged_texts")):
        for entry in texts.get(key) or []:
            for number in (1, 2, 3):
                text = (entry.get(f"instruction_{number}") or "").strip()
                if text:
                    captions.append({"text": text, "style": f"instruction_{number}", "level": level,
                                     "start": int(entry["start_idx"]), "end": int(entry["end_idx"])})
    return captions


def _lengths(directory: str, history: int) -> tuple[int, int]:
    """(future, raw future) steps after frame t stored by an episode."""
    traj = np.load(os.path.join(directory, "samples", "traj.npy"), mmap_mode="r")
    history_steps = np.load(os.path.join(directory, "samples", "traj_history.npy"), mmap_mode="r").shape[1] - 1
    if history_steps < history:
        raise ValueError(f"{directory}: traj_history has {history_steps} past steps, fewer than history={history}.")
    raw = os.path.join(directory, "samples", "raw_traj.npy")
    return traj.shape[1] - 1, (np.load(raw, mmap_mode="r").shape[1] - 1 if os.path.isfile(raw) else traj.shape[1] - 1)


def episode_rows(directory: str, episode_id: str, history: int = 8, min_moving: int = 16) -> Iterator[dict]:
    """One `samples` row per usable sample frame of a TraceExtract episode folder."""
    missing = [name for name in REQUIRED_FILES if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise FileNotFoundError(f"{directory} is not a TraceExtract episode: it lacks {missing}.")
    load = lambda name: np.load(os.path.join(directory, name), mmap_mode="r")  # noqa: E731
    samples = lambda name: load(os.path.join("samples", name))  # noqa: E731
    images = load("images.npy")
    depth = load("depth.npy") if os.path.isfile(os.path.join(directory, "depth.npy")) else None
    cameras = dict(np.load(os.path.join(directory, "cameras.npz"))) if os.path.isfile(os.path.join(directory, "cameras.npz")) else {}
    frames, offsets = np.asarray(samples("frame_indices.npy")), np.asarray(samples("offsets.npy"))
    moving = np.asarray(samples("is_moving.npy")).astype(bool) if os.path.isfile(
        os.path.join(directory, "samples", "is_moving.npy")) else np.ones(offsets[-1], dtype=bool)
    clusters = np.asarray(samples("cluster_ids.npy")).astype(np.int64) if os.path.isfile(
        os.path.join(directory, "samples", "cluster_ids.npy")) else np.full(offsets[-1], -1, dtype=np.int64)
    has_raw = os.path.isfile(os.path.join(directory, "samples", "raw_traj.npy"))
    captions = _captions(directory)
    for slot, frame in enumerate(frames):
        start, stop = int(offsets[slot]), int(offsets[slot + 1])
        if moving[start:stop].sum() < min_moving:
            continue
        traj = np.asarray(samples("traj.npy")[start:stop], dtype=np.float32)
        past = np.asarray(samples("traj_history.npy")[start:stop, 1 : history + 1], dtype=np.float32)
        future, future_valid = _pixels(traj[:, 1:], np.asarray(samples("valid_steps.npy")[start:stop, 1:], dtype=bool))
        past, past_valid = _pixels(past, np.asarray(samples("valid_steps_history.npy")[start:stop, 1 : history + 1], dtype=bool))
        if has_raw:
            raw, raw_valid = _pixels(np.asarray(samples("raw_traj.npy")[start:stop, 1:], dtype=np.float32),
                                     np.asarray(samples("raw_valid_steps.npy")[start:stop, 1:], dtype=bool))
        else:
            raw, raw_valid = future, future_valid
        intrinsics = cameras["intrinsics"][frame] if "intrinsics" in cameras else np.eye(3)
        yield {
            "episode_id": episode_id,
            "frame_index": int(frame),
            "image": np.asarray(images[frame]),
            "depth_mm": _encode_depth_mm(None if depth is None else np.asarray(depth[frame], dtype=np.float32)),
            "intrinsics": np.asarray(intrinsics, dtype=np.float32),
            "query_uv": traj[:, 0, :2] - 0.5,
            "query_z": traj[:, 0, 2],
            "history": past,
            "history_valid": past_valid,
            "future": future,
            "future_valid": future_valid,
            "future_raw": raw,
            "future_raw_valid": raw_valid,
            "track_ids": np.arange(stop - start, dtype=np.int64),
            "cluster_ids": clusters[start:stop],
            "moving": moving[start:stop],
            "captions": [caption for caption in captions if caption["start"] <= frame <= caption["end"]],
            "task": "",
        }


def released_test_samples(root: str, history: int = 8, min_moving: int = 16) -> datasets.Dataset:
    """The released `test_set/` (or any TraceExtract output tree) as a map-style `samples` dataset."""
    directories = episode_dirs(root)
    lengths = {_lengths(directory, history) for directory in directories}
    if len(lengths) != 1:
        raise ValueError(f"Episodes under {root} store different trace lengths {sorted(lengths)}; convert them separately.")
    future, raw = lengths.pop()
    features = sample_features(ExtractionSettings(history=history, retarget_steps=future, horizon=raw))

    def generate():
        for directory in directories:
            episode_id = "__".join(os.path.relpath(directory, root).split(os.sep))  # a file-name-safe group__episode
            yield from episode_rows(directory, episode_id, history, min_moving)

    # Files and their times name the cache entry, so a changed folder is never served from an older cache.
    stamps = [(path, os.path.getmtime(path)) for directory in directories
              for path in sorted(glob.glob(os.path.join(directory, "**", "*"), recursive=True)) if os.path.isfile(path)]
    fingerprint = hashlib.sha256(repr((stamps, history, min_moving)).encode()).hexdigest()[:32]
    return datasets.Dataset.from_generator(generate, features=features, fingerprint=fingerprint)


__all__ = ["episode_dirs", "episode_rows", "is_trace_extract_tree", "released_test_samples"]
