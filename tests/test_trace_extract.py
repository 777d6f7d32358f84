"""TraceExtract builders end to end: samples and episodes, statistics, resumability, failures, sharding, sources."""

import json
import os

import numpy as np
import pytest

from mu0 import Mu0Processor
from mu0.dataset_builders.captions import given_captions, template_captions
from mu0.dataset_builders.extraction import EpisodeRejected, ExtractionSettings, episode_samples, extract_episode
from mu0.dataset_builders.procedural import generate_episode
from mu0.dataset_builders.sources import RawEpisode, load_procedural, procedural_refs, rgbd_refs, video_folder_refs
from mu0.dataset_builders.trace_extract import TraceExtract, decode_sample

SMALL = dict(source="procedural", num_episodes=2, num_frames=30, image_size=64, settings={"frame_stride": 6})


def build(tmp_path, config_name="samples", download_mode=None, **overrides):
    options = {**SMALL, **overrides}
    builder = TraceExtract(config_name=config_name, cache_dir=str(tmp_path / "cache"), work_dir=str(tmp_path / "work"), **options)
    builder.download_and_prepare(download_mode=download_mode)
    return builder, builder.as_dataset(split="train")


def test_samples_rows_match_the_procedural_ground_truth(tmp_path):
    builder, samples = build(tmp_path)
    assert len(samples) > 0
    row = decode_sample(samples[0])
    episode = generate_episode(procedural_refs(2)[0].seed, num_frames=30, image_size=64)
    frame = row["frame_index"]
    assert row["episode_id"] == procedural_refs(2)[0].episode_id
    np.testing.assert_array_equal(row["image"], episode.frames[frame])
    np.testing.assert_allclose(row["depth"], episode.depth[frame], atol=6e-4, equal_nan=True)  # 1 mm PNG steps
    # raw future step k of every query = its world point at t + k seen through camera t
    from mu0.dataset_builders.procedural import project_points

    query = row["track_ids"]
    now = project_points(episode.tracks_world[frame, query], episode.extrinsics[frame], episode.intrinsics)[0]
    assert np.median(np.linalg.norm(row["query_uv"] - now, axis=-1)) < 0.02
    expected_uv, expected_z = project_points(episode.tracks_world[frame + 3, query], episode.extrinsics[frame], episode.intrinsics)
    valid = row["future_raw_valid"][:, 2]
    # extracted traces come from depth lifted at the tracked pixel: sub-pixel error, worst at depth edges
    uv_error = np.linalg.norm(row["future_raw"][valid, 2, :2] - expected_uv[valid], axis=-1)
    assert np.median(uv_error) < 0.02 and uv_error.max() < 1.0
    z_error = np.abs(row["future_raw"][valid, 2, 2] - expected_z[valid])
    assert np.median(z_error) < 1e-3 and z_error.max() < 0.05
    assert row["future"].shape[1] == 128 and row["history"].shape[1] == 8
    assert all(c["start"] <= frame < c["end"] for c in row["captions"])
    assert {c["style"] for c in row["captions"]} >= {"descriptive", "imperative", "casual"}


def test_statistics_load_into_the_processor(tmp_path, tiny_processor):
    builder, _ = build(tmp_path)
    statistics = builder.compute_statistics()
    assert len(statistics["delta_scale"]) == 3 and all(v > 0 for v in statistics["delta_scale"])
    assert statistics["depth_log_range"][0] < statistics["depth_log_range"][1]
    saved = json.loads((tmp_path / "work" / "trace_statistics.json").read_text())
    assert saved == statistics
    processor = Mu0Processor(tiny_processor.image_processor, tiny_processor.tokenizer, **statistics)
    assert processor.delta_scale == statistics["delta_scale"]


def test_episodes_config_and_resumability(tmp_path):
    build(tmp_path)
    cached = sorted(os.listdir(tmp_path / "work" / "episodes"))
    assert len(cached) == 2 and not any(name.endswith(".tmp") for name in cached)
    stamps = [os.path.getmtime(tmp_path / "work" / "episodes" / name) for name in cached]
    _, episodes = build(tmp_path, config_name="episodes")  # reuses the extracted episodes
    assert stamps == [os.path.getmtime(tmp_path / "work" / "episodes" / name) for name in cached]
    assert len(episodes) == 2
    row = episodes[0]
    assert json.loads(row["metadata"])["backends"] == {"depth": "given", "camera": "given", "keypoints": "given", "tracker": "given", "captions": "template"}
    assert np.asarray(row["tracks_world"]).shape[-1] == 3 and len(row["frames"]) == 30


def test_sharding_splits_episodes(tmp_path):
    _, first = build(tmp_path / "a", num_episodes=4, shard_index=0, num_shards=2)
    _, second = build(tmp_path / "b", num_episodes=4, shard_index=1, num_shards=2)
    ids = set(first["episode_id"]), set(second["episode_id"])
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert ids[0] | ids[1] == {ref.episode_id for ref in procedural_refs(4)}


def test_rejected_episode_is_counted_not_written(tmp_path):
    builder = TraceExtract(config_name="samples", cache_dir=str(tmp_path / "cache"), work_dir=str(tmp_path / "work"),
                           **{**SMALL, "settings": {"frame_stride": 6, "min_coverage": 1.01}})
    builder.download_and_prepare()
    assert builder.info.splits["train"].num_examples == 0
    failures = [json.loads(line) for line in (tmp_path / "work" / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 2 and all(f["kind"] == "rejected" and "coverage" in f["reason"] for f in failures)
    assert not (tmp_path / "work" / "episodes").exists() or not os.listdir(tmp_path / "work" / "episodes")


def test_backend_requirements_are_explicit():
    raw = load_procedural(procedural_refs(1)[0], num_frames=20, image_size=64)
    no_camera = RawEpisode(raw.episode_id, raw.frames, raw.fps, tracks=raw.tracks, track_visible=raw.track_visible)
    with pytest.raises(ValueError, match="depth='given'"):
        extract_episode(no_camera, ExtractionSettings())
    no_intrinsics = RawEpisode(raw.episode_id, raw.frames, raw.fps, raw.depth, None, raw.extrinsics, raw.tracks, raw.track_visible)
    with pytest.raises(ValueError, match="field_of_view"):
        extract_episode(no_intrinsics, ExtractionSettings())
    guessed = extract_episode(no_intrinsics, ExtractionSettings(field_of_view=60.0))
    assert guessed.metadata["intrinsics"].startswith("guessed")
    no_text = RawEpisode(raw.episode_id, raw.frames, raw.fps, raw.depth, raw.intrinsics, raw.extrinsics, raw.tracks, raw.track_visible)
    with pytest.raises(ValueError, match="captions='given'"):
        extract_episode(no_text, ExtractionSettings(captions="given"))
    with pytest.raises(ValueError, match="Unknown tracker"):
        ExtractionSettings(tracker="cotracker3")
    with pytest.raises(ValueError, match="keypoints='given'"):
        ExtractionSettings(tracker="given", keypoints="grid")
    static = extract_episode(raw, ExtractionSettings(camera="static"))
    assert np.allclose(static.extrinsics, np.eye(4)) and static.metadata["backends"]["camera"] == "static"


def test_short_episode_is_rejected():
    raw = load_procedural(procedural_refs(1)[0], num_frames=9, image_size=64)
    with pytest.raises(EpisodeRejected, match="too short"):
        extract_episode(raw, ExtractionSettings())


def test_bad_episodes_raise():
    frames = np.zeros((5, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="depth has shape"):
        RawEpisode("bad", frames, 10.0, depth=np.ones((5, 4, 4)))
    with pytest.raises(ValueError, match="entirely NaN"):
        RawEpisode("bad", frames, 10.0, depth=np.full((5, 8, 8), np.nan))
    with pytest.raises(ValueError, match="non-empty"):
        RawEpisode("bad", frames[:0], 10.0)


def test_video_folder_and_rgbd_sources(tmp_path):
    import av

    episode = generate_episode(2, num_frames=12, image_size=64)
    with av.open(str(tmp_path / "clip.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for frame in episode.frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    (tmp_path / "clip.txt").write_text("push the block")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    refs = video_folder_refs(str(tmp_path))
    from mu0.dataset_builders.sources import load_video_folder

    loaded = load_video_folder(next(r for r in refs if r.episode_id == "clip"))
    assert loaded.frames.shape == (12, 64, 64, 3) and loaded.task == "push the block"
    assert np.abs(loaded.frames.astype(int) - episode.frames).mean() < 12  # lossy codec, same content
    with pytest.raises(ValueError, match="broken.mp4"):
        load_video_folder(next(r for r in refs if r.episode_id == "broken"))
    with pytest.raises(FileNotFoundError):
        video_folder_refs(str(tmp_path / "missing"))

    np.savez(tmp_path / "ep0.npz", frames=episode.frames, depth=episode.depth, intrinsics=episode.intrinsics,
             extrinsics=episode.extrinsics, task="stack")
    (ref,) = rgbd_refs(str(tmp_path))
    from mu0.dataset_builders.sources import load_rgbd

    assert load_rgbd(ref).task == "stack"


def test_captions_hierarchy():
    chunks = [(0, 30), (30, 60), (60, 90), (90, 120)]
    uvz = np.zeros((120, 1, 3))
    uvz[:, 0, 0] = np.linspace(0, 0.8, 120)  # steadily to the right
    captions = template_captions(chunks, uvz, np.ones((120, 1), bool), np.array([True]))
    levels = [c.level for c in captions]
    assert levels.count("chunk") == 12 and levels.count("pair") == 9 and levels.count("triple") == 6
    assert levels.count("segment") == 3
    assert all("right" in c.text for c in captions if c.level == "chunk")
    assert max(len(c.text.split()) for c in captions if c.style == "imperative" and c.level == "chunk") <= 30
    assert given_captions("open the drawer", 50)[0].text == "open the drawer"


def test_samples_skip_frames_without_history():
    raw = load_procedural(procedural_refs(1)[0], num_frames=20, image_size=64)
    samples = list(episode_samples(extract_episode(raw, ExtractionSettings()), ExtractionSettings(frame_stride=1)))
    assert min(s["frame_index"] for s in samples) == 8


def test_lk_tracking_and_estimated_camera_recover_the_scene():
    """Raw pixels only (no given tracks or poses): grid keypoints, LK tracks, PnP poses from depth."""
    episode = generate_episode(4, num_frames=24, image_size=96, moving_camera=True)
    raw = RawEpisode("lk", episode.frames, 10.0, depth=episode.depth, intrinsics=episode.intrinsics, task=episode.task)
    settings = ExtractionSettings(keypoints="grid", tracker="lk", camera="estimated", num_keypoints=128)
    extracted = extract_episode(raw, settings)
    assert extracted.metadata["backends"]["tracker"] == "lk" and extracted.metadata["backends"]["camera"] == "estimated"
    # estimated poses are relative to frame 0: compare camera-to-camera-0 motion with the ground truth
    truth = episode.extrinsics @ np.linalg.inv(episode.extrinsics[0])
    translation_error = np.linalg.norm(extracted.extrinsics[:, :3, 3] - truth[:, :3, 3], axis=-1)
    assert np.median(translation_error) < 0.01
    # tracks of static surfaces stay put in the estimated world
    static_world = np.where(extracted.world_valid[..., None], extracted.world, np.nan)[:, ~extracted.moving]
    drift = np.nanmax(np.linalg.norm(static_world - np.nanmedian(static_world, axis=0), axis=-1), axis=0)
    assert np.nanmedian(drift) < 0.01


def test_depth_anything_backend_from_a_saved_checkpoint(tmp_path):
    from test_depth_backends import tiny_depth_anything, tiny_processor

    tiny_depth_anything().save_pretrained(tmp_path / "depth")
    tiny_processor().save_pretrained(tmp_path / "depth")
    raw = load_procedural(procedural_refs(1)[0], num_frames=12, image_size=64)
    raw = RawEpisode(raw.episode_id, raw.frames, raw.fps, intrinsics=raw.intrinsics, tracks=raw.tracks,
                     track_visible=raw.track_visible, task=raw.task)
    extracted = extract_episode(raw, ExtractionSettings(depth="depth_anything", camera="static", depth_model=str(tmp_path / "depth"),
                                                        min_coverage=0.0, captions="given"))
    assert extracted.depth.shape == raw.frames.shape[:3] and np.isfinite(extracted.depth).all()
    assert extracted.metadata["backends"]["depth"] == "depth_anything"


def test_parallel_build_gives_the_same_rows(tmp_path):
    """num_proc=2 shards the episode refs across processes; the rows must not depend on it."""
    _, serial = build(tmp_path / "serial", num_episodes=3)
    builder = TraceExtract(config_name="samples", cache_dir=str(tmp_path / "parallel" / "cache"),
                           work_dir=str(tmp_path / "parallel" / "work"), **{**SMALL, "num_episodes": 3})
    builder.download_and_prepare(num_proc=2)
    parallel = builder.as_dataset(split="train")
    assert len(builder.info.splits["train"].shard_lengths) == 2  # two processes, one shard each
    assert len({row["episode_id"] for row in serial}) == 3

    def keyed(dataset):
        return {(row["episode_id"], row["frame_index"]): row for row in dataset.with_format("numpy")}

    serial_rows, parallel_rows = keyed(serial), keyed(parallel)
    assert serial_rows.keys() == parallel_rows.keys()
    for key, row in serial_rows.items():
        for column in ("query_uv", "query_z", "future", "future_valid", "history", "track_ids", "task"):
            np.testing.assert_array_equal(parallel_rows[key][column], row[column], err_msg=f"{key} {column}")


def failures(work) -> list[dict]:
    return [json.loads(line) for line in (work / "failures.jsonl").read_text().splitlines()]


def test_unreadable_frame_fails_its_episode_not_the_build(tmp_path):
    """A corrupt PNG (PIL's UnidentifiedImageError) used to escape the per-episode handler and stop every build."""
    from PIL import Image

    episode = generate_episode(3, num_frames=12, image_size=32)
    for name in ("good", "corrupt"):
        (tmp_path / "videos" / name).mkdir(parents=True)
        for t, frame in enumerate(episode.frames):
            Image.fromarray(frame).save(tmp_path / "videos" / name / f"{t:03d}.png")
    (tmp_path / "videos" / "corrupt" / "005.png").write_bytes(b"\x89PNG not really")
    builder = TraceExtract(config_name="samples", source="video_folder", source_path=str(tmp_path / "videos"),
                           cache_dir=str(tmp_path / "cache"), work_dir=str(tmp_path / "work"))
    builder.download_and_prepare()
    by_id = {f["episode_id"]: f for f in failures(tmp_path / "work")}
    assert "005.png" in by_id["corrupt"]["reason"] and "unreadable" in by_id["corrupt"]["reason"]
    assert "depth='given'" in by_id["good"]["reason"]  # the readable folder got as far as extraction


RGBD_SETTINGS = {"keypoints": "grid", "tracker": "lk", "num_keypoints": 64, "frame_stride": 6}


def write_rgbd(folder, seeds=(2, 3)):
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        episode = generate_episode(seed, num_frames=20, image_size=48)
        np.savez(folder / f"ep{seed}.npz", frames=episode.frames, depth=episode.depth, intrinsics=episode.intrinsics,
                 extrinsics=episode.extrinsics, task=episode.task)


def test_truncated_npz_fails_its_episode_and_failures_are_listed_once(tmp_path):
    """A truncated RGB-D `.npz` (BadZipFile) used to stop the build; failures.jsonl used to grow on every re-run."""
    write_rgbd(tmp_path / "rgbd")
    data = (tmp_path / "rgbd" / "ep3.npz").read_bytes()
    (tmp_path / "rgbd" / "ep3.npz").write_bytes(data[: len(data) // 2])

    def episode_ids():
        builder = TraceExtract(config_name="samples", source="rgbd", source_path=str(tmp_path / "rgbd"),
                               settings=RGBD_SETTINGS, cache_dir=str(tmp_path / "cache"), work_dir=str(tmp_path / "work"))
        builder.download_and_prepare(download_mode="force_redownload")
        return set(builder.as_dataset(split="train")["episode_id"])

    for _ in range(2):
        assert episode_ids() == {"ep2"}
        (failure,) = failures(tmp_path / "work")
        assert failure["episode_id"] == "ep3" and "ep3.npz" in failure["reason"] and failure["kind"] == "failed"
    write_rgbd(tmp_path / "rgbd", seeds=(3,))  # repaired: the episode builds and its failure line goes
    assert episode_ids() == {"ep2", "ep3"}
    assert failures(tmp_path / "work") == []


def test_statistics_survive_a_kill_between_cache_and_statistics(tmp_path):
    """A kill after an episode's cache write but before its statistics write used to drop that episode from the
    statistics for good (the re-run skipped the cached episode); a leftover temp file broke compute_statistics."""
    builder, _ = build(tmp_path, num_episodes=3)
    complete = builder.compute_statistics()
    statistics = tmp_path / "work" / "statistics"
    lost = sorted(os.listdir(statistics))[1]
    os.remove(statistics / lost)  # what the kill left: the cache is there, the statistics are not
    (statistics / f"{lost}.ab12cd.tmp").write_bytes(b"half a file")  # and a temp file of the interrupted write
    (tmp_path / "work" / "episodes" / "other-episode.npz.x1.tmp").write_bytes(b"")  # not this shard's: kept
    assert builder.compute_statistics()["delta_scale"] != complete["delta_scale"]  # two of three episodes
    rebuilt, _ = build(tmp_path, num_episodes=3, download_mode="force_redownload")
    assert rebuilt.compute_statistics() == complete
    assert len(os.listdir(statistics)) == 3 and not any(name.endswith(".tmp") for name in os.listdir(statistics))
    assert "other-episode.npz.x1.tmp" in os.listdir(tmp_path / "work" / "episodes")


def test_statistics_from_reservoirs_without_depth_have_no_depth_range(tmp_path):
    """An episode that holds no positive depth (no depth map, and no query point in front of the camera) saves an
    empty depth reservoir; aggregating it used to raise a bare IndexError from np.percentile."""
    from mu0.dataset_builders.statistics import TraceStatistics, load_reservoirs, save_reservoirs

    episode = TraceStatistics()
    future = np.array([[[10.0, 12.0, 0.5], [12.0, 15.0, 1.0]]])  # one point at depth 0, two future steps
    episode.add(np.array([[8.0, 9.0]]), np.zeros(1), future, np.ones((1, 2), bool), (64, 64))
    save_reservoirs(episode, str(tmp_path / "episode.npz"))
    aggregated = TraceStatistics()
    load_reservoirs(aggregated, str(tmp_path / "episode.npz"))
    statistics = aggregated.compute()
    assert "depth_log_range" not in statistics
    np.testing.assert_allclose(statistics["delta_scale"], [0.121875, 0.1828125, 0.975])  # p95 of two |deltas| per axis
