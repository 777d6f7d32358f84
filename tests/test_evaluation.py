"""The evaluation protocol, `mu0 evaluate` and the quality benchmark's quick run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model, make_processor

from mu0.dataset_builders.extraction import SYNTHETIC_RETARGET_STEP
from mu0.presets import preset_config
from mu0.training.cli import main
from mu0.training.evaluation import (
    EvaluationProtocol,
    evaluate_models,
    format_metrics_table,
    protocol_indices,
    protocol_samples,
    select_queries,
    table_keys,
)

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def samples_dir(tmp_path_factory):
    """Two procedural episodes with 16 sample frames each (8, 10, ..., 38), saved as `mu0 train` loads them."""
    from mu0.dataset_builders.trace_extract import TraceExtract
    from mu0.training.pretrain import save_samples

    root = tmp_path_factory.mktemp("samples")
    builder = TraceExtract(config_name="samples", source="procedural", num_episodes=2, num_frames=40, image_size=64,
                           cache_dir=str(root / "cache"), work_dir=str(root / "work"), settings={"frame_stride": 2, "retarget_step": SYNTHETIC_RETARGET_STEP})
    builder.download_and_prepare()
    save_samples(builder.as_dataset(split="train"), builder.compute_statistics(), str(root / "samples"))
    return root / "samples"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = preset_config("tiny")
    path = tmp_path_factory.mktemp("model")
    make_model(config).save_pretrained(path)
    make_processor(config).save_pretrained(path)
    return path


def test_protocol_picks_offsets_per_episode_by_frame_order():
    episodes = ["b"] * 14 + ["a"] * 6
    frames = list(range(30, 2, -2)) + [8, 10, 12, 14, 16, 18]  # "b" stored newest first
    rows, missing = protocol_indices(episodes, frames, (4, 8, 12))
    picked = {(episodes[row], frames[row]) for row in rows}
    assert picked == {("a", 16), ("b", 12), ("b", 20), ("b", 28)}  # b sorted: 4, 6, ..., 30; offset 4 is the 5th
    assert missing == {"a": [8, 12]}


def test_query_selection_takes_16_valid_queries_seeded_per_sample():
    rng = np.random.default_rng(0)
    count = 40
    row = {"episode_id": "e", "frame_index": 12, "query_uv": rng.uniform(-1, 1, (count, 2)),
           "query_z": rng.uniform(1, 2, count), "history": rng.normal(size=(count, 8, 3)),
           "history_valid": np.ones((count, 8), bool), "future": rng.normal(size=(count, 32, 3)),
           "future_valid": np.ones((count, 32), bool), "future_raw": rng.normal(size=(count, 32, 3)),
           "future_raw_valid": np.ones((count, 32), bool), "track_ids": np.arange(count),
           "cluster_ids": np.zeros(count, int), "moving": np.ones(count, bool)}
    row["future_valid"][:10] = False  # no future: never chosen
    chosen = select_queries(row, EvaluationProtocol())
    assert len(chosen["track_ids"]) == 16 and chosen["track_ids"].min() >= 10
    assert not chosen["history_valid"].any()  # no history by default
    again = select_queries(dict(row), EvaluationProtocol())
    other_seed = select_queries(row, EvaluationProtocol(seed=1))
    assert np.array_equal(chosen["track_ids"], again["track_ids"])
    assert not np.array_equal(chosen["track_ids"], other_seed["track_ids"])
    assert select_queries(row, EvaluationProtocol(use_history=True))["history_valid"].all()
    np.testing.assert_array_equal(chosen["query_uv"], row["query_uv"][chosen["track_ids"]])


def test_protocol_samples_of_a_saved_dataset(samples_dir):
    from mu0.training.pretrain import load_samples

    samples, _ = load_samples(str(samples_dir))
    rows, missing = protocol_samples(samples, EvaluationProtocol())
    assert len(rows) == 6 and not missing
    assert sorted({int(row["frame_index"]) for row in rows}) == [16, 24, 32]  # offsets 4, 8, 12 from frame 8
    assert all(len(row["query_uv"]) == 16 for row in rows)


def test_evaluation_reproduces_with_its_seed_and_writes_outputs(samples_dir, model_dir, tmp_path):
    from mu0 import Mu0ForTracePrediction, Mu0Processor
    from mu0.training.pretrain import load_samples

    samples, _ = load_samples(str(samples_dir))
    model = Mu0ForTracePrediction.from_pretrained(model_dir)
    processor = Mu0Processor.from_pretrained(model_dir)
    protocol = EvaluationProtocol(num_samples=2)
    first = evaluate_models({"mu0": model}, processor, samples, protocol, output_dir=str(tmp_path), num_overlays=2)
    second = evaluate_models({"mu0": model}, processor, samples, protocol)
    other = evaluate_models({"mu0": model}, processor, samples, EvaluationProtocol(num_samples=2, seed=1))
    assert first["metrics"] == second["metrics"]
    assert first["metrics"]["mu0"] != other["metrics"]["mu0"]
    assert first["metrics"]["zero_motion"]["uv/ade@32"] > 0
    assert first["metrics"]["zero_motion"] == first["metrics"]["constant_velocity"]  # no history: no velocity
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["num_samples"] == 6 and saved["num_queries"] == 96 and len(saved["per_sample"]) == 6
    assert len(saved["overlays"]) == 4 and all((tmp_path / name).exists() for name in saved["overlays"])
    errors = [entry["uv/ade@32"] for entry in saved["per_sample"]]
    worst = [name for name in saved["overlays"] if name.startswith("worst_1_")][0]
    worst_entry = max(saved["per_sample"], key=lambda entry: entry["uv/ade@32"])
    assert worst.endswith(f"f{worst_entry['frame_index']:06d}.png") and max(errors) == worst_entry["uv/ade@32"]
    table = format_metrics_table(first["metrics"])
    assert table.count("\n") == len(table_keys()) + 1 and "| uvz/min_fde@32 |" in table
    with pytest.raises(ValueError, match="use_depth"):
        evaluate_models({"mu0": make_model(preset_config("tiny", use_depth=False))}, processor, samples,
                        EvaluationProtocol(use_depth=True))


def test_evaluate_command(samples_dir, model_dir, tmp_path, capsys):
    output = tmp_path / "eval"
    code = main(["evaluate", "--model", str(model_dir), "--dataset", str(samples_dir), "--output-dir", str(output),
                 "--samples", "2", "--overlays", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| metric | mu0 | zero_motion | constant_velocity |" in printed and "| uv/min_ade@32 |" in printed
    assert "6 samples from 2 episodes, 96 queries (depth off, history off" in printed
    summary = json.loads((output / "metrics.json").read_text())
    assert summary["protocol"]["frame_offsets"] == [4, 8, 12] and summary["protocol"]["num_queries"] == 16
    assert all(math.isfinite(value) for value in summary["metrics"]["mu0"].values())
    code = main(["evaluate", "--model", str(model_dir), "--dataset", str(samples_dir), "--output-dir", str(output),
                 "--samples", "1", "--use-depth", "--use-history", "--heuristics"])
    assert code == 0
    summary = json.loads((output / "metrics.json").read_text())
    assert summary["protocol"]["use_depth"] and list(summary["metrics"]) == ["mu0"]
    assert main(["evaluate", "--model", str(tmp_path / "missing"), "--dataset", str(samples_dir)]) == 1


def test_bench_quality_quick_writes_one_table_and_json(tmp_path):
    output = tmp_path / "bench_quality.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(REPOSITORY / "benchmarks" / "bench_quality.py"), "--quick",
                             "--output", str(output)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| metric | mu0 | regression | dense_flow | tokenized_vlm | zero_motion | constant_velocity |" in result.stdout
    summary = json.loads(output.read_text())
    assert set(summary["models"]) == {"mu0", "regression", "dense_flow", "tokenized_vlm"}
    for record in summary["models"].values():
        assert record["steps"] == 2 and record["latency_s"] > 0 and record["parameters"] > 0
    assert all(math.isfinite(value) for metrics in summary["metrics"].values() for value in metrics.values())
    assert any(key.startswith("tokenized_vlm (8 waypoints) / mu0") for key in summary["latency_ratios"])
    assert summary["data"]["eval_samples"] > 0 and summary["settings"]["eval_seed"] != summary["settings"]["train_seed"]


def test_bench_quality_runs_ablations_as_models(tmp_path):
    output = tmp_path / "ablations.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(REPOSITORY / "benchmarks" / "bench_quality.py"), "--quick",
                             "--models", "mu0", "mu0_no_dino", "mu0_D4", "--output", str(output)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads(output.read_text())["models"]
    assert set(records) == {"mu0", "mu0_no_dino", "mu0_D4"}
    # no DINOv2 tower, and a smaller control-point head: the switches reached the models
    assert records["mu0_no_dino"]["parameters"] < records["mu0"]["parameters"]
    assert records["mu0_D4"]["parameters"] < records["mu0"]["parameters"]
