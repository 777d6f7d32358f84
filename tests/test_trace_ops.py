"""TraceExtract geometry and motion stages against exact ground truth."""

from pathlib import Path

import numpy as np
import pytest

from mu0.dataset_builders.procedural import generate_episode, project_points
from mu0.dataset_builders.trace_ops import (
    check_camera,
    fill_world_tracks,
    interpolate_at,
    lift_to_world,
    motion_events,
    moving_tracks,
    normalize_pixels,
    project_to_camera,
    retarget_times,
    robust_speed,
    visible_coverage,
)

SCENETRACKER = Path(__file__).resolve().parents[2] / "shared" / "data" / "scenetracker_000005"


@pytest.fixture(scope="module")
def episode():
    return generate_episode(5, num_frames=24, image_size=96, moving_camera=True)


def ground_truth_pixels(episode):
    return np.stack([project_points(episode.tracks_world[t], episode.extrinsics[t], episode.intrinsics)[0]
                     for t in range(len(episode.frames))])


def test_lifting_recovers_world_points_with_a_moving_camera(episode):
    pixels = ground_truth_pixels(episode)
    world, valid = lift_to_world(pixels, episode.visible, episode.depth, episode.intrinsics, episode.extrinsics)
    assert valid.mean() > 0.5
    error = np.linalg.norm(world[valid] - episode.tracks_world[valid], axis=-1)
    # bilinear depth at sub-pixel positions on 96 px renders: a few millimetres at ~1 m
    assert np.median(error) < 0.01


def test_projection_removes_camera_motion(episode):
    anchor = 10
    traces, in_front = project_to_camera(episode.tracks_world, np.ones(episode.visible.shape, bool),
                                         episode.extrinsics[anchor], episode.intrinsics)
    expected, expected_z = project_points(episode.tracks_world, episode.extrinsics[anchor], episode.intrinsics)
    np.testing.assert_allclose(traces[in_front][:, :2], expected[in_front], atol=1e-3)
    np.testing.assert_allclose(traces[in_front][:, 2], expected_z[in_front], rtol=1e-5)
    static = ~episode.moving
    # static points keep their pixel position in a fixed camera, whatever the real camera did
    assert np.abs(traces[:, static, :2] - traces[anchor, static, :2]).max() < 1e-3


@pytest.mark.skipif(not SCENETRACKER.exists(), reason="shared SceneTracker clip not present")
def test_scenetracker_static_points_stay_fixed_in_the_world():
    from mu0.dataset_builders.sources import load_scenetracker, scenetracker_refs

    raw = load_scenetracker(scenetracker_refs(str(SCENETRACKER))[0])
    world, valid = lift_to_world(raw.tracks, raw.track_visible, raw.depth, raw.intrinsics, raw.extrinsics)
    drift = np.nanmax(np.linalg.norm(world - np.nanmedian(np.where(valid[..., None], world, np.nan), axis=0), axis=-1), axis=0)
    # most points are static: their world position must not follow the 0.36-unit camera path
    assert np.nanmedian(drift) < 0.02


def test_bad_cameras_raise():
    with pytest.raises(ValueError, match="intrinsics"):
        check_camera(np.zeros((3, 3)), np.repeat(np.eye(4)[None], 2, 0), 2)
    with pytest.raises(ValueError, match="extrinsics"):
        check_camera(np.eye(3), np.full((2, 4, 4), np.nan), 2)
    singular = np.repeat(np.eye(4)[None], 2, 0)
    singular[1, :3, :3] = 0
    with pytest.raises(ValueError, match="frame 1"):
        check_camera(np.eye(3), singular, 2)


def test_fill_interpolates_gaps_only():
    world = np.zeros((5, 1, 3))
    world[:, 0, 0] = [np.nan, 1.0, np.nan, 3.0, np.nan]
    valid = np.array([[False], [True], [False], [True], [False]])
    filled, known = fill_world_tracks(world, valid)
    assert filled[2, 0, 0] == pytest.approx(2.0)
    assert known[:, 0].tolist() == [False, True, True, True, False]


def test_normalize_pixels_edges():
    pixels = np.array([[-0.5, -0.5], [99.5, 49.5], [49.5, 24.5]])
    np.testing.assert_allclose(normalize_pixels(pixels, (50, 100)), [[-1, -1], [1, 1], [0, 0]])


def test_retargeting_places_steps_by_path_length():
    # speed doubles halfway: equal path-length steps are twice as close in time in the fast half
    speed = np.array([0.01] * 10 + [0.02] * 10)
    times = retarget_times(speed, anchor=0, num_steps=8)
    np.testing.assert_allclose(times[:2], [5.0, 10.0])
    np.testing.assert_allclose(times[2:4], [12.5, 15.0])
    assert np.isnan(times[-1])  # beyond the episode's motion: invalid
    backward = retarget_times(speed, anchor=20, num_steps=2, direction=-1)
    np.testing.assert_allclose(backward, [17.5, 15.0])
    assert np.isnan(retarget_times(np.zeros(5), 0, 3)).all()  # no motion, no retargeted steps


def test_robust_speed_uses_the_fastest_tracks():
    tracks = np.zeros((3, 100, 2))
    tracks[1:, :1, 0] = [[0.5], [1.0]]  # one fast track (the top 2 % of 100 is 2 tracks: itself and a still one)
    speed = robust_speed(tracks, np.ones((3, 100), bool))
    np.testing.assert_allclose(speed, [0.25, 0.25])


def test_interpolation_and_validity():
    traces = np.arange(4, dtype=np.float64)[:, None, None] * np.ones((4, 1, 3))
    valid = np.array([[True], [True], [False], [True]])
    values, ok = interpolate_at(traces, valid, np.array([0.5, 1.5, np.nan]))
    assert values[0, 0, 0] == pytest.approx(0.5) and ok[0].tolist() == [True, False, False]


def test_moving_threshold_and_events():
    tracks = np.zeros((60, 2, 2))
    tracks[:, 1, 0] = np.concatenate([np.linspace(0, 20, 30), np.linspace(20, 0, 30)])
    moving = moving_tracks(tracks, np.ones((60, 2), bool), (100, 100))
    assert moving.tolist() == [False, True]  # 20 px > 141 / 20
    events = motion_events(tracks, np.ones((60, 2), bool), moving)
    assert events[0][0] == 0 and events[-1][1] == 60
    assert all(25 <= end - start <= 200 for start, end in events)
    assert visible_coverage(np.array([[True, False], [True, True]])) == pytest.approx(0.75)


def test_retargeting_measures_paths_in_released_units():
    """One step = 0.05 of path length in (x / W, y / H, z metres): a point moving 0.05 W px per frame takes one
    retargeted step per frame, whatever the image height, and depth motion counts as well."""
    from mu0.dataset_builders.trace_ops import path_coordinates

    width, height, frames = 200, 50, 12
    sideways = np.zeros((frames, 1, 3))
    sideways[:, 0, 0] = 0.05 * width * np.arange(frames)
    speed = robust_speed(path_coordinates(sideways, (height, width)), np.ones((frames, 1), bool))
    np.testing.assert_allclose(speed, 0.05)
    np.testing.assert_allclose(retarget_times(speed, anchor=2, num_steps=3), [3.0, 4.0, 5.0])
    receding = np.zeros((frames, 1, 3))
    receding[:, 0, 2] = 0.1 * np.arange(frames)  # 10 cm per frame towards the back, no pixel motion
    speed = robust_speed(path_coordinates(receding, (height, width)), np.ones((frames, 1), bool))
    np.testing.assert_allclose(retarget_times(speed, anchor=0, num_steps=2), [0.5, 1.0])
