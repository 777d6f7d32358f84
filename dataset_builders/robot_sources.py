"""Episode sources from robot and human-demonstration datasets: EgoDex and the LeRobotDataset v3 layout.

They follow `sources.py`: a `*_refs(path)` lister returns light, picklable `EpisodeRef`s and a `load_*(ref)` loader
returns one `RawEpisode`. Both formats are read with plain libraries (h5py, pyarrow, PyAV), so extraction does not
depend on the datasets' own toolkits. Pixels follow OpenCV: pixel centres at integer coordinates.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from .sources import EpisodeRef, RawEpisode, read_video

# ---------------------------------------------------------------------------------------------------- EgoDex
# Key names of Apple's EgoDex release; edit these if a release names them differently (errors list what is present).
EGODEX_INTRINSICS_KEY = "camera/intrinsic"  # (3, 3) pixels
EGODEX_CAMERA_KEY = "transforms/camera"  # (T, 4, 4) camera -> world
EGODEX_TRANSFORMS_GROUP = "transforms"  # <group>/<joint>: (T, 4, 4) joint -> world
EGODEX_CONFIDENCES_GROUP = "confidences"  # <group>/<joint>: (T,) tracking confidence, optional
# Task text, first non-empty wins; `which_llm_description == 2` promotes `llm_description2` (reversible tasks).
EGODEX_TASK_ATTRIBUTES = ("llm_description", "llm_description2", "description")
# Wrists and fingertips: the points that carry the manipulation.
EGODEX_JOINTS = tuple(
    f"{side}{part}"
    for side in ("left", "right")
    for part in ("Hand", "ThumbTip", "IndexFingerTip", "MiddleFingerTip", "RingFingerTip", "LittleFingerTip")
)
EGODEX_MIN_CONFIDENCE = 0.5


def egodex_refs(path: str) -> list[EpisodeRef]:
    """Every `<name>.hdf5` under `path` (a release part, a task folder, or above); each pairs with `<name>.mp4`.

    Episode ids are the path from `path`'s own folder name down, joined by "-" (e.g. "part1-stack_cups-0"), because
    EgoDex numbers episodes per task folder. A missing video is reported when that episode loads, not here, so one
    bad pair does not stop the listing of a whole release.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"EgoDex folder {path!r} does not exist.")
    base = os.path.dirname(os.path.normpath(path))
    refs = []
    for folder, subfolders, files in os.walk(path):
        subfolders.sort()
        for name in sorted(files):
            if name.endswith(".hdf5"):
                location = os.path.join(folder, name)
                episode_id = os.path.splitext(os.path.relpath(location, base))[0].replace(os.sep, "-")
                refs.append(EpisodeRef("egodex", episode_id, location))
    if not refs:
        raise FileNotFoundError(f"No EgoDex episodes (*.hdf5 beside *.mp4) found under {path!r}.")
    return refs


def _require_h5py():
    try:
        import h5py
    except ImportError as error:
        raise ImportError("Reading EgoDex needs h5py: pip install h5py (or pip install 'mu0[extract]').") from error
    return h5py


def _hdf5_node(handle: Any, key: str, path: str) -> Any:
    """`handle[key]`, or an error naming the missing part of `key` and the keys present where it was expected."""
    node, walked = handle, ""
    for part in key.strip("/").split("/"):
        if not hasattr(node, "keys") or part not in node:
            present = sorted(node.keys()) if hasattr(node, "keys") else []
            raise ValueError(
                f"EgoDex file {path!r} has no {key!r}: {part!r} is missing under {walked or '/'!r}, which holds "
                f"{present}. If this release names it differently, set the EGODEX_* constants in robot_sources."
            )
        node, walked = node[part], f"{walked}/{part}"
    return node


def _hdf5_array(handle: Any, key: str, path: str, shape: tuple[int | None, ...]) -> np.ndarray:
    """Read `key` as float64 and check its shape (None matches any length)."""
    array = np.asarray(_hdf5_node(handle, key, path)[()], dtype=np.float64)
    if array.ndim != len(shape) or any(want is not None and got != want for got, want in zip(array.shape, shape)):
        expected = tuple("T" if want is None else want for want in shape)
        raise ValueError(f"EgoDex file {path!r}: {key!r} has shape {array.shape}, expected {expected}.")
    return array


def _text(value: Any) -> str:
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    return (value.decode("utf-8") if isinstance(value, bytes) else str(value)).strip()


def _egodex_task(attributes: Any, hdf5_path: str) -> tuple[str, str]:
    """(task text, where it came from): the LLM description EgoDex selects, else the task folder's name."""
    keys = list(EGODEX_TASK_ATTRIBUTES)
    if "which_llm_description" in attributes and _text(attributes["which_llm_description"]) == "2":
        keys.sort(key=lambda key: key != "llm_description2")
    for key in keys:
        if key in attributes:
            text = _text(attributes[key])
            if text and text.lower() != "none":
                return text, key
    return os.path.basename(os.path.dirname(os.path.abspath(hdf5_path))).replace("_", " "), "folder"


def _hand_cluster(joint: str) -> int:
    if joint.startswith("left"):
        return 0
    if joint.startswith("right"):
        return 1
    raise ValueError(f"EgoDex joint {joint!r} belongs to neither hand; use joints named left* or right*.")


def load_egodex(
    ref: EpisodeRef,
    joints: tuple[str, ...] = EGODEX_JOINTS,
    target_fps: float | None = None,
    min_confidence: float = EGODEX_MIN_CONFIDENCE,
) -> RawEpisode:
    """Video, camera and hand-joint tracks of one EgoDex episode; EgoDex has no depth, so depth stays None, but the
    metric world joint positions come along as `tracks_world`, so extraction needs no depth map (depth='given').

    Tracks are the world joint positions projected through each frame's camera with a pinhole model, as EgoDex's
    own 2D visualisation does (the camera frame is used as is: +z in front). A joint is visible when it is in front
    of the camera, inside the image and, where the file has a confidence for it, more confident than
    `min_confidence`. Joints behind the camera get NaN pixels. `cluster_ids` are 0 for left-hand joints and 1 for
    right-hand joints. `target_fps` subsamples frames and poses alike.
    """
    h5py = _require_h5py()
    hdf5_path = ref.location
    video_path = os.path.splitext(hdf5_path)[0] + ".mp4"
    if not os.path.isfile(video_path):
        raise FileNotFoundError(f"EgoDex episode {hdf5_path!r} has no video beside it ({video_path!r} is missing).")
    if not joints:
        raise ValueError("load_egodex needs at least one joint.")
    cluster_ids = np.array([_hand_cluster(joint) for joint in joints], dtype=np.int64)

    with h5py.File(hdf5_path, "r") as handle:
        intrinsics = _hdf5_array(handle, EGODEX_INTRINSICS_KEY, hdf5_path, (3, 3))
        camera_to_world = _hdf5_array(handle, EGODEX_CAMERA_KEY, hdf5_path, (None, 4, 4))
        num_poses = len(camera_to_world)
        joint_keys = [f"{EGODEX_TRANSFORMS_GROUP}/{joint}" for joint in joints]
        joint_poses = np.stack([_hdf5_array(handle, key, hdf5_path, (num_poses, 4, 4)) for key in joint_keys], axis=1)
        confidences = np.ones((num_poses, len(joints)))
        for index, joint in enumerate(joints):
            key = f"{EGODEX_CONFIDENCES_GROUP}/{joint}"
            if key in handle:
                confidences[:, index] = _hdf5_array(handle, key, hdf5_path, (num_poses,))
        task, task_source = _egodex_task(handle.attrs, hdf5_path)

    video = read_video(video_path, target_fps)
    if video.num_in_window != num_poses:
        raise ValueError(
            f"EgoDex episode {hdf5_path!r}: the video has {video.num_in_window} frames but "
            f"{EGODEX_CAMERA_KEY!r} has {num_poses} poses; they must correspond one to one."
        )
    keep = slice(None, None, video.keep_every)
    extrinsics = np.linalg.inv(camera_to_world[keep])  # world -> camera
    points = joint_poses[keep, :, :3, 3]  # (T, J, 3) world
    points_camera = np.einsum("tij,tnj->tni", extrinsics[:, :3, :3], points) + extrinsics[:, None, :3, 3]
    depth = points_camera[..., 2]
    in_front = depth > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        normalized = points_camera[..., :2] / depth[..., None]
    tracks = np.where(in_front[..., None], normalized @ intrinsics[:2, :2].T + intrinsics[:2, 2], np.nan)
    height, width = video.frames.shape[1:3]
    with np.errstate(invalid="ignore"):
        inside = (tracks >= -0.5).all(-1) & (tracks[..., 0] < width - 0.5) & (tracks[..., 1] < height - 0.5)
    visible = in_front & inside & (confidences[keep] > min_confidence)
    return RawEpisode(
        episode_id=ref.episode_id,
        frames=video.frames,
        fps=video.fps,
        intrinsics=intrinsics,
        extrinsics=extrinsics,
        tracks=tracks.astype(np.float32),
        track_visible=visible,
        cluster_ids=cluster_ids,
        task=task,
        tracks_world=points.astype(np.float32),
        metadata={"joint_names": list(joints), "task_source": task_source, "hdf5": hdf5_path, "video": video_path},
    )


# ------------------------------------------------------------------ LeRobot layouts v3.0 and v2.1, local or on the Hub
LEROBOT_INFO_PATH = "meta/info.json"
LEROBOT_TASKS_PATH = "meta/tasks.parquet"  # v3: task text as the index, task_index
LEROBOT_EPISODES_DIR = "meta/episodes"  # v3: chunked parquet files, one row per episode
LEROBOT_V2_TASKS_PATH = "meta/tasks.jsonl"  # v2.1: {"task_index", "task"} per line
LEROBOT_V2_EPISODES_PATH = "meta/episodes.jsonl"  # v2.1: {"episode_index", "tasks", "length"} per line
LEROBOT_STATE_KEY = "observation.state"
LEROBOT_ACTION_KEY = "action"
_CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
LEROBOT_FILE_PATHS = {  # info.json's path templates of each layout
    "v3.0": {"data_path": "data/" + _CHUNK_FILE + ".parquet", "video_path": "videos/{video_key}/" + _CHUNK_FILE + ".mp4"},
    "v2.1": {"data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
             "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"},
}
_DEFAULT_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}


@dataclass(frozen=True)
class LeRobotSource:
    """Where a LeRobot dataset's files are: a local folder, or a Hub dataset repo at one commit whose files are
    fetched one by one, when first read, into the Hugging Face cache (`root` is that commit's snapshot folder)."""

    root: str
    name: str  # the dataset's name in episode ids
    repo_id: str | None = None
    revision: str | None = None  # the commit, so that every worker reads the files the refs were listed from

    @property
    def location(self) -> str:
        """What a ref stores to reopen this source in another process or on another node."""
        return self.root if self.repo_id is None else f"{self.repo_id}@{self.revision}"

    def path(self, relative: str) -> str:
        """The local path of one of the dataset's files, downloaded first when the dataset is on the Hub."""
        if self.repo_id is None:
            return os.path.join(self.root, relative)
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return hf_hub_download(self.repo_id, relative, repo_type="dataset", revision=self.revision)
        except EntryNotFoundError:
            return os.path.join(self.root, relative)  # reported as a missing file by the caller, as for a folder


def _looks_like_a_path(location: str) -> bool:
    """Hub ids are `name` or `namespace/name`: anything absolute, relative to `.`/`~`, or deeper is meant as a folder."""
    return location.startswith((".", "/", "~")) or location.count("/") > 1 or (os.sep != "/" and os.sep in location)


def open_lerobot(location: str) -> LeRobotSource:
    """A local LeRobot folder, or a Hub dataset `REPO_ID` (or `REPO_ID@REVISION`) of which only `meta/` is fetched
    here; a loader then fetches the data and video files of its own episode and camera."""
    if os.path.isdir(location) or _looks_like_a_path(location):
        return LeRobotSource(location, os.path.basename(os.path.normpath(location)))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    repo_id, _, revision = location.partition("@")
    try:
        snapshot = snapshot_download(repo_id, repo_type="dataset", revision=revision or None, allow_patterns=["meta/**"])
    except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError) as error:
        raise FileNotFoundError(f"LeRobot dataset {location!r} is no local folder, and the Hub dataset could not be "
                                f"read: {error}") from error
    # the snapshot folder is named after the commit it holds
    return LeRobotSource(snapshot, repo_id.rsplit("/", 1)[-1], repo_id, os.path.basename(snapshot))


def _lerobot_info(source: LeRobotSource) -> dict:
    path = source.path(LEROBOT_INFO_PATH)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{source.location!r} is not a LeRobot dataset: {path!r} is missing.")
    with open(path, encoding="utf-8") as handle:
        info = json.load(handle)
    missing = [key for key in ("fps", "features", "data_path", "video_path", "codebase_version") if key not in info]
    if missing:
        raise ValueError(f"LeRobot info {path!r} lacks {missing}.")
    if not str(info["codebase_version"]).startswith(("v3", "v2.1")):
        raise ValueError(
            f"LeRobot dataset {source.location!r} is {info['codebase_version']}; the v3 layout (multi-episode files) "
            "and the v2.1 layout (one file per episode) are read here. Convert older ones with lerobot's scripts."
        )
    if _is_v2(info) and "chunks_size" not in info:
        raise ValueError(f"LeRobot info {path!r} lacks 'chunks_size', which v2.1 file paths need.")
    return info


def _is_v2(info: dict) -> bool:
    return str(info["codebase_version"]).startswith("v2")


def _video_keys(info: dict) -> list[str]:
    return [key for key, feature in info["features"].items() if feature.get("dtype") == "video"]


def _check_camera(info: dict, camera_key: str, source: LeRobotSource) -> str:
    keys = _video_keys(info)
    if camera_key not in keys:
        raise ValueError(f"LeRobot dataset {source.location!r} has no video feature {camera_key!r}; its cameras are {keys}.")
    return camera_key


def _lerobot_episode_id(source: LeRobotSource, camera_key: str, episode_index: int) -> str:
    return f"{source.name}-{camera_key}-{episode_index:06d}"


def _episode_files(source: LeRobotSource) -> list[str]:
    """v3 episode metadata files (fetched with the rest of `meta/` for a Hub dataset)."""
    folder = os.path.join(source.root, LEROBOT_EPISODES_DIR)
    files = sorted(
        os.path.join(folder, chunk, name)
        for chunk in (sorted(os.listdir(folder)) if os.path.isdir(folder) else [])
        if os.path.isdir(os.path.join(folder, chunk))
        for name in os.listdir(os.path.join(folder, chunk))
        if name.endswith(".parquet")
    )
    if not files:
        raise FileNotFoundError(
            f"LeRobot dataset {source.location!r} has no episode metadata ({folder}/chunk-*/file-*.parquet).")
    return files


def _json_lines(source: LeRobotSource, relative: str) -> list[dict]:
    path = source.path(relative)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LeRobot dataset {source.location!r} has no {relative} ({path!r} is missing).")
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _episode_indices(source: LeRobotSource, info: dict) -> list[int]:
    import pyarrow.parquet as pq

    if _is_v2(info):
        return sorted(int(row["episode_index"]) for row in _json_lines(source, LEROBOT_V2_EPISODES_PATH))
    return sorted(
        index
        for path in _episode_files(source)
        for index in pq.read_table(path, columns=["episode_index"]).column("episode_index").to_pylist()
    )


def lerobot_refs(location: str, camera_key: str | None = None, episodes: list[int] | None = None) -> list[EpisodeRef]:
    """One ref per episode (or per episode index in `episodes`), seen through `camera_key` (default: the first video
    feature in `meta/info.json`). `location` is a local folder or a Hub dataset repo id (`REPO_ID[@REVISION]`): of
    a Hub dataset only `meta/` is fetched here, and each `load_lerobot` fetches its episode's data and video files.

    A ref's `seed` carries the episode index (refs have no other integer field, and these episodes need no seed);
    its id names the camera, which is how `load_lerobot(ref)` knows which one to decode.
    """
    source = open_lerobot(location)
    info = _lerobot_info(source)
    keys = _video_keys(info)
    if not keys:
        raise ValueError(f"LeRobot dataset {location!r} has no video features, so it has no frames to extract from.")
    camera_key = _check_camera(info, camera_key, source) if camera_key is not None else keys[0]
    indices = _episode_indices(source, info)
    if episodes is not None:
        missing = sorted(set(episodes) - set(indices))
        if missing:
            raise ValueError(f"LeRobot dataset {location!r} has no episodes {missing}; it has {len(indices)} episodes, "
                             f"indices {indices[0]} to {indices[-1]}.")
        indices = sorted(set(episodes))
    return [EpisodeRef("lerobot", _lerobot_episode_id(source, camera_key, i), source.location, int(i)) for i in indices]


def _episode_row(source: LeRobotSource, episode_index: int, columns: list[str]) -> dict:
    import pyarrow.parquet as pq

    for path in _episode_files(source):
        present = pq.read_schema(path).names
        missing = [column for column in columns if column not in present]
        if missing:
            raise ValueError(f"LeRobot episode metadata {path!r} lacks columns {missing}.")
        table = pq.read_table(path, columns=columns, filters=[("episode_index", "=", episode_index)])
        if table.num_rows:
            return {column: table.column(column)[0].as_py() for column in columns}
    raise ValueError(f"LeRobot dataset {source.location!r} has no episode {episode_index} in {LEROBOT_EPISODES_DIR}.")


@dataclass
class _EpisodeFiles:
    """Where one episode's rows and one camera's frames are: its files, and its span of a multi-episode video."""

    data: str
    video: str
    length: int
    start: float = float("-inf")
    end: float = float("inf")


def _episode_locations(source: LeRobotSource, info: dict, episode_index: int, camera_key: str) -> _EpisodeFiles:
    """The relative paths of an episode's files: v3 from its row in `meta/episodes` (files shared by several
    episodes, cut by timestamps), v2.1 from the path templates (one file per episode, chunked by index)."""
    if _is_v2(info):
        rows = [row for row in _json_lines(source, LEROBOT_V2_EPISODES_PATH) if row["episode_index"] == episode_index]
        if not rows:
            raise ValueError(f"LeRobot dataset {source.location!r} has no episode {episode_index} in "
                             f"{LEROBOT_V2_EPISODES_PATH}.")
        place = {"episode_chunk": episode_index // info["chunks_size"], "episode_index": episode_index}
        return _EpisodeFiles(info["data_path"].format(**place), info["video_path"].format(video_key=camera_key, **place),
                             int(rows[0]["length"]))
    video = f"videos/{camera_key}/"
    row = _episode_row(
        source,
        episode_index,
        ["length", "data/chunk_index", "data/file_index"]
        + [video + name for name in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")],
    )
    half_frame = 0.5 / float(info["fps"])  # frame k of the episode sits at from_timestamp + k / fps, up to rounding
    return _EpisodeFiles(
        info["data_path"].format(chunk_index=row["data/chunk_index"], file_index=row["data/file_index"]),
        info["video_path"].format(video_key=camera_key, chunk_index=row[video + "chunk_index"],
                                  file_index=row[video + "file_index"]),
        row["length"],
        row[video + "from_timestamp"] - half_frame,
        row[video + "to_timestamp"] - half_frame,
    )


def _task_names(source: LeRobotSource, info: dict) -> dict[int, str]:
    """task_index -> task text; v3 stores the text as the index of the tasks table (named "task")."""
    if _is_v2(info):
        return {int(row["task_index"]): str(row["task"]) for row in _json_lines(source, LEROBOT_V2_TASKS_PATH)}
    import pandas as pd

    path = source.path(LEROBOT_TASKS_PATH)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LeRobot dataset {source.location!r} has no task table ({path!r} is missing).")
    table = pd.read_parquet(path)
    texts = table["task"] if "task" in table.columns else table.index
    return {int(index): str(text) for index, text in zip(table["task_index"], texts)}


def _vectors(column: Any) -> np.ndarray:
    """A list (or fixed-size list) parquet column -> (rows, dim) array."""
    column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)


def load_lerobot(ref: EpisodeRef, camera_key: str | None = None) -> RawEpisode:
    """Frames of one camera for one episode: cut from a multi-episode mp4 by its [from, to) timestamps (v3), or its
    own mp4 (v2.1). For a Hub dataset only this episode's data file and this camera's video file are fetched.

    `camera_key` defaults to the camera the ref was listed with. `metadata` holds the per-frame `states`
    (observation.state) and `actions` as lists, when the dataset has them, for action-expert training.
    """
    import pyarrow.parquet as pq

    source, episode_index = open_lerobot(ref.location), ref.seed
    info = _lerobot_info(source)
    if camera_key is None:
        matches = [key for key in _video_keys(info) if _lerobot_episode_id(source, key, episode_index) == ref.episode_id]
        if not matches:
            raise ValueError(f"Ref {ref.episode_id!r} was not made by lerobot_refs({ref.location!r}); pass camera_key.")
        camera_key = matches[0]
    _check_camera(info, camera_key, source)
    files = _episode_locations(source, info, episode_index, camera_key)

    data_path = source.path(files.data)
    if not os.path.isfile(data_path):
        raise FileNotFoundError(f"LeRobot episode {episode_index}: data file {data_path!r} is missing.")
    present = pq.read_schema(data_path).names
    missing = [column for column in ("episode_index", "frame_index", "task_index") if column not in present]
    if missing:
        raise ValueError(f"LeRobot data file {data_path!r} lacks columns {missing}.")
    vector_columns = [key for key in (LEROBOT_STATE_KEY, LEROBOT_ACTION_KEY) if key in present]
    table = pq.read_table(
        data_path,
        columns=["frame_index", "task_index", *vector_columns],
        filters=[("episode_index", "=", episode_index)],
    ).sort_by("frame_index")
    if table.num_rows != files.length:
        raise ValueError(
            f"LeRobot episode {episode_index}: {data_path!r} holds {table.num_rows} rows but the episode "
            f"metadata says {files.length}."
        )

    video_path = source.path(files.video)
    frames = read_video(video_path, start=files.start, end=files.end).frames
    if len(frames) != files.length:
        raise ValueError(
            f"LeRobot episode {episode_index}: {video_path!r} has {len(frames)} frames in "
            f"[{files.start:g}, {files.end:g}) s but the episode has {files.length}."
        )

    names = _task_names(source, info)
    task_indices = list(dict.fromkeys(table.column("task_index").to_pylist()))
    unknown = [index for index in task_indices if index not in names]
    if unknown:
        raise ValueError(f"LeRobot episode {episode_index}: task indices {unknown} are not in the dataset's task table.")
    metadata: dict[str, Any] = {"episode_index": episode_index, "camera_key": camera_key}
    for key, name in ((LEROBOT_STATE_KEY, "states"), (LEROBOT_ACTION_KEY, "actions")):
        if key in vector_columns:
            metadata[name] = _vectors(table.column(key)).tolist()
    return RawEpisode(
        episode_id=ref.episode_id,
        frames=frames,
        fps=float(info["fps"]),
        task="; ".join(names[index] for index in task_indices),
        metadata=metadata,
    )


def _encode_video(path: str, frames: list[np.ndarray], fps: float) -> None:
    """H.264 (yuv420p) mp4 whose frame k is presented at k / fps, so episodes can be cut by timestamps."""
    import av

    rate = Fraction(fps).limit_denominator(1001)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.height, stream.width = frames[0].shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        stream.codec_context.time_base = 1 / rate
        pts = 0
        for episode_frames in frames:
            for image in episode_frames:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                frame.pts = pts
                pts += 1
                container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _episode_arrays(index: int, episode: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    missing = [key for key in ("frames", "states", "actions", "task") if key not in episode]
    if missing:
        raise ValueError(f"Episode {index} to write lacks {missing}; each needs frames, states, actions and task.")
    frames = np.asarray(episode["frames"])
    states = np.asarray(episode["states"], dtype=np.float32)
    actions = np.asarray(episode["actions"], dtype=np.float32)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(
            f"Episode {index}: frames must be non-empty (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}."
        )
    if states.ndim != 2 or actions.ndim != 2 or len(states) != len(frames) or len(actions) != len(frames):
        raise ValueError(
            f"Episode {index}: states and actions must be (T={len(frames)}, D) arrays, got {states.shape} and "
            f"{actions.shape}."
        )
    return frames, states, actions, str(episode["task"])


def write_lerobot_episodes(
    root: str,
    episodes: list[dict],
    fps: float,
    camera_key: str = "observation.images.main",
    episodes_per_file: int = 100,
    chunks_size: int = 1000,
    codebase_version: str = "v3.0",
) -> None:
    """Write episodes (dicts of `frames` (T, H, W, 3) uint8, `states` (T, S), `actions` (T, A), `task` str) as a
    LeRobotDataset folder that `lerobot_refs`/`load_lerobot` (and lerobot itself, for v3.0) read.

    v3.0: every `episodes_per_file` episodes share one data parquet and one mp4; files roll over to a new chunk
    folder after `chunks_size` files. v2.1: one parquet and one mp4 per episode, `chunks_size` episodes per chunk
    folder, and the episode and task tables as JSON lines (no per-episode statistics: lerobot's own loader wants
    those). The dataset is built in a temporary sibling folder and renamed into place, so a crash never leaves a
    half-written dataset at `root`; an existing `root` is refused.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = os.path.abspath(root)
    if os.path.exists(root):
        raise FileExistsError(f"{root!r} already exists; write LeRobot datasets to a new folder.")
    if not episodes:
        raise ValueError("write_lerobot_episodes needs at least one episode.")
    if episodes_per_file < 1 or chunks_size < 1:
        raise ValueError(f"episodes_per_file and chunks_size must be >= 1, got {episodes_per_file}, {chunks_size}.")
    if codebase_version not in LEROBOT_FILE_PATHS:
        raise ValueError(f"codebase_version must be one of {list(LEROBOT_FILE_PATHS)}, got {codebase_version!r}.")
    per_episode = codebase_version == "v2.1"
    paths = LEROBOT_FILE_PATHS[codebase_version]
    episodes_per_file = 1 if per_episode else episodes_per_file
    arrays = [_episode_arrays(index, episode) for index, episode in enumerate(episodes)]
    shapes = {(frames.shape[1:], states.shape[1], actions.shape[1]) for frames, states, actions, _ in arrays}
    if len(shapes) > 1:
        raise ValueError(f"All episodes must share image size and state/action sizes, got {sorted(shapes)}.")
    (height, width, _), state_size, action_size = shapes.pop()
    if height % 2 or width % 2:
        raise ValueError(f"H.264 (yuv420p) needs an even image size, got {height}x{width}.")
    task_index = {task: index for index, task in enumerate(dict.fromkeys(task for *_, task in arrays))}

    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.", dir=parent)
    try:
        episode_rows, global_index = [], 0
        for file_number, first in enumerate(range(0, len(arrays), episodes_per_file)):
            group = arrays[first : first + episodes_per_file]
            chunk_index, file_index = divmod(file_number, chunks_size)
            place = dict(chunk_index=chunk_index, file_index=file_index, episode_chunk=chunk_index, episode_index=first,
                         video_key=camera_key)
            columns: dict[str, list] = {key: [] for key in (*_DEFAULT_FEATURES, LEROBOT_STATE_KEY, LEROBOT_ACTION_KEY)}
            file_frames = 0
            for offset, (frames, states, actions, task) in enumerate(group):
                length = len(frames)
                columns["timestamp"].extend(np.arange(length) / fps)
                columns["frame_index"].extend(range(length))
                columns["episode_index"].extend([first + offset] * length)
                columns["index"].extend(range(global_index, global_index + length))
                columns["task_index"].extend([task_index[task]] * length)
                columns[LEROBOT_STATE_KEY].extend(states)
                columns[LEROBOT_ACTION_KEY].extend(actions)
                episode_rows.append(
                    {
                        "episode_index": first + offset,
                        "tasks": [task],
                        "length": length,
                        "data/chunk_index": chunk_index,
                        "data/file_index": file_index,
                        "dataset_from_index": global_index,
                        "dataset_to_index": global_index + length,
                        f"videos/{camera_key}/chunk_index": chunk_index,
                        f"videos/{camera_key}/file_index": file_index,
                        f"videos/{camera_key}/from_timestamp": file_frames / fps,
                        f"videos/{camera_key}/to_timestamp": (file_frames + length) / fps,
                        "meta/episodes/chunk_index": 0,
                        "meta/episodes/file_index": 0,
                    }
                )
                global_index += length
                file_frames += length
            table = pa.table(
                {
                    "timestamp": pa.array(columns["timestamp"], pa.float32()),
                    **{key: pa.array(columns[key], pa.int64()) for key in _DEFAULT_FEATURES if key != "timestamp"},
                    LEROBOT_STATE_KEY: _fixed_size_lists(columns[LEROBOT_STATE_KEY], state_size),
                    LEROBOT_ACTION_KEY: _fixed_size_lists(columns[LEROBOT_ACTION_KEY], action_size),
                }
            )
            data_path = os.path.join(staging, paths["data_path"].format(**place))
            os.makedirs(os.path.dirname(data_path), exist_ok=True)
            pq.write_table(table, data_path)
            video_path = os.path.join(staging, paths["video_path"].format(**place))
            os.makedirs(os.path.dirname(video_path), exist_ok=True)
            _encode_video(video_path, [frames for frames, *_ in group], fps)

        if per_episode:
            _write_json_lines(os.path.join(staging, LEROBOT_V2_EPISODES_PATH),
                              [{key: row[key] for key in ("episode_index", "tasks", "length")} for row in episode_rows])
            _write_json_lines(os.path.join(staging, LEROBOT_V2_TASKS_PATH),
                              [{"task_index": index, "task": task} for task, index in task_index.items()])
        else:
            episodes_path = os.path.join(staging, LEROBOT_EPISODES_DIR, _CHUNK_FILE.format(chunk_index=0, file_index=0))
            os.makedirs(os.path.dirname(episodes_path))
            pq.write_table(pa.Table.from_pylist(episode_rows), episodes_path + ".parquet")
            tasks = pd.DataFrame({"task_index": list(task_index.values())}, index=pd.Index(list(task_index), name="task"))
            tasks.to_parquet(os.path.join(staging, LEROBOT_TASKS_PATH))
        info = {
            "codebase_version": codebase_version,
            "robot_type": None,
            "total_episodes": len(arrays),
            "total_frames": global_index,
            "total_tasks": len(task_index),
            "chunks_size": chunks_size,
            "data_files_size_in_mb": 100,
            "video_files_size_in_mb": 500,
            "fps": fps,
            "splits": {"train": f"0:{len(arrays)}"},
            **paths,
            "features": {
                LEROBOT_STATE_KEY: {"dtype": "float32", "shape": [state_size], "names": None},
                LEROBOT_ACTION_KEY: {"dtype": "float32", "shape": [action_size], "names": None},
                camera_key: {
                    "dtype": "video",
                    "shape": [height, width, 3],
                    "names": ["height", "width", "channels"],
                    "info": {
                        "video.height": height,
                        "video.width": width,
                        "video.codec": "h264",
                        "video.pix_fmt": "yuv420p",
                        "video.is_depth_map": False,
                        "video.fps": fps,
                        "video.channels": 3,
                        "has_audio": False,
                    },
                },
                **_DEFAULT_FEATURES,
            },
        }
        with open(os.path.join(staging, LEROBOT_INFO_PATH), "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=4)
        os.rename(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_json_lines(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def _fixed_size_lists(rows: list[np.ndarray], size: int) -> Any:
    """Rows of equal length as an Arrow fixed-size list column, the type lerobot gives 1-D features."""
    import pyarrow as pa

    values = pa.array(np.asarray(rows, dtype=np.float32).reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(values, size)


ROBOT_SOURCES = {"egodex": load_egodex, "lerobot": load_lerobot}

__all__ = [
    "EGODEX_CAMERA_KEY",
    "EGODEX_CONFIDENCES_GROUP",
    "EGODEX_INTRINSICS_KEY",
    "EGODEX_JOINTS",
    "EGODEX_TASK_ATTRIBUTES",
    "EGODEX_TRANSFORMS_GROUP",
    "ROBOT_SOURCES",
    "egodex_refs",
    "lerobot_refs",
    "load_egodex",
    "load_lerobot",
    "write_lerobot_episodes",
]
