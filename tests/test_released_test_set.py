"""The released test set (TraceExtract output folders) read as μ0 `samples` rows, checked against the released data
pipeline's formulas, and `mu0 evaluate` running the headline protocol on it with a converted released checkpoint."""

import json

import numpy as np
from conftest import make_processor
from test_convert import write_release

from mu0.convert import convert_released_checkpoint
from mu0.dataset_builders.released_test_set import released_test_samples
from mu0.presets import preset_config
from mu0.training.cli import main
from mu0.training.evaluation import EvaluationProtocol, protocol_samples

HEIGHT, WIDTH, FUTURE, PAST = 48, 64, 128, 32


def write_episode(directory, seed: int, num_frames: int = 18, sparse_slots=(2,)):
    """A TraceExtract episode: slot i is frame i + 1 (frame 0 has no sample); `sparse_slots` have 10 rows, the
    others 20, so only those reach the 16 moving rows a usable frame needs."""
    rng = np.random.default_rng(seed)
    (directory / "samples").mkdir(parents=True)
    np.save(directory / "images.npy", rng.integers(0, 255, (num_frames, HEIGHT, WIDTH, 3), dtype=np.uint8))
    np.save(directory / "depth.npy", (0.5 + rng.random((num_frames, HEIGHT, WIDTH))).astype(np.float16))
    intrinsics = np.tile(np.array([[60.0, 0, 32], [0, 60, 24], [0, 0, 1]], np.float32), (num_frames, 1, 1))
    np.savez(directory / "cameras.npz", intrinsics=intrinsics, extrinsics=np.tile(np.eye(4, dtype=np.float32), (num_frames, 1, 1)),
             height=np.int32(HEIGHT), width=np.int32(WIDTH))
    frames = np.arange(1, num_frames, dtype=np.int32)
    counts = np.array([10 if slot in sparse_slots else 20 for slot in range(len(frames))])
    total = int(counts.sum())
    start = np.stack([rng.uniform(0, WIDTH, total), rng.uniform(0, HEIGHT, total), rng.uniform(0.5, 2, total)], -1)

    def walk(steps, lengths):
        values = start[:, None] + np.cumsum(rng.normal(0, [1.0, 1.0, 0.02], (total, steps, 3)), axis=1) * (np.arange(steps) > 0)[None, :, None]
        valid = np.arange(steps)[None] < lengths[:, None]
        return np.where(valid[..., None], values, -np.inf).astype(np.float16), valid

    traj, valid = walk(FUTURE, rng.integers(2, FUTURE, total))
    history, history_valid = walk(PAST, rng.integers(1, PAST, total))
    history[:, 0] = traj[:, 0]
    for name, value in {"frame_indices": frames, "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                        "keypoints": traj[:, 0, :2], "cluster_ids": rng.integers(0, 3, total).astype(np.int32),
                        "is_moving": np.ones(total, bool), "visibs": np.ones(total, np.float16), "traj": traj,
                        "traj_history": history, "valid_steps": valid, "valid_steps_history": history_valid,
                        "raw_traj": traj[:, :33], "raw_valid_steps": valid[:, :33],
                        "raw_traj_history": history[:, :9], "raw_valid_steps_history": history_valid[:, :9]}.items():
        np.save(directory / "samples" / f"{name}.npy", value)
    texts = {"video_id": directory.name, "n_frames": num_frames,
             "chunk_texts": [{"chunk_id": 0, "start_idx": 0, "end_idx": 8, "instruction_1": "open the lid",
                              "instruction_2": "lift the lid", "instruction_3": ""}],
             "merged_texts": [{"start_idx": 0, "end_idx": num_frames - 1, "instruction_1": "put the lid aside"}]}
    (directory / "curated_training_texts.json").write_text(json.dumps(texts))
    return traj, history, valid, history_valid, frames, counts


def test_rows_follow_the_released_dataset_conventions(tmp_path):
    root = tmp_path / "test_set"
    traj, history, valid, history_valid, frames, counts = write_episode(root / "test_dataset_demo" / "ep_a", seed=0)
    write_episode(root / "test_dataset_demo" / "ep_b", seed=1, sparse_slots=())
    samples = released_test_samples(str(root))
    assert len(samples) == (len(frames) - 1) + len(frames)  # ep_a's sparse slot is not usable
    rows = samples.with_format("numpy")
    row = rows[1]  # ep_a's second usable frame: slot 1 (frame 2)
    assert row["episode_id"] == "test_dataset_demo__ep_a" and row["frame_index"] == 2
    rows_of_slot = slice(int(counts[0]), int(counts[:2].sum()))
    t, h = traj[rows_of_slot].astype(np.float32), history[rows_of_slot].astype(np.float32)
    assert [c["text"] for c in rows[1]["captions"]] == ["open the lid", "lift the lid", "put the lid aside"]

    # The processor's model inputs equal the released dataset's: u = 2x/W - 1 (no pixel-centre shift), history
    # oldest first relative to the current point, unscaled, zero where invalid; future deltas / delta_scale.
    processor = make_processor(preset_config("tiny"), delta_scale=[0.6625, 0.7411, 0.2075])
    inputs = processor(images=[row["image"]], query_points=[np.concatenate([row["query_uv"], row["query_z"][:, None]], 1)],
                       history=[row["history"]], history_mask=[row["history_valid"]], future=[row["future"][:, :32]],
                       future_mask=[row["future_valid"][:, :32]])
    size = np.array([WIDTH, HEIGHT], np.float32)
    current = np.concatenate([t[:, 0, :2] / size * 2 - 1, t[:, 0, 2:]], -1)
    np.testing.assert_allclose(inputs["query_points"][0].numpy(), current[:, :2], atol=1e-6)
    past = h[:, 1:9][:, ::-1]
    past_valid = history_valid[rows_of_slot, 1:9][:, ::-1] & np.isfinite(past).all(-1)
    past = np.concatenate([past[..., :2] / size * 2 - 1, past[..., 2:]], -1) - current[:, None]
    expected_history = np.where(past_valid[..., None], past, 0.0)
    np.testing.assert_allclose(inputs["history"][0].numpy(), expected_history, atol=1e-5)
    future_valid = valid[rows_of_slot, 1:33] & np.isfinite(t[:, 1:33]).all(-1)
    future = np.concatenate([t[:, 1:33, :2] / size * 2 - 1, t[:, 1:33, 2:]], -1) - current[:, None]
    expected_future = np.where(future_valid[..., None], future / np.array([0.6625, 0.7411, 0.2075]), 0.0)
    np.testing.assert_array_equal(inputs["labels_mask"][0].numpy(), future_valid)
    np.testing.assert_allclose(inputs["labels"][0].numpy() * future_valid[..., None], expected_future, atol=1e-5)

    # Frame offsets 4/8/12 are the 5th/9th/13th usable frames: ep_a skips slot 2 (frame 3).
    chosen, missing = protocol_samples(samples, EvaluationProtocol())
    picked = {(r["episode_id"], int(r["frame_index"])) for r in chosen}
    assert picked == {("test_dataset_demo__ep_a", 6), ("test_dataset_demo__ep_a", 10), ("test_dataset_demo__ep_a", 14),
                      ("test_dataset_demo__ep_b", 5), ("test_dataset_demo__ep_b", 9), ("test_dataset_demo__ep_b", 13)}
    assert not missing and all(len(r["query_uv"]) == 16 for r in chosen)
    assert not any(r["history_valid"].any() for r in chosen)  # no history in the headline protocol


def test_mu0_evaluate_runs_the_headline_protocol_on_a_converted_release(tmp_path, capsys):
    root = tmp_path / "test_set"
    write_episode(root / "test_dataset_demo" / "ep_a", seed=0)
    release_dir = tmp_path / "release"
    release_dir.mkdir()
    step = write_release(release_dir)[0]
    model, processor = convert_released_checkpoint(str(step))
    model.save_pretrained(tmp_path / "converted")
    processor.save_pretrained(tmp_path / "converted")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tmp_path / "converted"), "--dataset", str(root), "--output-dir", str(out),
                 "--overlays", "1"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["num_samples"] == 3 and summary["num_queries"] == 3 * 16 and summary["episodes"] == 1
    assert summary["protocol"]["num_samples"] == 5 and not summary["protocol"]["use_depth"]
    metrics = summary["metrics"]["mu0"]
    assert all(np.isfinite(value) for value in metrics.values())
    assert metrics["uv/min_ade@32"] <= metrics["uv/ade@32"]
    assert "mu0" in capsys.readouterr().out
