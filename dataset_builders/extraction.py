"""TraceExtract per episode: raw video (+ what the source knows) -> world tracks, motion, events, captions, samples.

Every stage runs through an explicit backend recorded in the episode's metadata; a backend that lacks its input
raises an error naming the missing input and the alternatives, never a silent fallback. The stages (`STAGES`) are
functions that read and fill one `EpisodeState`; `extract_episode` runs them in order in this process, and the Ray
executor runs the same functions as steps of a pipeline, each learned stage in an actor pool of its own.
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
    appearance_choice: bool = False  # support_lk: an own LK step failing its check is kept where its patch matches better
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
        if self.appearance_choice and self.tracker != "support_lk":
            raise ValueError(f"appearance_choice is a setting of tracker='support_lk', not of {self.tracker!r}.")
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


def _model_device():
    """Where learned models run: the GPU when this process sees one (a Ray actor sees only the GPUs it holds)."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    # the backends move their inputs to the model's device
    model = load_checkpoint(model_class, name_or_path, f"{kind} model").eval().to(_model_device())
    return model, load_checkpoint(processor_class, name_or_path, f"{kind} processor")


class _TrackerOnDevice:
    """A torch.hub tracker on a GPU, called as `track_points_cotracker` calls it with inputs built on the CPU."""

    def __init__(self, model, device):
        self.model, self.device = model.to(device), device

    def __call__(self, video, queries):
        return self.model(video.to(self.device), queries=queries.to(self.device))


@functools.lru_cache(maxsize=2)
def _hub_tracker(repo_dir: str, checkpoint: str, entry: str):
    """A local torch.hub tracker, loaded once per process (onto the GPU if there is one)."""
    model, device = load_hub_tracker(repo_dir, checkpoint, entry), _model_device()
    return model if device.type == "cpu" else _TrackerOnDevice(model, device)


# the stages that can run a learned model, and that model's backend name
LEARNED_BACKENDS = {"depth": "depth_anything", "keypoints": "dino", "tracker": "cotracker", "captions": "vlm"}


def learned_stages(settings: ExtractionSettings) -> list[str]:
    """The stages whose backend under `settings` is a learned model (these run where the GPUs are)."""
    return [stage for stage, backend in LEARNED_BACKENDS.items() if getattr(settings, stage) == backend]


def stage_model(stage: str, settings: ExtractionSettings):
    """The learned model of `stage` under `settings`, loaded once per process and then reused: a (model,
    processor) pair for transformers checkpoints, the predictor for CoTracker. Executors call it before the first
    episode, so a checkpoint that cannot be loaded stops the run once instead of failing every episode."""
    if stage not in learned_stages(settings):
        raise ValueError(f"Stage {stage!r} runs the classical backend {getattr(settings, stage, None)!r}: no model.")
    if stage == "tracker":
        return _hub_tracker(settings.cotracker_repo, settings.cotracker_checkpoint, settings.cotracker_model)
    kind, checkpoint = {"depth": ("depth", settings.depth_model), "keypoints": ("dino", settings.dino_model),
                        "captions": ("vlm", settings.caption_model)}[stage]
    return _pretrained(kind, checkpoint)


@dataclass
class EpisodeState:
    """One episode between stages: its raw data and what the stages so far have added. Each stage reads and fills
    it, so consecutive stages may run in different processes (a Ray pipeline ships it from one to the next)."""

    raw: RawEpisode
    given_world: bool = False  # the source's own 3D tracks are the world tracks (no depth map to lift with)
    depth: np.ndarray | None = None  # (T, H, W) metres
    intrinsics: np.ndarray | None = None
    intrinsics_origin: str = ""
    points: np.ndarray | None = None  # (N, 2) first-frame pixels to track
    cluster_ids: np.ndarray | None = None  # (N,)
    tracks: np.ndarray | None = None  # (T, N, 2) pixels
    visible: np.ndarray | None = None  # (T, N)
    coverage: float = 0.0
    extrinsics: np.ndarray | None = None  # (T, 4, 4)
    world: np.ndarray | None = None  # (T, N, 3), gaps filled
    world_valid: np.ndarray | None = None
    anchor_traces: np.ndarray | None = None  # (T, N, 3): pixels and depth in the first frame's camera
    anchor_valid: np.ndarray | None = None
    moving: np.ndarray | None = None
    events: list | None = None
    captions: list | None = None


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


def check_stage(state: EpisodeState, settings: ExtractionSettings) -> None:
    """Reject episodes too short for a history and a future; decide where the world tracks come from."""
    if len(state.raw.frames) <= settings.history + 1:
        raise EpisodeRejected(f"{len(state.raw.frames)} frames: too short for a history of {settings.history} and a future")
    state.given_world = _uses_given_world(state.raw, settings)


def depth_stage(state: EpisodeState, settings: ExtractionSettings) -> None:
    """Metric depth (T, H, W) and intrinsics, with where the intrinsics came from."""
    raw = state.raw
    if state.given_world:
        state.depth, state.intrinsics, state.intrinsics_origin = None, raw.intrinsics, "source"
        return
    if settings.depth == "given":
        if raw.depth is None:
            raise ValueError(
                f"Episode {raw.episode_id}: depth='given' but the source has no depth; use depth='depth_anything'."
            )
        state.depth = raw.depth
    else:
        from .depth_backends import estimate_depth_depth_anything

        model, image_processor = stage_model("depth", settings)
        state.depth = estimate_depth_depth_anything(raw.frames, model=model, image_processor=image_processor)
    if raw.intrinsics is not None:
        state.intrinsics, state.intrinsics_origin = raw.intrinsics, "source"
        return
    if settings.field_of_view is None:
        raise ValueError(
            f"Episode {raw.episode_id}: the source has no intrinsics; set field_of_view (degrees) to use a "
            "pinhole guess, or provide calibrated intrinsics."
        )
    from .depth_backends import estimate_intrinsics

    state.intrinsics = estimate_intrinsics(raw.image_size, settings.field_of_view)
    state.intrinsics_origin = f"guessed from {settings.field_of_view} deg"


def keypoint_stage(state: EpisodeState, settings: ExtractionSettings) -> None:
    """The first-frame points to track and their cluster ids (none with tracker='given': the source's tracks are
    taken whole by the tracker stage)."""
    raw = state.raw
    if settings.tracker == "given":
        return
    rng = np.random.default_rng(settings.seed)
    if settings.keypoints == "grid":
        state.points, state.cluster_ids = grid_keypoints(raw.image_size, settings.num_keypoints)
    elif settings.keypoints == "motion":
        state.points, state.cluster_ids = motion_keypoints(raw.frames, settings.num_keypoints, rng)
    elif settings.keypoints == "dino":
        from .learned_backends import dino_keypoints

        model, image_processor = stage_model("keypoints", settings)
        state.points, state.cluster_ids = dino_keypoints(raw.frames, model=model, image_processor=image_processor, rng=rng)
    else:
        if raw.tracks is None:
            raise ValueError(f"Episode {raw.episode_id}: keypoints='given' but the source has no points; use 'grid' or 'motion'.")
        start = raw.track_visible[0] if raw.track_visible is not None else np.ones(raw.tracks.shape[1], bool)
        state.points = raw.tracks[0][start]
        state.cluster_ids = (raw.cluster_ids[start] if raw.cluster_ids is not None else np.zeros(len(state.points), np.int64))


def tracker_stage(state: EpisodeState, settings: ExtractionSettings) -> None:
    """Pixel tracks and visibility of the keypoints (or the source's own tracks), one cluster id per track."""
    raw = state.raw
    if settings.tracker == "given":
        if raw.tracks is None:
            raise ValueError(f"Episode {raw.episode_id}: tracker='given' but the source has no tracks; use tracker='support_lk'.")
        visible = raw.track_visible if raw.track_visible is not None else np.ones(raw.tracks.shape[:2], dtype=bool)
        result = track_points_given(raw.tracks, visible)
        state.tracks, state.visible = result.tracks, result.visible
        state.cluster_ids = raw.cluster_ids if raw.cluster_ids is not None else np.zeros(raw.tracks.shape[1], dtype=np.int64)
        return
    queries = np.column_stack([np.zeros(len(state.points)), state.points])
    if settings.tracker == "cotracker":
        result = track_points(raw.frames, queries, "cotracker", model=stage_model("tracker", settings))
        state.tracks, state.visible = result.tracks, result.visible
        return
    # progressive: new points join every 50 frames wherever existing tracks no longer cover the image
    options = {} if settings.lk_window is None else {"window": settings.lk_window}
    if settings.appearance_choice:
        options["appearance_choice"] = True
    result = track_progressive(raw.frames, queries, chunk=50, backend=settings.tracker, **options)
    added = result.tracks.shape[1] - len(state.points)
    state.tracks, state.visible = result.tracks, result.visible
    state.cluster_ids = np.concatenate([state.cluster_ids, np.full(added, -1, dtype=np.int64)])


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


def _extrinsics(state: EpisodeState, settings: ExtractionSettings) -> np.ndarray:
    raw = state.raw
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

    return estimate_poses(raw.frames, state.depth, state.intrinsics, state.tracks, state.visible)


def motion_stage(state: EpisodeState, settings: ExtractionSettings) -> None:
    """Coverage check, cameras, world tracks, which tracks move and the motion events."""
    raw = state.raw
    if settings.tracker == "given":
        state.coverage, kind = entity_coverage(state.visible, state.cluster_ids), "tracked-entity"
    else:
        state.coverage, kind = visible_coverage(state.visible), "visible-track"
    if state.coverage < settings.min_coverage:
        raise EpisodeRejected(f"{kind} coverage {state.coverage:.2f} < {settings.min_coverage}")
    state.extrinsics = _extrinsics(state, settings)
    if state.given_world:
        world = raw.tracks_world.astype(np.float64)
        world_valid = state.visible & np.isfinite(world).all(-1)
    else:
        world, world_valid = lift_to_world(state.tracks, state.visible, state.depth, state.intrinsics, state.extrinsics)
    state.world, state.world_valid = fill_world_tracks(world, world_valid)
    # Motion is judged in one fixed camera (the first frame's), so camera motion does not count as object motion.
    state.anchor_traces, state.anchor_valid = project_to_camera(state.world, state.world_valid, state.extrinsics[0], state.intrinsics)
    state.moving = moving_tracks(state.anchor_traces[..., :2], state.anchor_valid, raw.image_size)
    state.events = motion_events(state.anchor_traces[..., :2], state.anchor_valid, state.moving)


def caption_stage(state: EpisodeState, settings: ExtractionSettings) -> None:
    raw = state.raw
    if settings.captions == "given":
        captions = given_captions(raw.task, len(raw.frames))
    elif settings.captions == "vlm":
        from .learned_backends import vlm_captions

        model, processor = stage_model("captions", settings)
        captions = vlm_captions(state.events, raw.frames, model=model, processor=processor)
    else:
        uvz = np.concatenate([normalize_pixels(state.anchor_traces[..., :2], raw.image_size), state.anchor_traces[..., 2:]], -1)
        captions = template_captions(state.events, uvz, state.anchor_valid, state.moving)
        if raw.task:
            captions.extend(given_captions(raw.task, len(raw.frames)))
    state.captions = captions


# every stage, in the order they run; the keys of LEARNED_BACKENDS are the ones that may need a model
STAGES = {
    "check": check_stage,
    "depth": depth_stage,
    "keypoints": keypoint_stage,
    "tracker": tracker_stage,
    "motion": motion_stage,
    "captions": caption_stage,
}


def finish_episode(state: EpisodeState, settings: ExtractionSettings) -> ExtractedEpisode:
    """The extracted episode from the state all stages filled, with the backends and checks in its metadata."""
    raw = state.raw
    metadata = {
        **raw.metadata,
        "backends": {k: getattr(settings, k) for k in ("depth", "camera", "keypoints", "tracker", "captions")},
        "intrinsics": state.intrinsics_origin,
        "world_tracks": "given" if state.given_world else "lifted",
        "coverage": state.coverage,
        "num_tracks": int(state.tracks.shape[1]),
        "num_moving": int(state.moving.sum()),
    }
    return ExtractedEpisode(
        episode_id=raw.episode_id,
        task=raw.task,
        fps=raw.fps,
        frames=raw.frames,
        depth=state.depth,
        intrinsics=np.asarray(state.intrinsics, dtype=np.float32),
        extrinsics=np.asarray(state.extrinsics, dtype=np.float32),
        tracks=state.tracks.astype(np.float32),
        visible=state.visible,
        world=state.world.astype(np.float32),
        world_valid=state.world_valid,
        cluster_ids=np.asarray(state.cluster_ids, dtype=np.int64),
        moving=state.moving,
        events=state.events,
        captions=[caption.to_dict() for caption in state.captions],
        metadata=metadata,
    )


def extract_episode(raw: RawEpisode, settings: ExtractionSettings) -> ExtractedEpisode:
    """Run every stage on one episode; raises ValueError on bad input and EpisodeRejected on unusable data."""
    state = EpisodeState(raw)
    for stage in STAGES.values():
        stage(state, settings)
    return finish_episode(state, settings)


def frame_times(frame: int, num_steps: int, direction: int, num_frames: int) -> np.ndarray:
    """Frame times frame ± 1, ± 2, ..., ± num_steps (nearest first), NaN outside the episode: steps of one frame."""
    times = frame + direction * np.arange(1, num_steps + 1, dtype=np.float64)
    times[(times < 0) | (times > num_frames - 1)] = np.nan
    return times


def camera_sample(
    traces: np.ndarray, valid: np.ndarray, frame: int, future_times: np.ndarray, history_times: np.ndarray
) -> dict[str, np.ndarray]:
    """The per-query part of a sample at frame t, shared by every source (procedural, MuJoCo, video).

    `traces` (T, n, 3) are the world tracks projected through camera t (`project_to_camera`), which removes camera
    motion, so the model only has to predict how the scene moves. Future and history are read at fractional frame
    times (`frame_times`, or arc-length `retarget_times`), nearest first: the history runs backwards in time (t-1,
    t-2, ...), which `Mu0Processor` reverses. Returns query_uv (n, 2) pixels and query_z (n,) depth at t, and
    future / history (n, S, 3) (u, v, z) with their validity (n, S), zero where invalid (outside the episode,
    behind the camera, or untracked).
    """
    future, future_valid = interpolate_at(traces, valid, future_times)
    history, history_valid = interpolate_at(traces, valid, history_times)
    return {
        "query_uv": traces[frame, :, :2],
        "query_z": traces[frame, :, 2],
        "future": future,
        "future_valid": future_valid,
        "history": history,
        "history_valid": history_valid,
    }


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
        sample = camera_sample(
            traces, valid, frame,
            retarget_times(speed, frame, settings.retarget_steps, 1, settings.retarget_step),
            retarget_times(speed, frame, settings.history, -1, settings.retarget_step),
        )
        if not sample["future_valid"].any():
            continue  # nothing moves after t: a retargeted future does not exist
        raw_future, raw_future_valid = interpolate_at(traces, valid, frame_times(frame, settings.horizon, 1, num_frames))
        yield {
            "episode_id": episode.episode_id,
            "frame_index": frame,
            "image": episode.frames[frame],
            "depth": None if episode.depth is None else episode.depth[frame],
            "intrinsics": episode.intrinsics,
            **sample,
            "future_raw": raw_future,
            "future_raw_valid": raw_future_valid,
            "track_ids": np.flatnonzero(query),
            "cluster_ids": episode.cluster_ids[query],
            "moving": episode.moving[query],
            "captions": covering(episode.captions, frame),
            "task": episode.task or "",
        }


__all__ = [
    "LEARNED_BACKENDS",
    "STAGES",
    "SYNTHETIC_RETARGET_STEP",
    "EpisodeRejected",
    "EpisodeState",
    "ExtractedEpisode",
    "ExtractionSettings",
    "camera_sample",
    "entity_coverage",
    "episode_samples",
    "extract_episode",
    "finish_episode",
    "frame_times",
    "learned_stages",
    "stage_model",
]
