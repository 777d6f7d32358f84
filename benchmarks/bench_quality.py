"""Trace quality of μ0 against its baselines under one CPU budget (the paper's claim, at toy scale).

Every trained model (μ0, regression, dense flow matching, tokenized VLM) starts from the same random "tiny" preset
backbone, is trained by `Mu0Trainer` with the `tiny-cpu` recipe on the same procedural TraceExtract episodes for the
same number of steps under the same wall-clock cap, and is scored with the zero-motion and constant-velocity
heuristics under the authors' protocol (frame offsets 4/8/12, 16 queries, RGB only, no history, best of 5, seed 0)
on held-out episodes rendered from a different seed. All models train RGB-only (depth off), so their inputs match.

Reports ADE/FDE/minADE_5/minFDE_5 for uv, depth and uvz at H = 8/16/32, parameters, steps and training time,
prediction latency per sample during evaluation, and the latency of one image with 16 queries x 32 steps (batch 1,
one sample, median of repeats) with the tokenized / μ0 ratio, also for a tokenized model emitting all 32 steps.
Prints one markdown table and writes JSON.

    python benchmarks/bench_quality.py [--steps 5000] [--max-train-seconds 450] [--quick]
                                       [--output benchmarks/results/bench_quality.json]
"""

import argparse
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from transformers import TrainerCallback, set_seed

from results_io import write_json
from mu0.dataset_builders.extraction import SYNTHETIC_RETARGET_STEP
from mu0.dataset_builders.trace_extract import TraceExtract
from mu0.presets import preset_config
from mu0.training.baselines import BASELINES, build_trace_model
from mu0.training.evaluation import EvaluationProtocol, evaluate_models, format_metrics_table
from mu0.training.pretrain import build_model_and_processor, load_recipe, make_trainer


# μ0 with one component switched off (run with `--models mu0 mu0_no_dino ...`). Depth input and history are
# ablated by the protocol's switches instead: the authors' protocol already evaluates RGB-only without history.
ABLATIONS = {
    "mu0_no_dino": {"use_dino": False},
    "mu0_no_done_head": {"use_done_head": False},
    "mu0_no_rigidity": {"rigidity_loss_weight": 0.0},
    "mu0_D4": {"num_control_points": 4},
    "mu0_D7": {"num_control_points": 7},
}


@dataclass
class BenchSettings:
    # Data is cheap (300 episodes extract in about a minute), steps are not: μ0's best-of-5 error keeps falling with
    # steps long after it stops falling with data (docs/training.md, "Learning curves"). The 450 s cap per model
    # keeps the four models within about 30 minutes on 2 cores: on a quiet machine μ0 (2x expert) runs its 5000 steps
    # in about 380 s, the tokenized VLM is stopped near 1200; the JSON records the steps each model ran.
    train_episodes: int = 300
    eval_episodes: int = 12
    num_frames: int = 40
    image_size: int = 64
    frame_stride: int = 2
    train_seed: int = 0
    eval_seed: int = 1
    steps: int = 5000
    max_train_seconds: float = 450.0
    recipe: str = "tiny-cpu"
    models: tuple[str, ...] = BASELINES
    protocol: EvaluationProtocol = field(default_factory=EvaluationProtocol)
    latency_queries: int = 16
    latency_repeats: int = 3


QUICK = BenchSettings(train_episodes=2, eval_episodes=1, num_frames=24, frame_stride=1, steps=2, max_train_seconds=20,
                      protocol=EvaluationProtocol(num_queries=4, num_samples=2), latency_queries=2, latency_repeats=1)


class WallClockBudget(TrainerCallback):
    """Stops training once `seconds` of wall time have passed, so every model gets the same time budget."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.start > self.seconds:
            control.should_training_stop = True


def extract(num_episodes: int, seed: int, settings: BenchSettings, work_dir: str):
    builder = TraceExtract(config_name="samples", source="procedural", num_episodes=num_episodes, seed=seed,
                           num_frames=settings.num_frames, image_size=settings.image_size,
                           cache_dir=os.path.join(work_dir, f"cache-{seed}"),
                           work_dir=os.path.join(work_dir, f"extract-{seed}"),
                           settings={"frame_stride": settings.frame_stride,
                                     "retarget_step": SYNTHETIC_RETARGET_STEP})
    builder.download_and_prepare()
    return builder.as_dataset(split="train"), builder


def train(name: str, recipe: dict, train_set, statistics_: dict, settings: BenchSettings, work_dir: str):
    set_seed(settings.train_seed)  # every model starts from the same random draws
    _, processor = build_model_and_processor(recipe, statistics_)
    config = preset_config(recipe["model"]["preset"], **recipe["model"]["overrides"])
    model = build_trace_model("mu0", config, **ABLATIONS[name]) if name in ABLATIONS else build_trace_model(name, config)
    trainer = make_trainer(recipe, train_set, statistics_, os.path.join(work_dir, name), max_steps=settings.steps,
                           model=model, processor=processor)
    trainer.add_callback(WallClockBudget(settings.max_train_seconds))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    record = {
        "steps": trainer.state.global_step,
        "train_seconds": seconds,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "parameters": model.num_parameters(),
        "trainable_parameters": model.num_parameters(only_trainable=True),
    }
    return model.eval(), processor, record


def latency(model, processor, repeats: int, num_queries: int) -> float:
    """Median seconds of `predict_traces` for one 64x64 image with `num_queries` queries (one sample)."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 255, (64, 64, 3), dtype=torch.uint8).numpy()
    points = torch.rand(num_queries, 2, generator=generator).numpy() * 60 + 2
    inputs = processor(images=image, text="push the block", query_points=points)
    model.predict_traces(**inputs, generator=generator)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict_traces(**inputs, generator=generator)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(settings: BenchSettings, work_dir: str) -> dict:
    start = time.perf_counter()
    load_before = os.getloadavg()
    train_set, builder = extract(settings.train_episodes, settings.train_seed, settings, work_dir)
    eval_set, _ = extract(settings.eval_episodes, settings.eval_seed, settings, work_dir)
    overlap = set(train_set.unique("episode_id")) & set(eval_set.unique("episode_id"))
    eval_set = eval_set.filter(lambda episode: episode not in overlap, input_columns="episode_id")
    statistics_ = builder.compute_statistics()
    recipe = load_recipe(settings.recipe)
    recipe["model"]["overrides"] = {**recipe["model"].get("overrides", {}), "use_depth": False}
    recipe["training"].update(seed=settings.train_seed, save_strategy="no", logging_steps=max(1, settings.steps // 20))
    recipe["training"].pop("save_steps", None)
    recipe["training"].pop("save_total_limit", None)

    models, records, processor = {}, {}, None
    for name in settings.models:
        models[name], processor, records[name] = train(name, recipe, train_set, statistics_, settings, work_dir)
        print(f"{name}: {records[name]['steps']} steps in {records[name]['train_seconds']:.0f} s, loss "
              f"{records[name]['first_loss']} -> {records[name]['last_loss']}", flush=True)
    summary = evaluate_models(models, processor, eval_set, settings.protocol,
                              output_dir=os.path.join(work_dir, "evaluation"), num_overlays=0)
    for name, model in models.items():
        records[name]["latency_s"] = latency(model, processor, settings.latency_repeats, settings.latency_queries)
    config = preset_config(recipe["model"]["preset"], **recipe["model"]["overrides"])
    all_steps = build_trace_model("tokenized_vlm", config, num_waypoints=config.horizon).eval()  # 16 x 96 tokens
    extra_latency = {"tokenized_vlm_all_steps_s": latency(all_steps, processor, settings.latency_repeats,
                                                          settings.latency_queries)}
    ratios = {}
    if "mu0" in records and "tokenized_vlm" in records:
        waypoints = models["tokenized_vlm"].config.num_waypoints
        ratios[f"tokenized_vlm ({waypoints} waypoints) / mu0"] = records["tokenized_vlm"]["latency_s"] / records["mu0"]["latency_s"]
        ratios[f"tokenized_vlm ({config.horizon} waypoints) / mu0"] = extra_latency["tokenized_vlm_all_steps_s"] / records["mu0"]["latency_s"]
    return {
        "settings": {**asdict(settings), "protocol": asdict(settings.protocol)},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "data": {"train_samples": len(train_set), "eval_episodes": summary["episodes"],
                 "eval_samples": summary["num_samples"], "eval_queries": summary["num_queries"],
                 "missing_offsets": summary["missing_offsets"], "statistics": statistics_},
        "models": records,
        "metrics": summary["metrics"],
        "seconds_per_sample": summary["seconds_per_sample"],
        "latency": extra_latency,
        "latency_ratios": ratios,
        "wall_seconds": time.perf_counter() - start,
    }


def table(result: dict) -> str:
    records = result["models"]
    extra = {
        "parameters (trainable)": {name: f"{r['parameters'] / 1e3:.0f}k ({r['trainable_parameters'] / 1e3:.0f}k)"
                                   for name, r in records.items()},
        "training steps / s": {name: f"{r['steps']} / {r['train_seconds']:.0f}" for name, r in records.items()},
        "ms per sample (eval, best of N)": {name: f"{s * 1000:.1f}" for name, s in result["seconds_per_sample"].items()},
        f"ms {result['settings']['latency_queries']} queries x 32 steps": {
            name: f"{r['latency_s'] * 1000:.1f}" for name, r in records.items()},
    }
    return format_metrics_table(result["metrics"], extra_rows=extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a reduced run for CI (under a minute)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--max-train-seconds", type=float, default=None)
    parser.add_argument("--recipe", default=None, help="a named recipe or a recipe JSON path (default: tiny-cpu)")
    parser.add_argument("--models", nargs="+", default=None, choices=[*BASELINES, *ABLATIONS])
    parser.add_argument("--output", default="benchmarks/results/bench_quality.json")
    parser.add_argument("--work-dir", default=None, help="where data and runs go (default: a temporary folder)")
    args = parser.parse_args()
    settings = QUICK if args.quick else BenchSettings()
    overrides = {"steps": args.steps, "max_train_seconds": args.max_train_seconds, "recipe": args.recipe,
                 "models": tuple(args.models) if args.models else None}
    settings = replace(settings, **{key: value for key, value in overrides.items() if value is not None})
    with tempfile.TemporaryDirectory() as temporary:
        result = run(settings, args.work_dir or temporary)
    print(table(result))
    for label, ratio in result["latency_ratios"].items():
        print(f"latency {label} at {settings.latency_queries} queries x 32 steps (batch 1, one sample): {ratio:.1f}x")
    print(f"wall time {result['wall_seconds']:.0f} s; load average before {result['machine']['loadavg_before']}, "
          f"after {result['machine']['loadavg_after']}")
    write_json(result, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
