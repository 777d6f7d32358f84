"""The demo's table is `mu0 evaluate`'s table on the demo's `eval/`: one protocol, one set of numbers, distinct
overlays, and a note where a baseline predicts exactly what another does."""

import json
from dataclasses import replace

import numpy as np

from mu0.training.cli import main
from mu0.training.demo import QUICK, run_demo
from mu0.training.evaluation import overlay_picks


def test_overlay_picks_never_draw_one_row_twice():
    errors = np.array([0.3, 0.1])
    picks = overlay_picks(errors, 3)
    assert picks == [("worst", 0, 0), ("best", 0, 1)]
    assert [row for _, _, row in overlay_picks(np.arange(10.0), 3)] == [9, 8, 7, 0, 1, 2]
    assert overlay_picks(np.array([0.5]), 3) == [("worst", 0, 0)]


def test_mu0_evaluate_on_the_demo_eval_reproduces_the_demo_table(tmp_path, capsys):
    # 40 frames at stride 2: sample frames 8..38, so every held-out episode has the protocol's offsets 4, 8, 12
    settings = replace(QUICK, train_episodes=2, eval_episodes=2, num_frames=40, frame_stride=2, image_size=64, steps=2)
    demo = run_demo(str(tmp_path / "demo"), settings)
    assert demo["scored_samples"] == 6 and not demo["missing_offsets"]
    code = main(["evaluate", "--model", str(tmp_path / "demo" / "model"), "--dataset", str(tmp_path / "demo" / "eval"),
                 "--output-dir", str(tmp_path / "eval")])
    assert code == 0
    printed = capsys.readouterr().out
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["num_samples"] == demo["scored_samples"]
    assert evaluated["metrics"] == demo["metrics"]
    # no history under the protocol: constant velocity is zero motion, and both say so
    note = "constant_velocity predicts exactly what zero_motion predicts (no history: no velocity to repeat)."
    assert demo["notes"] == evaluated["notes"] == [note] and note in printed
    overlays = [(tmp_path / "eval" / name).read_bytes() for name in evaluated["overlays"]]
    assert len(overlays) == 6 and len(set(overlays)) == 6
