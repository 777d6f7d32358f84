"""Instruction following of μ0 and regression on held-out procedural frames (see `mu0.training.instruction`).

Trains μ0 and regression from the same random tiny model on procedural TraceExtract episodes (RGB only, the
`tiny-cpu` recipe, as `bench_quality`), then renders held-out push and pick-and-place episodes (seeds that no
training episode uses), takes the first sample frame (before the block moves) with points on the named block, the
other blocks and the table, and predicts under the true prompt, the direction-flipped prompt and each other block's
colour. Rates for μ0, regression and μ0 with every prompt empty; one picture of a frame under two prompts.

    python benchmarks/bench_instruction.py [--train-episodes 300] [--steps 2000] [--frames 48] [--quick]
        [--output benchmarks/results/bench_instruction.json]
"""

import argparse
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from bench_quality import BenchSettings, extract, train

from results_io import write_json
from mu0.dataset_builders.sources import procedural_refs
from mu0.training.instruction import draw_two_instructions, format_instruction_table, instruction_following, instruction_frames
from mu0.training.pretrain import load_recipe


@dataclass
class InstructionSettings:
    frames: int = 48
    frame_seed: int = 2
    points_per_object: int = 8
    num_samples: int = 5
    data: BenchSettings = field(default_factory=lambda: BenchSettings(train_episodes=300, steps=2000,
                                                                      max_train_seconds=900, models=("mu0", "regression")))


QUICK = InstructionSettings(frames=3, points_per_object=2, num_samples=2,
                            data=BenchSettings(train_episodes=2, num_frames=40, steps=2, max_train_seconds=20,
                                               models=("mu0", "regression")))


def held_out_seeds(count: int, seed: int, training: set[int]) -> list[int]:
    """`count` procedural seeds that no training episode uses."""
    candidates = [ref.seed for ref in procedural_refs(count + len(training), seed)]
    return [candidate for candidate in candidates if candidate not in training][:count]


def run(settings: InstructionSettings, work_dir: str, picture: str) -> dict:
    start = time.perf_counter()
    load_before = os.getloadavg()
    data = settings.data
    train_set, builder = extract(data.train_episodes, data.train_seed, data, work_dir)
    statistics = builder.compute_statistics()
    recipe = load_recipe(data.recipe)
    recipe["model"]["overrides"] = {**recipe["model"].get("overrides", {}), "use_depth": False}
    recipe["training"].update(seed=data.train_seed, save_strategy="no", logging_steps=max(1, data.steps // 20))
    recipe["training"].pop("save_steps", None)
    recipe["training"].pop("save_total_limit", None)
    models, records, processor = {}, {}, None
    for name in data.models:
        models[name], processor, records[name] = train(name, recipe, train_set, statistics, data, work_dir)
        print(f"{name}: {records[name]['steps']} steps in {records[name]['train_seconds']:.0f} s", flush=True)
    training_seeds = {ref.seed for ref in procedural_refs(data.train_episodes, data.train_seed)}
    frames = instruction_frames(held_out_seeds(settings.frames, settings.frame_seed, training_seeds),
                                num_frames=data.num_frames, image_size=data.image_size,
                                points_per_object=settings.points_per_object)
    results = {name: instruction_following(model, processor, frames, settings.num_samples, data.protocol.seed)
               for name, model in models.items()}
    results["mu0, empty prompt"] = instruction_following(models["mu0"], processor, frames, settings.num_samples,
                                                          data.protocol.seed, empty_prompt=True)
    draw_two_instructions(models["mu0"], processor, frames[0], picture, data.protocol.seed, settings.num_samples)
    return {
        "settings": {**asdict(settings), "data": {**asdict(data), "protocol": asdict(data.protocol)}},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "train_samples": len(train_set),
        "models": records,
        "frames": [{"seed": frame.episode_seed, "prompt": frame.prompt} for frame in frames],
        "results": results,
        "picture": picture,
        "wall_seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a reduced run for CI (under a minute)")
    parser.add_argument("--train-episodes", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--max-train-seconds", type=float, default=None)
    parser.add_argument("--recipe", default=None, help="a named recipe or a recipe JSON path (default: tiny-cpu)")
    parser.add_argument("--frames", type=int, default=None, help="held-out frames (one per episode)")
    parser.add_argument("--output", default="benchmarks/results/bench_instruction.json")
    parser.add_argument("--work-dir", default=None, help="where data and runs go (default: a temporary folder)")
    args = parser.parse_args()
    settings = QUICK if args.quick else InstructionSettings()
    data = {"train_episodes": args.train_episodes, "steps": args.steps, "max_train_seconds": args.max_train_seconds,
            "recipe": args.recipe}
    settings = replace(settings, data=replace(settings.data, **{k: v for k, v in data.items() if v is not None}))
    if args.frames is not None:
        settings = replace(settings, frames=args.frames)
    if min(settings.frames, settings.data.train_episodes, settings.data.steps) < 1:
        parser.error("--frames, --train-episodes and --steps must be positive")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    picture = args.output.removesuffix(".json") + "_two_instructions.png"
    with tempfile.TemporaryDirectory() as temporary:
        result = run(settings, args.work_dir or temporary, picture)
    print(format_instruction_table(result["results"]))
    print(f"{len(result['frames'])} held-out frames; wall time {result['wall_seconds']:.0f} s; load average before "
          f"{result['machine']['loadavg_before']}, after {result['machine']['loadavg_after']}")
    write_json(result, args.output)
    print(f"wrote {args.output} and {picture}")


if __name__ == "__main__":
    main()
