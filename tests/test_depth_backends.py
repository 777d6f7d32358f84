"""Camera backends for sources without depth or poses: Depth Anything, guessed intrinsics, classical poses.

Pose expectations come from the procedural episodes' exact cameras; the depth model is a tiny random Depth
Anything (no weights can be downloaded here) or a stub whose output is known in advance.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mu0.dataset_builders.depth_backends import estimate_depth_depth_anything, estimate_intrinsics, estimate_poses
from mu0.dataset_builders.procedural import TASK_TYPES, generate_episode, project_points
from mu0.dataset_builders.trace_ops import lift_to_world, sample_depth

# conftest.py sets HF_HUB_OFFLINE=1 before anything imports huggingface_hub: nothing here may touch the network.

# ----------------------------------------------------------------------------------------------- depth


def tiny_depth_anything(depth_estimation_type: str = "metric", seed: int = 0):
    """A ~0.1M-parameter Depth Anything with a 4-layer Dinov2 backbone, weights drawn at random.

    The default initialisation gives a constant map (sigmoid(0) * max_depth everywhere), so every weight is
    redrawn: a spatially varying output is what could expose a wrong resize or batch bookkeeping.
    """
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(
        image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, out_indices=[1, 2, 3, 4], reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16, head_hidden_size=8, depth_estimation_type=depth_estimation_type, max_depth=5,
    )
    torch.manual_seed(seed)
    model = DepthAnythingForDepthEstimation(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.15)
    return model


def tiny_processor():
    """Depth Anything's processor settings (aspect kept, multiple of 14, ImageNet normalisation) at 56 px.

    `DPTImageProcessor` is what AutoImageProcessor maps depth_anything to; without torchvision it is the PIL
    backend, named directly here to avoid the fallback warning.
    """
    from transformers import DPTImageProcessorPil

    return DPTImageProcessorPil(
        size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14, do_rescale=True,
        do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(0).integers(0, 256, (5, 40, 60, 3), dtype=np.uint8)


def test_tiny_depth_anything_gives_finite_positive_metric_depth(frames):
    depth = estimate_depth_depth_anything(frames, model=tiny_depth_anything(), image_processor=tiny_processor())
    assert depth.shape == (5, 40, 60)
    assert depth.dtype == np.float32
    assert np.isfinite(depth).all()
    assert (depth > 0).all() and (depth <= 5.0 + 1e-4).all()  # the metric head is sigmoid * max_depth (5 m)
    assert depth.std() > 0.05  # redrawn weights: not a constant map


def test_depth_is_deterministic_and_independent_of_batching(frames):
    model, processor = tiny_depth_anything(), tiny_processor()
    one_by_one = estimate_depth_depth_anything(frames, model=model, image_processor=processor, batch_size=1)
    batched = estimate_depth_depth_anything(frames, model=model, image_processor=processor, batch_size=3)
    again = estimate_depth_depth_anything(frames, model=model, image_processor=processor, batch_size=3)
    np.testing.assert_array_equal(batched, again)
    np.testing.assert_allclose(one_by_one, batched, rtol=1e-4, atol=1e-5)
    # Each frame's map depends on its own image only: frames are not mixed up across batches.
    assert not np.allclose(batched[0], batched[1])


def test_depth_loads_a_local_checkpoint_offline(frames, tmp_path):
    model, processor = tiny_depth_anything(), tiny_processor()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = estimate_depth_depth_anything(frames[:2], model_name_or_path=str(tmp_path))
    direct = estimate_depth_depth_anything(frames[:2], model=model, image_processor=processor)
    np.testing.assert_allclose(loaded, direct, rtol=1e-4, atol=1e-5)


def test_missing_checkpoint_raises_an_error_naming_it(frames):
    name = "mu0-tests/no-such-depth-anything-checkpoint"
    with pytest.raises(OSError, match=name):
        estimate_depth_depth_anything(frames, model_name_or_path=name)


def test_relative_checkpoints_are_refused(frames):
    with pytest.raises(ValueError, match="metric"):
        estimate_depth_depth_anything(frames, model=tiny_depth_anything("relative"), image_processor=tiny_processor())


def test_a_model_without_processor_or_checkpoint_is_refused(frames):
    with pytest.raises(ValueError, match="image processor"):
        estimate_depth_depth_anything(frames, model=tiny_depth_anything())


class BrightnessDepthModel(torch.nn.Module):
    """Stub metric model whose depth is the input's red channel minus 0.5: known in advance, and <= 0 on dark
    pixels, which a real head can also produce (ReLU exactly 0, or sigmoid underflow)."""

    config = SimpleNamespace(depth_estimation_type="metric")

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, pixel_values):
        return SimpleNamespace(predicted_depth=self.scale * pixel_values[:, 0] - 0.5)


def test_depth_maps_come_back_at_frame_size_in_frame_orientation():
    """A left-to-right ramp in a 30 x 80 frame must stay a left-to-right ramp of the frame's size; non-positive
    predictions on the dark side must come out as depth that the lifting stage treats as invalid."""
    from transformers import DPTImageProcessorPil

    height, width = 30, 80
    ramp = np.broadcast_to(np.linspace(0, 255, width)[None, :, None], (height, width, 3)).round().astype(np.uint8)
    processor = DPTImageProcessorPil(size={"height": 28, "width": 70}, do_normalize=False, do_rescale=True)
    depth = estimate_depth_depth_anything(ramp[None], model=BrightnessDepthModel(), image_processor=processor)[0]
    assert depth.shape == (height, width)
    np.testing.assert_allclose(depth, np.broadcast_to(depth[:1], depth.shape), atol=1e-5)  # constant down columns
    bright = np.linspace(0, 1, width) - 0.5 > 0.05  # well inside the positive side, away from the resize blur
    assert (np.diff(depth[0][bright]) > 0).all()
    np.testing.assert_allclose(depth[0, -1], 0.5, atol=0.02)  # red 255 -> 1.0 - 0.5
    dark = np.linspace(0, 1, width) - 0.5 < -0.05
    assert (depth[:, dark] > 0).all()
    pixels = np.stack(np.meshgrid(np.flatnonzero(dark), [height // 2]), axis=-1).reshape(1, -1, 2).astype(float)
    assert np.isnan(sample_depth(depth[None], pixels)).all()


# ----------------------------------------------------------------------------------------------- intrinsics


def test_intrinsics_guess_centres_the_principal_point_and_uses_the_fov():
    intrinsics = estimate_intrinsics((48, 64), fov_degrees=60.0)
    # tan(30 deg) = 1 / sqrt(3), so f = (64 / 2) * sqrt(3); centre ((64 - 1) / 2, (48 - 1) / 2).
    expected = np.array([[32 * math.sqrt(3), 0, 31.5], [0, 32 * math.sqrt(3), 23.5], [0, 0, 1]])
    np.testing.assert_allclose(intrinsics, expected, rtol=1e-12)


def test_intrinsics_guess_spans_the_fov_edge_to_edge():
    """The rays through the outer edges of the leftmost and rightmost pixels (x = -0.5 and W - 0.5) must be
    fov_degrees apart, and the guess must reproduce the procedural renderer's own 45-degree camera."""
    height, width, fov = 30, 50, 70.0
    inverse = np.linalg.inv(estimate_intrinsics((height, width), fov))
    left, right = inverse @ [-0.5, (height - 1) / 2, 1], inverse @ [width - 0.5, (height - 1) / 2, 1]
    angle = math.degrees(math.acos(left @ right / np.linalg.norm(left) / np.linalg.norm(right)))
    assert angle == pytest.approx(fov, abs=1e-9)
    episode = generate_episode(0, num_frames=2, image_size=64)
    np.testing.assert_allclose(estimate_intrinsics((64, 64), 45.0), episode.intrinsics, rtol=1e-6)


@pytest.mark.parametrize("image_size, fov", [((0, 10), 60.0), ((10, 10), 0.0), ((10, 10), 180.0)])
def test_intrinsics_guess_refuses_impossible_inputs(image_size, fov):
    with pytest.raises(ValueError):
        estimate_intrinsics(image_size, fov)


# ----------------------------------------------------------------------------------------------- poses

NUM_FRAMES = 48


def exact_tracks(episode):
    return np.stack([project_points(episode.tracks_world[t], episode.extrinsics[t], episode.intrinsics)[0]
                     for t in range(len(episode.frames))])


def relative_to_first(extrinsics):
    """World -> camera matrices re-expressed with the world = camera 0, the frame `estimate_poses` returns."""
    extrinsics = np.asarray(extrinsics, dtype=np.float64)
    return extrinsics @ np.linalg.inv(extrinsics[0])


def pose_errors(estimated, truth):
    """Per-frame rotation error in degrees and camera-centre error in metres."""
    difference = estimated @ np.linalg.inv(truth)
    rotation = difference[:, :3, :3]
    sine = np.linalg.norm(np.stack([rotation[:, 2, 1] - rotation[:, 1, 2], rotation[:, 0, 2] - rotation[:, 2, 0],
                                    rotation[:, 1, 0] - rotation[:, 0, 1]], -1), axis=-1) / 2
    cosine = (np.trace(rotation, axis1=1, axis2=2) - 1) / 2
    angles = np.degrees(np.arctan2(sine, cosine))  # accurate near 0, unlike arccos
    centres = [np.einsum("tji,tj->ti", pose[:, :3, :3], -pose[:, :3, 3]) for pose in (estimated, truth)]
    return angles, np.linalg.norm(centres[0] - centres[1], axis=-1)


@pytest.fixture(scope="module", params=range(4), ids=TASK_TYPES)
def episode(request):
    """Half of the 256 points ride on the manipulated block and the gripper: as many movers as static points."""
    return generate_episode(request.param, num_frames=NUM_FRAMES, image_size=128, moving_camera=True,
                            task=TASK_TYPES[request.param])


def test_poses_from_exact_tracks_match_the_true_cameras(episode):
    """Measured over seeds 0-11 (every task): at most 0.033 deg, 0.38 mm of camera centre and 0.38 mm of static
    point drift, from depth interpolation at the anchor and sub-threshold drift of movers; the bounds leave about
    3x margin. Letting the moving points into PnP gives errors of degrees and centimetres."""
    tracks = exact_tracks(episode)
    estimated = estimate_poses(episode.frames, episode.depth, episode.intrinsics, tracks, episode.visible)
    truth = relative_to_first(episode.extrinsics)
    angles, offsets = pose_errors(estimated, truth)
    assert angles.max() < 0.1
    assert offsets.max() < 1e-3
    assert np.linalg.norm(truth[-1, :3, 3]) > 0.05  # the camera really moved: the test is not trivially passed

    # Static points lifted with the estimated cameras land where the true cameras put them.
    static = episode.visible & ~episode.moving[None]
    with_estimate, valid = lift_to_world(tracks, static, episode.depth, episode.intrinsics, estimated)
    with_truth, _ = lift_to_world(tracks, static, episode.depth, episode.intrinsics, truth)
    drift = np.linalg.norm(with_estimate - with_truth, axis=-1)[valid]
    assert drift.max() < 1e-3


def test_chunked_poses_chain_through_their_anchors(episode):
    """Three chunks of 16 frames. With exact tracks the threshold can sit at 0.5 px, well above the ~0.1 px that
    anchor depth interpolation leaves; measured at most 0.057 deg and 0.63 mm over seeds 0-11."""
    tracks = exact_tracks(episode)
    estimated = estimate_poses(episode.frames, episode.depth, episode.intrinsics, tracks, episode.visible,
                               chunk=16, ransac_threshold=0.5)
    angles, offsets = pose_errors(estimated, relative_to_first(episode.extrinsics))
    assert angles.max() < 0.2
    assert offsets.max() < 2e-3


def test_poses_are_deterministic():
    episode = generate_episode(1, num_frames=12, image_size=96, moving_camera=True)
    tracks = exact_tracks(episode)
    first = estimate_poses(episode.frames, episode.depth, episode.intrinsics, tracks, episode.visible)
    second = estimate_poses(episode.frames, episode.depth, episode.intrinsics, tracks, episode.visible)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first[0], np.eye(4))


def test_a_frame_with_too_few_points_is_named():
    episode = generate_episode(2, num_frames=8, image_size=96, moving_camera=True)
    visible = episode.visible.copy()
    keep = np.flatnonzero(visible[5])[:5]
    visible[5] = False
    visible[5, keep] = True
    with pytest.raises(ValueError, match="Frame 5"):
        estimate_poses(episode.frames, episode.depth, episode.intrinsics, exact_tracks(episode), visible)


@pytest.mark.parametrize("change", ["depth", "tracks", "visible", "chunk", "threshold"])
def test_poses_refuse_inconsistent_inputs(change):
    episode = generate_episode(3, num_frames=6, image_size=64, moving_camera=True)
    inputs = dict(frames=episode.frames, depth=episode.depth, intrinsics=episode.intrinsics,
                  tracks=exact_tracks(episode), visible=episode.visible)
    if change == "depth":
        inputs["depth"] = episode.depth[:-1]
    elif change == "tracks":
        inputs["tracks"] = inputs["tracks"][:-1]
    elif change == "visible":
        inputs["visible"] = episode.visible[:, :-1]
    elif change == "chunk":
        inputs["chunk"] = 1
    else:
        inputs["ransac_threshold"] = 0.0
    with pytest.raises(ValueError):
        estimate_poses(**inputs)
