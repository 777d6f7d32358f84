"""MetaWorld recording and rollouts (MuJoCo offscreen through EGL)."""

import json
import os

import numpy as np
import pytest

from mu0.dataset_builders.metaworld_recorder import (
    METAWORLD_META_PATH,
    metaworld_scene,
    record_episode,
    rollout,
    scripted_actor,
    task_instruction,
    write_metaworld_lerobot,
    write_metaworld_rgbd,
)
from mu0.dataset_builders.procedural import project_points
from mu0.dataset_builders.robot_sources import lerobot_refs, load_lerobot
from mu0.dataset_builders.sources import load_rgbd, rgbd_refs

TASK = "button-press-topdown-v3"


@pytest.fixture(scope="module")
def episode():
    with metaworld_scene(TASK, image_size=64) as scene:
        return record_episode(scene, start_index=0, max_steps=120)


def test_scripted_expert_succeeds_and_episode_is_consistent(episode):
    assert episode.succeeded and episode.successes[-1]
    length = len(episode.frames)
    assert episode.frames.shape == (length, 64, 64, 3) and episode.frames.dtype == np.uint8
    assert episode.depth.shape == (length, 64, 64) and np.isfinite(episode.depth).all()
    assert episode.states.shape == (length, 4) and episode.actions.shape == (length, 4)
    assert np.abs(episode.actions).max() <= 1.0
    # The end effector travels to the button: the states record real motion.
    assert np.linalg.norm(episode.states[-1, :3] - episode.states[0, :3]) > 0.05


def test_camera_matrices_project_the_button_onto_its_red_pixels():
    with metaworld_scene(TASK, image_size=64) as scene:
        observation = scene.reset(0)
        rgb, depth = scene.render()
        intrinsics, extrinsics = scene.camera_matrices()
    pixels, z = project_points(observation[4:7][None].astype(float), extrinsics, intrinsics)
    x, y = np.round(pixels[0]).astype(int)
    assert 0 <= x < 64 and 0 <= y < 64
    red, green, blue = rgb[y, x].astype(int)
    assert red > 100 and green < 60 and blue < 60  # the button top is red
    assert abs(depth[y, x] - z[0]) < 0.06  # metric depth along the optical axis agrees with our projection
    np.testing.assert_allclose(extrinsics[:3, :3] @ extrinsics[:3, :3].T, np.eye(3), atol=1e-9)


def test_lerobot_and_rgbd_outputs_read_back(tmp_path, episode):
    root = tmp_path / "lerobot"
    write_metaworld_lerobot(str(root), [episode, episode])
    refs = lerobot_refs(str(root))
    raw = load_lerobot(refs[1])
    assert raw.task == task_instruction(TASK) == "button press topdown"
    assert raw.frames.shape == episode.frames.shape
    np.testing.assert_allclose(np.asarray(raw.metadata["actions"]), episode.actions, atol=1e-6)
    np.testing.assert_allclose(np.asarray(raw.metadata["states"]), episode.states, atol=1e-6)
    meta = json.loads((root / METAWORLD_META_PATH).read_text())
    assert [entry["success"] for entry in meta] == [True, True]
    np.testing.assert_allclose(meta[0]["extrinsics"], episode.extrinsics)

    paths = write_metaworld_rgbd(str(tmp_path / "rgbd"), [episode])
    assert not [name for name in os.listdir(tmp_path / "rgbd") if ".tmp" in name]
    rgbd = load_rgbd(rgbd_refs(str(tmp_path / "rgbd"))[0])
    assert os.path.basename(paths[0]) == f"{TASK}-000.npz"
    np.testing.assert_array_equal(rgbd.depth, episode.depth)
    assert rgbd.extrinsics.shape == (len(episode.frames), 4, 4) and rgbd.task == "button press topdown"


def test_rollout_scores_the_expert_and_a_frozen_arm():
    with metaworld_scene(TASK, image_size=32) as scene:
        expert = scripted_actor(scene)

        def act_expert(frame, state, instruction):
            assert frame.shape == (32, 32, 3) and state.shape == (4,) and instruction == "button press topdown"
            np.testing.assert_array_equal(state, scene.observation[:4])  # the expert sees the same, current step
            return expert(frame, state, instruction)

        assert rollout(act_expert, scene, start_index=3, max_steps=150, num_execute_steps=1)
        assert not rollout(lambda *_: np.zeros((8, 4)), scene, start_index=3, max_steps=40)
        with pytest.raises(ValueError, match="needs \\(chunk, 4\\)"):
            rollout(lambda *_: np.zeros((8, 3)), scene, start_index=3, max_steps=8)


def test_unknown_task_and_camera_are_named():
    with pytest.raises(ValueError, match="Unknown MetaWorld task"):
        metaworld_scene("fly-to-the-moon-v3").__enter__()
    with pytest.raises(ValueError, match="no camera 'ceiling'"):
        metaworld_scene(TASK, camera="ceiling").__enter__()


def load_bench():
    """benchmarks/ is not a package: the benchmark script is loaded by its path."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "bench_metaworld.py")
    spec = importlib.util.spec_from_file_location("bench_metaworld", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_success_rows_carry_binomial_standard_errors():
    bench = load_bench()
    settings = bench.BenchSettings(tasks=["a", "b"], rollouts=10)
    row = bench.success_row({"a": 0.5, "b": 0.0}, settings)
    assert row["success_rate"] == 0.25 and row["rollouts"] == 20
    assert abs(row["standard_error"] - 0.0968246) < 1e-6  # sqrt(0.25 * 0.75 / 20)
    assert "0.25 ± 0.10" in bench.format_row({"variant": "mu0", **row, "rollout_time_s": 1.0})


def test_downstream_benchmark_smoke(tmp_path):
    """The reduced MetaWorld benchmark: record, pretrain μ0, train the three policy variants, roll them out.

    The quick task (one demonstration, rolled out from its own start state) is one a policy trained in the quick
    run solves: each variant succeeded in 20 of 20 rollouts (13–14 of 20 for the μ0 variants after 400 steps instead
    of 600; none in 6 after 3 steps or with the flow target's sign flipped). The scripted expert and a do-nothing
    policy through the same rollouts bound the measurement itself.
    """
    bench = load_bench()
    output = tmp_path / "bench.json"
    result = bench.main(["--quick", "--output", str(output)])
    assert json.loads(output.read_text())["rows"] == result["rows"]
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"mu0", "no_trace", "mu0_lora"}
    references = {row["variant"]: row["success_rate"] for row in result["reference_rows"]}
    assert references["scripted_expert"] >= 0.9
    assert references["do_nothing"] == 0.0
    below_minimum = {variant: row["success_rate"] for variant, row in rows.items() if row["success_rate"] < 0.5}
    assert not below_minimum
    # The ablation drops the motion path; LoRA adds trainable weights on top of the action expert.
    assert rows["no_trace"]["trainable_parameters"] < rows["mu0"]["trainable_parameters"]
    assert rows["mu0_lora"]["trainable_parameters"] > rows["mu0"]["trainable_parameters"]
    assert result["mu0_trace_samples"] > 0
