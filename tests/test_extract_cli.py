"""`mu0 extract` with the local executor: flags and settings files, the output folder, failures, resuming, pushing."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mu0.dataset_builders.procedural import generate_episode
from mu0.dataset_builders.sources import procedural_refs
from mu0.training.cli import EXTRACT_SETTING_OPTIONS, EXTRACT_SOURCE_OPTIONS, build_parser, main

GENERATED = ["--source", "procedural", "--num-frames", "30", "--image-size", "64", "--frame-stride", "6", "--no-progress"]


def write_rgbd_folder(folder, seeds=(3, 4), short_seed=5) -> None:
    """Procedural episodes in the `rgbd` layout, one of them too short to use and one file that is not an npz."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed in (*seeds, short_seed):
        episode = generate_episode(seed, num_frames=30 if seed != short_seed else 6, image_size=64)
        np.savez(folder / f"episode_{seed}.npz", frames=episode.frames, depth=episode.depth,
                 intrinsics=episode.intrinsics, extrinsics=episode.extrinsics, task=episode.task)
    (folder / "episode_9.npz").write_bytes(b"not a zip archive")


RGBD = ["--source", "rgbd", "--keypoints", "grid", "--tracker", "lk", "--num-keypoints", "64", "--lk-window", "11",
        "--frame-stride", "6", "--no-progress"]


def test_extract_writes_datasets_statistics_and_failures(tmp_path, capsys):
    from datasets import load_from_disk

    from mu0.training.pretrain import load_samples

    write_rgbd_folder(tmp_path / "videos")
    output = tmp_path / "out"
    assert main(["extract", *RGBD, "--source-path", str(tmp_path / "videos"), "--output-dir", str(output)]) == 0
    assert "2 episodes (60 frames)" in capsys.readouterr().out
    episodes = load_from_disk(str(output / "episodes"))
    assert sorted(episodes["episode_id"]) == ["episode_3", "episode_4"]
    truth = generate_episode(3, num_frames=30, image_size=64)
    row = episodes[episodes["episode_id"].index("episode_3")]
    np.testing.assert_array_equal(np.asarray(row["frames"][7]), truth.frames[7])
    assert json.loads(row["metadata"])["backends"]["tracker"] == "lk"
    samples, statistics = load_samples(str(output / "samples"))  # the folder `mu0 train --dataset` reads
    assert len(samples) > 0 and set(samples["episode_id"]) == {"episode_3", "episode_4"}
    assert statistics == json.loads((output / "trace_statistics.json").read_text())
    assert len(statistics["delta_scale"]) == 3 and all(value > 0 for value in statistics["delta_scale"])
    failures = [json.loads(line) for line in (output / "failures.jsonl").read_text().splitlines()]
    assert {(f["episode_id"], f["kind"]) for f in failures} == {("episode_5", "rejected"), ("episode_9", "failed")}
    assert "too short" in next(f["reason"] for f in failures if f["episode_id"] == "episode_5")
    assert not list(output.glob("**/*.tmp"))


def test_settings_file_flags_override_it_and_the_run_resumes(tmp_path, capsys):
    import yaml
    from datasets import load_from_disk

    settings_file = tmp_path / "extract.yaml"
    settings_file.write_text(yaml.safe_dump({"source": "procedural", "num_episodes": 2, "num_frames": 30,
                                             "image_size": 64, "settings": {"frame_stride": 6, "horizon": 16}}))
    output = tmp_path / "out"
    arguments = ["extract", "--config", str(settings_file), "--num-episodes", "3", "--output-dir", str(output), "--no-progress"]
    assert main(arguments) == 0
    recorded = json.loads((output / "extract_settings.json").read_text())
    assert recorded["num_episodes"] == 3 and recorded["settings"]["horizon"] == 16 and recorded["settings"]["history"] == 8
    assert len(load_from_disk(str(output / "episodes"))) == 3
    assert len(load_from_disk(str(output / "samples"))[0]["future_raw"][0]) == 16
    cache = output / "work" / "episodes"
    stamps = {name: os.path.getmtime(cache / name) for name in os.listdir(cache)}
    assert main(arguments) == 0  # everything cached: nothing is extracted again
    assert stamps == {name: os.path.getmtime(cache / name) for name in os.listdir(cache)}
    # the recorded settings file reproduces the run
    assert main(["extract", "--config", str(output / "extract_settings.json"), "--output-dir", str(output), "--no-progress"]) == 0
    assert stamps == {name: os.path.getmtime(cache / name) for name in os.listdir(cache)}
    capsys.readouterr()
    assert main([*arguments, "--horizon", "24"]) == 1  # episodes extracted with other settings are not mixed in
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize(("arguments", "message"), [
    (["--config", "{folder}/bad.json"], "settings.tracker_model"),
    (["--source", "procedural", "--tracker", "sift"], "Unknown tracker backend 'sift'"),
    (["--source", "video_folder"], "needs source_path"),
    (["--source", "procedural", "--ray-num-workers", "2"], "need --executor ray"),
])
def test_bad_options_fail_with_a_message_naming_them(tmp_path, capsys, arguments, message):
    (tmp_path / "bad.json").write_text(json.dumps({"source": "procedural", "settings": {"tracker_model": "x"}}))
    arguments = [argument.format(folder=tmp_path) for argument in arguments]
    assert main(["extract", *arguments, "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "samples").exists()


def test_every_extraction_option_has_a_flag():
    from dataclasses import fields

    import datasets

    from mu0.dataset_builders.extraction import ExtractionSettings
    from mu0.dataset_builders.trace_extract import TraceExtractConfig

    internal = {f.name for f in fields(datasets.BuilderConfig)} | {"settings", "work_dir", "episode_ids"}
    assert set(EXTRACT_SOURCE_OPTIONS) == {f.name for f in fields(TraceExtractConfig)} - internal
    assert set(EXTRACT_SETTING_OPTIONS) | {"seed"} == {f.name for f in fields(ExtractionSettings)}
    extract_parser = build_parser()._subparsers._group_actions[0].choices["extract"]
    destinations = {action.dest for action in extract_parser._actions}
    assert set(EXTRACT_SOURCE_OPTIONS) | set(EXTRACT_SETTING_OPTIONS) | {"extraction_seed"} <= destinations


def test_the_local_executor_never_imports_ray(tmp_path):
    script = ("import sys; from mu0.training.cli import main; "
              f"code = main(['extract', *{GENERATED!r}, '--num-episodes', '1', '--output-dir', {str(tmp_path)!r}]); "
              "assert code == 0; assert 'ray' not in sys.modules, 'ray was imported'")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_push_to_hub_publishes_both_configurations_and_the_statistics(hub, tmp_path):
    from mu0.training.pretrain import load_samples

    output = tmp_path / "out"
    assert main(["extract", *GENERATED, "--num-episodes", "2", "--output-dir", str(output), "--push-to-hub", "user/traces"]) == 0
    files = hub.files("user/traces", repo_type="dataset")
    assert any(name.startswith("episodes/") for name in files) and any(name.startswith("samples/") for name in files)
    streamed, statistics = load_samples("user/traces")
    assert statistics == json.loads((output / "trace_statistics.json").read_text())
    assert next(iter(streamed))["episode_id"] in {ref.episode_id for ref in procedural_refs(2)}


def test_the_ray_executor_without_ray_says_how_to_install_it(tmp_path):
    script = ("import sys; sys.modules['ray'] = None; from mu0.training.cli import main; "  # None: `import ray` fails
              f"sys.exit(main(['extract', *{GENERATED!r}, '--num-episodes', '1', '--executor', 'ray', "
              f"'--output-dir', {str(tmp_path)!r}]))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and 'pip install "mu0[scale]"' in result.stderr, result.stderr[-2000:]


def test_a_full_disk_stops_the_run_instead_of_failing_every_episode(tmp_path, monkeypatch, capsys):
    import errno

    write_rgbd_folder(tmp_path / "videos")

    replace = os.replace

    def no_space_for_episodes(source, target):  # failures.jsonl, being small, still fits
        if os.path.basename(os.path.dirname(target)) == "episodes":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)
        replace(source, target)

    monkeypatch.setattr(os, "replace", no_space_for_episodes)
    assert main(["extract", *RGBD, "--source-path", str(tmp_path / "videos"), "--output-dir", str(tmp_path / "out")]) == 1
    assert "mu0 extract: error: [Errno 28] No space left on device" in capsys.readouterr().err
    failures = list(tmp_path.glob("**/failures.jsonl"))
    assert all(path.read_text() == "" for path in failures)


def test_an_output_folder_that_cannot_be_written_fails_before_any_episode(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file, not a folder")
    assert main(["extract", *GENERATED, "--output-dir", str(tmp_path / "taken")]) == 1
    assert f"--output-dir {str(tmp_path / 'taken')!r} is not a writable folder" in capsys.readouterr().err
