"""The Ray executor across nodes: a head that runs no tasks and two worker nodes of 1 CPU each (all on loopback, as
`ray.cluster_utils.Cluster` starts them). Every node sees the same work folder here, as the docs ask of a real
cluster (a shared file system); the source is a shared folder, or a Hub dataset that the workers download from."""

import contextlib

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from mu0.dataset_builders.executors import LocalExecutor, RayExecutor, extract_to_folder  # noqa: E402
from test_extract_cli import write_rgbd_folder  # noqa: E402
from test_ray_executor import TRACKED, assert_same_outputs  # noqa: E402


@contextlib.contextmanager
def head_and_two_worker_nodes():
    """The cluster and its worker nodes' ids. Its processes take this process's environment as it is now."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        yield cluster, {node.node_id for node in workers}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_extraction_runs_on_both_worker_nodes_and_gives_the_local_rows(tmp_path):
    write_rgbd_folder(tmp_path / "videos", seeds=(3, 4, 6, 7))
    config = {"source": "rgbd", "source_path": str(tmp_path / "videos")}
    local = extract_to_folder(config, TRACKED, str(tmp_path / "local"), LocalExecutor(), progress=False)
    with head_and_two_worker_nodes() as (cluster, worker_nodes):
        on_ray = extract_to_folder(config, TRACKED, str(tmp_path / "ray"),
                                   RayExecutor(address=cluster.address, num_workers=2), progress=False)
    assert_same_outputs(tmp_path / "local", tmp_path / "ray")
    assert (on_ray["episodes"], on_ray["failures"]) == (local["episodes"], local["failures"]) == (4, 2)
    nodes = {worker.rsplit("@", 1)[1] for worker in on_ray["workers"]}
    assert nodes == worker_nodes  # both worker nodes extracted episodes; the head (no CPUs) none


def test_worker_nodes_fetch_their_episodes_of_a_hub_lerobot_dataset(hub, monkeypatch, tmp_path):
    """No shared source: the driver lists the episodes from `meta/`, and the worker nodes download each episode's
    files from the Hub themselves (here a stand-in served on loopback, with one cache for the nodes of this machine)."""
    from mu0.dataset_builders.procedural import generate_episode
    from mu0.dataset_builders.robot_sources import lerobot_refs, write_lerobot_episodes
    from test_depth_backends import tiny_depth_anything, tiny_processor

    rng = np.random.default_rng(0)
    episodes = [{"frames": generate_episode(seed, num_frames=30, image_size=64).frames, "task": "push the block",
                 "states": rng.normal(size=(30, 2)).astype(np.float32),
                 "actions": rng.normal(size=(30, 2)).astype(np.float32)} for seed in (3, 4, 6)]
    write_lerobot_episodes(str(tmp_path / "robot"), episodes, fps=10.0, codebase_version="v2.1")
    hub.upload("user/robot", {p.relative_to(tmp_path / "robot").as_posix(): p.read_bytes()
                              for p in (tmp_path / "robot").rglob("*") if p.is_file()}, repo_type="dataset")
    tiny_depth_anything().save_pretrained(tmp_path / "depth_model")
    tiny_processor().save_pretrained(tmp_path / "depth_model")
    settings = {**TRACKED, "depth": "depth_anything", "depth_model": str(tmp_path / "depth_model"), "camera": "static",
                "field_of_view": 60.0}
    config = {"source": "lerobot", "source_path": "user/robot", "episodes": [0, 2]}
    with hub.serve() as endpoint:
        for name, value in hub.subprocess_env(endpoint).items():
            if name.startswith("HF_"):
                monkeypatch.setenv(name, value)  # for the Ray nodes started below, and their workers
        with head_and_two_worker_nodes() as (cluster, worker_nodes):
            executor = RayExecutor(address=cluster.address, cpus_per_worker=0.5)
            refs = lerobot_refs("user/robot", episodes=[0, 2])
            outcomes = list(executor.run(str(tmp_path / "work"), config, settings, refs))
    failures = tmp_path / "work" / "failures.jsonl"
    assert sorted((outcome.episode_id, outcome.failed) for outcome in outcomes) == [
        ("robot-observation.images.main-000000", False), ("robot-observation.images.main-000002", False)], (
        failures.read_text() if failures.exists() else "")
    assert {outcome.worker.rsplit("@", 1)[1] for outcome in outcomes} <= worker_nodes
    served = {path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path, status in hub.requests
              if method == "GET" and "/resolve/" in path and status == 200 and path.startswith("/datasets")}
    assert {"data/chunk-000/episode_000000.parquet", "data/chunk-000/episode_000002.parquet"} <= served
    assert not any("episode_000001" in path for path in served)
