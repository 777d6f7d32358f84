"""Episode sources for TraceExtract: what a video (plus whatever the source knows) looks like before extraction.

Each source lists light, picklable `EpisodeRef`s (so extraction can be sharded across processes and machines) and
loads one `RawEpisode` per ref. What a source does not know (depth, cameras, tracks, text) stays None and the
extraction stages must supply it with an explicit backend.
"""

import glob
import math
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class EpisodeRef:
    source: str
    episode_id: str
    location: str = ""
    seed: int = 0


@dataclass
class RawEpisode:
    episode_id: str
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    fps: float
    depth: np.ndarray | None = None  # (T, H, W) metres
    intrinsics: np.ndarray | None = None  # (3, 3) pixels
    extrinsics: np.ndarray | None = None  # (T, 4, 4) world -> camera
    tracks: np.ndarray | None = None  # (T, N, 2) pixels, ground truth
    track_visible: np.ndarray | None = None  # (T, N)
    cluster_ids: np.ndarray | None = None  # (N,)
    task: str | None = None
    tracks_world: np.ndarray | None = None  # (T, N, 3) metres, world frame: the 3D of `tracks`, where the source has it
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.frames.ndim != 4 or self.frames.shape[-1] != 3 or self.frames.dtype != np.uint8 or len(self.frames) == 0:
            raise ValueError(
                f"Episode {self.episode_id}: frames must be a non-empty (T, H, W, 3) uint8 array, got "
                f"{self.frames.shape} {self.frames.dtype}."
            )
        num_frames, height, width = self.frames.shape[:3]
        if self.depth is not None:
            if self.depth.shape != (num_frames, height, width):
                raise ValueError(
                    f"Episode {self.episode_id}: depth has shape {self.depth.shape} but the frames are "
                    f"{(num_frames, height, width)}; depth must be aligned with the frames."
                )
            if np.isnan(self.depth).all():
                raise ValueError(f"Episode {self.episode_id}: depth is entirely NaN.")
        if self.tracks is not None and (self.tracks.shape[0] != num_frames or self.tracks.shape[-1] != 2):
            raise ValueError(f"Episode {self.episode_id}: tracks must be (T={num_frames}, N, 2), got {self.tracks.shape}.")
        if self.tracks_world is not None and (self.tracks is None or self.tracks_world.shape != (*self.tracks.shape[:2], 3)):
            raise ValueError(
                f"Episode {self.episode_id}: tracks_world must be (T, N, 3) beside tracks (T, N, 2), got "
                f"{self.tracks_world.shape} and {None if self.tracks is None else self.tracks.shape}."
            )

    @property
    def image_size(self) -> tuple[int, int]:
        return self.frames.shape[1], self.frames.shape[2]


# ------------------------------------------------------------------------------------------------ procedural
def procedural_refs(num_episodes: int, seed: int = 0) -> list[EpisodeRef]:
    return _generated_refs("procedural", num_episodes, seed)


def load_procedural(ref: EpisodeRef, num_frames: int = 48, image_size: int = 128, moving_camera: bool = False) -> RawEpisode:
    from .procedural import generate_episode

    return _generated_raw(ref, generate_episode(ref.seed, num_frames=num_frames, image_size=image_size, moving_camera=moving_camera))


# ---------------------------------------------------------------------------------------------------- mujoco
def mujoco_refs(num_episodes: int, seed: int = 0) -> list[EpisodeRef]:
    return _generated_refs("mujoco", num_episodes, seed)


def load_mujoco(ref: EpisodeRef, num_frames: int = 48, image_size: int = 128, moving_camera: bool = False) -> RawEpisode:
    """A MuJoCo-rendered tabletop episode (needs `pip install "mu0[sim]"` and an offscreen GL, see `mujoco_scenes`)."""
    from .mujoco_scenes import generate_mujoco_episode

    episode = generate_mujoco_episode(ref.seed, num_frames=num_frames, image_size=image_size, moving_camera=moving_camera)
    return _generated_raw(ref, episode)


def _generated_refs(source: str, num_episodes: int, seed: int) -> list[EpisodeRef]:
    seeds = np.random.default_rng(seed).permutation(1_000_000)[:num_episodes]
    return [EpisodeRef(source, f"{source}-{int(s):06d}", seed=int(s)) for s in seeds]


def _generated_raw(ref: EpisodeRef, episode) -> RawEpisode:
    """A `ProceduralEpisode` (or subclass) as a source episode: every field known, tracks projected to pixels."""
    from .procedural import project_points

    tracks = np.stack([project_points(world, extrinsics, episode.intrinsics)[0]
                       for world, extrinsics in zip(episode.tracks_world, episode.extrinsics)])
    return RawEpisode(
        episode_id=ref.episode_id,
        frames=episode.frames,
        fps=10.0,
        depth=episode.depth,
        intrinsics=episode.intrinsics,
        extrinsics=episode.extrinsics,
        tracks=tracks.astype(np.float32),
        track_visible=episode.visible,
        cluster_ids=episode.object_ids,
        task=episode.task,
        metadata={"skill": episode.skill, "seed": ref.seed},
    )


# ---------------------------------------------------------------------------------------------- video folder
def video_folder_refs(path: str) -> list[EpisodeRef]:
    """Videos and frame folders under `path`, or the single video `path`; each may have a text file with its
    instruction."""
    stem, extension = os.path.splitext(os.path.basename(path))
    if os.path.isfile(path):
        if extension.lower() not in VIDEO_EXTENSIONS:
            raise ValueError(f"{path!r} is a file but not a video ({', '.join(VIDEO_EXTENSIONS)}): give a video or "
                             "the folder of videos or frame folders.")
        return [EpisodeRef("video_folder", stem, path)]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Video folder {path!r} does not exist.")
    refs = []
    for entry in sorted(os.listdir(path)):
        full = os.path.join(path, entry)
        stem, extension = os.path.splitext(entry)
        if os.path.isfile(full) and extension.lower() in VIDEO_EXTENSIONS:
            refs.append(EpisodeRef("video_folder", stem, full))
        elif os.path.isdir(full) and any(f.lower().endswith(FRAME_EXTENSIONS) for f in os.listdir(full)):
            refs.append(EpisodeRef("video_folder", entry, full))
    if not refs:
        raise FileNotFoundError(f"No videos ({', '.join(VIDEO_EXTENSIONS)}) or frame folders found in {path!r}.")
    return refs


def read_description(location: str) -> str | None:
    """`<video stem>.txt` beside a video, `description.txt` inside a frame folder or its parent folder."""
    candidates = [os.path.splitext(location)[0] + ".txt", os.path.join(location, "description.txt")]
    candidates.append(os.path.join(os.path.dirname(location.rstrip("/")), "description.txt"))
    for candidate in candidates:
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as handle:
                text = handle.read().strip()
            if text:
                return text
    return None


class VideoClip(NamedTuple):
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB, every `keep_every`-th frame of the window
    fps: float  # of the kept frames
    keep_every: int
    num_in_window: int  # frames of the window before subsampling, to check against per-frame labels


def read_video(path: str, target_fps: float | None = None, start: float = -math.inf, end: float = math.inf) -> VideoClip:
    """Decode frames presented in [start, end) seconds, keeping about `target_fps` of them per second.

    Only kept frames are converted to RGB arrays and decoding starts at the keyframe before `start`, so a short
    episode inside a long multi-episode file, or a 1080p video at a lower rate, does not cost a full decode in memory.
    """
    import av

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Video {path!r} does not exist.")
    try:
        container = av.open(path)
    except Exception as error:  # PyAV raises several error types for unreadable files
        raise ValueError(f"Cannot open video {path!r}: {error}") from error
    with container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 30.0)
        keep_every = max(1, round(fps / target_fps)) if target_fps else 1
        if start > 0:
            container.seek(int(start / stream.time_base), stream=stream)  # lands on the keyframe at or before
        frames, count = [], 0
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    raise ValueError("a frame has no timestamp")
                if frame.time < start:
                    continue
                if frame.time >= end:
                    break
                if count % keep_every == 0:
                    frames.append(frame.to_ndarray(format="rgb24"))
                count += 1
        except (av.FFmpegError, ValueError) as error:
            raise ValueError(f"Video {path!r} is corrupt: {error}") from error
    if not frames:
        window = "" if (start, end) == (-math.inf, math.inf) else f" in [{start:.3f}, {end:.3f}) s"
        raise ValueError(f"Video {path!r} has no frames{window}.")
    return VideoClip(np.stack(frames), fps / keep_every, keep_every, count)


def read_frame(path: str) -> np.ndarray:
    """One frame file as (H, W, 3) uint8 RGB; an unreadable file is a ValueError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as error:  # PIL's UnidentifiedImageError and truncated-file errors are OSErrors
        raise ValueError(f"Frame {path!r} is unreadable: {error}") from error


def read_npz(path: str, keys: tuple[str, ...], allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """The arrays `keys` of an `.npz` file (missing optional ones are left out by the caller's choice of `keys`);
    a truncated or corrupt file is a ValueError naming it, not a zipfile error from deep inside numpy."""
    import zipfile
    import zlib

    try:
        with np.load(path, allow_pickle=allow_pickle) as data:
            return {key: data[key] for key in keys if key in data.files}
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise ValueError(f"{path!r} is not a readable .npz file ({type(error).__name__}: {error}).") from error


def load_video_folder(ref: EpisodeRef, target_fps: float | None = None) -> RawEpisode:
    if os.path.isdir(ref.location):
        files = sorted(f for f in os.listdir(ref.location) if f.lower().endswith(FRAME_EXTENSIONS))
        frames = [read_frame(os.path.join(ref.location, f)) for f in files]
        sizes = sorted({frame.shape for frame in frames})
        if len(sizes) > 1:
            raise ValueError(f"Frame folder {ref.location!r} mixes frame sizes {sizes}.")
        frames = np.stack(frames)
        fps = float(target_fps or 10.0)
    else:
        video = read_video(ref.location, target_fps)
        frames, fps = video.frames, video.fps
    return RawEpisode(ref.episode_id, frames, fps, task=read_description(ref.location))


# -------------------------------------------------------------------------------------------------- RGB-D npz
def rgbd_refs(path: str) -> list[EpisodeRef]:
    """One `.npz` per episode with `frames`, `depth`, `intrinsics`, `extrinsics` and optionally `task`, `fps`."""
    files = sorted(glob.glob(os.path.join(path, "*.npz")))
    if not files:
        raise FileNotFoundError(f"No RGB-D episodes (*.npz) found in {path!r}.")
    return [EpisodeRef("rgbd", os.path.splitext(os.path.basename(f))[0], f) for f in files]


def load_rgbd(ref: EpisodeRef) -> RawEpisode:
    data = read_npz(ref.location, ("frames", "depth", "intrinsics", "extrinsics", "fps", "task"))
    missing = {"frames", "depth", "intrinsics", "extrinsics"} - set(data)
    if missing:
        raise ValueError(f"RGB-D episode {ref.location!r} lacks {sorted(missing)}.")
    return RawEpisode(
        ref.episode_id,
        data["frames"],
        float(data["fps"]) if "fps" in data else 10.0,
        depth=data["depth"].astype(np.float32),
        intrinsics=data["intrinsics"].astype(np.float64),
        extrinsics=data["extrinsics"].astype(np.float64),
        task=str(data["task"]) if "task" in data else None,
    )


# ----------------------------------------------------------------------------------- SceneTracker / LSFOdyssey
def scenetracker_refs(path: str) -> list[EpisodeRef]:
    """Folders holding `rgb.mp4`, `deps.npz`, `intris.npz` and `track.npz` (the LSFOdyssey demo layout)."""
    folders = [path] if os.path.isfile(os.path.join(path, "rgb.mp4")) else sorted(
        os.path.dirname(f) for f in glob.glob(os.path.join(path, "*", "rgb.mp4"))
    )
    if not folders:
        raise FileNotFoundError(f"No SceneTracker-style episode (rgb.mp4 + npz files) found in {path!r}.")
    return [EpisodeRef("scenetracker", os.path.basename(os.path.normpath(f)), f) for f in folders]


def load_scenetracker(ref: EpisodeRef) -> RawEpisode:
    video = read_video(os.path.join(ref.location, "rgb.mp4"))
    frames, fps = video.frames, video.fps
    arrays = {}
    for name, keys in (("deps.npz", ("deps",)), ("intris.npz", ("intris", "extris")), ("track.npz", ("track_g",))):
        path = os.path.join(ref.location, name)
        loaded = read_npz(path, keys)
        if len(loaded) < len(keys):
            raise ValueError(f"{path!r} lacks {sorted(set(keys) - set(loaded))}.")
        arrays.update(loaded)
    depth, track = arrays["deps"][:, 0].astype(np.float32), arrays["track_g"]
    cameras = {key: arrays[key] for key in ("intris", "extris")}
    return RawEpisode(
        ref.episode_id,
        frames,
        fps,
        depth=depth,
        intrinsics=cameras["intris"][0, 0].astype(np.float64),
        extrinsics=cameras["extris"][0].astype(np.float64),
        tracks=track[..., :2].astype(np.float32),
        track_visible=(track[..., 3] > 0) & (track[..., 4] > 0),
    )


SOURCES = {
    "procedural": load_procedural,
    "mujoco": load_mujoco,
    "video_folder": load_video_folder,
    "rgbd": load_rgbd,
    "scenetracker": load_scenetracker,
}

__all__ = [
    "EpisodeRef",
    "RawEpisode",
    "SOURCES",
    "read_video",
    "mujoco_refs",
    "procedural_refs",
    "rgbd_refs",
    "scenetracker_refs",
    "video_folder_refs",
]
