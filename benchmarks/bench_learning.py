"""Learning curves of μ0 and regression over training-set size and steps, and recipe variants of the tiny model.

One procedural extraction of the largest training set (seed 0) is cut into nested subsets of whole episodes; the
held-out episodes come from another seed. Every run starts from the same random tiny model, trains with the
`tiny-cpu` recipe (optionally changed by a named variant: schedule, learning rate, batch, weight average) and is
scored under the authors' protocol (frame offsets 4/8/12, 16 queries, RGB only, no history, best of 5, seed 0) at
each step in `--eval-at`. Beside ADE and best-of-5 it reports the ADE of the mean of the 5 samples and the samples'
spread (mean ADE of a sample to that mean): a calibrated sampler's spread is about the mean's ADE.

Writes JSON, a markdown table and a PNG of the curves:

    python benchmarks/bench_learning.py [--train-episodes 24 100 300] [--eval-at 500 1000 2000]
        [--runs mu0 regression mu0:cosine mu0:ema] [--max-train-seconds 900] [--quick]
        [--output benchmarks/results/bench_learning.json]
"""

import argparse
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from bench_quality import BenchSettings, WallClockBudget, extract
from transformers import TrainerCallback, set_seed

from results_io import write_json
from mu0.presets import preset_config
from mu0.training.baselines import build_trace_model
from mu0.training.evaluation import EvaluationProtocol, evaluate_models
from mu0.training.pretrain import build_model_and_processor, load_recipe, make_trainer

# Changes to the `tiny-cpu` recipe's training arguments (and `ema_decay`; `collator` and `model` hold collator
# settings and model config overrides), run as `MODEL:VARIANT`.
VARIANTS = {
    "constant": {},
    "cosine": {"lr_scheduler_type": "cosine", "warmup_steps": 100},
    "ema": {"ema_decay": 0.999},
    "cosine_ema": {"lr_scheduler_type": "cosine", "warmup_steps": 100, "ema_decay": 0.999},
    "lr3e-4": {"learning_rate": 3e-4},
    "lr2e-3": {"learning_rate": 2e-3},
    "batch32": {"per_device_train_batch_size": 32},
    "task_text": {"collator": {"task_text_probability": 0.5}},
    "queries32": {"collator": {"min_queries": 32, "max_queries": 32}},
    "train_backbone": {"model": {"freeze_vision_tower": False, "freeze_text_layers": False}},
    "expert_x0.5": {"model": {"expert_width_factor": 0.5}},
    "expert_x4": {"model": {"expert_width_factor": 4.0}},
}
CURVE_KEYS = ("uv/ade@32", "uv/mean_ade@32", "uv/min_ade@32", "uv/min_fde@32", "uv/spread@32", "depth/min_ade@32")


@dataclass
class LearningSettings:
    train_episodes: tuple[int, ...] = (24, 100, 300)
    eval_at: tuple[int, ...] = (500, 1000, 2000)
    runs: tuple[str, ...] = ("mu0", "regression")
    eval_episodes: int = 12
    max_train_seconds: float = 900.0
    data: BenchSettings = field(default_factory=BenchSettings)
    protocol: EvaluationProtocol = field(default_factory=EvaluationProtocol)


QUICK = LearningSettings(train_episodes=(1, 2), eval_at=(1, 2), runs=("mu0", "regression", "mu0:ema"), eval_episodes=1,
                         max_train_seconds=20,
                         data=BenchSettings(num_frames=24, frame_stride=1),
                         protocol=EvaluationProtocol(num_queries=4, num_samples=2))


def parse_run(run: str) -> tuple[str, str]:
    model, _, variant = run.partition(":")
    if model not in ("mu0", "regression") or (variant or "constant") not in VARIANTS:
        raise ValueError(f"Unknown run {run!r}: use MODEL[:VARIANT] with MODEL in mu0/regression and VARIANT in "
                         f"{sorted(VARIANTS)}.")
    return model, variant or "constant"


class CurvePoints(TrainerCallback):
    """Scores the model under the protocol at the chosen steps (with the weight average swapped in, if any)."""

    def __init__(self, steps: tuple[int, ...], score):
        self.steps, self.score, self.points = set(steps), score, []
        self.average = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps or control.should_training_stop or state.global_step >= state.max_steps:
            if self.points and self.points[-1]["step"] == state.global_step:
                return
            start = time.perf_counter()
            if self.average is not None:
                with self.average.averaged_weights(model):
                    metrics = self.score(model)
            else:
                metrics = self.score(model)
            model.train()
            self.points.append({"step": state.global_step, **{key: metrics[key] for key in CURVE_KEYS},
                                "eval_seconds": time.perf_counter() - start})


def train_run(run: str, train_set, statistics: dict, eval_set, settings: LearningSettings, work_dir: str) -> dict:
    model_name, variant = parse_run(run)
    recipe = load_recipe(settings.data.recipe)
    changes = dict(VARIANTS[variant])
    recipe["ema_decay"] = changes.pop("ema_decay", None)
    recipe["collator"] = {**recipe.get("collator", {}), **changes.pop("collator", {})}
    recipe["model"]["overrides"] = {**recipe["model"].get("overrides", {}), "use_depth": False,
                                    **changes.pop("model", {})}
    recipe["training"].update(seed=settings.data.train_seed, save_strategy="no",
                              logging_steps=max(1, max(settings.eval_at) // 20), **changes)
    recipe["training"].pop("save_steps", None)
    recipe["training"].pop("save_total_limit", None)
    set_seed(settings.data.train_seed)  # every run starts from the same random draws
    _, processor = build_model_and_processor(recipe, statistics)
    config = preset_config(recipe["model"]["preset"], **recipe["model"]["overrides"])
    model = build_trace_model(model_name, config)
    trainer = make_trainer(recipe, train_set, statistics, os.path.join(work_dir, run.replace(":", "_")),
                           max_steps=max(settings.eval_at), model=model, processor=processor)

    def score(current):
        summary = evaluate_models({model_name: current}, processor, eval_set, settings.protocol, heuristics=())
        return summary["metrics"][model_name]

    curve = CurvePoints(settings.eval_at, score)
    curve.average = next((c for c in trainer.callback_handler.callbacks if hasattr(c, "averaged_weights")), None)
    trainer.add_callback(WallClockBudget(settings.max_train_seconds))
    trainer.add_callback(curve)
    start = time.perf_counter()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"steps": trainer.state.global_step, "seconds": time.perf_counter() - start - sum(
        p["eval_seconds"] for p in curve.points), "losses": losses, "curve": curve.points}


def run(settings: LearningSettings, work_dir: str) -> dict:
    start = time.perf_counter()
    load_before = os.getloadavg()
    data = settings.data
    full, builder = extract(max(settings.train_episodes), data.train_seed, data, work_dir)
    eval_set, _ = extract(settings.eval_episodes, data.eval_seed, data, work_dir)
    episodes = sorted(set(full.unique("episode_id")))
    eval_set = eval_set.filter(lambda episode: episode not in set(episodes), input_columns="episode_id")
    heuristics = None
    results = {}
    for size in settings.train_episodes:
        kept = set(episodes[:size])  # nested subsets: a larger set holds every smaller one
        train_set = full.filter(lambda episode: episode in kept, input_columns="episode_id")
        statistics = builder.compute_statistics(sorted(kept))
        for name in settings.runs:
            record = train_run(name, train_set, statistics, eval_set, settings, work_dir)
            record["train_samples"] = len(train_set)
            results[f"{name}@{size}"] = record
            last = record["curve"][-1]
            print(f"{name} on {size} episodes ({len(train_set)} samples): {record['steps']} steps in "
                  f"{record['seconds']:.0f} s, loss {record['losses'][0]:.3g} -> {record['losses'][-1]:.3g}; "
                  + ", ".join(f"{key} {last[key]:.4f}" for key in CURVE_KEYS), flush=True)
        if heuristics is None:  # zero motion and constant velocity do not depend on training
            _, processor = build_model_and_processor(load_recipe(data.recipe), statistics)
            any_model = build_trace_model("regression", preset_config("tiny", use_depth=False))
            summary = evaluate_models({"unused": any_model}, processor, eval_set, settings.protocol)
            heuristics = {name: {key: summary["metrics"][name][key] for key in CURVE_KEYS}
                          for name in ("zero_motion", "constant_velocity")}
    return {
        "settings": {**asdict(settings), "data": asdict(data), "protocol": asdict(settings.protocol)},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "eval_samples": len(eval_set),
        "runs": results,
        "heuristics": heuristics,
        "wall_seconds": time.perf_counter() - start,
    }


def table(result: dict) -> str:
    columns = ("uv/ade@32", "uv/mean_ade@32", "uv/min_ade@32", "uv/min_fde@32", "uv/spread@32", "depth/min_ade@32")
    lines = ["| run | episodes (samples) | step | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for key, record in result["runs"].items():
        name, size = key.rsplit("@", 1)
        for point in record["curve"]:
            lines.append(f"| {name} | {size} ({record['train_samples']}) | {point['step']} | "
                         + " | ".join(f"{point[c]:.4f}" for c in columns) + " |")
    for name, metrics in result["heuristics"].items():
        lines.append(f"| {name} | – | – | " + " | ".join(f"{metrics[c]:.4f}" for c in columns) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> str:
    """uv minADE_5@32 and single-sample ADE@32 against steps, one line per run and training-set size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for axis, key in zip(axes, ("uv/min_ade@32", "uv/ade@32", "uv/mean_ade@32")):
        for name, record in result["runs"].items():
            steps = [point["step"] for point in record["curve"]]
            axis.plot(steps, [point[key] for point in record["curve"]], marker="o", label=name)
        axis.axhline(result["heuristics"]["zero_motion"][key], color="black", linestyle="--", label="zero motion")
        axis.set_xlabel("training steps")
        axis.set_ylabel(key)
        axis.set_title(key.replace("@32", " at H=32 (lower is better)"))
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path + ".tmp.png", dpi=100)
    plt.close(figure)
    os.replace(path + ".tmp.png", path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a reduced run for CI (about a minute)")
    parser.add_argument("--train-episodes", type=int, nargs="+", default=None)
    parser.add_argument("--eval-at", type=int, nargs="+", default=None, help="steps at which to score (the last ends)")
    parser.add_argument("--runs", nargs="+", default=None, help="MODEL[:VARIANT], e.g. mu0 regression mu0:ema")
    parser.add_argument("--eval-episodes", type=int, default=None)
    parser.add_argument("--max-train-seconds", type=float, default=None)
    parser.add_argument("--output", default="benchmarks/results/bench_learning.json")
    parser.add_argument("--work-dir", default=None, help="where data and runs go (default: a temporary folder)")
    args = parser.parse_args()
    settings = QUICK if args.quick else LearningSettings()
    overrides = {"train_episodes": args.train_episodes and tuple(sorted(args.train_episodes)),
                 "eval_at": args.eval_at and tuple(sorted(args.eval_at)), "runs": args.runs and tuple(args.runs),
                 "eval_episodes": args.eval_episodes, "max_train_seconds": args.max_train_seconds}
    settings = replace(settings, **{key: value for key, value in overrides.items() if value is not None})
    for name in settings.runs:
        parse_run(name)  # refuse a bad run name before minutes of extraction
    if min(settings.train_episodes) < 1 or min(settings.eval_at) < 1:
        parser.error("--train-episodes and --eval-at must be positive")
    with tempfile.TemporaryDirectory() as temporary:
        result = run(settings, args.work_dir or temporary)
    print(table(result))
    print(f"wall time {result['wall_seconds']:.0f} s; load average before {result['machine']['loadavg_before']}, "
          f"after {result['machine']['loadavg_after']}")
    write_json(result, args.output)
    print(f"wrote {args.output} and {plot(result, args.output.removesuffix('.json') + '.png')}")


if __name__ == "__main__":
    main()
