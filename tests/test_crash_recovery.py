"""SIGKILL at random points, then a plain re-run: the result must equal an uninterrupted run, with no temp files left.

A kill is placed exactly on a commit boundary by a child process that replaces `os.replace` (every atomic write in
the package ends in one) with one that kills itself on the k-th call, before or after renaming: the two states a
power cut can leave. Seeds pick k, so each seed exercises a different point of the run.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mu0.dataset_builders.trace_extract import TraceExtract

EXTRACTION = dict(source="procedural", num_episodes=3, num_frames=30, image_size=64, settings={"frame_stride": 6})
COMMITS_PER_EXTRACTION = 6  # three episodes, each an episode cache and its statistics

KILL_ON_REPLACE = """
import os, signal
_replace, _calls = os.replace, [0]
def replace(source, target):
    _calls[0] += 1
    if _calls[0] == {k} and {before}:
        os.kill(os.getpid(), signal.SIGKILL)
    _replace(source, target)
    if _calls[0] == {k}:
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
"""


def run_killed(body: str, k: int, before: bool) -> subprocess.CompletedProcess:
    script = KILL_ON_REPLACE.format(k=k, before=before) + textwrap.dedent(body)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


def extraction(root) -> TraceExtract:
    return TraceExtract(config_name="samples", cache_dir=str(root / "cache"), work_dir=str(root / "work"), **EXTRACTION)


def rows(builder: TraceExtract) -> dict:
    dataset = builder.as_dataset(split="train").with_format("numpy")
    return {(row["episode_id"], int(row["frame_index"])): row for row in dataset}


def temp_files(root) -> list[str]:
    return [os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names
            if name.endswith((".tmp", ".incomplete")) or ".incomplete" in folder]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    builder = extraction(root)
    builder.download_and_prepare()
    return rows(builder), builder.compute_statistics()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_killed_extraction_resumes_to_the_same_rows_and_statistics(tmp_path, uninterrupted, seed):
    rng = np.random.default_rng(seed)
    k, before = int(rng.integers(1, COMMITS_PER_EXTRACTION + 1)), bool(rng.integers(2))
    killed = run_killed(f"""
        from mu0.dataset_builders.trace_extract import TraceExtract
        TraceExtract(config_name="samples", cache_dir={str(tmp_path / "cache")!r}, work_dir={str(tmp_path / "work")!r},
                     **{EXTRACTION!r}).download_and_prepare()
    """, k, before)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    builder = extraction(tmp_path)
    builder.download_and_prepare()
    expected_rows, expected_statistics = uninterrupted
    resumed = rows(builder)
    assert resumed.keys() == expected_rows.keys()
    for key, row in expected_rows.items():
        for column in ("query_uv", "query_z", "future", "future_valid", "history", "history_valid", "track_ids"):
            np.testing.assert_array_equal(resumed[key][column], row[column], err_msg=f"{key} {column}")
    assert builder.compute_statistics() == expected_statistics
    assert temp_files(tmp_path) == []


def test_killed_parallel_build_stops_its_workers(tmp_path):
    """`num_proc` workers used to run every remaining episode after their parent was killed."""
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("needs /proc to find the workers")
    options = {**EXTRACTION, "num_episodes": 12, "num_frames": 40, "image_size": 96}
    script = textwrap.dedent(f"""
        from mu0.dataset_builders.trace_extract import TraceExtract
        TraceExtract(config_name="samples", cache_dir={str(tmp_path / "cache")!r}, work_dir={str(tmp_path / "work")!r},
                     **{options!r}).download_and_prepare(num_proc=2)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    episodes = tmp_path / "work" / "episodes"
    deadline = time.monotonic() + 120
    while not (episodes.is_dir() and any(name.endswith(".npz") for name in os.listdir(episodes))):
        assert parent.poll() is None and time.monotonic() < deadline, "the build ended before any episode was cached"
        time.sleep(0.05)
    with open(f"/proc/{parent.pid}/task/{parent.pid}/children") as handle:
        workers = [int(pid) for pid in handle.read().split()]
    assert len(workers) >= 2
    parent.kill()
    parent.wait()
    try:
        deadline = time.monotonic() + 60
        while len(working := [pid for pid in workers if cpu_ticks(pid) is not None]) > 1:
            assert time.monotonic() < deadline, "the workers outlived their killed parent"
            time.sleep(0.1)
        for pid in working:  # datasets' queue manager, idle: not ours to stop, but it must not be working
            ticks = cpu_ticks(pid)
            time.sleep(1.0)
            assert cpu_ticks(pid) == ticks, "a worker kept working after its parent was killed"
    finally:
        for pid in workers:
            if cpu_ticks(pid) is not None:
                os.kill(pid, signal.SIGKILL)
    assert len([name for name in os.listdir(episodes) if name.endswith(".npz")]) < options["num_episodes"]


def cpu_ticks(pid: int) -> int | None:
    """User + system CPU time of a live process, None once it has exited (zombies included)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return None if fields[0] in "ZX" else int(fields[11]) + int(fields[12])
