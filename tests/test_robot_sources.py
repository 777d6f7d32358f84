"""Tests for the EgoDex and LeRobotDataset (v3.0, v2.1, local or on the Hub) sources.

Fixtures are built from procedural episodes, whose cameras and 3D points are exact: an EgoDex episode's expected
tracks are `project_points` of the very points written into its hdf5, and a LeRobot round trip must give back the
frames (up to codec loss), states, actions and tasks that were written. Files are written with PyAV, h5py and
pyarrow directly where the layout itself is under test.
"""

import json
import os
from fractions import Fraction

import numpy as np
import pyarrow.parquet as pq
import pytest

from mu0.dataset_builders.procedural import generate_episode, project_points
from mu0.dataset_builders.robot_sources import (
    egodex_refs,
    lerobot_refs,
    load_egodex,
    load_lerobot,
    write_lerobot_episodes,
)

NUM_FRAMES, IMAGE_SIZE, FPS = 12, 64, 10
MAX_CODEC_ERROR = 12.0  # mean absolute difference per pixel channel allowed for H.264 at this size


def write_mp4(path, frames, fps=FPS):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def mean_abs_diff(a, b):
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


# ---------------------------------------------------------------------------------------------------- EgoDex
@pytest.fixture(scope="module")
def scene():
    return generate_episode(3, num_frames=NUM_FRAMES, image_size=IMAGE_SIZE, moving_camera=True)


def pose(points):
    """(T, 3) positions -> (T, 4, 4) transforms with a fixed, non-identity rotation (only the position matters)."""
    angle = 0.7
    transforms = np.tile(np.eye(4), (len(points), 1, 1))
    transforms[:, :2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    transforms[:, :3, 3] = points
    return transforms


def joint_points(scene):
    """World positions of the fake joints; returns (names, (T, J, 3) points, expected visibility (T, J))."""
    camera_to_world = np.linalg.inv(scene.extrinsics.astype(np.float64))
    centres, forward, right = camera_to_world[:, :3, 3], camera_to_world[:, :3, 2], camera_to_world[:, :3, 0]
    always = np.ones(NUM_FRAMES, bool)
    confident_later = np.arange(NUM_FRAMES) >= 4  # see the confidences written below
    joints = {
        "leftHand": (scene.tracks_world[:, 0], always),
        "leftIndexFingerTip": (scene.tracks_world[:, 1], always),
        "rightHand": (scene.tracks_world[:, -1], always),
        "rightThumbTip": (scene.tracks_world[:, -2], confident_later),
        "rightIndexFingerTip": (centres - 0.5 * forward, ~always),  # behind the camera
        "leftThumbTip": (centres + forward + 5.0 * right, ~always),  # in front, far right of the image
    }
    names = list(joints)
    return names, np.stack([joints[n][0] for n in names], 1), np.stack([joints[n][1] for n in names], 1)


def write_egodex_episode(folder, scene, attributes=None, drop=(), num_poses=NUM_FRAMES):
    """`<folder>/0.mp4` + `<folder>/0.hdf5` in EgoDex's layout; `drop` leaves hdf5 keys out."""
    import h5py

    os.makedirs(folder, exist_ok=True)
    write_mp4(os.path.join(folder, "0.mp4"), scene.frames)
    names, points, _ = joint_points(scene)
    datasets = {
        "camera/intrinsic": scene.intrinsics,
        "transforms/camera": np.linalg.inv(scene.extrinsics.astype(np.float64))[:num_poses],
        **{f"transforms/{name}": pose(points[:num_poses, j]) for j, name in enumerate(names)},
        "confidences/rightThumbTip": np.where(np.arange(num_poses) >= 4, 0.9, 0.2),
        "confidences/leftHand": np.full(num_poses, 0.99),
    }
    path = os.path.join(folder, "0.hdf5")
    with h5py.File(path, "w") as handle:
        for key, value in datasets.items():
            if key not in drop:
                handle.create_dataset(key, data=value)
        for key, value in (attributes or {}).items():
            handle.attrs[key] = value
    return path


def test_egodex_tracks_are_the_projected_joints(tmp_path, scene):
    pytest.importorskip("h5py")
    write_egodex_episode(tmp_path / "part1" / "stack_cups", scene, {"llm_description": "Stack the cups."})
    refs = egodex_refs(str(tmp_path / "part1"))
    assert [ref.episode_id for ref in refs] == ["part1-stack_cups-0"]

    names, points, expected_visible = joint_points(scene)
    episode = load_egodex(refs[0], joints=tuple(names))

    assert episode.frames.shape == (NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert mean_abs_diff(episode.frames, scene.frames) < MAX_CODEC_ERROR
    assert episode.fps == pytest.approx(FPS)
    assert episode.depth is None
    np.testing.assert_allclose(episode.intrinsics, scene.intrinsics, atol=1e-5)
    np.testing.assert_allclose(episode.extrinsics, scene.extrinsics, atol=1e-5)
    expected_uv = np.stack(
        [project_points(points[t], scene.extrinsics[t], scene.intrinsics)[0] for t in range(NUM_FRAMES)]
    )
    in_front = expected_visible | (np.arange(len(names)) != names.index("rightIndexFingerTip"))
    np.testing.assert_allclose(episode.tracks[in_front], expected_uv[in_front], atol=1e-3)
    assert np.isnan(episode.tracks[:, names.index("rightIndexFingerTip")]).all()
    # The scene's points are in the image at every frame, which is what makes them expected-visible above.
    assert ((expected_uv[:, :4] > 0) & (expected_uv[:, :4] < IMAGE_SIZE - 1)).all()
    np.testing.assert_array_equal(episode.track_visible, expected_visible)
    np.testing.assert_array_equal(episode.cluster_ids, [0, 0, 1, 1, 1, 0])
    assert episode.task == "Stack the cups."
    assert episode.metadata["joint_names"] == names


def test_egodex_target_fps_subsamples_frames_and_poses(tmp_path, scene):
    pytest.importorskip("h5py")
    write_egodex_episode(tmp_path / "task", scene)
    names, points, _ = joint_points(scene)
    episode = load_egodex(egodex_refs(str(tmp_path / "task"))[0], joints=tuple(names[:3]), target_fps=FPS / 3)
    kept = np.arange(0, NUM_FRAMES, 3)
    assert len(episode.frames) == len(kept) and episode.fps == pytest.approx(FPS / 3)
    assert mean_abs_diff(episode.frames, scene.frames[kept]) < MAX_CODEC_ERROR
    expected = np.stack([project_points(points[t, :3], scene.extrinsics[t], scene.intrinsics)[0] for t in kept])
    np.testing.assert_allclose(episode.tracks, expected, atol=1e-3)


LID = {"llm_description": "Close the lid.", "llm_description2": "Open the lid."}


@pytest.mark.parametrize(
    "attributes, expected",
    [
        ({}, "wipe screen"),  # the task folder's name
        ({"description": "Wipe the screen."}, "Wipe the screen."),
        ({"llm_description": b"Wipe it.", "description": "Wipe the screen."}, "Wipe it."),
        ({**LID, "which_llm_description": "2"}, "Open the lid."),
        ({**LID, "which_llm_description": "1"}, "Close the lid."),
    ],
)
def test_egodex_task_text(tmp_path, scene, attributes, expected):
    pytest.importorskip("h5py")
    write_egodex_episode(tmp_path / "wipe_screen", scene, attributes)
    episode = load_egodex(egodex_refs(str(tmp_path / "wipe_screen"))[0], joints=("leftHand",))
    assert episode.task == expected


@pytest.mark.parametrize(
    "drop, joints, missing, present",
    [
        (("camera/intrinsic",), ("leftHand",), "camera/intrinsic", "'transforms'"),
        (("transforms/camera",), ("leftHand",), "transforms/camera", "'leftHand'"),
        ((), ("leftHand", "leftPinkyTip"), "transforms/leftPinkyTip", "'rightThumbTip'"),
    ],
)
def test_egodex_missing_key_names_it_and_lists_present_keys(tmp_path, scene, drop, joints, missing, present):
    pytest.importorskip("h5py")
    write_egodex_episode(tmp_path / "task", scene, drop=drop)
    with pytest.raises(ValueError) as error:
        load_egodex(egodex_refs(str(tmp_path / "task"))[0], joints=joints)
    message = str(error.value)
    assert repr(missing) in message and present in message and "0.hdf5" in message


def test_egodex_missing_camera_group_lists_top_level_keys(tmp_path, scene):
    pytest.importorskip("h5py")
    write_egodex_episode(tmp_path / "task", scene, drop=("camera/intrinsic",))
    with pytest.raises(ValueError, match=r"'camera' is missing under '/', which holds \['confidences', 'transforms'\]"):
        load_egodex(egodex_refs(str(tmp_path / "task"))[0])


def test_egodex_rejects_mismatched_lengths_missing_video_and_non_hand_joints(tmp_path, scene):
    pytest.importorskip("h5py")
    write_egodex_episode(tmp_path / "short", scene, num_poses=NUM_FRAMES - 2)
    with pytest.raises(ValueError, match=f"{NUM_FRAMES} frames but 'transforms/camera' has {NUM_FRAMES - 2} poses"):
        load_egodex(egodex_refs(str(tmp_path / "short"))[0], joints=("leftHand",))

    write_egodex_episode(tmp_path / "novideo", scene)
    os.remove(tmp_path / "novideo" / "0.mp4")
    with pytest.raises(FileNotFoundError, match="0.mp4"):
        load_egodex(egodex_refs(str(tmp_path / "novideo"))[0], joints=("leftHand",))

    with pytest.raises(ValueError, match="'hip' belongs to neither hand"):
        load_egodex(egodex_refs(str(tmp_path / "short"))[0], joints=("leftHand", "hip"))

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No EgoDex episodes"):
        egodex_refs(str(tmp_path / "empty"))



def write_full_egodex_episode(folder, scene):
    """An EgoDex episode with every default joint (`EGODEX_JOINTS`), each on one of the scene's moving points, all
    confident; returns the (T, J, 3) world points written."""
    import h5py

    from mu0.dataset_builders.robot_sources import EGODEX_JOINTS

    os.makedirs(folder, exist_ok=True)
    write_mp4(os.path.join(folder, "0.mp4"), scene.frames)
    moving = np.flatnonzero(scene.moving)
    points = scene.tracks_world[:, moving[: len(EGODEX_JOINTS)]]
    assert points.shape[1] == len(EGODEX_JOINTS)
    with h5py.File(os.path.join(folder, "0.hdf5"), "w") as handle:
        handle.create_dataset("camera/intrinsic", data=scene.intrinsics)
        handle.create_dataset("transforms/camera", data=np.linalg.inv(scene.extrinsics.astype(np.float64)))
        for index, name in enumerate(EGODEX_JOINTS):
            handle.create_dataset(f"transforms/{name}", data=pose(points[:, index]))
        handle.attrs["llm_description"] = "Move the blocks."
    return points


GIVEN_3D = {"depth": "given", "camera": "given", "keypoints": "given", "tracker": "given", "history": 2, "horizon": 4}


def test_egodex_samples_come_from_the_given_3d_joints_without_depth(tmp_path, scene):
    from mu0.dataset_builders.extraction import ExtractionSettings, episode_samples, extract_episode

    points = write_full_egodex_episode(tmp_path / "move_blocks", scene)
    raw = load_egodex(egodex_refs(str(tmp_path))[0])
    assert raw.depth is None
    np.testing.assert_allclose(raw.tracks_world, points, atol=1e-5)
    settings = ExtractionSettings(**GIVEN_3D)
    episode = extract_episode(raw, settings)
    assert episode.depth is None and episode.metadata["world_tracks"] == "given"
    # The world tracks are the joints themselves (not lifted through a depth map), wherever they are seen.
    seen = raw.track_visible
    assert seen.mean() > 0.5
    np.testing.assert_allclose(episode.world[seen], points[seen], atol=1e-5)
    samples = list(episode_samples(episode, settings))
    assert len(samples) > 0 and all(sample["depth"] is None for sample in samples)
    # Each sample's query points are the joints seen at its frame, projected through that frame's camera.
    sample = samples[0]
    frame, ids = sample["frame_index"], sample["track_ids"]
    expected_uv, _ = project_points(points[frame, ids], scene.extrinsics[frame], scene.intrinsics)
    np.testing.assert_allclose(sample["query_uv"], expected_uv, atol=1e-3)


def test_egodex_folder_builds_a_samples_dataset_end_to_end(tmp_path, scene):
    from mu0.dataset_builders.trace_extract import TraceExtract, decode_sample

    write_full_egodex_episode(tmp_path / "clips" / "move_blocks", scene)
    builder = TraceExtract(config_name="samples", cache_dir=str(tmp_path / "cache"), work_dir=str(tmp_path / "work"),
                           source="egodex", source_path=str(tmp_path / "clips"), settings=GIVEN_3D)
    builder.download_and_prepare()
    rows = builder.as_dataset(split="train")
    assert len(rows) > 0
    row = decode_sample(rows[0])
    assert row["depth"] is None and row["task"] == "Move the blocks."
    assert not os.path.exists(os.path.join(str(tmp_path / "work"), "failures.jsonl"))


def test_egodex_statistics_take_depth_from_the_given_3d_joints(tmp_path, scene):
    """A source without depth maps gets its depth range from its 3D points: the joints' depths in the cameras
    (the build used to die in `np.percentile` on an empty depth list)."""
    from mu0.dataset_builders.trace_extract import TraceExtract

    points = write_full_egodex_episode(tmp_path / "clips" / "move_blocks", scene)
    builder = TraceExtract(config_name="samples", cache_dir=str(tmp_path / "cache"), work_dir=str(tmp_path / "work"),
                           source="egodex", source_path=str(tmp_path / "clips"), settings=GIVEN_3D)
    builder.download_and_prepare()
    statistics = builder.compute_statistics()
    camera = np.einsum("tij,tnj->tni", scene.extrinsics[:, :3, :3], points) + scene.extrinsics[:, None, :3, 3]
    log_low, log_high = statistics["depth_log_range"]
    assert np.log(camera[..., 2].min()) - 1e-4 <= log_low < log_high <= np.log(camera[..., 2].max()) + 1e-4


def test_given_3d_tracks_need_the_given_tracker_and_camera(tmp_path, scene):
    from mu0.dataset_builders.extraction import ExtractionSettings, extract_episode

    write_full_egodex_episode(tmp_path / "move_blocks", scene)
    raw = load_egodex(egodex_refs(str(tmp_path))[0])
    with pytest.raises(ValueError, match="tracker='given'"):
        extract_episode(raw, ExtractionSettings(**{**GIVEN_3D, "keypoints": "grid", "tracker": "support_lk"}))
    with pytest.raises(ValueError, match="camera='given'"):
        extract_episode(raw, ExtractionSettings(**{**GIVEN_3D, "camera": "static"}))


def test_entity_coverage_counts_entities_not_points():
    from mu0.dataset_builders.extraction import entity_coverage
    from mu0.dataset_builders.trace_ops import visible_coverage

    # Two hands of 3 joints and a third entity never seen, over 4 frames. Left hand: one joint seen in every frame;
    # right hand: seen in frames 0 and 1 only.
    visible = np.zeros((4, 7), dtype=bool)
    visible[:, 0] = True
    visible[:2, 3:5] = True
    clusters = np.array([0, 0, 0, 1, 1, 1, 2])
    assert entity_coverage(visible, clusters) == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)
    assert visible_coverage(visible) == pytest.approx(8 / 28)  # the per-point fraction would reject it
    assert entity_coverage(np.zeros((3, 2), bool), np.array([0, 1])) == 0.0


def test_sparse_given_tracks_pass_the_coverage_filter_where_a_per_point_one_fails(tmp_path, scene):
    """Per frame, 4 of 12 joints seen (fraction 0.33, under the 0.6 filter) while both hands are in view."""
    from mu0.dataset_builders.extraction import ExtractionSettings, extract_episode

    write_full_egodex_episode(tmp_path / "move_blocks", scene)
    raw = load_egodex(egodex_refs(str(tmp_path))[0])
    raw.track_visible = raw.track_visible & (np.arange(12) % 3 == 0)[None]  # 2 of each hand's 6 joints
    assert raw.track_visible.mean() < 0.6
    episode = extract_episode(raw, ExtractionSettings(**GIVEN_3D))
    assert episode.metadata["coverage"] >= 0.9

# --------------------------------------------------------------------------------------------------- LeRobot
CAMERA = "observation.images.main"
LENGTHS = (8, 6, 10)
TASKS = ("push the red block to the left", "stack the blue block on the red block", "push the red block to the left")


def make_episodes():
    rng = np.random.default_rng(0)
    episodes = []
    for seed, (length, task) in enumerate(zip(LENGTHS, TASKS)):
        frames = generate_episode(seed, num_frames=length, image_size=IMAGE_SIZE).frames
        states = rng.normal(size=(length, 5)).astype(np.float32)
        actions = rng.normal(size=(length, 4)).astype(np.float32)
        episodes.append({"frames": frames, "states": states, "actions": actions, "task": task})
    return episodes


@pytest.fixture(scope="module")
def episodes():
    return make_episodes()


@pytest.mark.parametrize("chunks_size", [1000, 1])
def test_lerobot_round_trip(tmp_path, episodes, chunks_size):
    root = tmp_path / "metaworld"
    write_lerobot_episodes(str(root), episodes, FPS, camera_key=CAMERA, episodes_per_file=2, chunks_size=chunks_size)
    assert os.listdir(tmp_path) == ["metaworld"]  # nothing staged is left behind
    second_file = "chunk-000/file-001" if chunks_size > 1 else "chunk-001/file-000"  # files roll over to a new chunk
    videos = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.mp4"))
    assert videos == [f"videos/{CAMERA}/chunk-000/file-000.mp4", f"videos/{CAMERA}/{second_file}.mp4"]
    assert (root / "data" / f"{second_file}.parquet").is_file()

    refs = lerobot_refs(str(root))
    assert [ref.seed for ref in refs] == [0, 1, 2]
    assert len({ref.episode_id for ref in refs}) == 3
    for ref, written in zip(refs, episodes):
        episode = load_lerobot(ref, CAMERA)
        assert episode.frames.shape == written["frames"].shape
        assert mean_abs_diff(episode.frames, written["frames"]) < MAX_CODEC_ERROR
        assert episode.fps == pytest.approx(FPS)
        assert episode.task == written["task"]
        np.testing.assert_array_equal(np.asarray(episode.metadata["states"], np.float32), written["states"])
        np.testing.assert_array_equal(np.asarray(episode.metadata["actions"], np.float32), written["actions"])
        assert isinstance(episode.metadata["states"], list) and isinstance(episode.metadata["actions"][0], list)
        assert load_lerobot(ref).frames.shape == episode.frames.shape  # the ref remembers its camera


def test_lerobot_layout_is_v3(tmp_path, episodes):
    root = tmp_path / "dataset"
    write_lerobot_episodes(str(root), episodes, FPS, camera_key=CAMERA, episodes_per_file=2)
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == FPS and info["total_frames"] == sum(LENGTHS)
    assert info["features"][CAMERA]["dtype"] == "video"
    assert info["features"][CAMERA]["shape"] == [IMAGE_SIZE, IMAGE_SIZE, 3]
    videos = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.mp4"))
    assert videos == [f"videos/{CAMERA}/chunk-000/file-000.mp4", f"videos/{CAMERA}/chunk-000/file-001.mp4"]

    rows = pq.read_table(root / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    assert [row["episode_index"] for row in rows] == [0, 1, 2]
    assert [row[f"videos/{CAMERA}/file_index"] for row in rows] == [0, 0, 1]
    assert [row["data/file_index"] for row in rows] == [0, 0, 1]
    assert [row[f"videos/{CAMERA}/from_timestamp"] for row in rows] == pytest.approx([0.0, 0.8, 0.0])
    assert [row[f"videos/{CAMERA}/to_timestamp"] for row in rows] == pytest.approx([0.8, 1.4, 1.0])
    assert [(row["dataset_from_index"], row["dataset_to_index"]) for row in rows] == [(0, 8), (8, 14), (14, 24)]
    assert [row["tasks"] for row in rows] == [[task] for task in TASKS]

    data = pq.read_table(root / "data" / "chunk-000" / "file-000.parquet").to_pydict()
    assert data["episode_index"] == [0] * 8 + [1] * 6
    assert data["frame_index"] == list(range(8)) + list(range(6))
    assert data["task_index"] == [0] * 8 + [1] * 6
    np.testing.assert_allclose(data["timestamp"][8:], np.arange(6) / FPS, atol=1e-6)
    import pandas as pd

    tasks = pd.read_parquet(root / "meta" / "tasks.parquet")
    assert list(tasks.index) == list(TASKS[:2]) and list(tasks["task_index"]) == [0, 1]


def test_lerobot_reads_a_shared_mp4_written_elsewhere(tmp_path, episodes):
    """Cutting by timestamps must not rely on the writer: swap in an mp4 encoded here with other frames."""
    root = tmp_path / "dataset"
    write_lerobot_episodes(str(root), episodes[:2], FPS, camera_key=CAMERA, episodes_per_file=2)
    replacement = np.concatenate([255 - episodes[0]["frames"], 255 - episodes[1]["frames"]])
    write_mp4(root / "videos" / CAMERA / "chunk-000" / "file-000.mp4", replacement)
    second = load_lerobot(lerobot_refs(str(root))[1], CAMERA)
    assert mean_abs_diff(second.frames, 255 - episodes[1]["frames"]) < MAX_CODEC_ERROR


def test_lerobot_errors(tmp_path, episodes):
    with pytest.raises(FileNotFoundError, match=r"meta/info\.json"):
        lerobot_refs(str(tmp_path / "nothing"))

    root = tmp_path / "dataset"
    write_lerobot_episodes(str(root), episodes[:1], FPS, camera_key=CAMERA)
    with pytest.raises(ValueError, match=rf"no video feature 'observation.images.wrist'.*\['{CAMERA}'\]"):
        lerobot_refs(str(root), camera_key="observation.images.wrist")
    ref = lerobot_refs(str(root))[0]
    with pytest.raises(ValueError, match="observation.images.wrist"):
        load_lerobot(ref, "observation.images.wrist")

    with pytest.raises(FileExistsError, match="already exists"):
        write_lerobot_episodes(str(root), episodes[:1], FPS)

    (root / "data" / "chunk-000" / "file-000.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"data file .*file-000\.parquet"):
        load_lerobot(ref)

    info = json.loads((root / "meta" / "info.json").read_text())
    (root / "meta" / "info.json").write_text(json.dumps({**info, "codebase_version": "v2.0"}))
    with pytest.raises(ValueError, match="is v2.0; the v3 layout .* and the v2.1 layout"):
        lerobot_refs(str(root))
    (root / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"has no episodes \[5\]; it has 1 episodes"):
        lerobot_refs(str(root), episodes=[0, 5])


def assert_episode_read_back(episode, written):
    assert episode.frames.shape == written["frames"].shape
    assert mean_abs_diff(episode.frames, written["frames"]) < MAX_CODEC_ERROR
    assert episode.task == written["task"]
    np.testing.assert_array_equal(np.asarray(episode.metadata["states"], np.float32), written["states"])
    np.testing.assert_array_equal(np.asarray(episode.metadata["actions"], np.float32), written["actions"])


def test_lerobot_v21_layout_round_trip(tmp_path, episodes):
    """v2.1: one parquet and one mp4 per episode, chunked by episode index; episode and task tables as JSON lines."""
    root = tmp_path / "dataset"
    write_lerobot_episodes(str(root), episodes, FPS, camera_key=CAMERA, chunks_size=2, codebase_version="v2.1")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == ["data/chunk-000/episode_000000.parquet", "data/chunk-000/episode_000001.parquet",
                     "data/chunk-001/episode_000002.parquet", "meta/episodes.jsonl", "meta/info.json",
                     "meta/tasks.jsonl", f"videos/chunk-000/{CAMERA}/episode_000000.mp4",
                     f"videos/chunk-000/{CAMERA}/episode_000001.mp4", f"videos/chunk-001/{CAMERA}/episode_000002.mp4"]
    lines = [json.loads(line) for line in (root / "meta" / "episodes.jsonl").read_text().splitlines()]
    assert lines == [{"episode_index": i, "tasks": [task], "length": n} for i, (n, task) in enumerate(zip(LENGTHS, TASKS))]
    refs = lerobot_refs(str(root))
    assert [ref.seed for ref in refs] == [0, 1, 2]
    for ref, written in zip(refs, episodes):
        assert_episode_read_back(load_lerobot(ref), written)
    assert [ref.seed for ref in lerobot_refs(str(root), episodes=[2, 0])] == [0, 2]


WRIST = "observation.images.wrist"  # a second camera in the Hub repo, never to be fetched


@pytest.mark.parametrize("codebase_version", ["v3.0", "v2.1"])
def test_lerobot_from_the_hub_fetches_only_the_requested_episode_and_camera(hub, tmp_path, episodes, codebase_version):
    root = tmp_path / "dataset"
    write_lerobot_episodes(str(root), episodes, FPS, camera_key=CAMERA, episodes_per_file=2,
                           codebase_version=codebase_version)
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    files.update({path.replace(CAMERA, WRIST): data for path, data in files.items() if path.endswith(".mp4")})
    hub.upload("user/robot", files, repo_type="dataset")
    before = len(hub.requests)

    refs = lerobot_refs("user/robot", episodes=[1])
    assert [(ref.episode_id, ref.seed) for ref in refs] == [(f"robot-{CAMERA}-000001", 1)]
    assert_episode_read_back(load_lerobot(refs[0]), episodes[1])

    fetched = {path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path, status in hub.requests[before:]
               if method == "GET" and "/resolve/" in path and status == 200}
    metadata = {path for path in files if path.startswith("meta/")}
    episode_files = ({"data/chunk-000/file-000.parquet", f"videos/{CAMERA}/chunk-000/file-000.mp4"}  # with episode 0
                     if codebase_version == "v3.0" else
                     {"data/chunk-000/episode_000001.parquet", f"videos/chunk-000/{CAMERA}/episode_000001.mp4"})
    assert fetched == metadata | episode_files
    assert not hub.unknown_requests and not hub.errors


def test_lerobot_writer_validates_episodes(tmp_path, episodes):
    bad = dict(episodes[0], actions=episodes[0]["actions"][:-1])
    with pytest.raises(ValueError, match="states and actions must be"):
        write_lerobot_episodes(str(tmp_path / "a"), [bad], FPS)
    with pytest.raises(ValueError, match=r"lacks \['task'\]"):
        write_lerobot_episodes(str(tmp_path / "b"), [{k: v for k, v in episodes[0].items() if k != "task"}], FPS)
    odd = dict(episodes[0], frames=episodes[0]["frames"][:, :63])
    with pytest.raises(ValueError, match="even image size"):
        write_lerobot_episodes(str(tmp_path / "c"), [odd], FPS)
    assert os.listdir(tmp_path) == []  # failed writes leave nothing behind


def test_extract_flags_pick_lerobot_episodes(tmp_path, episodes, capsys):
    from mu0.dataset_builders.trace_extract import REF_LISTERS, TraceExtractConfig
    from mu0.training.cli import build_parser

    root = tmp_path / "dataset"
    write_lerobot_episodes(str(root), episodes, FPS, camera_key=CAMERA, codebase_version="v2.1")
    args = build_parser().parse_args(["extract", "--source", "lerobot", "--source-path", str(root), "--episodes", "0,2-2"])
    assert args.episodes == [0, 2]
    config = TraceExtractConfig(source="lerobot", source_path=args.source_path, episodes=args.episodes)
    assert [ref.seed for ref in REF_LISTERS["lerobot"](config)] == [0, 2]
    for bad in ("3-1", "a", "1,,2"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["extract", "--episodes", bad])
    assert "argument --episodes: must be episode indices or ranges like 0,3,10-19" in capsys.readouterr().err
    with pytest.raises(ValueError, match="episodes picks LeRobot episode indices"):
        TraceExtractConfig(source="rgbd", source_path=str(tmp_path), episodes=[0]).validate()
