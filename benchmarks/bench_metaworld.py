"""Downstream benchmark: does a frozen μ0, pretrained without actions, make a MetaWorld policy better?

1. Record scripted MetaWorld demonstrations (RGB-D, fixed `corner` camera) of every task.
2. Pretrain a small μ0 on action-free traces of those scenes (TraceExtract with given depth and cameras, LK
   tracks on a keypoint grid) from more episodes than any policy sees.
3. Train one multi-task policy per (demos per task N, variant): (a) action expert + frozen μ0 motion tokens,
   (b) the same with `use_trace=False`, (c) (a) with LoRA on μ0's trace expert.
4. Roll each out from held-out MT1 start states (seeded) and report success rates, wall time and parameters,
   beside two reference rows from the same rollout code that bound the measurement: the scripted expert (must
   succeed) and a do-nothing policy (must fail).

Prints a table and writes JSON to benchmarks/results/bench_metaworld.json. `--quick` is the CI smoke version: one
demonstration from one fixed start state, rolled out from that same state, so a policy trained for a minute on 2
CPU cores solves it and the smoke test can demand a minimum success rate.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from mu0 import Mu0ActionProcessor, Mu0ForActionPrediction
from mu0.dataset_builders.metaworld_recorder import (
    ACTION_SIZE,
    MetaWorldScene,
    metaworld_scene,
    record_metaworld,
    rollout,
    scripted_actor,
    task_instruction,
    write_metaworld_rgbd,
)
from mu0.dataset_builders.trace_extract import TraceExtract
from mu0.processing import robot_statistics
from mu0.training.adaptation import RobotEpisode, action_samples, add_trace_lora, train_policy
from mu0.training.pretrain import load_recipe, make_trainer

TASKS = ("button-press-topdown-v3", "drawer-close-v3", "reach-v3", "handle-press-v3", "plate-slide-v3")
VARIANTS = {"mu0": {"use_trace": True}, "no_trace": {"use_trace": False}, "mu0_lora": {"use_trace": True}}


@dataclass
class BenchSettings:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    demos: list[int] = field(default_factory=lambda: [5, 20])
    pretrain_episodes: int = 30  # per task, for μ0's action-free pretraining (start states 0..P-1)
    rollouts: int = 20  # per task, from held-out start states 30..49
    first_rollout_state: int = 30
    rollout_start_states: int = 20  # the rollouts cycle through start states first..first+this-1
    image_size: int = 96
    max_steps: int = 150
    trace_steps: int = 1500
    policy_steps: int = 600
    policy_learning_rate: float = 3e-4
    # μ0 is queried on a uniform grid, mostly static background: pretraining on static queries too keeps those in
    # its training distribution (the released samples hold moving points only).
    static_queries: bool = False
    # Where μ0's flow starts on the grid (Mu0ActionConfig.trace_noise): "zero" makes the motion tokens a function of
    # the observation alone; with "random" this small μ0's tokens vary ~100x more with the draw than with the frame.
    trace_noise: str = "zero"
    batch_size: int = 16
    trace_grid_size: int = 8
    lora_rank: int = 4
    seed: int = 0


QUICK = BenchSettings(tasks=["button-press-topdown-v3"], demos=[1], pretrain_episodes=2, rollouts=6,
                      first_rollout_state=0, rollout_start_states=1, image_size=64, max_steps=100, trace_steps=3,
                      policy_learning_rate=3e-3, batch_size=8)
Actor = Callable[[np.ndarray, np.ndarray, str], np.ndarray]


def pretrain_mu0(episodes, settings: BenchSettings, workdir: str):
    """A tiny μ0 trained on action-free traces extracted from the recorded RGB-D episodes."""
    rgbd_dir = os.path.join(workdir, "rgbd")
    write_metaworld_rgbd(rgbd_dir, episodes)
    builder = TraceExtract(
        config_name="samples",
        source="rgbd",
        source_path=rgbd_dir,
        cache_dir=os.path.join(workdir, "cache"),
        work_dir=os.path.join(workdir, "trace_extract"),
        settings={"depth": "given", "camera": "given", "keypoints": "grid", "tracker": "lk", "captions": "given",
                  "frame_stride": 4, "static_queries": settings.static_queries},
    )
    builder.download_and_prepare()
    samples = builder.as_dataset(split="train")
    statistics = builder.compute_statistics(sorted(set(samples["episode_id"])))
    recipe = load_recipe("tiny-cpu")
    recipe["training"].update(seed=settings.seed, disable_tqdm=True)
    trainer = make_trainer(recipe, samples, statistics, os.path.join(workdir, "mu0"), max_steps=settings.trace_steps)
    trainer.train()
    return trainer.model.eval(), trainer.processing_class, len(samples)


def make_actor(policy, processor: Mu0ActionProcessor, seed: int) -> Actor:
    generator = torch.Generator().manual_seed(seed)

    def act(frame: np.ndarray, state: np.ndarray, instruction: str) -> np.ndarray:
        batch = processor(images=[frame], text=instruction, state=state[None])
        actions = policy.predict_actions(**batch, generator=generator)
        return processor.unnormalize_actions(actions)[0].numpy()

    return act


IDLE_CHUNK = 16  # do-nothing actions per query: rendering a frame per step would only slow the rollout down


def do_nothing(frame: np.ndarray, state: np.ndarray, instruction: str) -> np.ndarray:
    return np.zeros((IDLE_CHUNK, ACTION_SIZE))


def success_rates(actor_for: Callable[[MetaWorldScene, int], Actor], settings: BenchSettings,
                  num_execute_steps: int) -> dict[str, float]:
    """Success rate per task; `actor_for(scene, seed)` makes a fresh actor per rollout, so each one is reproducible
    on its own whatever the number or order of the others."""
    rates = {}
    for task_name in settings.tasks:
        with metaworld_scene(task_name, settings.image_size, seed=settings.seed) as scene:
            successes = [
                rollout(actor_for(scene, settings.seed + index), scene,
                        settings.first_rollout_state + index % settings.rollout_start_states, settings.max_steps,
                        num_execute_steps)
                for index in range(settings.rollouts)
            ]
        rates[task_name] = float(np.mean(successes))
    return rates


def success_row(rates: dict[str, float], settings: BenchSettings) -> dict:
    """Mean success over tasks with its binomial standard error sqrt(p (1 - p) / n), n = every rollout counted."""
    rate = float(np.mean(list(rates.values())))
    count = settings.rollouts * len(settings.tasks)
    return {"success_rate": rate, "standard_error": float(np.sqrt(rate * (1 - rate) / count)), "rollouts": count,
            "per_task": rates}


def reference_rows(settings: BenchSettings) -> list[dict]:
    """The scripted expert and a do-nothing policy through the same rollouts: the bounds of the measurement.

    Both are deterministic, and so are MetaWorld's resets: one rollout per distinct start state says it all.
    """
    settings = replace(settings, rollouts=min(settings.rollouts, settings.rollout_start_states))
    rows = []
    for variant, actor_for, num_execute_steps in (
        ("scripted_expert", lambda scene, seed: scripted_actor(scene), 1),
        ("do_nothing", lambda scene, seed: do_nothing, IDLE_CHUNK),
    ):
        start = time.perf_counter()
        rates = success_rates(actor_for, settings, num_execute_steps)
        rows.append({"variant": variant, **success_row(rates, settings), "rollout_time_s": time.perf_counter() - start})
    return rows


def run(settings: BenchSettings, workdir: str) -> dict:
    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    needed = max(settings.pretrain_episodes, max(settings.demos))
    episodes = record_metaworld(settings.tasks, list(range(needed)), settings.image_size, max_steps=settings.max_steps,
                                seed=settings.seed)
    record_time = time.perf_counter() - start

    start = time.perf_counter()
    pretrain = [e for e in episodes if e.start_index < settings.pretrain_episodes]
    trace_model, trace_processor, num_trace_samples = pretrain_mu0(pretrain, settings, workdir)
    pretrain_time = time.perf_counter() - start

    references = reference_rows(settings)
    rows = []
    for num_demos in settings.demos:
        demos = [e for e in episodes if e.start_index < num_demos]
        robot = [RobotEpisode(e.frames, e.states, e.actions, task_instruction(e.task_name)) for e in demos]
        for variant, overrides in VARIANTS.items():
            torch.manual_seed(settings.seed)
            policy = Mu0ForActionPrediction.from_trace_model(
                trace_model, action_dim=4, state_dim=4, trace_grid_size=settings.trace_grid_size,
                trace_noise=settings.trace_noise, **overrides,
            )
            processor = Mu0ActionProcessor.from_trace_processor(
                trace_processor,
                robot_statistics(np.concatenate([e.actions for e in demos]), np.concatenate([e.states for e in demos])),
                chunk_size=policy.config.chunk_size,
            )
            model = add_trace_lora(policy, rank=settings.lora_rank) if variant == "mu0_lora" else policy
            samples = action_samples(robot, policy.config.chunk_size)
            start = time.perf_counter()
            train_policy(model, processor, samples, os.path.join(workdir, f"policy-{variant}-{num_demos}"),
                         steps=settings.policy_steps, batch_size=settings.batch_size,
                         learning_rate=settings.policy_learning_rate, seed=settings.seed, disable_tqdm=True)
            train_time = time.perf_counter() - start
            model.eval()
            start = time.perf_counter()
            rates = success_rates(lambda scene, seed: make_actor(model, processor, seed), settings,
                                  policy.config.num_execute_steps)
            rows.append({
                "variant": variant,
                "demos_per_task": num_demos,
                **success_row(rates, settings),
                "train_time_s": train_time,
                "rollout_time_s": time.perf_counter() - start,
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "total_parameters": sum(p.numel() for p in model.parameters()),
            })
            print(format_row(rows[-1]), flush=True)
    return {
        "settings": asdict(settings),
        "expert_success": float(np.mean([e.succeeded for e in episodes])),
        "record_time_s": record_time,
        "mu0_pretrain_time_s": pretrain_time,
        "mu0_trace_samples": num_trace_samples,
        "rows": rows,
        "reference_rows": references,
        "load_average": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(),
    }


def format_row(row: dict) -> str:
    """Reference rows have no demonstrations, training or parameters: those cells read "–"."""

    def cell(key: str, template: str) -> str:
        return template.format(row[key]) if key in row else "–"

    return (f"| {row['variant']} | {cell('demos_per_task', '{}')} | {row['success_rate']:.2f} ± {row['standard_error']:.2f} | "
            + " ".join(f"{rate:.2f}" for rate in row["per_task"].values())
            + f" | {cell('train_time_s', '{:.0f} s')} | {row['rollout_time_s']:.0f} s | "
            f"{cell('trainable_parameters', '{:,}')} |")


def format_table(result: dict) -> str:
    header = "| variant | demos/task | success ± SE | per task | train | rollouts | trainable params |\n|---|---|---|---|---|---|---|"
    return "\n".join([header, *(format_row(row) for row in result["rows"] + result["reference_rows"])])


def parse_flag(text: str) -> bool:
    """`--static-queries false` must mean False (`bool("false")` is True)."""
    return text.lower() in ("1", "true", "yes")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CI smoke version: 1 task, 1 fixed start state, 6 rollouts")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "bench_metaworld.json"))
    for name, value in asdict(BenchSettings()).items():
        kind = type(value[0]) if isinstance(value, list) else type(value)
        if kind is bool:
            kind = parse_flag
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, nargs="+" if isinstance(value, list) else None)
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else BenchSettings()
    settings = BenchSettings(**{**asdict(settings), **{k: v for k, v in vars(args).items()
                                                         if k in asdict(settings) and v is not None}})
    with tempfile.TemporaryDirectory() as workdir:
        result = run(settings, workdir)
    print(format_table(result))
    print(f"expert demos succeeded: {result['expert_success']:.2f}; recording {result['record_time_s']:.0f} s; "
          f"μ0 pretraining {result['mu0_pretrain_time_s']:.0f} s on {result['mu0_trace_samples']} trace samples")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    temporary = args.output + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(result, handle, indent=2)
    os.replace(temporary, args.output)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
