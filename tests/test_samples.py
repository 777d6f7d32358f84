"""TraceExtract samples as released: moving queries only by default, static queries an explicit setting."""

import numpy as np

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
