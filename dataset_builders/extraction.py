"""TraceExtract per episode: raw video (+ what the source knows) -> world tracks, motion, events, captions, samples.

Every stage runs through an explicit backend recorded in the episode's metadata; a backend that lacks its input
raises an error naming the missing input and the alternatives, never a silent fallback.
"""

import functools
import json
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

from .captions import covering, given_captions, template_captions
from .checkpoints import load_checkpoint
from .keypoints import grid_keypoints, motion_keypoints
from .sources import RawEpisode
from .tracking import LK_BACKENDS, load_hub_tracker, track_points, track_points_given, track_progressive
from .trace_ops import (
    MIN_COVERAGE,
    RETARGET_STEP,
    fill_world_tracks,
    interpolate_at,
    lift_to_world,
    motion_events,
    moving_tracks,
    normalize_pixels,
    path_coordinates,
    project_to_camera,
    retarget_times,
    robust_speed,
    visible_coverage,
)

DEPTH_BACKENDS = ("given", "depth_anything")
CAMERA_BACKENDS = ("given", "static", "estimated")
KEYPOINT_BACKENDS = ("given", "grid", "motion", "dino")
TRACKER_BACKENDS = ("given", *LK_BACKENDS, "cotracker")
CAPTION_BACKENDS = ("given", "template", "vlm")


# The step the synthetic sources' short scenes are built with: they hold ~0.6 units of motion per episode, so at the
# released 0.05 a 32-step future has ~6 valid steps and no query reaches the D = 10 a control-point fit needs; at
# 0.02 about half of them do (measured on procedural episodes).
SYNTHETIC_RETARGET_STEP = 0.02


@dataclass
class ExtractionSettings:
    depth: str = "given"
    camera: str = "given"
    keypoints: str = "given"
    tracker: str = "given"
    captions: str = "template"
    num_keypoints: int = 256
    lk_window: int | None = None  # LK window side in px; None: the tracker's default for the image size
    depth_model: str = "depth-anything/Depth-Anything-V2-Metric-Indoor-Small-hf"
    field_of_view: float | None = None
    dino_model: str = "facebook/dinov2-base"
    cotracker_model: str = "cotracker3_offline"  # hubconf entry of the tracker repository
    cotracker_repo: str | None = None  # local clone of facebookresearch/co-tracker (or another torch.hub tracker)
    cotracker_checkpoint: str | None = None  # local .pth state dict for that entry
    caption_model: str | None = None
    min_coverage: float = MIN_COVERAGE
    history: int = 8
    horizon: int = 32
    retarget_steps: int = 128
    # Released: 0.05 of robust path length in (x / W, y / H, z) units. Short synthetic scenes move too little for it
    # (a procedural episode holds ~0.6 units of motion, so no query would reach the D valid steps a fit needs).
    retarget_step: float = RETARGET_STEP
    frame_stride: int = 1
    static_queries: bool = False
    seed: int = 0

    def __post_init__(self):
        for name, allowed in (
            ("depth", DEPTH_BACKENDS),
            ("camera", CAMERA_BACKENDS),
            ("keypoints", KEYPOINT_BACKENDS),
            ("tracker", TRACKER_BACKENDS),
            ("captions", CAPTION_BACKENDS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Unknown {name} backend {getattr(self, name)!r}; choose from {allowed}.")
        if not self.retarget_step > 0:
            raise ValueError(f"retarget_step must be > 0, got {self.retarget_step}.")
        if self.tracker == "given" and self.keypoints != "given":
            raise ValueError("tracker='given' follows the source's own points: use keypoints='given' with it.")
        if self.tracker == "cotracker" and not (self.cotracker_repo and self.cotracker_checkpoint):
            raise ValueError(
                "tracker='cotracker' runs offline from local files: set cotracker_repo (a clone of "
                "https://github.com/facebookresearch/co-tracker) and cotracker_checkpoint (its .pth file), or use "
                "tracker='support_lk'."
            )
        if self.captions == "vlm" and not self.caption_model:
            raise ValueError("captions='vlm' needs caption_model: an image-text-to-text checkpoint (Hub id or folder).")


@dataclass
class ExtractedEpisode:
    episode_id: str
    task: str | None
    fps: float
    frames: np.ndarray
    depth: np.ndarray | None
    intrinsics: np.ndarray
    extrinsics: np.ndarray
    tracks: np.ndarray  # (T, N, 2) pixels
    visible: np.ndarray  # (T, N)
    world: np.ndarray  # (T, N, 3), gaps filled
    world_valid: np.ndarray  # (T, N)
    cluster_ids: np.ndarray
    moving: np.ndarray
    events: list
    captions: list
    metadata: dict = field(default_factory=dict)

    ARRAYS = ("frames", "intrinsics", "extrinsics", "tracks", "visible", "world", "world_valid", "cluster_ids", "moving")

    def save(self, path: str) -> None:
        """Atomic write: a temp file in the same folder, then rename, so a crash never leaves a half episode."""
        arrays = {name: getattr(self, name) for name in self.ARRAYS}
        if self.depth is not None:
            arrays["depth"] = self.depth.astype(np.float16)
        header = {key: getattr(self, key) for key in ("episode_id", "task", "fps", "events", "captions", "metadata")}
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        # named after the target so a builder can tell its own orphans (from a kill) from another machine's in-flight writes
        with tempfile.NamedTemporaryFile(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp", delete=False) as handle:
            np.savez(handle, **arrays)
        os.replace(handle.name, path)

    @classmethod
    def load(cls, path: str) -> "ExtractedEpisode":
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(data["header"].tobytes().decode())
            arrays = {name: data[name] for name in cls.ARRAYS}
            depth = data["depth"].astype(np.float32) if "depth" in data.files else None
        header["events"] = [tuple(event) for event in header["events"]]
        return cls(depth=depth, **arrays, **header)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.frames.shape[1], self.frames.shape[2]


class EpisodeRejected(Exception):
    """An episode that is readable but unusable (e.g. low track coverage): counted and skipped, with the reason."""


@functools.lru_cache(maxsize=4)
def _pretrained(kind: str, name_or_path: str):
    """A stage's model and processor, loaded once per process (extraction calls it for every episode)."""
    from transformers import (
        AutoImageProcessor,
        AutoModel,
        AutoModelForDepthEstimation,
        AutoModelForImageTextToText,
        AutoProcessor,
    )

    model_class, processor_class = {
        "dino": (AutoModel, AutoImageProcessor),
        "depth": (AutoModelForDepthEstimation, AutoImageProcessor),
        "vlm": (AutoModelForImageTextToText, AutoProcessor),
    }[kind]
    model = load_checkpoint(model_class, name_or_path, f"{kind} model").eval()
    return model, load_checkpoint(processor_class, name_or_path, f"{kind} processor")


@functools.lru_cache(maxsize=2)
def _hub_tracker(repo_dir: str, checkpoint: str, entry: str):
    """A local torch.hub tracker, loaded once per process."""
    return load_hub_tracker(repo_dir, checkpoint, entry)


def _depth(raw: RawEpisode, settings: ExtractionSettings) -> tuple[np.ndarray, np.ndarray, str]:
    """Metric depth (T, H, W) and intrinsics, with where the intrinsics came from."""
    if settings.depth == "given":
        if raw.depth is None:
            raise ValueError(
                f"Episode {raw.episode_id}: depth='given' but the source has no depth; use depth='depth_anything'."
            )
        depth = raw.depth
    else:
        from .depth_backends import estimate_depth_depth_anything

        model, image_processor = _pretrained("depth", settings.depth_model)
        depth = estimate_depth_depth_anything(raw.frames, model=model, image_processor=image_processor)
    if raw.intrinsics is not None:
        return depth, raw.intrinsics, "source"
    if settings.field_of_view is None:
        raise ValueError(
            f"Episode {raw.episode_id}: the source has no intrinsics; set field_of_view (degrees) to use a "
            "pinhole guess, or provide calibrated intrinsics."
        )
    from .depth_backends import estimate_intrinsics

    return depth, estimate_intrinsics(raw.image_size, settings.field_of_view), f"guessed from {settings.field_of_view} deg"


def _extrinsics(raw, settings, depth, intrinsics, tracks, visible) -> np.ndarray:
    if settings.camera == "given":
        if raw.extrinsics is None:
            raise ValueError(
                f"Episode {raw.episode_id}: camera='given' needs extrinsics; use camera='static' for a fixed camera "
                "or 'estimated' for poses from the tracks."
            )
        return raw.extrinsics
    if settings.camera == "static":
        return np.repeat(np.eye(4)[None], len(raw.frames), axis=0)
    from .depth_backends import estimate_poses

    return estimate_poses(raw.frames, depth, intrinsics, tracks, visible)


def _tracks(raw: RawEpisode, settings: ExtractionSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(settings.seed)
    if settings.tracker == "given":
        if raw.tracks is None:
            raise ValueError(f"Episode {raw.episode_id}: tracker='given' but the source has no tracks; use tracker='support_lk'.")
        visible = raw.track_visible if raw.track_visible is not None else np.ones(raw.tracks.shape[:2], dtype=bool)
        result = track_points_given(raw.tracks, visible)
        clusters = raw.cluster_ids if raw.cluster_ids is not None else np.zeros(raw.tracks.shape[1], dtype=np.int64)
        return result.tracks, result.visible, clusters

    if settings.keypoints == "grid":
        points, clusters = grid_keypoints(raw.image_size, settings.num_keypoints)
    elif settings.keypoints == "motion":
        points, clusters = motion_keypoints(raw.frames, settings.num_keypoints, rng)
    elif settings.keypoints == "dino":
        from .learned_backends import dino_keypoints

        model, image_processor = _pretrained("dino", settings.dino_model)
        points, clusters = dino_keypoints(raw.frames, model=model, image_processor=image_processor, rng=rng)
    else:
        if raw.tracks is None:
            raise ValueError(f"Episode {raw.episode_id}: keypoints='given' but the source has no points; use 'grid' or 'motion'.")
        start = raw.track_visible[0] if raw.track_visible is not None else np.ones(raw.tracks.shape[1], bool)
        points = raw.tracks[0][start]
        clusters = (raw.cluster_ids[start] if raw.cluster_ids is not None else np.zeros(len(points), np.int64))
    queries = np.column_stack([np.zeros(len(points)), points])
    if settings.tracker == "cotracker":
        model = _hub_tracker(settings.cotracker_repo, settings.cotracker_checkpoint, settings.cotracker_model)
        result = track_points(raw.frames, queries, "cotracker", model=model)
        return result.tracks, result.visible, clusters
    # progressive: new points join every 50 frames wherever existing tracks no longer cover the image
    window = {} if settings.lk_window is None else {"window": settings.lk_window}
    result = track_progressive(raw.frames, queries, chunk=50, backend=settings.tracker, **window)
    added = result.tracks.shape[1] - len(points)
    return result.tracks, result.visible, np.concatenate([clusters, np.full(added, -1, dtype=np.int64)])


def entity_coverage(visible: np.ndarray, cluster_ids: np.ndarray) -> float:
    """Coverage of sparse given tracks: per frame, the fraction of the tracked entities (cluster ids, e.g. the two
    hands of EgoDex) with at least one visible point, averaged over frames; entities never seen do not count.

    The per-point fraction of `visible_coverage` suits dense point grids, where an unseen part of the image means
    lost tracks; a few joints per hand are often self-occluded or out of view one by one while the hand itself is
    in view, so they are judged per entity.
    """
    cluster_ids = np.asarray(cluster_ids)
    entities = [visible[:, cluster_ids == entity].any(axis=1) for entity in np.unique(cluster_ids)]
    present = [seen for seen in entities if seen.any()]
    return float(np.mean(present)) if present else 0.0


def _uses_given_world(raw: RawEpisode, settings: ExtractionSettings) -> bool:
    """Whether the world tracks come from the source (metric 3D given, no depth map): depth='given' on a source
    with `tracks_world` and no depth. The 3D belongs to the source's own points, so it needs tracker='given'."""
    if settings.depth != "given" or raw.depth is not None or raw.tracks_world is None:
        return False
    if settings.tracker != "given":
        raise ValueError(
            f"Episode {raw.episode_id}: the source gives 3D tracks for its own points but no depth map, so "
            f"tracker={settings.tracker!r} has no depth to lift with; use tracker='given' and keypoints='given', "
            "or depth='depth_anything'."
        )
    if raw.intrinsics is None or settings.camera != "given":
        raise ValueError(
            f"Episode {raw.episode_id}: given 3D tracks are in the source's world frame, so they need the source's "
            "intrinsics and camera='given'."
        )
    return True


def extract_episode(raw: RawEpisode, settings: ExtractionSettings) -> ExtractedEpisode:
    """Run every stage on one episode; raises ValueError on bad input and EpisodeRejected on unusable data."""
    if len(raw.frames) <= settings.history + 1:
        raise EpisodeRejected(f"{len(raw.frames)} frames: too short for a history of {settings.history} and a future")
    given_world = _uses_given_world(raw, settings)
    if given_world:
        depth, intrinsics, intrinsics_origin = None, raw.intrinsics, "source"
    else:
        depth, intrinsics, intrinsics_origin = _depth(raw, settings)
    tracks, visible, cluster_ids = _tracks(raw, settings)
    if settings.tracker == "given":
        coverage, kind = entity_coverage(visible, cluster_ids), "tracked-entity"
    else:
        coverage, kind = visible_coverage(visible), "visible-track"
    if coverage < settings.min_coverage:
        raise EpisodeRejected(f"{kind} coverage {coverage:.2f} < {settings.min_coverage}")
    extrinsics = _extrinsics(raw, settings, depth, intrinsics, tracks, visible)
    if given_world:
        world = raw.tracks_world.astype(np.float64)
        world_valid = visible & np.isfinite(world).all(-1)
    else:
        world, world_valid = lift_to_world(tracks, visible, depth, intrinsics, extrinsics)
    world, world_valid = fill_world_tracks(world, world_valid)
    # Motion is judged in one fixed camera (the first frame's), so camera motion does not count as object motion.
    anchor_traces, anchor_valid = project_to_camera(world, world_valid, extrinsics[0], intrinsics)
    moving = moving_tracks(anchor_traces[..., :2], anchor_valid, raw.image_size)
    events = motion_events(anchor_traces[..., :2], anchor_valid, moving)
    if settings.captions == "given":
        captions = given_captions(raw.task, len(raw.frames))
    elif settings.captions == "vlm":
        from .learned_backends import vlm_captions

        model, processor = _pretrained("vlm", settings.caption_model)
        captions = vlm_captions(events, raw.frames, model=model, processor=processor)
    else:
        uvz = np.concatenate([normalize_pixels(anchor_traces[..., :2], raw.image_size), anchor_traces[..., 2:]], -1)
        captions = template_captions(events, uvz, anchor_valid, moving)
        if raw.task:
            captions.extend(given_captions(raw.task, len(raw.frames)))
    metadata = {
        **raw.metadata,
        "backends": {k: getattr(settings, k) for k in ("depth", "camera", "keypoints", "tracker", "captions")},
        "intrinsics": intrinsics_origin,
        "world_tracks": "given" if given_world else "lifted",
        "coverage": coverage,
        "num_tracks": int(tracks.shape[1]),
        "num_moving": int(moving.sum()),
    }
    return ExtractedEpisode(
        episode_id=raw.episode_id,
        task=raw.task,
        fps=raw.fps,
        frames=raw.frames,
        depth=depth,
        intrinsics=np.asarray(intrinsics, dtype=np.float32),
        extrinsics=np.asarray(extrinsics, dtype=np.float32),
        tracks=tracks.astype(np.float32),
        visible=visible,
        world=world.astype(np.float32),
        world_valid=world_valid,
        cluster_ids=np.asarray(cluster_ids, dtype=np.int64),
        moving=moving,
        events=events,
        captions=[caption.to_dict() for caption in captions],
        metadata=metadata,
    )


def episode_samples(episode: ExtractedEpisode, settings: ExtractionSettings):
    """One sample per frame t (every `frame_stride`): tracks visible at t, projected through camera t.

    Future and history are retargeted by arc length (one step = 0.05 of robust path length) and the raw
    frame-time future is kept too. Frames with fewer than `history` frames before them, and frames after which
    nothing moves (no retargeted future exists), are skipped.
    """
    num_frames = len(episode.frames)
    for frame in range(settings.history, num_frames - 1, settings.frame_stride):
        query = episode.visible[frame] & episode.world_valid[frame]
        if not settings.static_queries:
            query &= episode.moving
        if not query.any():
            continue
        traces, valid = project_to_camera(
            episode.world[:, query], episode.world_valid[:, query], episode.extrinsics[frame], episode.intrinsics
        )
        speed = robust_speed(path_coordinates(traces, episode.image_size), valid)
        future, future_valid = interpolate_at(traces, valid, retarget_times(speed, frame, settings.retarget_steps, 1, settings.retarget_step))
        if not future_valid.any():
            continue  # nothing moves after t: a retargeted future does not exist
        history, history_valid = interpolate_at(traces, valid, retarget_times(speed, frame, settings.history, -1, settings.retarget_step))
        raw_steps = frame + np.arange(1, settings.horizon + 1, dtype=np.float64)
        raw_steps[raw_steps > num_frames - 1] = np.nan
        raw_future, raw_future_valid = interpolate_at(traces, valid, raw_steps)
        yield {
            "episode_id": episode.episode_id,
            "frame_index": frame,
            "image": episode.frames[frame],
            "depth": None if episode.depth is None else episode.depth[frame],
            "intrinsics": episode.intrinsics,
            "query_uv": traces[frame, :, :2],
            "query_z": traces[frame, :, 2],
            "history": history,
            "history_valid": history_valid,
            "future": future,
            "future_valid": future_valid,
            "future_raw": raw_future,
            "future_raw_valid": raw_future_valid,
            "track_ids": np.flatnonzero(query),
            "cluster_ids": episode.cluster_ids[query],
            "moving": episode.moving[query],
            "captions": covering(episode.captions, frame),
            "task": episode.task or "",
        }


__all__ = [
    "SYNTHETIC_RETARGET_STEP",
    "EpisodeRejected",
    "ExtractedEpisode",
    "ExtractionSettings",
    "entity_coverage",
    "episode_samples",
    "extract_episode",
]
