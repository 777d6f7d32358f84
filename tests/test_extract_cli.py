"""`mu0 extract` with the local executor: flags and settings files, the output folder, failures, resuming, pushing."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mu0.dataset_builders.procedural import generate_episode
from mu0.dataset_builders.sources import procedural_refs
from mu0.training.cli import (
    EXTRACT_BACKENDS,
    EXTRACT_SETTING_DEFAULTS,
    EXTRACT_SETTING_OPTIONS,
    EXTRACT_SOURCE_OPTIONS,
    build_parser,
    main,
)

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
    recorded = json.loads((output / "extract_settings.json").read_text())  # held procedural fields for a folder
    assert recorded["source"] == "rgbd" and not {"num_frames", "image_size", "num_episodes", "seed"} & set(recorded)


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
    (["--source", "scenetracker"], "needs source_path"),
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
    assert set(EXTRACT_SETTING_OPTIONS) == {f.name for f in fields(ExtractionSettings)}
    extract_parser = build_parser()._subparsers._group_actions[0].choices["extract"]
    destinations = {action.dest for action in extract_parser._actions}
    assert set(EXTRACT_SOURCE_OPTIONS) | set(EXTRACT_SETTING_OPTIONS) - {"seed"} | {"extraction_seed"} <= destinations


def test_extract_help_shows_backend_choices_and_the_real_defaults():
    """The help showed "ExtractionSettings.depth" with neither the choices nor the default."""
    from dataclasses import fields

    from mu0.dataset_builders import extraction

    assert EXTRACT_BACKENDS == {"depth": extraction.DEPTH_BACKENDS, "camera": extraction.CAMERA_BACKENDS,
                                "keypoints": extraction.KEYPOINT_BACKENDS, "tracker": extraction.TRACKER_BACKENDS,
                                "captions": extraction.CAPTION_BACKENDS}
    for field in fields(extraction.ExtractionSettings):
        if field.default is not None:  # None defaults are described in words
            assert EXTRACT_SETTING_DEFAULTS[field.name] == field.default, field.name
    help_text = " ".join(subprocess.run([sys.executable, "-m", "mu0.training.cli", "extract", "--help"],
                                        capture_output=True, text=True, check=True).stdout.split())
    assert "--depth {given,depth_anything} depth backend (default: given)" in help_text
    assert "(default: 32)" in help_text and "ExtractionSettings." not in help_text


@pytest.mark.parametrize(("flag", "value", "wanted"), [
    ("--num-episodes", "-2", "an integer in [1, 1000000]"),  # ran 999 998 episodes
    ("--num-episodes", "0", "an integer in [1, 1000000]"),
    ("--num-frames", "0", "an integer in [2, 10000]"),
    ("--image-size", "0", "an integer in [16, 2048]"),
    ("--horizon", "0", "an integer in [1, 1000]"),
    ("--seed", "-1", "an integer in [0, 4294967295]"),
    ("--extraction-seed", "x", "an integer in [0, 4294967295]"),
    ("--lk-window", "10", "an odd integer in [3, 255]"),
    ("--field-of-view", "nan", "a finite number in (0, 180)"),
    ("--min-coverage", "1.5", "a finite number in [0, 1]"),
    ("--target-fps", "0", "a finite number > 0"),
])
def test_bad_numbers_are_refused_by_the_parser_naming_the_flag(tmp_path, capsys, flag, value, wanted):
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", *GENERATED, flag, value, "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"argument {flag}: must be {wanted}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("settings", "message"), [
    ({"num_episodes": -2}, "num_episodes in --config"),
    ({"num_frames": "48"}, "num_frames in --config"),
    ({"settings": {"horizon": 0}}, "settings.horizon in --config"),
    ({"settings": {"min_coverage": True}}, "settings.min_coverage in --config"),
    ({"settings": {"retarget_step": None}}, "settings.retarget_step in --config"),  # a TypeError traceback
    ({"num_frames": 10**400}, "num_frames in --config"),
])
def test_settings_file_values_are_checked_like_the_flags(tmp_path, capsys, settings, message):
    (tmp_path / "options.json").write_text(json.dumps({"source": "procedural", **settings}))
    assert main(["extract", "--config", str(tmp_path / "options.json"), "--output-dir", str(tmp_path / "out")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_settings_no_episode_can_satisfy_fail_once_before_any_episode(tmp_path, capsys):
    """depth='given' (the default) on a plain video folder failed each episode in turn."""
    folder = tmp_path / "videos" / "clip"
    folder.mkdir(parents=True)
    for t, frame in enumerate(generate_episode(3, num_frames=12, image_size=32).frames):
        Image.fromarray(frame).save(folder / f"{t:03d}.png")
    arguments = ["extract", "--source", "video_folder", "--source-path", str(tmp_path / "videos"), "--no-progress",
                 "--output-dir", str(tmp_path / "out")]
    assert main(arguments) == 1
    error = capsys.readouterr().err
    assert "cannot work on any video_folder episode: depth='given'" in error
    assert "set field_of_view" in error and not (tmp_path / "out").exists()
    # with settings a video can satisfy, extraction starts (no depth model offline here, so it stops at that)
    main([*arguments, "--depth", "depth_anything", "--camera", "static", "--keypoints", "grid", "--tracker", "lk",
          "--field-of-view", "60"])
    assert "cannot work on any" not in capsys.readouterr().err


def test_a_single_video_file_is_a_source(tmp_path):
    from mu0.dataset_builders.sources import video_folder_refs

    (tmp_path / "clip.mp4").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a video")
    (ref,) = video_folder_refs(str(tmp_path / "clip.mp4"))  # was: "Video folder ... does not exist"
    assert (ref.episode_id, ref.location) == ("clip", str(tmp_path / "clip.mp4"))
    with pytest.raises(ValueError, match="is a file but not a video"):
        video_folder_refs(str(tmp_path / "notes.txt"))


def test_a_second_run_into_the_same_output_folder_is_refused_naming_the_holder(tmp_path, capsys):
    """Two runs into one folder both printed "wrote" (one of them lost) or crashed on each other's temp files."""
    from mu0.dataset_builders.trace_extract import output_folder_lock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mu0.dataset_builders.trace_extract import "
                               "output_folder_lock\nwith output_folder_lock(sys.argv[1]):\n print('held', flush=True); "
                               "time.sleep(60)", str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["extract", *GENERATED, "--num-episodes", "1", "--output-dir", str(tmp_path / "out")]) == 1
        assert f"is being written by mu0 extract (pid {holder.pid} on" in capsys.readouterr().err
        assert sorted(os.listdir(tmp_path / "out")) == [".mu0-extract.lock"]
    finally:
        holder.kill()
        holder.wait()
    with output_folder_lock(str(tmp_path / "out")):  # the kernel released a killed holder's lock
        pass


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


@pytest.mark.parametrize(("name", "text", "message"), [
    ("python.yaml", "source: !!python/object/apply:os.system ['touch {marker}']\n", "could not determine a constructor"),
    ("cut.json", '{"source": "procedural", ', "Expecting property name"),
    ("cut.yaml", "source: [procedural\n", "while parsing a flow sequence"),
])
def test_unreadable_settings_files_are_named_and_never_run(tmp_path, capsys, name, text, message):
    marker = tmp_path / "ran"
    (tmp_path / name).write_text(text.replace("{marker}", str(marker)))
    assert main(["extract", "--config", str(tmp_path / name), "--output-dir", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert f"Settings file {str(tmp_path / name)!r} cannot be read: " in error and message in error
    assert len(error.strip().splitlines()) == 1 and not marker.exists()
