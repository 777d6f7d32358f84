"""Tests for the procedural tabletop episodes.

Expected values come from the documented conventions (OpenCV pinhole camera, world z up, pixel centres at
integer coordinates) through the small reference geometry below, never from the code under test.
"""

import colorsys
import dataclasses
import re

import numpy as np
import pytest

from mu0.dataset_builders.procedural import (
    TASK_TYPES,
    ProceduralEpisode,
    episode_to_samples,
    generate_episode,
    project_points,
)

NUM_FRAMES, IMAGE_SIZE, NUM_POINTS = 24, 96, 128


def reference_project(points_world, extrinsics, intrinsics):
    """Pinhole projection written out independently: returns (n, 2) pixels and (n,) depths."""
    extrinsics = np.asarray(extrinsics, dtype=np.float64)
    camera = np.asarray(points_world, dtype=np.float64) @ extrinsics[:3, :3].T + extrinsics[:3, 3]
    homogeneous = camera @ np.asarray(intrinsics, dtype=np.float64).T
    return homogeneous[:, :2] / homogeneous[:, 2:], camera[:, 2]


def reference_unproject(uv, depth, extrinsics, intrinsics):
    """Pixels plus depth along the optical axis -> world points, through K^-1 and the inverse extrinsics."""
    pixels = np.concatenate([uv, np.ones((len(uv), 1))], axis=1)
    camera = pixels @ np.linalg.inv(np.asarray(intrinsics, dtype=np.float64)).T * np.asarray(depth)[:, None]
    world_to_camera = np.asarray(extrinsics, dtype=np.float64)
    return (np.linalg.inv(world_to_camera) @ np.concatenate([camera, np.ones((len(camera), 1))], axis=1).T).T[:, :3]


def nearest_pixels(uv):
    return np.floor(uv + 0.5).astype(int)


@pytest.fixture(scope="module")
def fixed_episode() -> ProceduralEpisode:
    return generate_episode(3, num_frames=NUM_FRAMES, image_size=IMAGE_SIZE, num_points=NUM_POINTS)


@pytest.fixture(scope="module")
def moving_episode() -> ProceduralEpisode:
    return generate_episode(5, num_frames=NUM_FRAMES, image_size=IMAGE_SIZE, num_points=NUM_POINTS, moving_camera=True)


@pytest.fixture(params=["fixed", "moving"])
def episode(request, fixed_episode, moving_episode) -> ProceduralEpisode:
    return fixed_episode if request.param == "fixed" else moving_episode


# --------------------------------------------------------------------------------------------- episode


def test_same_seed_gives_identical_episodes():
    first = generate_episode(11, num_frames=8, image_size=48, num_points=32, moving_camera=True)
    second = generate_episode(11, num_frames=8, image_size=48, num_points=32, moving_camera=True)
    for field in dataclasses.fields(ProceduralEpisode):
        a, b = getattr(first, field.name), getattr(second, field.name)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b), field.name
        else:
            assert a == b, field.name


def test_different_seeds_give_different_episodes():
    first = generate_episode(11, num_frames=8, image_size=48, num_points=32)
    second = generate_episode(12, num_frames=8, image_size=48, num_points=32)
    assert not np.array_equal(first.frames, second.frames)
    assert not np.allclose(first.tracks_world, second.tracks_world)


def test_shapes_and_dtypes(fixed_episode):
    T, H, N = NUM_FRAMES, IMAGE_SIZE, NUM_POINTS
    assert fixed_episode.frames.shape == (T, H, H, 3) and fixed_episode.frames.dtype == np.uint8
    assert fixed_episode.depth.shape == (T, H, H) and fixed_episode.depth.dtype == np.float32
    assert fixed_episode.intrinsics.shape == (3, 3) and fixed_episode.intrinsics.dtype == np.float32
    assert fixed_episode.extrinsics.shape == (T, 4, 4) and fixed_episode.extrinsics.dtype == np.float32
    assert fixed_episode.tracks_world.shape == (T, N, 3) and fixed_episode.tracks_world.dtype == np.float32
    assert fixed_episode.visible.shape == (T, N) and fixed_episode.visible.dtype == bool
    assert fixed_episode.object_ids.shape == (N,) and np.issubdtype(fixed_episode.object_ids.dtype, np.integer)
    assert fixed_episode.moving.shape == (N,) and fixed_episode.moving.dtype == bool
    assert fixed_episode.skill in TASK_TYPES and fixed_episode.task
    assert fixed_episode.object_names[0] == "table"
    assert set(np.unique(fixed_episode.object_ids)) <= set(range(len(fixed_episode.object_names)))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="task"):
        generate_episode(0, task="juggle")
    with pytest.raises(ValueError, match="num_frames"):
        generate_episode(0, num_frames=1)


def test_unspecified_task_covers_every_skill():
    skills = {generate_episode(seed, num_frames=4, image_size=32, num_points=8).skill for seed in range(24)}
    assert skills == set(TASK_TYPES)


def test_points_start_visible_and_half_are_moving(episode):
    assert episode.visible[0].all()
    assert episode.moving.sum() == NUM_POINTS // 2
    assert episode.visible.mean() > 0.6  # the geometry tests below must not pass vacuously
    gripper = episode.object_names.index("gripper")
    assert (episode.object_ids[episode.moving] == gripper).any()
    assert (episode.object_ids[~episode.moving] == 0).any()
    assert set(np.unique(episode.object_ids)) == set(range(len(episode.object_names)))  # every object is tracked


def test_depth_is_positive_and_finite(episode):
    assert np.isfinite(episode.depth).all() and (episode.depth > 0).all()


def test_project_points_matches_pinhole_reference(moving_episode):
    rng = np.random.default_rng(0)
    points = rng.uniform([-0.2, -0.2, 0.0], [0.2, 0.2, 0.2], size=(50, 3))
    uv, z = project_points(points, moving_episode.extrinsics[7], moving_episode.intrinsics)
    expected_uv, expected_z = reference_project(points, moving_episode.extrinsics[7], moving_episode.intrinsics)
    np.testing.assert_allclose(uv, expected_uv, atol=1e-6)
    np.testing.assert_allclose(z, expected_z, atol=1e-9)
    batched_uv, _ = project_points(points.reshape(5, 10, 3), moving_episode.extrinsics[7], moving_episode.intrinsics)
    np.testing.assert_allclose(batched_uv.reshape(50, 2), expected_uv, atol=1e-6)


def test_extrinsics_are_rigid_and_camera_looks_down(episode):
    rotations = episode.extrinsics[:, :3, :3].astype(np.float64)
    identities = np.broadcast_to(np.eye(3), rotations.shape)
    np.testing.assert_allclose(rotations @ rotations.transpose(0, 2, 1), identities, atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(rotations), 1.0, atol=1e-5)
    optical_axis_world = rotations[:, 2]  # third row of world->camera = camera z in world coordinates
    elevation = np.degrees(np.arcsin(-optical_axis_world[:, 2]))
    assert ((elevation > 30) & (elevation < 60)).all()


def test_visibility_is_the_z_buffer_test(episode):
    """Visible <=> inside the image, in front, and rendered depth within 2 % of the point's own depth."""
    for t in range(NUM_FRAMES):
        uv, z = reference_project(episode.tracks_world[t], episode.extrinsics[t], episode.intrinsics)
        cols, rows = nearest_pixels(np.nan_to_num(uv, nan=-1.0)).T
        inside = (z > 0) & (cols >= 0) & (cols < IMAGE_SIZE) & (rows >= 0) & (rows < IMAGE_SIZE)
        rows, cols = np.clip(rows, 0, IMAGE_SIZE - 1), np.clip(cols, 0, IMAGE_SIZE - 1)
        rendered = np.where(inside, episode.depth[t][rows, cols], np.nan)
        matches = np.abs(rendered - z) <= 0.02 * z
        np.testing.assert_array_equal(episode.visible[t], inside & matches, err_msg=f"frame {t}")


def test_unprojecting_rendered_depth_recovers_visible_points(episode):
    focal = float(episode.intrinsics[0, 0])
    errors, depths = [], []
    for t in range(NUM_FRAMES):
        points = episode.tracks_world[t, episode.visible[t]].astype(np.float64)
        uv, z = reference_project(points, episode.extrinsics[t], episode.intrinsics)
        pixels = nearest_pixels(uv)
        depth = episode.depth[t][pixels[:, 1], pixels[:, 0]]
        recovered = reference_unproject(pixels.astype(np.float64), depth, episode.extrinsics[t], episode.intrinsics)
        errors.append(np.linalg.norm(recovered - points, axis=1))
        depths.append(z)
        # with the exact sub-pixel position and own depth the recovery is exact up to float32 storage
        exact = reference_unproject(uv, z, episode.extrinsics[t], episode.intrinsics)
        np.testing.assert_allclose(exact, points, atol=1e-5)
    errors, depths = np.concatenate(errors), np.concatenate(depths)
    # off by at most half a pixel diagonally plus the 2 % depth tolerance of the visibility test
    assert (errors <= depths * (0.021 + 0.75 / focal)).all()
    assert np.median(errors / depths) < 0.005


def test_depth_is_along_the_optical_axis_not_the_ray(episode):
    """Every pixel unprojects onto the table plane (z = 0) or onto a box above it; ray lengths would sink below."""
    rows, cols = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    uv = np.stack([cols.ravel(), rows.ravel()], axis=1).astype(np.float64)
    for t in (0, NUM_FRAMES - 1):
        world = reference_unproject(uv, episode.depth[t].ravel(), episode.extrinsics[t], episode.intrinsics)
        assert world[:, 2].min() > -1e-4
        assert world[:, 2].max() < 0.3
        assert (np.abs(world[:, 2]) < 1e-4).mean() > 0.6  # most of the image is table


def test_static_points_stay_and_moving_points_move(episode):
    static_tracks = episode.tracks_world[:, ~episode.moving]
    assert np.abs(static_tracks - static_tracks[0]).max() < 1e-6
    moving_tracks = episode.tracks_world[:, episode.moving]
    travel = np.linalg.norm(moving_tracks - moving_tracks[0], axis=-1).max(axis=0)
    assert np.median(travel) > 0.02
    assert (travel > 0.01).mean() > 0.8  # only points close to a rotation axis may travel less


def test_moving_camera_moves_static_pixels_but_not_their_world_positions(fixed_episode, moving_episode):
    def static_pixel_shift(episode):
        static = episode.tracks_world[:, ~episode.moving]
        start, _ = reference_project(static[0], episode.extrinsics[0], episode.intrinsics)
        end, _ = reference_project(static[-1], episode.extrinsics[-1], episode.intrinsics)
        return np.linalg.norm(end - start, axis=1)

    assert np.median(static_pixel_shift(moving_episode)) > 3.0
    assert static_pixel_shift(fixed_episode).max() < 1e-3
    assert not np.allclose(moving_episode.extrinsics[0], moving_episode.extrinsics[-1])
    static = moving_episode.tracks_world[:, ~moving_episode.moving]
    assert np.abs(static - static[0]).max() < 1e-6


# ------------------------------------------------------------------------------------------------ tasks

CAPTION_PATTERNS = {
    "push": r"push the (?P<color>\w+) block to the (?P<direction>left|right)|"
    r"slide the (?P<color2>\w+) block (?P<direction2>forward|backward)",
    "pick_place": r"pick up the (?P<color>\w+) cube and place it on the (?P<direction>left|right)",
    "stack": r"stack the (?P<color>\w+) block on the (?P<target>\w+) block",
    "rotate": r"rotate the (?P<color>\w+) block (?P<direction>clockwise|counterclockwise)",
}
COLOR_HUES = {"red": 0, "orange": 30, "yellow": 55, "green": 120, "blue": 230, "purple": 285}


def nearest_color_name(rgb):
    hue = colorsys.rgb_to_hsv(*(np.asarray(rgb) / 255.0))[0] * 360
    return min(COLOR_HUES, key=lambda name: min(abs(hue - COLOR_HUES[name]), 360 - abs(hue - COLOR_HUES[name])))


def signed_yaw_change(points_start, points_end):
    """Median rotation about world z (counterclockwise positive, seen from above) of a rigid point set."""
    rng = np.random.default_rng(0)
    pairs = rng.integers(len(points_start), size=(200, 2))
    before = points_start[pairs[:, 1], :2] - points_start[pairs[:, 0], :2]
    after = points_end[pairs[:, 1], :2] - points_end[pairs[:, 0], :2]
    usable = np.linalg.norm(before, axis=1) > 0.01
    cross = before[usable, 0] * after[usable, 1] - before[usable, 1] * after[usable, 0]
    return np.degrees(np.median(np.arctan2(cross, (before[usable] * after[usable]).sum(axis=1))))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("task", TASK_TYPES)
def test_task_caption_names_the_block_that_moves_as_described(task, seed):
    episode = generate_episode(seed, num_frames=32, image_size=64, num_points=96, task=task)
    assert episode.skill == task
    match = re.fullmatch(CAPTION_PATTERNS[task], episode.task)
    assert match, episode.task
    color = match.group("color") or match.group("color2")
    direction = match.groupdict().get("direction") or match.groupdict().get("direction2")

    gripper = episode.object_names.index("gripper")
    block_points = episode.moving & (episode.object_ids != gripper)
    moved_ids = np.unique(episode.object_ids[block_points])
    assert len(moved_ids) == 1 and episode.object_names[moved_ids[0]] == f"{color} block"
    assert not np.isin(episode.object_ids[~episode.moving], [moved_ids[0], gripper]).any()

    uv, z = reference_project(episode.tracks_world[0, block_points], episode.extrinsics[0], episode.intrinsics)
    cols, rows = nearest_pixels(uv).T
    assert nearest_color_name(episode.frames[0][rows, cols].mean(axis=0)) == color

    block = episode.tracks_world[:, block_points].astype(np.float64)
    start, end = block[0], block[-1]
    uv_start, z_start = reference_project(start, episode.extrinsics[0], episode.intrinsics)
    uv_end, z_end = reference_project(end, episode.extrinsics[-1], episode.intrinsics)
    image_shift = (uv_end - uv_start).mean(axis=0)
    if task in ("push", "pick_place"):
        if direction in ("left", "right"):
            assert image_shift[0] * (1 if direction == "right" else -1) > 3.0
        else:  # forward means away from the camera: deeper and higher up in the image
            sign = 1 if direction == "forward" else -1
            assert sign * (z_end - z_start).mean() > 0.02 and sign * image_shift[1] < -1.0
        assert np.abs(end[:, 2] - start[:, 2]).max() < 1e-4  # ends on the table again
    if task == "pick_place":
        assert (block[:, :, 2].mean(axis=1) - start[:, 2].mean()).max() > 0.03  # lifted on the way
    if task == "stack":
        target_points = episode.object_ids == episode.object_names.index(f"{match.group('target')} block")
        assert target_points.any()
        target = episode.tracks_world[-1, target_points].astype(np.float64)
        # blocks are at most 7.2 cm wide: any point of the target lies within one block diagonal of the moved one
        assert np.linalg.norm(target[:, None, :2] - end[None, :, :2], axis=-1).max() < 2 * np.hypot(0.072, 0.072)
        other_blocks = ~episode.moving & (episode.object_ids > 0) & ~target_points
        if other_blocks.any():  # and it is the target, not another block, that ends up underneath
            centroid = end[:, :2].mean(axis=0)
            others = episode.tracks_world[-1, other_blocks, :2]
            target_gap = np.linalg.norm(target[:, :2] - centroid, axis=1).min()
            assert target_gap < np.linalg.norm(others - centroid, axis=1).min()
        assert end[:, 2].min() > target[:, 2].max() - 0.005  # resting on top, not beside it
        assert (end[:, 2] - start[:, 2]).min() > 0.04  # lifted by the target's height: only a block holds it up
    if task == "rotate":
        yaw = signed_yaw_change(start, end)
        assert 50 < abs(yaw) < 100 and (yaw < 0) == (direction == "clockwise")
        assert np.abs(end[:, 2] - start[:, 2]).max() < 1e-4
        assert np.linalg.norm(end.mean(axis=0) - start.mean(axis=0)) < 0.05  # turns in place


# ---------------------------------------------------------------------------------------------- samples


def test_sample_queries_are_visible_points_at_their_frame(moving_episode):
    sample = episode_to_samples(moving_episode, [6], history=4, horizon=8)[0]
    indices = sample["point_indices"]
    assert moving_episode.visible[6, indices].all() and len(indices) == moving_episode.visible[6].sum()
    uv, z = reference_project(
        moving_episode.tracks_world[6, indices], moving_episode.extrinsics[6], moving_episode.intrinsics
    )
    np.testing.assert_allclose(sample["query_uv"], uv, atol=1e-3)
    np.testing.assert_allclose(sample["query_z"], z, rtol=1e-5)
    np.testing.assert_array_equal(sample["image"], moving_episode.frames[6])
    np.testing.assert_array_equal(sample["depth"], moving_episode.depth[6])
    np.testing.assert_array_equal(sample["cluster_ids"], moving_episode.object_ids[indices])
    np.testing.assert_array_equal(sample["moving"], moving_episode.moving[indices])
    assert sample["task"] == moving_episode.task
    assert sample["future"].shape == (len(indices), 8, 3) and sample["history"].shape == (len(indices), 4, 3)


def test_future_in_camera_t_unprojects_to_future_world_tracks(moving_episode):
    t, horizon = 4, 12
    sample = episode_to_samples(moving_episode, [t], horizon=horizon)[0]
    assert sample["future_valid"].all()
    for k in range(horizon):
        future = sample["future"][:, k].astype(np.float64)
        world = reference_unproject(
            future[:, :2], future[:, 2], moving_episode.extrinsics[t], moving_episode.intrinsics
        )
        np.testing.assert_allclose(world, moving_episode.tracks_world[t + 1 + k, sample["point_indices"]], atol=1e-4)


def test_camera_motion_is_removed_for_static_points(moving_episode):
    sample = episode_to_samples(moving_episode, [3], horizon=16)[0]
    static = ~sample["moving"]
    future_uv = sample["future"][static, :, :2]
    query_uv = np.broadcast_to(sample["query_uv"][static, None], future_uv.shape)
    np.testing.assert_allclose(future_uv, query_uv, atol=1e-3)


def test_future_is_invalid_past_the_episode_end(fixed_episode):
    t = NUM_FRAMES - 5
    sample = episode_to_samples(fixed_episode, [t], horizon=16)[0]
    assert sample["future_valid"][:, :4].all()
    assert not sample["future_valid"][:, 4:].any()
    assert (sample["future"][:, 4:] == 0).all()


def test_history_is_time_reversed(moving_episode):
    t = 5
    sample = episode_to_samples(moving_episode, [t], history=8)[0]
    indices = sample["point_indices"]
    assert sample["history_valid"][:, :t].all() and not sample["history_valid"][:, t:].any()
    for k in range(t):
        uv, z = reference_project(
            moving_episode.tracks_world[t - 1 - k, indices], moving_episode.extrinsics[t], moving_episode.intrinsics
        )
        np.testing.assert_allclose(sample["history"][:, k, :2], uv, atol=1e-3)
        np.testing.assert_allclose(sample["history"][:, k, 2], z, rtol=1e-5)


def test_num_queries_prefers_moving_points(fixed_episode):
    sample = episode_to_samples(fixed_episode, [0], num_queries=32, rng=np.random.default_rng(0))[0]
    assert len(sample["point_indices"]) == 32 and len(np.unique(sample["point_indices"])) == 32
    assert sample["moving"].sum() >= 16 and (~sample["moving"]).any()
    oversized = episode_to_samples(fixed_episode, [0], num_queries=3 * NUM_POINTS)[0]
    assert oversized["future"].shape[0] == 3 * NUM_POINTS
    assert set(oversized["point_indices"]) == set(np.flatnonzero(fixed_episode.visible[0]))


def test_samples_reject_bad_input(fixed_episode):
    with pytest.raises(ValueError, match="out of range"):
        episode_to_samples(fixed_episode, [NUM_FRAMES])
    with pytest.raises(ValueError, match="out of range"):
        episode_to_samples(fixed_episode, [-1])
    blind = dataclasses.replace(fixed_episode, visible=np.zeros_like(fixed_episode.visible))
    with pytest.raises(ValueError, match="no visible points"):
        episode_to_samples(blind, [0])
