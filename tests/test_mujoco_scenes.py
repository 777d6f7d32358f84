"""The MuJoCo episode source: determinism, ground truth against the rasteriser, camera conventions, skills, builder."""

import math
import sys

import numpy as np
import pytest

from mu0.dataset_builders.mujoco_scenes import SKILLS, generate_mujoco_episode, import_mujoco
from mu0.dataset_builders.procedural import BLOCK_COLORS, TABLE_COLORS

SIZE, FRAMES = 96, 16
# a 45 degree vertical field of view on 96 px: focal 48 / tan(22.5 deg), pixel centres at integers
EXPECTED_K = np.array([[48 / math.tan(math.radians(22.5)), 0, 47.5], [0, 48 / math.tan(math.radians(22.5)), 47.5], [0, 0, 1]])


@pytest.fixture(scope="module")
def mujoco():
    """MuJoCo imported the way the source imports it (MUJOCO_GL=egl unless set), or the test is skipped."""
    try:
        return import_mujoco()
    except ImportError:
        pytest.skip("mujoco is not installed")


@pytest.fixture(scope="module")
def episodes(mujoco):
    return {skill: generate_mujoco_episode(3, num_frames=FRAMES, image_size=SIZE, skill=skill) for skill in SKILLS}


def camera_points(points, extrinsics):
    return points @ extrinsics[:3, :3].T.astype(np.float64) + extrinsics[:3, 3]


def pixels(points_camera):
    """Pinhole projection with the expected intrinsics (not the episode's)."""
    return points_camera[..., :2] / points_camera[..., 2:] * EXPECTED_K[0, 0] + EXPECTED_K[0, 2]


def bilinear(image, uv):
    u, v = uv[:, 0], uv[:, 1]
    left, top = np.floor(u).astype(int), np.floor(v).astype(int)
    du, dv = u - left, v - top
    return ((1 - du) * (1 - dv) * image[top, left] + du * (1 - dv) * image[top, left + 1]
            + (1 - du) * dv * image[top + 1, left] + du * dv * image[top + 1, left + 1])


def body_positions(episode, name):
    """(T, 3) world position of a body by MuJoCo's own forward kinematics of the episode's qpos."""
    mujoco = import_mujoco()
    model = mujoco.MjModel.from_xml_string(episode.mjcf)
    data = mujoco.MjData(model)
    body = model.body(name.replace(" ", "_")).id
    positions = []
    for qpos in episode.qpos:
        data.qpos[:] = qpos
        mujoco.mj_kinematics(model, data)
        positions.append(data.xpos[body].copy())
    return np.array(positions)


def mentioned(episode):
    """Bodies named in the instruction (by colour, as 'block' may read 'cube'), in order; a drawer, not its cabinet."""
    names = [name for name in episode.object_names[1:] if name.split()[0] in episode.task and name != "gripper"]
    names = [name for name in names if not name.endswith("cabinet")]
    return sorted(names, key=lambda name: episode.task.find(name.split()[0]))


def test_same_seed_gives_identical_episodes(mujoco):
    first, second = (generate_mujoco_episode(11, num_frames=8, image_size=64, moving_camera=True) for _ in range(2))
    for field in ("frames", "depth", "extrinsics", "tracks_world", "visible", "object_ids", "qpos"):
        assert getattr(first, field).tobytes() == getattr(second, field).tobytes(), field
    assert first.task == second.task and first.mjcf == second.mjcf
    other = generate_mujoco_episode(12, num_frames=8, image_size=64, moving_camera=True)
    assert other.frames.tobytes() != first.frames.tobytes()


def test_visible_points_agree_with_the_rendered_depth(episodes):
    for episode in episodes.values():
        assert episode.visible[0].all()  # points are drawn among those visible at frame 0
        assert episode.visible.mean() > 0.6
        errors = []
        for t in range(FRAMES):
            points = camera_points(episode.tracks_world[t, episode.visible[t]].astype(np.float64), episode.extrinsics[t])
            uv = pixels(points)
            assert ((uv >= -0.5) & (uv < SIZE - 0.5)).all()
            inner = ((uv >= 0) & (uv < SIZE - 1)).all(axis=1)
            rendered = bilinear(episode.depth[t].astype(np.float64), uv[inner])
            errors.append(np.abs(rendered - points[inner, 2]) / points[inner, 2])
        errors = np.concatenate(errors)
        assert np.median(errors) < 2e-3, episode.skill
        assert np.quantile(errors, 0.9) < 0.02, episode.skill


def test_depth_is_metric_distance_along_the_optical_axis(episodes):
    """Unprojecting every pixel with depth as camera z puts the table exactly on z = 0 and nothing below it."""
    for episode in episodes.values():
        depth = episode.depth[0].astype(np.float64)
        rows, cols = np.mgrid[0:SIZE, 0:SIZE]
        camera = np.stack([(cols - 47.5) * depth, (rows - 47.5) * depth, EXPECTED_K[0, 0] * depth], -1) / EXPECTED_K[0, 0]
        extrinsics = episode.extrinsics[0].astype(np.float64)
        world_z = ((camera.reshape(-1, 3) - extrinsics[:3, 3]) @ extrinsics[:3, :3])[:, 2]
        assert (np.abs(world_z) < 5e-4).mean() > 0.6  # the table fills most of the view
        assert world_z.min() > -5e-4
        assert 0.3 < depth.min() and depth[depth < 5].max() < 1.5  # metres: the camera is ~0.5 m away


def test_camera_conventions(episodes):
    episode = episodes["stack"]
    np.testing.assert_allclose(episode.intrinsics, EXPECTED_K, rtol=1e-6)
    rotation, translation = episode.extrinsics[0, :3, :3].astype(np.float64), episode.extrinsics[0, :3, 3]
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-6)
    assert np.linalg.det(rotation) == pytest.approx(1.0, abs=1e-6)
    center = -rotation.T @ translation
    assert center[2] > 0.2 and center[1] < -0.2  # above the table, on the -y side
    assert rotation[2, 1] > 0 and rotation[2, 2] < 0  # looks towards +y and down
    assert rotation[0, 0] > 0.8  # image x runs along world +x
    # the top-face centre of the static base block lands on pixels of its colour, not the table's or another's
    base = mentioned(episode)[1]
    position = body_positions(episode, base)[0]  # it rests on the table, so its top is at twice its centre's height
    u, v = np.round(pixels(camera_points(position * [1, 1, 2], episode.extrinsics[0]))).astype(int)
    color = episode.frames[0, v, u].astype(np.float64)
    palette = {name: np.array(rgb) for name, rgb in BLOCK_COLORS.items()} | {"table": np.array(TABLE_COLORS[0])}
    cosine = {name: color @ rgb / np.linalg.norm(color) / np.linalg.norm(rgb) for name, rgb in palette.items()}
    assert max(cosine, key=cosine.get) == base.split()[0], (base, color)


def test_re_rendering_from_the_returned_cameras_reproduces_the_depth(mujoco):
    """Place a camera from the returned extrinsics through the MJCF (pos and xyaxes, not the source's code path):
    MuJoCo must render the same depth, so the extrinsics are exactly the cameras the frames were filmed with."""
    episode = generate_mujoco_episode(5, num_frames=6, image_size=SIZE, moving_camera=True)
    for t in (0, 5):
        rotation, translation = episode.extrinsics[t, :3, :3].astype(np.float64), episode.extrinsics[t, :3, 3]
        center, right, up = -rotation.T @ translation, rotation[0], -rotation[1]  # OpenCV y points down
        camera = f'pos="{" ".join(map(str, center))}" xyaxes="{" ".join(map(str, [*right, *up]))}"'
        model = mujoco.MjModel.from_xml_string(episode.mjcf.replace('pos="0 -0.5 0.5"', camera))
        data = mujoco.MjData(model)
        data.qpos[:] = episode.qpos[t]
        mujoco.mj_forward(model, data)
        with mujoco.Renderer(model, SIZE, SIZE) as renderer:
            renderer.enable_depth_rendering()
            renderer.update_scene(data, camera="view")
            depth = renderer.render()
        differs = np.abs(depth - episode.depth[t]) > 1e-3 * episode.depth[t]
        assert differs.mean() < 2e-3, (t, differs.mean())


def test_each_skill_moves_the_right_body(episodes):
    push = episodes["push"]
    (name,) = mentioned(push)
    moved = body_positions(push, name)
    direction = {"left": [-1, 0], "right": [1, 0], "forward": [0, 1], "backward": [0, -1]}[push.task.split()[-1]]
    assert (moved[-1, :2] - moved[0, :2]) @ direction > 0.06
    np.testing.assert_allclose(moved[:, 2], moved[0, 2], atol=1e-9)  # stays on the table

    pick = episodes["pick_place"]
    (name,) = mentioned(pick)
    moved = body_positions(pick, name)
    assert moved[:, 2].max() > moved[0, 2] + 0.03 and moved[-1, 2] == pytest.approx(moved[0, 2], abs=1e-9)
    assert np.argmax(moved[:, 2]) not in (0, FRAMES - 1)  # rises, then falls
    side = 1 if pick.task.endswith("right") else -1
    assert side * (moved[-1, 0] - moved[0, 0]) > 0.07

    stack = episodes["stack"]
    moving_name, base_name = mentioned(stack)
    moved, base = body_positions(stack, moving_name), body_positions(stack, base_name)
    np.testing.assert_allclose(moved[-1, :2], base[-1, :2], atol=1e-9)
    assert moved[-1, 2] > 2 * base[-1, 2] - 1e-9  # resting on top of the base
    np.testing.assert_allclose(base, base[:1].repeat(FRAMES, 0))

    for skill, sign in (("open", 1), ("close", -1)):
        episode = episodes[skill]
        (drawer_name,) = mentioned(episode)
        drawer = body_positions(episode, drawer_name)
        assert sign * (drawer[0, 1] - drawer[-1, 1]) > 0.035  # slides out towards the camera (-y) or back in
        # tracked points on the drawer follow it exactly, table points never move
        points = episode.tracks_world[:, episode.object_ids == episode.object_names.index(drawer_name)]
        np.testing.assert_allclose(points - points[:1], (drawer - drawer[:1])[:, None].repeat(points.shape[1], 1), atol=1e-6)

    for episode in episodes.values():
        table = episode.tracks_world[:, episode.object_ids == 0]
        assert table.size and (table == table[:1]).all()
        gripper = episode.tracks_world[:, episode.object_ids == episode.object_names.index("gripper")]
        assert np.linalg.norm(gripper[-1] - gripper[0], axis=-1).min() > 0.03
        expected = {episode.object_names.index(name) for name in ("gripper", mentioned(episode)[0])}
        assert set(np.unique(episode.object_ids[episode.moving])) == expected


def test_moving_camera_changes_the_extrinsics(mujoco):
    fixed = generate_mujoco_episode(4, num_frames=8, image_size=48)
    moving = generate_mujoco_episode(4, num_frames=8, image_size=48, moving_camera=True)
    assert (fixed.extrinsics == fixed.extrinsics[:1]).all()
    centers = np.einsum("tji,tj->ti", moving.extrinsics[:, :3, :3], -moving.extrinsics[:, :3, 3])
    assert np.linalg.norm(centers[-1] - centers[0]) > 0.02
    assert np.abs(moving.extrinsics[-1, :3, :3] - moving.extrinsics[0, :3, :3]).max() > 0.05


def test_trace_extract_builds_from_mujoco(tmp_path, mujoco):
    from mu0.dataset_builders.sources import load_mujoco, mujoco_refs
    from mu0.dataset_builders.trace_extract import TraceExtract, decode_sample

    builder = TraceExtract(config_name="samples", source="mujoco", num_episodes=1, num_frames=20, image_size=64,
                           settings={"frame_stride": 5}, cache_dir=str(tmp_path / "cache"), work_dir=str(tmp_path / "work"))
    builder.download_and_prepare()
    samples = builder.as_dataset(split="train")
    assert len(samples) > 0
    row = decode_sample(samples[0])
    (ref,) = mujoco_refs(1)
    raw = load_mujoco(ref, num_frames=20, image_size=64)
    assert row["episode_id"] == ref.episode_id and row["episode_id"].startswith("mujoco-")
    np.testing.assert_array_equal(row["image"], raw.frames[row["frame_index"]])
    assert row["task"] == raw.task and row["future"].shape[1] == 128
    # query pixels are the source's exact tracks of the points visible at that frame
    np.testing.assert_allclose(row["query_uv"], raw.tracks[row["frame_index"], row["track_ids"]], atol=0.05)


def test_missing_mujoco_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mujoco", None)
    with pytest.raises(ImportError, match=r'pip install "mu0\[sim\]"'):
        generate_mujoco_episode(0, num_frames=4, image_size=32)


def test_gl_failure_is_a_clear_error(monkeypatch, mujoco):
    def no_context(*args, **kwargs):
        raise RuntimeError("eglInitialize failed")

    monkeypatch.setattr(mujoco, "Renderer", no_context)
    with pytest.raises(RuntimeError, match="MUJOCO_GL"):
        generate_mujoco_episode(0, num_frames=4, image_size=32)
