"""Quick runs of the learning-curve and instruction-following benchmarks, as CI runs them."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def run_benchmark(name: str, output: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(REPOSITORY / "benchmarks" / name), "--quick", "--output", str(output)],
                          capture_output=True, text=True, env=env, timeout=600)


def test_bench_learning_quick_writes_curves_table_and_plot(tmp_path):
    output = tmp_path / "learning.json"
    result = run_benchmark("bench_learning.py", output)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(output.read_text())
    assert set(summary["runs"]) == {f"{run}@{size}" for run in ("mu0", "regression", "mu0:ema") for size in (1, 2)}
    for record in summary["runs"].values():
        assert [point["step"] for point in record["curve"]] == [1, 2]
        assert all(math.isfinite(point["uv/mean_ade@32"]) for point in record["curve"])
    # one regression sample repeated: no spread, and its mean is itself
    regression = summary["runs"]["regression@2"]["curve"][-1]
    assert regression["uv/spread@32"] == 0 and regression["uv/mean_ade@32"] == regression["uv/ade@32"]
    assert summary["runs"]["mu0@2"]["curve"][-1]["uv/spread@32"] > 0
    assert summary["runs"]["mu0@2"]["train_samples"] > summary["runs"]["mu0@1"]["train_samples"]
    assert "| mu0:ema | 2 (" in result.stdout and (tmp_path / "learning.png").stat().st_size > 10_000


def test_bench_instruction_quick_writes_rates_and_a_picture(tmp_path):
    output = tmp_path / "instruction.json"
    result = run_benchmark("bench_instruction.py", output)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(output.read_text())
    assert set(summary["results"]) == {"mu0", "regression", "mu0, empty prompt"}
    for rates in summary["results"].values():
        assert rates["frames"] == len(summary["frames"]) > 0 and 0 <= rates["direction"] <= 1
    assert "| flips with the flipped prompt |" in result.stdout
    assert (tmp_path / "instruction_two_instructions.png").stat().st_size > 10_000
