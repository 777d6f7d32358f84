"""The `mu0` command line: the embedded demo end to end, version, and one-line errors."""

import contextlib
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mu0 import Mu0ForTracePrediction, Mu0Processor
from mu0.training.cli import main


QUICKSTART = Path(__file__).resolve().parent.parent / "docs" / "quickstart.md"


def quickstart_commands() -> list[list[str]]:
    """The `mu0` lines of the quickstart's "Start from the demo" block, in order."""
    section = QUICKSTART.read_text(encoding="utf-8").split("## Start from the demo", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def first_hour(tmp_path_factory):
    """The quickstart's command sequence run in order in an empty folder, the demo as `mu0 demo --quick`: the
    folder, and each command's (exit code, stdout, stderr)."""
    root = tmp_path_factory.mktemp("first-hour")
    results = []
    previous = os.getcwd()
    os.chdir(root)
    try:
        for command in quickstart_commands():
            assert command[0] == "mu0", command
            arguments = command[1:] + (["--quick"] if command[1] == "demo" else [])
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(arguments)
            results.append((code, out.getvalue(), err.getvalue()))
    finally:
        os.chdir(previous)
    return root, results


def test_quickstart_commands_chain_from_the_demo(first_hour):
    root, results = first_hour
    assert [command[1] for command in quickstart_commands()] == ["demo", "evaluate", "view", "predict", "predict"]
    for command, (code, _, err) in zip(quickstart_commands(), results):
        assert code == 0, f"{' '.join(command)} failed: {err[-2000:]}"
    evaluation = json.loads((root / "outputs" / "eval" / "metrics.json").read_text())
    assert evaluation["num_samples"] > 0 and list(root.glob("outputs/eval/worst_*.png"))
    assert (root / "outputs" / "view" / "episode_0.mp4").stat().st_size > 1000
    predicted = json.loads((root / "outputs" / "predict" / "traces.json").read_text())
    assert len(predicted["query_points"]) == 64 and (root / "outputs" / "predict" / "overlay.png").exists()
    metric = json.loads((root / "outputs" / "predict-3d" / "traces.json").read_text())
    assert np.asarray(metric["xyz_m"]).shape[:2] == (3, 64) and (root / "outputs" / "predict-3d" / "traces_3d.png").exists()
    assert "mu0 evaluate --model outputs/demo/model --dataset outputs/demo/eval" in results[0][1]  # what to run next


def test_demo_quick_writes_a_loadable_model_and_finite_metrics(first_hour):
    root, results = first_hour
    tmp_path = root / "outputs" / "demo"
    printed = results[0][1]
    assert "| mu0 |" in printed and "| zero_motion |" in printed and "| constant_velocity |" in printed
    summary = json.loads((tmp_path / "metrics.json").read_text())
    for method in ("mu0", "zero_motion", "constant_velocity"):
        assert all(math.isfinite(value) for value in summary["metrics"][method].values())
    assert summary["eval_samples"] > 0 and summary["train_samples"] > 0
    from PIL import Image

    overlays = sorted(tmp_path.glob("overlay_*.png"))
    assert overlays and summary["figures"][-1] == "traces_3d.png"
    side = 480  # a 96² frame is upscaled 5x, to 480 px
    for path in overlays:  # ground truth and prediction side by side
        with Image.open(path) as image:
            assert image.size == (2 * side + 8, side)
    assert (tmp_path / "traces_3d.png").stat().st_size > 10_000
    import av

    assert summary["video"] == "overlays.mp4"
    with av.open(str(tmp_path / "overlays.mp4")) as video:  # held-out frames, truth beside prediction
        frames = [frame.to_ndarray(format="rgb24") for frame in video.decode(video=0)]
    assert len(frames) == min(summary["eval_samples"], 48) > 0
    assert frames[0].shape == (side, 2 * side + 8, 3) and frames[0].std() > 10  # the frame, not a blank
    # what the next commands read: held-out samples, held-out episodes and raw frames; no caches or checkpoints
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["episodes", "eval", "frames", "model"]
    from datasets import load_from_disk

    evaluation, episodes = load_from_disk(str(tmp_path / "eval")), load_from_disk(str(tmp_path / "episodes"))
    assert len(evaluation) == summary["eval_samples"]
    assert set(evaluation.unique("episode_id")) == set(episodes["episode_id"]) == set(summary["eval_episodes"])
    assert len(episodes) == summary["settings"]["eval_episodes"]
    assert not list(tmp_path.rglob("cache-*.arrow"))  # no datasets cache files beside the saved datasets
    assert summary["frames"] == [f"frames/frame_{index}.png" for index in range(4)]
    with Image.open(tmp_path / summary["frames"][0]) as frame:
        assert frame.size == (96, 96)
    depth = np.load(tmp_path / "frames" / "frame_0_depth.npy")
    assert depth.shape == (96, 96) and 0.2 < np.nanmedian(depth) < 3.0  # metres
    assert np.asarray(json.loads((tmp_path / "frames" / "frame_0_K.json").read_text())).shape == (3, 3)
    model = Mu0ForTracePrediction.from_pretrained(tmp_path / "model")
    processor = Mu0Processor.from_pretrained(tmp_path / "model")
    assert processor.delta_scale is not None and all(value > 0 for value in processor.delta_scale)
    assert torch.isfinite(next(model.parameters())).all()


def test_version_and_help():
    version = subprocess.run([sys.executable, "-m", "mu0.training.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("mu0 ")
    help_text = subprocess.run([sys.executable, "-m", "mu0.training.cli", "--help"], capture_output=True, text=True)
    assert "mu0 demo" in help_text.stdout


def test_help_starts_without_torch_and_shows_defaults():
    from mu0.training.demo import QUICK, DemoSettings

    check = "import sys, mu0.training.cli as cli; cli.build_parser(); print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"  # `mu0 --help` imports neither (lazy `mu0` package)
    demo_help = subprocess.run([sys.executable, "-m", "mu0.training.cli", "demo", "--help"], capture_output=True,
                               text=True).stdout
    demo_help = " ".join(demo_help.split())  # argparse wraps lines
    assert f"(default: {DemoSettings.steps}," in demo_help and f"with --quick: {QUICK.steps})" in demo_help
    root = Path(__file__).resolve().parent.parent
    for page in ("README.md", "docs/training.md"):  # the same step count everywhere
        assert f"{DemoSettings.steps} steps" in (root / page).read_text(encoding="utf-8"), page
    assert "(default: outputs/demo)" in demo_help and "(default: 0)" in demo_help
    predict_help = subprocess.run([sys.executable, "-m", "mu0.training.cli", "predict", "--help"], capture_output=True,
                                  text=True).stdout
    assert "(default: 8)" in predict_help and "(default: outputs/predict)" in predict_help


def test_errors_print_one_line_and_exit_non_zero(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["demo", "--quick", "--steps", "1", "--output-dir", str(blocker / "out")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("mu0 demo: error:")
    with pytest.raises(SystemExit):
        main(["no-such-command"])


def test_train_command_trains_evaluates_and_saves(tmp_path, capsys, monkeypatch):
    from mu0.dataset_builders.trace_extract import TraceExtract
    from mu0.training.pretrain import save_samples

    builder = TraceExtract(config_name="samples", source="procedural", num_episodes=2, num_frames=30, image_size=64,
                           cache_dir=str(tmp_path / "cache"), work_dir=str(tmp_path / "work"), settings={"frame_stride": 4})
    builder.download_and_prepare()
    save_samples(builder.as_dataset(split="train"), builder.compute_statistics(), str(tmp_path / "samples"))
    from mu0.training import pretrain

    seen = {}
    original = pretrain.make_trainer

    def recording_make_trainer(recipe, train_dataset, statistics, output_dir, eval_dataset=None, **kwargs):
        seen.update(train=set(train_dataset["episode_id"]), evaluation=eval_dataset["episode_id"])
        return original(recipe, train_dataset, statistics, output_dir, eval_dataset=eval_dataset, **kwargs)

    monkeypatch.setattr(pretrain, "make_trainer", recording_make_trainer)
    code = main(["train", "--dataset", str(tmp_path / "samples"), "--max-steps", "3", "--eval-samples", "4",
                 "--output-dir", str(tmp_path / "run")])
    assert code == 0
    # the end-of-run evaluation holds out a whole episode: none of its rows were trained on
    assert len(seen["evaluation"]) == 4 and seen["train"] and not seen["train"] & set(seen["evaluation"])
    printed = capsys.readouterr().out
    assert "| uv/min_ade@32 |" in printed and "| uvz/fde@32 |" in printed
    assert Mu0Processor.from_pretrained(tmp_path / "run").delta_scale == builder.compute_statistics()["delta_scale"]
    assert Mu0ForTracePrediction.from_pretrained(tmp_path / "run").config.model_type == "mu0"
    assert main(["train", "--dataset", str(tmp_path / "missing"), "--recipe", "tiny-cpu"]) == 1
    assert main(["train", "--dataset", str(tmp_path / "samples"), "--max-steps", "1", "--eval-samples", "10000",
                 "--output-dir", str(tmp_path / "run2")]) == 1
    assert "--eval-samples 10000" in capsys.readouterr().err


def test_predict_writes_overlay_plot_and_json(tmp_path, tiny_config, tiny_processor, capsys):
    import numpy as np
    from conftest import make_model
    from PIL import Image

    make_model(tiny_config).save_pretrained(tmp_path / "model")
    tiny_processor.save_pretrained(tmp_path / "model")
    Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).save(tmp_path / "frame.png")
    np.save(tmp_path / "depth.npy", np.full((48, 64), 0.9))
    json_path = tmp_path / "K.json"
    json_path.write_text(json.dumps([[60.0, 0, 31.5], [0, 60.0, 23.5], [0, 0, 1]]))
    args = ["predict", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "frame.png"), "--prompt", "push",
            "--points", "10,20", "40,30", "--depth", str(tmp_path / "depth.npy"), "--intrinsics", str(json_path),
            "--samples", "2", "--rerun", "--output-dir", str(tmp_path / "out")]
    assert main(args) == 0
    result = json.loads((tmp_path / "out" / "traces.json").read_text())
    assert np.asarray(result["pixels"]).shape == (2, 2, tiny_config.horizon, 2)
    xyz, pixels = np.asarray(result["xyz_m"]), np.asarray(result["pixels"])
    # metric points are the predicted pixels unprojected with K at the predicted depth (queries start at 0.9 m)
    np.testing.assert_allclose(xyz[..., 0], (pixels[..., 0] - 31.5) / 60.0 * xyz[..., 2], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(xyz[..., 1], (pixels[..., 1] - 23.5) / 60.0 * xyz[..., 2], rtol=1e-4, atol=1e-6)
    assert np.abs(xyz[..., 2] - 0.9).max() < 0.5
    assert (tmp_path / "out" / "overlay.png").exists() and (tmp_path / "out" / "traces_3d.png").exists()
    from test_visualization import read_recording

    entities = read_recording(tmp_path / "out" / "scene.rrd")
    assert {"/world/predicted", "/world/camera/image/predicted", "/world/camera/image/depth"} <= set(entities)
    assert main(["predict", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "frame.png"),
                 "--points", "1,2,3"]) == 1
    assert "x,y pairs" in capsys.readouterr().err


def test_view_renders_an_episode_to_mp4(tmp_path, capsys):
    import av

    from mu0.dataset_builders.trace_extract import TraceExtract

    builder = TraceExtract(config_name="episodes", source="procedural", num_episodes=1, num_frames=12, image_size=64,
                           cache_dir=str(tmp_path / "cache"), work_dir=str(tmp_path / "work"))
    builder.download_and_prepare()
    builder.as_dataset(split="train").save_to_disk(str(tmp_path / "episodes"))
    assert main(["view", str(tmp_path / "episodes"), "--output-dir", str(tmp_path / "out")]) == 0
    with av.open(str(tmp_path / "out" / "episode_0.mp4")) as video:
        frames = list(video.decode(video=0))
    assert len(frames) == 12 and (frames[0].width, frames[0].height) == (512, 512)  # 64² upscaled 8x to 512
    assert main(["view", str(tmp_path / "episodes"), "--episode", "5"]) == 1
    assert "out of range" in capsys.readouterr().err


def test_view_explains_that_a_samples_dataset_is_not_episodes(tmp_path, capsys):
    from datasets import Dataset

    Dataset.from_dict({"episode_id": ["a"], "frame_index": [0]}).save_to_disk(str(tmp_path / "samples"))
    assert main(["view", str(tmp_path / "samples")]) == 1
    error = capsys.readouterr().err
    assert "not an `episodes` dataset" in error and "outputs/demo/episodes" in error and "KeyError" not in error


def test_predict_on_a_demo_frame_prints_no_warnings(first_hour):
    root, _ = first_hour
    demo = root / "outputs" / "demo"
    run = subprocess.run([sys.executable, "-m", "mu0.training.cli", "predict", "--model", str(demo / "model"),
                          "--image", str(demo / "frames" / "frame_0.png"), "--grid", "4", "--output-dir",
                          str(root / "quiet")], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    noise = [line for line in run.stderr.splitlines() if "deprecated" in line or "Warning" in line or "WARNING" in line]
    assert not noise  # an in-domain frame: no deprecation, pin_memory or training-range warnings
