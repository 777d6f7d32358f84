"""TraceExtract throughput on Ray next to the local executor, and what starting Ray costs.

Procedural episodes (moving camera) go through the classical pipeline (grid keypoints, LK, given depth and cameras)
with the local executor, then on a local Ray instance with 1 and 2 workers, each run into a fresh work folder (the
best of two runs each). The same episodes then run with depth='depth_anything' from a ~0.1M-parameter random Depth
Anything: locally, and on Ray with its depth stage in an actor pool of 1 and 2 actors (half a CPU per task and actor,
so the pools leave CPUs to the tasks). The model's inference is cheap, so those rows show what the staged pipeline
costs (episodes shipped between the tasks and the actors), not the speed of a real depth model.
Only the extraction is timed (the datasets are written from the cache the same way after either executor).
For the Ray runs, each pipeline step (the CPU tasks, each learned stage's actor pool) gets its busy seconds, episodes
per second of one of its workers and its utilisation: what docs/scaling_out.md sizes the pools from.
"Start-up" is `ray.init` of a local instance plus the first tiny Ray Data job (worker processes starting and
importing mu0). Prints a table and writes JSON. Needs `pip install "mu0[scale]"`.

    python benchmarks/bench_extract.py --executor ray [--episodes 8] [--output benchmarks/results/bench_extract_ray.json]
    python benchmarks/bench_extract_ray.py --episodes 8
"""

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import ray

from mu0.dataset_builders.executors import LocalExecutor, RayExecutor, learned_stages, pipeline_steps
from mu0.dataset_builders.extraction import ExtractionSettings
from mu0.dataset_builders.sources import procedural_refs

CONFIG = {"source": "procedural", "num_frames": 48, "image_size": 128, "moving_camera": True}
SETTINGS = {"keypoints": "grid", "tracker": "lk", "num_keypoints": 256, "lk_window": 11}


def best_of_two(executor, num_episodes: int, settings: dict = SETTINGS) -> dict:
    """The faster of two runs: the machine is shared, and the second Ray run finds its workers started."""
    return max((timed_extraction(executor, num_episodes, settings) for _ in range(2)), key=lambda row: row["episodes_per_s"])


def timed_extraction(executor, num_episodes: int, settings: dict) -> dict:
    """Episodes per second of one executor on a fresh work folder (and seconds until the first episode is done);
    rejected episodes (too little track coverage) count, they cost a full extraction."""
    work_dir = tempfile.mkdtemp(prefix="bench_extract_ray_")
    refs = procedural_refs(num_episodes)
    try:
        start = time.perf_counter()
        first = None
        outcomes = []
        for outcome in executor.run(work_dir, {**CONFIG, "num_episodes": num_episodes}, settings, refs):
            first = first or time.perf_counter() - start
            outcomes.append(outcome)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    # after the first episode: the rate once workers and actors are up (and models loaded), which a long run sees
    steady = (len(outcomes) - 1) / (seconds - first) if len(outcomes) > 1 else float("nan")
    row = {"episodes": len(outcomes), "rejected": sum(outcome.failed for outcome in outcomes), "seconds": seconds,
           "episodes_per_s": len(outcomes) / seconds, "first_episode_s": first, "after_first_episodes_per_s": steady,
           "workers": len({outcome.worker for outcome in outcomes})}
    if isinstance(executor, RayExecutor):
        row["steps"] = step_usage(executor, settings, outcomes, seconds)
    return row


def step_usage(executor: RayExecutor, settings: dict, outcomes: list, seconds: float) -> list[dict]:
    """Per step of the Ray pipeline (the CPU tasks, or a learned stage's actor pool): the seconds its stages took
    summed over the episodes ("busy"), episodes per second of one of its workers (episodes / busy), and its
    utilisation: busy over what its workers could give in the run (workers x run seconds). The tasks of all
    task steps share the CPUs that the pools leave (at most `num_workers` at a time), so their utilisation is
    reported over those slots together with each step's share of the busy time."""
    extraction = ExtractionSettings(**settings)
    pools = learned_stages(extraction)
    pool_cpus = sum(executor.pool_size(stage) for stage in pools) * executor.cpus_per_worker
    task_slots = int((ray.cluster_resources()["CPU"] - pool_cpus) // executor.cpus_per_worker)
    task_slots = min(task_slots, executor.num_workers or task_slots)
    rows = []
    for step in pipeline_steps(extraction):
        busy = sum(outcome.stage_seconds.get(stage, 0.0) for outcome in outcomes for stage in step)
        episodes = sum(any(stage in outcome.stage_seconds for stage in step) for outcome in outcomes)
        pool = step[0] in pools
        workers = executor.pool_size(step[0]) if pool else task_slots
        rows.append({"step": "+".join(step), "runs_on": f"{workers} actors" if pool else f"{workers} task slots",
                     "busy_s": busy, "episodes": episodes,
                     "episodes_per_s_per_worker": episodes / busy if busy else float("nan"),
                     "utilisation": busy / (workers * seconds)})
    return rows


def save_tiny_depth_model(folder: str) -> None:
    """A Depth Anything with a 4-layer, 32-wide DINOv2 backbone at 56 px, randomly initialised."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessorPil

    backbone = Dinov2Config(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=64, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                                 fusion_hidden_size=16, head_hidden_size=8, depth_estimation_type="metric", max_depth=5)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessorPil(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14).save_pretrained(folder)


def ray_start_up(num_cpus: int) -> dict:
    start = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    init_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ray.data.from_items([{"x": i} for i in range(num_cpus)], override_num_blocks=num_cpus).map_batches(
        lambda batch: {"x": [__import__("mu0").__version__ for _ in batch["x"]]}, batch_size=1).take_all()
    return {"ray_init_s": init_seconds, "first_job_s": time.perf_counter() - start}


def run(num_episodes: int, output: str) -> dict:
    load = os.getloadavg()
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__,
                           "load_average_1_5_15_at_start": load},
               "config": {**CONFIG, "num_episodes": num_episodes}, "settings": SETTINGS,
               "local": best_of_two(LocalExecutor(), num_episodes)}
    model_dir = tempfile.mkdtemp(prefix="bench_extract_ray_depth_")
    save_tiny_depth_model(model_dir)
    learned = {**SETTINGS, "depth": "depth_anything", "depth_model": model_dir}
    results["settings_depth_actor_pool"] = learned
    results["local_depth_model"] = best_of_two(LocalExecutor(), num_episodes, learned)
    results["start_up"] = ray_start_up(num_cpus=2)
    try:
        for workers in (1, 2):
            results[f"ray_{workers}_workers"] = best_of_two(RayExecutor(num_workers=workers), num_episodes)
        for actors in (1, 2):
            pool = RayExecutor(cpus_per_worker=0.5, stage_concurrency={"depth": actors})
            results[f"ray_depth_pool_{actors}_actors"] = best_of_two(pool, num_episodes, learned)
    finally:
        ray.shutdown()
        shutil.rmtree(model_dir, ignore_errors=True)
    results["machine"]["load_average_1_5_15_at_end"] = os.getloadavg()
    print(f"{num_episodes} procedural episodes, {CONFIG['num_frames']} frames at {CONFIG['image_size']} px, grid + LK; "
          f"load average at start {load[0]:.1f} on {os.cpu_count()} CPUs")
    print("| executor | depth | episodes/s | after the first | seconds | first episode (s) | worker processes | rejected |"
          "\n|---|---|---|---|---|---|---|---|")
    for name, depth in (("local", "given"), ("ray_1_workers", "given"), ("ray_2_workers", "given"),
                        ("local_depth_model", "tiny model"), ("ray_depth_pool_1_actors", "tiny model, 1 actor"),
                        ("ray_depth_pool_2_actors", "tiny model, 2 actors")):
        row = results[name]
        print(f"| {name} | {depth} | {row['episodes_per_s']:.2f} | {row['after_first_episodes_per_s']:.2f} | "
              f"{row['seconds']:.1f} | {row['first_episode_s']:.1f} | {row['workers']} | {row['rejected']} |")
    print("\nPer pipeline step (busy: seconds summed over episodes; utilisation: busy / (workers x run seconds), task "
          "steps sharing the same task slots):")
    print("| run | step | runs on | busy (s) | episodes/s per worker | utilisation |\n|---|---|---|---|---|---|")
    for name in ("ray_2_workers", "ray_depth_pool_1_actors", "ray_depth_pool_2_actors"):
        for step in results[name]["steps"]:
            print(f"| {name} | {step['step']} | {step['runs_on']} | {step['busy_s']:.1f} | "
                  f"{step['episodes_per_s_per_worker']:.2f} | {step['utilisation']:.0%} |")
    start_up = results["start_up"]
    print(f"\nRay start-up: ray.init {start_up['ray_init_s']:.1f} s, first job (workers start, import mu0) "
          f"{start_up['first_job_s']:.1f} s")
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"\nwrote {output}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--output", default="benchmarks/results/bench_extract_ray.json")
    args = parser.parse_args()
    run(args.episodes, args.output)


if __name__ == "__main__":
    main()
