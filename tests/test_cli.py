"""The `mu0` command line: the embedded demo end to end, version, and one-line errors."""

import json
import math
import subprocess
import sys

import pytest
import torch

from mu0 import Mu0ForTracePrediction, Mu0Processor
from mu0.training.cli import main


def test_demo_quick_writes_a_loadable_model_and_finite_metrics(tmp_path, capsys):
    assert main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| mu0 |" in printed and "| zero_motion |" in printed and "| constant_velocity |" in printed
    summary = json.loads((tmp_path / "metrics.json").read_text())
    for method in ("mu0", "zero_motion", "constant_velocity"):
        assert all(math.isfinite(value) for value in summary["metrics"][method].values())
    assert summary["eval_samples"] > 0 and summary["train_samples"] > 0
    from PIL import Image

    overlays = sorted(tmp_path.glob("overlay_*.png"))
    assert overlays and summary["figures"][-1] == "traces_3d.png"
    side = 4 * summary["settings"]["image_size"]
    for path in overlays:  # ground truth and prediction side by side, each the frame upscaled 4x
        with Image.open(path) as image:
            assert image.size == (2 * side + 8, side)
    assert (tmp_path / "traces_3d.png").stat().st_size > 10_000
    model = Mu0ForTracePrediction.from_pretrained(tmp_path / "model")
    processor = Mu0Processor.from_pretrained(tmp_path / "model")
    assert processor.delta_scale is not None and all(value > 0 for value in processor.delta_scale)
    assert torch.isfinite(next(model.parameters())).all()


def test_version_and_help():
    version = subprocess.run([sys.executable, "-m", "mu0.training.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("mu0 ")
    help_text = subprocess.run([sys.executable, "-m", "mu0.training.cli", "--help"], capture_output=True, text=True)
    assert "mu0 demo" in help_text.stdout


def test_errors_print_one_line_and_exit_non_zero(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["demo", "--quick", "--steps", "1", "--output-dir", str(blocker / "out")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("mu0 demo: error:")
    with pytest.raises(SystemExit):
        main(["no-such-command"])


def test_train_command_trains_evaluates_and_saves(tmp_path, capsys):
    from mu0.dataset_builders.trace_extract import TraceExtract
    from mu0.training.pretrain import save_samples

    builder = TraceExtract(config_name="samples", source="procedural", num_episodes=2, num_frames=30, image_size=64,
                           cache_dir=str(tmp_path / "cache"), work_dir=str(tmp_path / "work"), settings={"frame_stride": 4})
    builder.download_and_prepare()
    save_samples(builder.as_dataset(split="train"), builder.compute_statistics(), str(tmp_path / "samples"))
    code = main(["train", "--dataset", str(tmp_path / "samples"), "--max-steps", "3", "--eval-samples", "4",
                 "--output-dir", str(tmp_path / "run")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| uv/min_ade@32 |" in printed and "| uvz/fde@32 |" in printed
    assert Mu0Processor.from_pretrained(tmp_path / "run").delta_scale == builder.compute_statistics()["delta_scale"]
    assert Mu0ForTracePrediction.from_pretrained(tmp_path / "run").config.model_type == "mu0"
    assert main(["train", "--dataset", str(tmp_path / "missing"), "--recipe", "tiny-cpu"]) == 1
