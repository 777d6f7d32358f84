"""The Ray executor on a local 2-CPU Ray instance (one per module): the same rows, statistics and failures as the
local executor, a killed run that resumes (and survives a killed worker), and learned stages in actor pools that load
their model once per actor."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from mu0.dataset_builders.executors import LocalExecutor, RayExecutor, extract_to_folder, pipeline_steps  # noqa: E402
from mu0.dataset_builders.extraction import ExtractionSettings  # noqa: E402
from mu0.training.cli import main  # noqa: E402
from test_extract_cli import write_rgbd_folder  # noqa: E402
from test_tracking import HUBCONF  # noqa: E402

TRACKED = {"keypoints": "grid", "tracker": "lk", "num_keypoints": 64, "lk_window": 11, "frame_stride": 6}


@pytest.fixture(scope="module")
def ray_address():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def read_outputs(folder):
    from datasets import load_from_disk

    tables = {name: load_from_disk(str(folder / name)).data.table for name in ("episodes", "samples")}
    return tables, json.loads((folder / "trace_statistics.json").read_text()), (folder / "failures.jsonl").read_text()


def assert_same_outputs(first, second):
    (first_tables, first_statistics, first_failures), (second_tables, second_statistics, second_failures) = (
        read_outputs(first), read_outputs(second))
    for name in ("episodes", "samples"):
        assert first_tables[name].num_rows > 0 and first_tables[name].equals(second_tables[name]), name
    assert first_statistics == second_statistics and first_failures == second_failures


def test_ray_gives_the_local_rows_statistics_and_failures(ray_address, tmp_path):
    write_rgbd_folder(tmp_path / "videos")
    config = {"source": "rgbd", "source_path": str(tmp_path / "videos")}
    local = extract_to_folder(config, TRACKED, str(tmp_path / "local"), LocalExecutor(), progress=False)
    on_ray = extract_to_folder(config, TRACKED, str(tmp_path / "ray"), RayExecutor(num_workers=2), progress=False)
    assert_same_outputs(tmp_path / "local", tmp_path / "ray")
    assert (on_ray["episodes"], on_ray["failures"]) == (local["episodes"], local["failures"]) == (2, 2)
    assert f":{os.getpid()}" not in " ".join(on_ray["workers"])  # extracted in Ray workers, not here
    failures = [json.loads(line) for line in (tmp_path / "ray" / "failures.jsonl").read_text().splitlines()]
    assert {f["episode_id"]: f["kind"] for f in failures} == {"episode_5": "rejected", "episode_9": "failed"}


def kill_a_worker_running(function: str, deadline: float) -> bool:
    """SIGKILL the first Ray worker process whose title says it runs `function` (Ray names busy workers after it)."""
    import psutil

    while time.monotonic() < deadline:
        for process in psutil.process_iter(["cmdline"]):
            if any(function in part for part in process.info["cmdline"] or []) and process.info["cmdline"][0].startswith("ray::"):
                process.send_signal(signal.SIGKILL)
                return True
        time.sleep(0.1)
    return False


def test_a_killed_ray_run_resumes_where_it_stopped(ray_address, tmp_path):
    generated = {"source": "procedural", "num_episodes": 6, "num_frames": 40, "image_size": 96}
    arguments = [f"--{key.replace('_', '-')}={value}" for key, value in {**generated, **TRACKED}.items()]
    run = subprocess.Popen(
        [sys.executable, "-m", "mu0.training.cli", "extract", *arguments, "--output-dir", str(tmp_path / "ray"),
         "--executor", "ray", "--ray-address", ray_address, "--ray-num-workers", "1", "--no-progress"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    cache = tmp_path / "ray" / "work" / "episodes"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and run.poll() is None and len(list(cache.glob("*.npz"))) < 2:
        time.sleep(0.2)
    assert run.poll() is None, run.stdout.read().decode()[-3000:]
    run.send_signal(signal.SIGKILL)  # the driver and, with it, its Ray workers
    run.wait()
    finished = {path.name: path.stat().st_mtime_ns for path in cache.glob("*.npz")}
    assert 2 <= len(finished) < 6
    # resume, and kill a Ray worker while it extracts an episode: Ray retries that episode in a new worker
    resumed = {}
    resume = threading.Thread(target=lambda: resumed.update(extract_to_folder(
        generated, TRACKED, str(tmp_path / "ray"), RayExecutor(num_workers=2), progress=False)))
    resume.start()
    assert kill_a_worker_running("Map(advance)", deadline=time.monotonic() + 240)
    resume.join(timeout=300)
    assert resumed["episodes"] == 6 and resumed["failures"] == 0
    assert finished == {name: (cache / name).stat().st_mtime_ns for name in finished}  # not extracted again
    extract_to_folder(generated, TRACKED, str(tmp_path / "local"), LocalExecutor(), progress=False)
    assert_same_outputs(tmp_path / "local", tmp_path / "ray")


# The tracker of test_tracking, loaded through the hubconf entry below: each load appends its process id to a log,
# and it fails on 20-frame videos (as a model may fail on one episode, running out of memory on it).
COUNTED_HUBCONF = HUBCONF + """

import os


class PickyShiftPredictor(ShiftPredictor):
    def forward(self, video, queries):
        if video.shape[1] == 20:
            raise RuntimeError("out of memory on this episode")
        return super().forward(video, queries)


def counted_shift_tracker(*, pretrained=True):
    with open(LOAD_LOG, "a") as log:
        log.write(f"{os.getpid()}\\n")
    return PickyShiftPredictor()
"""


def test_learned_stages_run_in_actor_pools_that_load_their_model_once(ray_address, tmp_path):
    import numpy as np
    import torch

    from mu0.dataset_builders.procedural import generate_episode
    from test_depth_backends import tiny_depth_anything, tiny_processor

    tiny_depth_anything().save_pretrained(tmp_path / "depth_model")
    tiny_processor().save_pretrained(tmp_path / "depth_model")
    (tmp_path / "tracker").mkdir()
    (tmp_path / "tracker" / "hubconf.py").write_text(COUNTED_HUBCONF.replace("LOAD_LOG", repr(str(tmp_path / "loads.log"))))
    torch.save({"shift": torch.tensor([0.4, -0.2])}, tmp_path / "shift.pth")
    videos = tmp_path / "videos"
    write_rgbd_folder(videos, seeds=(3, 4, 6))  # episode_5 too short, episode_9 unreadable
    failing = generate_episode(7, num_frames=20, image_size=64)  # the tracker fails on it
    np.savez(videos / "episode_7.npz", frames=failing.frames, depth=failing.depth, intrinsics=failing.intrinsics,
             extrinsics=failing.extrinsics, task=failing.task)
    config = {"source": "rgbd", "source_path": str(videos)}
    settings = {"depth": "depth_anything", "depth_model": str(tmp_path / "depth_model"), "keypoints": "grid",
                "num_keypoints": 64, "tracker": "cotracker", "cotracker_repo": str(tmp_path / "tracker"),
                "cotracker_checkpoint": str(tmp_path / "shift.pth"), "cotracker_model": "counted_shift_tracker",
                "frame_stride": 6}
    assert pipeline_steps(ExtractionSettings(**settings)) == [
        ("decode", "check"), ("depth",), ("keypoints",), ("tracker",), ("motion", "captions", "write")]
    # half a CPU each: two depth actors, one tracker actor and the tasks fit the 2-CPU instance together
    executor = RayExecutor(cpus_per_worker=0.5, stage_concurrency={"depth": 2})
    on_ray = extract_to_folder(config, settings, str(tmp_path / "ray"), executor, progress=False)
    assert (on_ray["episodes"], on_ray["failures"]) == (3, 3)
    loads = (tmp_path / "loads.log").read_text().split()
    assert len(loads) == 1 and loads[0] != str(os.getpid())  # one tracker actor, one load, for four tracked episodes
    failures = {f["episode_id"]: f for f in map(json.loads, (tmp_path / "ray" / "failures.jsonl").read_text().splitlines())}
    assert {name: f["kind"] for name, f in failures.items()} == {
        "episode_5": "rejected", "episode_7": "failed", "episode_9": "failed"}
    assert failures["episode_7"]["reason"] == "RuntimeError: out of memory on this episode"
    extract_to_folder(config, settings, str(tmp_path / "local"), LocalExecutor(), progress=False)
    assert_same_outputs(tmp_path / "local", tmp_path / "ray")
    tables, _, _ = read_outputs(tmp_path / "ray")
    backends = json.loads(tables["episodes"].column("metadata")[0].as_py())["backends"]
    assert (backends["depth"], backends["tracker"]) == ("depth_anything", "cotracker")


def test_actor_pool_settings_name_learned_stages(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown stage 'camera'"):
        RayExecutor(stage_gpus={"camera": 1})
    with pytest.raises(ValueError, match="at least 1"):
        RayExecutor(stage_concurrency={"depth": 0})
    command = ["extract", "--source", "procedural", "--num-episodes", "1", "--output-dir", str(tmp_path / "out"),
               "--executor", "ray", "--no-progress"]
    assert main([*command, "--ray-stage-gpus", "depth"]) == 1
    assert "--ray-stage-gpus 'depth': expected STAGE=FLOAT" in capsys.readouterr().err
    # depth='given' has no model: a pool setting for it would be silently unused
    assert main([*command, "--ray-stage-gpus", "depth=1", "--ray-stage-concurrency", "depth=2"]) == 1
    assert "Actor pool settings for ['depth']" in capsys.readouterr().err


def test_actor_pools_that_would_starve_the_tasks_are_refused(ray_address, tmp_path):
    from mu0.dataset_builders.sources import procedural_refs

    settings = {"depth": "depth_anything", "depth_model": "unused", "frame_stride": 6}
    arguments = (str(tmp_path / "work"), {"source": "procedural", "num_episodes": 1}, settings, procedural_refs(1))
    # two 1-CPU depth actors hold both CPUs of the instance: no task could decode an episode for them
    with pytest.raises(ValueError, match="hold 2 CPUs at 1 each, and the tasks need 1 more, but the Ray cluster has 2"):
        list(RayExecutor(stage_concurrency={"depth": 2}).run(*arguments))
    with pytest.raises(ValueError, match="hold 1 GPUs but the Ray cluster has 0"):
        list(RayExecutor(cpus_per_worker=0.5, stage_gpus={"depth": 1}).run(*arguments))


def test_a_missing_model_stops_the_run_before_any_episode(ray_address, tmp_path):
    settings = {"depth": "depth_anything", "depth_model": str(tmp_path / "no_such_model")}
    with pytest.raises(Exception, match="no_such_model"):
        extract_to_folder({"source": "procedural", "num_episodes": 2}, settings, str(tmp_path / "out"),
                          RayExecutor(), progress=False)
    assert not (tmp_path / "out" / "work" / "episodes").exists()


def test_ray_outcomes_time_each_stage_an_episode_went_through(ray_address, tmp_path):
    """What bench_extract_ray sizes the pools from: the seconds of every stage, per episode."""
    from mu0.dataset_builders.extraction import STAGES
    from mu0.dataset_builders.sources import rgbd_refs

    write_rgbd_folder(tmp_path / "videos", seeds=(3,))  # episode_5 too short: rejected by the check stage
    config = {"source": "rgbd", "source_path": str(tmp_path / "videos")}
    refs = [ref for ref in rgbd_refs(config["source_path"]) if ref.episode_id != "episode_9"]
    outcomes = {outcome.episode_id: outcome
                for outcome in RayExecutor(num_workers=2).run(str(tmp_path / "work"), config, TRACKED, refs)}
    assert list(outcomes["episode_3"].stage_seconds) == ["decode", *STAGES, "write"]
    assert all(seconds > 0 for seconds in outcomes["episode_3"].stage_seconds.values())
    assert outcomes["episode_5"].failed and list(outcomes["episode_5"].stage_seconds) == ["decode", "check"]
