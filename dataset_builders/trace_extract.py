"""TraceExtract as a `datasets` builder: videos in, 3D trace records out, publishable to the Hub and streamable.

`datasets` has no loading scripts, so the builder is instantiated directly:

```python
from mu0.dataset_builders import TraceExtract

builder = TraceExtract(config_name="samples", source="procedural", num_episodes=8, cache_dir="data/cache")
builder.download_and_prepare(num_proc=2)
samples = builder.as_dataset(split="train")
samples.push_to_hub("me/my-traces", config_name="samples")
```

Two configurations share the extraction: `episodes` (one row per episode: world tracks, cameras, motion, events,
captions) and `samples` (one self-contained row per (episode, frame t) for streaming training). Each episode is
extracted once into `work_dir/episodes/<id>.npz` (atomic write); a re-run skips finished episodes, and failed or
rejected episodes are logged in `work_dir/failures.jsonl` and counted, never half-written.
"""

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
import zipfile
import zlib
from dataclasses import dataclass, field

import datasets
import numpy as np
from PIL import Image

from .checkpoints import require_checkpoints
from .extraction import EpisodeRejected, ExtractedEpisode, ExtractionSettings, episode_samples, extract_episode
from .robot_sources import ROBOT_SOURCES, egodex_refs, lerobot_refs
from .sources import SOURCES, mujoco_refs, procedural_refs, rgbd_refs, scenetracker_refs, video_folder_refs
from .statistics import TraceStatistics, load_reservoirs, save_reservoirs, save_statistics

logger = logging.getLogger(__name__)

CAPTION_FEATURES = {
    "text": datasets.Value("string"),
    "style": datasets.Value("string"),
    "level": datasets.Value("string"),
    "start": datasets.Value("int32"),
    "end": datasets.Value("int32"),
}


def _float_list(depth: int) -> datasets.List:
    feature = datasets.Value("float32")
    for _ in range(depth):
        feature = datasets.List(feature)
    return feature


def _bool_list(depth: int) -> datasets.List:
    feature = datasets.Value("bool")
    for _ in range(depth):
        feature = datasets.List(feature)
    return feature


EPISODE_FEATURES = datasets.Features(
    {
        "episode_id": datasets.Value("string"),
        "task": datasets.Value("string"),
        "fps": datasets.Value("float32"),
        "frames": datasets.List(datasets.Image()),
        "intrinsics": _float_list(2),
        "extrinsics": _float_list(3),
        "tracks_world": _float_list(3),
        "visible": _bool_list(2),
        "cluster_ids": datasets.List(datasets.Value("int64")),
        "moving": datasets.List(datasets.Value("bool")),
        "events": datasets.List(datasets.List(datasets.Value("int32"))),
        "captions": datasets.List(CAPTION_FEATURES),
        "metadata": datasets.Value("string"),
    }
)

def sample_features(settings: ExtractionSettings) -> datasets.Features:
    """Per-query arrays use fixed-shape Array features (dynamic query count): they decode to numpy without
    walking nested Python lists, which matters for 128-step futures of hundreds of queries."""
    history, future, raw = settings.history, settings.retarget_steps, settings.horizon
    return datasets.Features(
        {
            "episode_id": datasets.Value("string"),
            "frame_index": datasets.Value("int32"),
            "image": datasets.Image(),
            "depth_mm": datasets.Image(),
            "intrinsics": datasets.Array2D((3, 3), "float32"),
            "query_uv": datasets.Array2D((None, 2), "float32"),
            "query_z": datasets.List(datasets.Value("float32")),
            "history": datasets.Array3D((None, history, 3), "float32"),
            "history_valid": datasets.Array2D((None, history), "bool"),
            "future": datasets.Array3D((None, future, 3), "float32"),
            "future_valid": datasets.Array2D((None, future), "bool"),
            "future_raw": datasets.Array3D((None, raw, 3), "float32"),
            "future_raw_valid": datasets.Array2D((None, raw), "bool"),
            "track_ids": datasets.List(datasets.Value("int64")),
            "cluster_ids": datasets.List(datasets.Value("int64")),
            "moving": datasets.List(datasets.Value("bool")),
            "captions": datasets.List(CAPTION_FEATURES),
            "task": datasets.Value("string"),
        }
    )


REF_LISTERS = {
    "procedural": lambda config: procedural_refs(config.num_episodes, config.seed),
    "mujoco": lambda config: mujoco_refs(config.num_episodes, config.seed),
    "video_folder": lambda config: video_folder_refs(config.source_path),
    "rgbd": lambda config: rgbd_refs(config.source_path),
    "scenetracker": lambda config: scenetracker_refs(config.source_path),
    "egodex": lambda config: egodex_refs(config.source_path),
    "lerobot": lambda config: lerobot_refs(config.source_path, config.camera_key, config.episodes),
}
LOADERS = {**SOURCES, **ROBOT_SOURCES}
GENERATED_SOURCES = ("procedural", "mujoco")  # rendered from seeds: no source_path, generation options instead
# what reading one bad source file raises (PIL's UnidentifiedImageError is an OSError, a truncated npz a BadZipFile,
# EOFError or zlib.error): that episode fails and is logged, the build goes on. Extraction itself is not covered:
# an OSError there (a backend checkpoint that cannot be loaded) concerns every episode and stops the build.
UNREADABLE_SOURCE_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)
FAILURES_FILE = "failures.jsonl"
# what each source gives beside frames, for the settings that take it from the source ("given" backends)
SOURCE_GIVES = {
    "procedural": {"depth", "intrinsics", "extrinsics", "tracks"},
    "mujoco": {"depth", "intrinsics", "extrinsics", "tracks"},
    "video_folder": set(),
    "rgbd": {"depth", "intrinsics", "extrinsics"},
    "scenetracker": {"depth", "intrinsics", "extrinsics", "tracks"},
    "egodex": {"world_tracks", "intrinsics", "extrinsics", "tracks"},  # 3D joints, no depth map
    "lerobot": set(),
}


def settings_the_source_lacks(source: str, settings: ExtractionSettings) -> list[str]:
    """Why `settings` cannot work on any episode of `source` (empty if they can): checked once before the first
    episode instead of failing every episode in turn."""
    gives = SOURCE_GIVES[source]
    problems = []
    if settings.depth == "given" and not gives & {"depth", "world_tracks"}:
        problems.append(f"depth='given' but {source} episodes have no depth: use depth='depth_anything'")
    if settings.camera == "given" and "extrinsics" not in gives:
        problems.append(f"camera='given' but {source} episodes have no camera poses: use camera='static' for a fixed "
                        "camera or 'estimated' for a moving one")
    if settings.keypoints == "given" and "tracks" not in gives:
        problems.append(f"keypoints='given' but {source} episodes have no points: use keypoints='grid' (or 'motion')")
    if settings.tracker == "given" and "tracks" not in gives:
        problems.append(f"tracker='given' but {source} episodes have no tracks: use tracker='support_lk'")
    if settings.field_of_view is None and "intrinsics" not in gives:
        problems.append(f"{source} episodes have no intrinsics: set field_of_view (degrees), e.g. 60")
    return problems


LOCK_FILE = ".mu0-extract.lock"


@contextlib.contextmanager
def output_folder_lock(folder: str):
    """Hold `folder` for one writer: a second run into it fails at once, naming the holder, instead of both writing
    the same temp folders. The lock is the kernel's (flock), so a killed holder leaves no stale lock behind."""
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RuntimeError(f"{folder} is being written by {holder}; wait for it to finish or choose another "
                               "output folder.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"mu0 extract (pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')})")
        handle.flush()
        try:
            yield
        except BaseException:
            if created and os.listdir(folder) == [LOCK_FILE]:  # refused before writing anything: leave no folder
                os.remove(path)
                os.rmdir(folder)
            raise
    finally:
        handle.close()  # releases the lock


@dataclass
class TraceExtractConfig(datasets.BuilderConfig):
    """Which source, which backend for each stage, and how to shard the work.

    `source`: procedural | mujoco | video_folder | rgbd | scenetracker | egodex | lerobot; `source_path` for the
    folder sources (`camera_key` picks a LeRobot camera), `num_episodes`/`seed`/`num_frames`/`image_size`/
    `moving_camera` for the generated ones (procedural, mujoco). Stage backends and trace lengths are the fields of
    `ExtractionSettings`. `shard_index`/`num_shards` split the episodes across machines. `episode_ids` keeps only
    those episodes: an executor that filled the work folder (`executors.py`) builds the datasets from what it extracted.
    """

    source: str = "procedural"
    source_path: str | None = None
    num_episodes: int = 8
    seed: int = 0
    num_frames: int = 48
    image_size: int = 128
    moving_camera: bool = False
    target_fps: float | None = None
    camera_key: str | None = None
    episodes: list[int] | None = None  # lerobot: only these episode indices (of a Hub dataset, only their files)
    work_dir: str | None = None
    shard_index: int = 0
    num_shards: int = 1
    episode_ids: list[str] | None = None
    settings: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Called by the builder: `datasets` sets overrides on a copy of the config after construction."""
        if self.source not in LOADERS:
            raise ValueError(f"Unknown source {self.source!r}; choose from {sorted(LOADERS)}.")
        if self.source not in GENERATED_SOURCES and not self.source_path:
            raise ValueError(f"source={self.source!r} needs source_path (the folder to read).")
        if self.episodes is not None and self.source != "lerobot":
            raise ValueError(f"episodes picks LeRobot episode indices; source={self.source!r} has none to pick.")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index must be in [0, {self.num_shards}), got {self.shard_index}.")
        require_checkpoints(self.extraction)  # validates the stage backends, and fails early on missing checkpoints

    @property
    def extraction(self) -> ExtractionSettings:
        return ExtractionSettings(**self.settings)


def _encode_depth_mm(depth: np.ndarray | None) -> Image.Image:
    """Metric depth as a 16-bit PNG in millimetres (0 = invalid): compact, lossless to 1 mm, streamable."""
    if depth is None:
        return Image.fromarray(np.zeros((1, 1), dtype=np.uint16))
    millimetres = np.where(np.isfinite(depth) & (depth > 0), np.clip(depth * 1000.0, 1, 65535), 0)
    return Image.fromarray(millimetres.round().astype(np.uint16))


def decode_depth_mm(image) -> np.ndarray:
    depth = np.asarray(image, dtype=np.float32) / 1000.0
    return np.where(depth > 0, depth, np.nan)


class TraceExtract(datasets.GeneratorBasedBuilder):
    BUILDER_CONFIG_CLASS = TraceExtractConfig
    BUILDER_CONFIGS = [
        TraceExtractConfig(name="episodes", description="one row per episode"),
        TraceExtractConfig(name="samples", description="one row per (episode, frame) for training"),
    ]
    DEFAULT_CONFIG_NAME = "samples"
    DEFAULT_WRITER_BATCH_SIZE = 16

    def _info(self) -> datasets.DatasetInfo:
        self.config.validate()
        features = EPISODE_FEATURES if self.config.name == "episodes" else sample_features(self.config.extraction)
        return datasets.DatasetInfo(description=__doc__, features=features)

    @property
    def work_dir(self) -> str:
        return self.config.work_dir or os.path.join(self._cache_dir_root, "trace_extract_work")

    def _split_generators(self, dl_manager):
        refs = REF_LISTERS[self.config.source](self.config)
        refs = refs[self.config.shard_index :: self.config.num_shards]
        if self.config.episode_ids is not None:
            refs = [ref for ref in refs if ref.episode_id in set(self.config.episode_ids)]
        self._remove_orphaned_temp_files({ref.episode_id for ref in refs})
        self.info.splits = None  # the row count depends on which episodes succeed: a repaired file is no size mismatch
        # the builder's pid travels to the `num_proc` workers so they can stop when it is killed
        gen_kwargs = {"refs": refs, "builder_pid": os.getpid()}
        return [datasets.SplitGenerator(name=datasets.Split.TRAIN, gen_kwargs=gen_kwargs)]

    def _remove_orphaned_temp_files(self, episode_ids: set[str]) -> None:
        """Temp files a killed run left behind, of this shard's episodes only: other machines sharing the work
        folder may be writing theirs right now. Every temp name starts with `<episode_id>.npz.`."""
        for folder in (os.path.join(self.work_dir, "episodes"), os.path.join(self.work_dir, "statistics")):
            for name in os.listdir(folder) if os.path.isdir(folder) else []:
                episode_id, _, rest = name.partition(".npz.")
                if rest.endswith(".tmp") and episode_id in episode_ids:
                    os.remove(os.path.join(folder, name))

    def _load_raw(self, ref):
        if ref.source in GENERATED_SOURCES:
            return SOURCES[ref.source](ref, self.config.num_frames, self.config.image_size, self.config.moving_camera)
        if ref.source in ("video_folder", "egodex"):
            return LOADERS[ref.source](ref, target_fps=self.config.target_fps)
        return LOADERS[ref.source](ref)

    def extracted_episode(self, ref) -> ExtractedEpisode | None:
        """The cached extraction of `ref`, computing and saving it first if needed; None if it failed."""
        episode = self.cached_episode(ref)
        if episode is not None:
            return episode
        try:
            raw = self._load_raw(ref)
        except UNREADABLE_SOURCE_ERRORS as error:
            reason = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
            return self._record_failure(ref.episode_id, "failed", reason)
        try:
            episode = extract_episode(raw, self.config.extraction)
        except (ValueError, EpisodeRejected) as error:
            kind = "rejected" if isinstance(error, EpisodeRejected) else "failed"
            return self._record_failure(ref.episode_id, kind, str(error))
        return self.commit_episode(episode)

    def _episode_path(self, episode_id: str) -> str:
        return os.path.join(self.work_dir, "episodes", f"{episode_id}.npz")

    def cached_episode(self, ref) -> ExtractedEpisode | None:
        """The extraction of `ref` a previous run committed, or None.

        An episode is committed by two atomic writes, its cache then its statistics; a kill between them is
        repaired here (the statistics are recomputed from the cache), so no re-run silently drops an episode."""
        path = self._episode_path(ref.episode_id)
        if not os.path.exists(path):
            return None
        episode = ExtractedEpisode.load(path)
        if not os.path.exists(self._statistics_path(ref.episode_id)):
            self._save_partial_statistics(episode)
        return episode

    def commit_episode(self, episode: ExtractedEpisode) -> ExtractedEpisode:
        """Save a freshly extracted episode and its statistics, and clear a failure an earlier run logged for it."""
        episode.save(self._episode_path(episode.episode_id))
        self._save_partial_statistics(episode)
        self._update_failures(episode.episode_id, None)
        return episode

    def _record_failure(self, episode_id: str, kind: str, reason: str) -> None:
        logger.warning("Episode %s %s: %s", episode_id, kind, reason)
        self._update_failures(episode_id, {"episode_id": episode_id, "kind": kind, "reason": reason})

    def _update_failures(self, episode_id: str, record: dict | None) -> None:
        """Replace `episode_id`'s line in failures.jsonl by `record` (None: drop it, the episode now succeeds), so
        the file lists each failing episode once however often the build re-runs. Rewritten atomically under a
        lock on the work folder: `num_proc` workers and shards on other machines update it concurrently."""
        path = os.path.join(self.work_dir, FAILURES_FILE)
        if record is None and not os.path.exists(path):
            return
        os.makedirs(self.work_dir, exist_ok=True)
        lock = os.open(self.work_dir, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            lines = []
            if os.path.exists(path):
                with open(path) as handle:
                    lines = [line for line in handle if line.strip() and json.loads(line)["episode_id"] != episode_id]
            if record is not None:
                lines.append(json.dumps(record) + "\n")
            with open(path + ".tmp", "w") as handle:
                handle.writelines(lines)
            os.replace(path + ".tmp", path)
        finally:
            os.close(lock)  # releases the lock

    def _statistics_path(self, episode_id: str) -> str:
        return os.path.join(self.work_dir, "statistics", f"{episode_id}.npz")

    def _save_partial_statistics(self, episode: ExtractedEpisode) -> None:
        """Per-episode statistic reservoirs, computed while the frames are in memory (no second decode)."""
        statistics = TraceStatistics(reservoir_size=20_000)
        horizon = self.config.extraction.horizon
        for sample in episode_samples(episode, self.config.extraction):
            statistics.add(sample["query_uv"], sample["query_z"], sample["future"][:, :horizon],
                           sample["future_valid"][:, :horizon], episode.image_size, sample["depth"], sample["image"])
        save_reservoirs(statistics, self._statistics_path(episode.episode_id))

    def compute_statistics(self, episode_ids: list[str] | None = None) -> dict:
        """Aggregate the per-episode reservoirs (of `episode_ids`, default all: pass the training episodes to keep
        held-out ones out) into processor statistics and save them beside the dataset."""
        folder = os.path.join(self.work_dir, "statistics")
        files = sorted(name for name in os.listdir(folder) if name.endswith(".npz")) if os.path.isdir(folder) else []
        if episode_ids is not None:
            files = [name for name in files if name.removesuffix(".npz") in set(episode_ids)]
        if not files:
            raise FileNotFoundError(f"No per-episode statistics in {folder}: run download_and_prepare() first.")
        statistics = TraceStatistics()
        for name in files:
            load_reservoirs(statistics, os.path.join(folder, name))
        result = statistics.compute()
        save_statistics(result, self.work_dir)
        return result

    def _generate_examples(self, refs, builder_pid: int):
        from datasets.utils.tqdm import tqdm  # hidden by datasets.disable_progress_bars(), like datasets' own bars

        for ref in tqdm(refs, desc=f"TraceExtract {self.config.name}", unit="episode"):
            if os.getpid() != builder_pid and os.getppid() != builder_pid:
                logger.error("The TraceExtract build (pid %d) was killed: this worker stops too.", builder_pid)
                os._exit(1)
            episode = self.extracted_episode(ref)
            if episode is None:
                continue
            if self.config.name == "episodes":
                yield ref.episode_id, self._episode_row(episode)
                continue
            for sample in episode_samples(episode, self.config.extraction):
                key = f"{ref.episode_id}/{sample['frame_index']:06d}"
                yield key, self._sample_row(sample)

    @staticmethod
    def _episode_row(episode: ExtractedEpisode) -> dict:
        return {
            "episode_id": episode.episode_id,
            "task": episode.task or "",
            "fps": episode.fps,
            "frames": [Image.fromarray(frame) for frame in episode.frames],
            "intrinsics": episode.intrinsics,
            "extrinsics": episode.extrinsics,
            "tracks_world": np.nan_to_num(episode.world),
            "visible": episode.visible,
            "cluster_ids": episode.cluster_ids,
            "moving": episode.moving,
            "events": [list(event) for event in episode.events],
            "captions": episode.captions,
            "metadata": json.dumps(episode.metadata),
        }

    @staticmethod
    def _sample_row(sample: dict) -> dict:
        row = {key: value for key, value in sample.items() if key != "depth"}
        row["depth_mm"] = _encode_depth_mm(sample["depth"])
        return row


def decode_sample(row: dict) -> dict:
    """A `samples` row (as `datasets` returns it) to numpy arrays ready for `Mu0Processor`."""
    image = np.asarray(row["image"].convert("RGB")) if isinstance(row["image"], Image.Image) else np.asarray(row["image"])
    depth = decode_depth_mm(row["depth_mm"])
    decoded = {key: np.asarray(row[key]) for key in ("query_uv", "query_z", "history", "history_valid", "future",
                                                     "future_valid", "future_raw", "future_raw_valid", "track_ids", "cluster_ids",
                                                     "moving", "intrinsics")}
    decoded.update(image=image, depth=depth if depth.shape == image.shape[:2] else None,
                   captions=row["captions"], task=row["task"], episode_id=row["episode_id"], frame_index=row["frame_index"])
    return decoded


__all__ = ["TraceExtract", "TraceExtractConfig", "decode_sample", "decode_depth_mm", "output_folder_lock",
           "settings_the_source_lacks"]

