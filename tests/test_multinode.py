"""The Ray executor across nodes: a head that runs no tasks and two worker nodes of 1 CPU each (all on loopback, as
`ray.cluster_utils.Cluster` starts them). Every node sees the same source and work folders here, as the docs ask of
a real cluster (a shared file system)."""

import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from mu0.dataset_builders.executors import LocalExecutor, RayExecutor, extract_to_folder  # noqa: E402
from test_extract_cli import write_rgbd_folder  # noqa: E402
from test_ray_executor import TRACKED, assert_same_outputs  # noqa: E402


@pytest.fixture()
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, {node.node_id for node in workers}
    ray.shutdown()
    cluster.shutdown()


def test_extraction_runs_on_both_worker_nodes_and_gives_the_local_rows(cluster, tmp_path):
    cluster, worker_nodes = cluster
    write_rgbd_folder(tmp_path / "videos", seeds=(3, 4, 6, 7))
    config = {"source": "rgbd", "source_path": str(tmp_path / "videos")}
    local = extract_to_folder(config, TRACKED, str(tmp_path / "local"), LocalExecutor(), progress=False)
    on_ray = extract_to_folder(config, TRACKED, str(tmp_path / "ray"),
                               RayExecutor(address=cluster.address, num_workers=2), progress=False)
    assert_same_outputs(tmp_path / "local", tmp_path / "ray")
    assert (on_ray["episodes"], on_ray["failures"]) == (local["episodes"], local["failures"]) == (4, 2)
    nodes = {worker.rsplit("@", 1)[1] for worker in on_ray["workers"]}
    assert nodes == worker_nodes  # both worker nodes extracted episodes; the head (no CPUs) none
