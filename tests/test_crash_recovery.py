"""SIGKILL at random points, then a plain re-run: the result must equal an uninterrupted run, with no temp files left.

A kill is placed exactly on a commit boundary by a child process that replaces `os.replace` (every atomic write in
the package ends in one) with one that kills itself on the k-th call, before or after renaming: the two states a
power cut can leave. Seeds pick k, so each seed exercises a different point of the run.
"""

import errno
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
    assert_same_as_uninterrupted(tmp_path, uninterrupted)


def assert_same_as_uninterrupted(root, uninterrupted) -> None:
    builder = extraction(root)
    builder.download_and_prepare()
    expected_rows, expected_statistics = uninterrupted
    resumed = rows(builder)
    assert resumed.keys() == expected_rows.keys()
    for key, row in expected_rows.items():
        for column in ("query_uv", "query_z", "future", "future_valid", "history", "history_valid", "track_ids"):
            np.testing.assert_array_equal(resumed[key][column], row[column], err_msg=f"{key} {column}")
    assert builder.compute_statistics() == expected_statistics
    assert temp_files(root) == []


@pytest.mark.parametrize("k", [1, 4])
def test_full_disk_stops_the_build_and_a_rerun_completes(tmp_path, uninterrupted, monkeypatch, k):
    """The k-th atomic write runs out of space: the build stops with that OSError (an episode is not logged as a
    bad file and skipped), no cache holds a partial file, and once there is space a re-run equals an uninterrupted
    build."""
    real_replace, calls = os.replace, [0]

    def replace(source, target):
        calls[0] += 1
        if calls[0] == k:
            with open(source, "r+b") as handle:  # the disk filled up while this file was written
                handle.truncate(os.path.getsize(source) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), source)
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Exception) as raised:
        extraction(tmp_path).download_and_prepare()
    cause = raised.value
    while not isinstance(cause, OSError) and cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC, repr(raised.value)
    failures = tmp_path / "work" / "failures.jsonl"
    assert not failures.exists() or failures.read_text() == ""
    monkeypatch.setattr(os, "replace", real_replace)
    assert_same_as_uninterrupted(tmp_path, uninterrupted)


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


# ------------------------------------------------------------------------------------------------- training
KILL_IN_CHECKPOINT = """
import os, signal
from transformers import Trainer
_save, _rng = Trainer._save_checkpoint, Trainer._save_rng_state
def save_checkpoint(self, *args, **kwargs):
    _save(self, *args, **kwargs)
    if self.state.global_step == {k}:
        os.kill(os.getpid(), signal.SIGKILL)  # the checkpoint is complete
def save_rng_state(self, *args, **kwargs):
    if {partial} and self.state.global_step == {k}:
        os.kill(os.getpid(), signal.SIGKILL)  # weights and optimizer written, trainer state not
    _rng(self, *args, **kwargs)
Trainer._save_checkpoint, Trainer._save_rng_state = save_checkpoint, save_rng_state
"""
TRAINING_STEPS = 4


@pytest.fixture(scope="module")
def training_run(tmp_path_factory):
    """A small samples dataset, a recipe checkpointing every step, and the uninterrupted run's weights."""
    from mu0.training.cli import main
    from mu0.training.pretrain import load_recipe, save_samples

    root = tmp_path_factory.mktemp("training")
    builder = extraction(root)
    builder.download_and_prepare()
    save_samples(builder.as_dataset(split="train"), builder.compute_statistics(), str(root / "samples"))
    recipe = load_recipe("tiny-cpu")
    recipe["training"].update(max_steps=TRAINING_STEPS, save_steps=1, save_total_limit=None,
                              per_device_train_batch_size=2, logging_steps=1)
    (root / "recipe.json").write_text(json.dumps(recipe))
    arguments = ["train", "--recipe", str(root / "recipe.json"), "--dataset", str(root / "samples"), "--eval-samples", "0"]
    assert main([*arguments, "--output-dir", str(root / "uninterrupted")]) == 0
    return arguments, load_weights(root / "uninterrupted")


def load_weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module", params=[0, 1, 2])
def resumed_training(request, training_run, tmp_path_factory):
    """A run killed inside or after a random checkpoint (the seed picks which), then `mu0 train --resume last`."""
    from mu0.training.cli import main

    arguments, _ = training_run
    rng = np.random.default_rng(request.param)
    k, partial = int(rng.integers(1, TRAINING_STEPS)), bool(rng.integers(2))
    root = tmp_path_factory.mktemp(f"resumed-{request.param}")
    output = root / "run"
    script = KILL_IN_CHECKPOINT.format(k=k, partial=partial) + textwrap.dedent(f"""
        import sys
        from mu0.training.cli import main
        sys.exit(main({[*arguments, "--output-dir", str(output)]!r}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (output / f"checkpoint-{k}" / "trainer_state.json").exists() != partial
    assert main([*arguments, "--output-dir", str(output), "--resume", "last"]) == 0
    return root, load_weights(output)


def test_killed_training_resumes_from_its_last_complete_checkpoint(resumed_training):
    root, weights = resumed_training
    output = root / "run"
    checkpoints = [name for name in os.listdir(output) if name.startswith("checkpoint-")]
    assert len(checkpoints) == TRAINING_STEPS  # the cut-short checkpoint was redone, not resumed from
    assert all((output / name / "trainer_state.json").exists() for name in checkpoints)
    state = json.loads((output / f"checkpoint-{TRAINING_STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == TRAINING_STEPS
    assert all(np.isfinite(tensor.numpy()).all() for tensor in weights.values())
    assert temp_files(root) == []


def test_killed_training_resumes_to_the_same_weights(training_run, resumed_training):
    import torch

    _, expected = training_run
    _, resumed = resumed_training
    assert resumed.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)


def test_training_killed_in_its_final_save_leaves_no_half_file_and_resumes(training_run, tmp_path):
    """A kill while `mu0 train` moves its final model into the output folder: no `model.safetensors` there yet (not a
    truncated one), and `--resume last` writes the same weights as an uninterrupted run."""
    import torch

    from mu0.training.cli import main

    arguments, expected = training_run
    output = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, sys
        _replace = os.replace
        def replace(source, target):
            if os.path.abspath(target) == {str(output / "model.safetensors")!r}:
                os.kill(os.getpid(), signal.SIGKILL)
            _replace(source, target)
        os.replace = replace
        from mu0.training.cli import main
        sys.exit(main({[*arguments, "--output-dir", str(output)]!r}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (output / "model.safetensors").exists()
    assert (output / ".model.incomplete" / "model.safetensors").exists()
    assert main([*arguments, "--output-dir", str(output), "--resume", "last"]) == 0
    resumed = load_weights(output)
    assert resumed.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
    assert temp_files(tmp_path) == []
