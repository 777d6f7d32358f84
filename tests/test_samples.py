"""TraceExtract samples as released: moving queries only by default, static queries an explicit setting."""

import numpy as np

from mu0.dataset_builders.extraction import ExtractedEpisode, ExtractionSettings, episode_samples
from mu0.dataset_builders.trace_extract import TraceExtract


def build(tmp_path, **settings):
    builder = TraceExtract(config_name="samples", source="procedural", num_episodes=2, num_frames=20, image_size=64,
                           cache_dir=str(tmp_path / "cache"), work_dir=str(tmp_path / "work"),
                           settings={"frame_stride": 4, **settings})
    builder.download_and_prepare()
    return builder.as_dataset(split="train").with_format("numpy"), builder.compute_statistics()


def test_samples_hold_only_moving_queries_unless_static_queries_are_asked_for(tmp_path):
    moving_only, moving_statistics = build(tmp_path / "moving")
    with_static, static_statistics = build(tmp_path / "static", static_queries=True)
    assert len(moving_only) and all(np.asarray(row["moving"]).all() for row in moving_only)
    assert any(not np.asarray(row["moving"]).all() for row in with_static)
    # static points (zero deltas) pull the 95th percentile of |delta| down
    assert all(m > s for m, s in zip(moving_statistics["delta_scale"], static_statistics["delta_scale"]))


def test_extraction_history_runs_backwards_from_the_query():
    """Points sliding right at one arc-length step (0.05 of the width) per frame: history step k is the position
    k + 1 frames before t (nearest first; the processor reverses it to oldest first), the future k + 1 frames after.
    A reversed history, which once passed every test of this path, fails here."""
    num_frames, size, focal, depth = 30, 64, 50.0, 2.0
    pixels_per_frame = 0.05 * size
    start = np.array([[-0.6, -0.2, depth], [-0.6, 0.1, depth], [-0.5, 0.3, depth]])
    world = start[None] + np.arange(num_frames)[:, None, None] * np.array([pixels_per_frame * depth / focal, 0, 0])
    intrinsics = np.array([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1]], dtype=np.float32)
    everywhere = np.ones((num_frames, 3), dtype=bool)
    episode = ExtractedEpisode(
        episode_id="slide", task="slide right", fps=10.0, frames=np.zeros((num_frames, size, size, 3), np.uint8),
        depth=None, intrinsics=intrinsics, extrinsics=np.tile(np.eye(4, dtype=np.float32), (num_frames, 1, 1)),
        tracks=np.zeros((num_frames, 3, 2), np.float32), visible=everywhere, world=world.astype(np.float32),
        world_valid=everywhere, cluster_ids=np.zeros(3, np.int64), moving=np.ones(3, bool), events=[], captions=[],
    )
    samples = list(episode_samples(episode, ExtractionSettings(frame_stride=5, history=4, retarget_steps=6)))
    assert [sample["frame_index"] for sample in samples] == [4, 9, 14, 19, 24]
    for sample in samples:
        shown = sample["history_valid"]
        assert shown[:, :3].all()  # the 4th step of frame 4 lands on frame 0, within rounding of the episode start
        past_steps = np.broadcast_to(np.arange(1, 5) * pixels_per_frame, shown.shape)
        np.testing.assert_allclose(sample["history"][..., 0][shown], (sample["query_uv"][:, :1] - past_steps)[shown], atol=1e-3)
        np.testing.assert_allclose(sample["history"][..., 1][shown], np.repeat(sample["query_uv"][:, 1:], 4, 1)[shown], atol=1e-3)
        valid = sample["future_valid"]
        future_steps = np.broadcast_to(np.arange(1, 7) * pixels_per_frame, valid.shape)
        np.testing.assert_allclose(sample["future"][..., 0][valid], (sample["query_uv"][:, :1] + future_steps)[valid], atol=1e-3)
