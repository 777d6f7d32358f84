"""TraceExtract accuracy and throughput against exact ground truth.

Procedural and MuJoCo-rendered episodes (moving camera) are tracked with the `lk` backend and lifted with their
given depth and cameras; the SceneTracker clip in ../shared/data (if present) gives TAP-style 2D scores. Prints a
table and writes JSON. The MuJoCo rows need `pip install "mu0[sim]"` and an offscreen GL (MUJOCO_GL=egl).

    python benchmarks/bench_extract.py [--episodes 6] [--output benchmarks/results/bench_extract.json] [--quick]
    python benchmarks/bench_extract.py --executor ray   # episodes/s on Ray next to local (bench_extract_ray.py)
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from mu0.dataset_builders.extraction import ExtractionSettings, episode_samples, extract_episode
from mu0.dataset_builders.mujoco_scenes import generate_mujoco_episode
from mu0.dataset_builders.procedural import generate_episode, project_points
from mu0.dataset_builders.sources import RawEpisode, load_scenetracker, scenetracker_refs
from mu0.dataset_builders.trace_ops import lift_to_world
from mu0.dataset_builders.tracking import track_points_lk

SCENETRACKER = Path(__file__).resolve().parents[2] / "shared" / "data" / "scenetracker_000005"
TAP_THRESHOLDS = (1, 2, 4, 8, 16)


def ground_truth_pixels(episode) -> np.ndarray:
    return np.stack(
        [project_points(episode.tracks_world[t], episode.extrinsics[t], episode.intrinsics)[0] for t in range(len(episode.frames))]
    )


def tap_scores(predicted: np.ndarray, predicted_visible: np.ndarray, truth: np.ndarray, truth_visible: np.ndarray) -> dict:
    """δ_avg: fraction of GT-visible points within 1/2/4/8/16 px, averaged; occlusion accuracy over all points."""
    errors = np.linalg.norm(predicted - truth, axis=-1)[truth_visible]
    within = {f"within_{t}px": float((errors < t).mean()) for t in TAP_THRESHOLDS}
    return {
        "delta_avg": float(np.mean(list(within.values()))),
        **within,
        "occlusion_accuracy": float((predicted_visible == truth_visible).mean()),
        "median_2d_error_px": float(np.median(errors)),
    }


def bench_generated(generate, num_episodes: int, image_size: int, num_frames: int) -> dict:
    """LK against the exact tracks of episodes from `generate` (`generate_episode` or `generate_mujoco_episode`)."""
    rows = []
    for seed in range(num_episodes):
        start = time.perf_counter()
        episode = generate(seed, num_frames=num_frames, image_size=image_size, moving_camera=True)
        generate_seconds = time.perf_counter() - start
        truth = ground_truth_pixels(episode)
        queries = np.column_stack([np.zeros(truth.shape[1]), truth[0]])
        start = time.perf_counter()
        result = track_points_lk(episode.frames, queries)
        track_seconds = time.perf_counter() - start
        scores = tap_scores(result.tracks, result.visible, truth, episode.visible)
        start = time.perf_counter()
        world, valid = lift_to_world(result.tracks, result.visible, episode.depth, episode.intrinsics, episode.extrinsics)
        lift_seconds = time.perf_counter() - start
        error_3d = np.linalg.norm(world[valid] - episode.tracks_world[valid], axis=-1)
        static = ~episode.moving
        static_world = np.where(valid[:, static, None], world[:, static], np.nan)
        drift = np.nanmax(np.linalg.norm(static_world - episode.tracks_world[:1, static], axis=-1), axis=0)
        rows.append({
            **scores,
            "median_3d_error_mm": float(np.median(error_3d) * 1000),
            "static_world_drift_mm": float(np.nanmedian(drift) * 1000),
            "track_fps": num_frames / track_seconds,
            "lift_fps": num_frames / lift_seconds,
            "generate_fps": num_frames / generate_seconds,
        })
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def bench_scenetracker() -> dict | None:
    if not SCENETRACKER.exists():
        return None
    raw = load_scenetracker(scenetracker_refs(str(SCENETRACKER))[0])
    queries = np.column_stack([np.zeros(raw.tracks.shape[1]), raw.tracks[0]])
    start = time.perf_counter()
    result = track_points_lk(raw.frames, queries)
    seconds = time.perf_counter() - start
    scores = tap_scores(result.tracks, result.visible, raw.tracks, raw.track_visible)
    truth_world, truth_valid = lift_to_world(raw.tracks, raw.track_visible, raw.depth, raw.intrinsics, raw.extrinsics)
    world, valid = lift_to_world(result.tracks, result.visible, raw.depth, raw.intrinsics, raw.extrinsics)
    both = valid & truth_valid
    scores["median_3d_error_mm"] = float(np.median(np.linalg.norm(world[both] - truth_world[both], axis=-1)) * 1000)
    scores["track_fps"] = len(raw.frames) / seconds
    return scores


def bench_end_to_end(height: int, width: int, num_frames: int) -> dict:
    """Frames per second of each stage and the whole extraction on a resized procedural episode."""
    import cv2

    episode = generate_episode(1, num_frames=num_frames, image_size=max(height, width), moving_camera=True)
    frames = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in episode.frames])
    depth = np.stack([cv2.resize(d, (width, height), interpolation=cv2.INTER_NEAREST) for d in episode.depth])
    scale = np.diag([width / episode.frames.shape[2], height / episode.frames.shape[1], 1.0])
    raw = RawEpisode("bench", frames, 10.0, depth=depth, intrinsics=scale @ episode.intrinsics,
                     extrinsics=episode.extrinsics, task=episode.task)
    settings = ExtractionSettings(keypoints="grid", tracker="lk", captions="template", num_keypoints=256)
    start = time.perf_counter()
    extracted = extract_episode(raw, settings)
    extract_seconds = time.perf_counter() - start
    start = time.perf_counter()
    num_samples = sum(1 for _ in episode_samples(extracted, settings))
    sample_seconds = time.perf_counter() - start
    return {
        "extract_fps": num_frames / extract_seconds,
        "samples_per_s": num_samples / sample_seconds,
        "end_to_end_fps": num_frames / (extract_seconds + sample_seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=6)
    parser.add_argument("--output", default="benchmarks/results/bench_extract.json")
    parser.add_argument("--quick", action="store_true", help="2 small episodes and 224² only (CI smoke run)")
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="ray: extraction throughput with 1 and 2 Ray workers next to local, and Ray start-up")
    args = parser.parse_args()
    if args.executor == "ray":
        from bench_extract_ray import run

        run(2 if args.quick else args.episodes, args.output.replace("bench_extract.json", "bench_extract_ray.json"))
        return
    episodes = 2 if args.quick else args.episodes
    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "procedural_lk_128px": bench_generated(generate_episode, episodes, 128, 32 if args.quick else 48),
        "mujoco_lk_128px": bench_generated(generate_mujoco_episode, episodes, 128, 32 if args.quick else 48),
        "scenetracker_lk": None if args.quick else bench_scenetracker(),
        "throughput": {
            f"{h}x{w}": bench_end_to_end(h, w, 24 if args.quick else 60)
            for h, w in ([(224, 224)] if args.quick else [(224, 224), (480, 640)])
        },
    }
    print("| dataset | median 2D err (px) | within 4 px | δ_avg | occlusion acc | median 3D err (mm) | static drift (mm) "
          "| track fps | generate fps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ("procedural_lk_128px", "mujoco_lk_128px", "scenetracker_lk"):
        row = results[name]
        if row is None:
            continue
        print(f"| {name} | {row['median_2d_error_px']:.2f} | {row['within_4px']:.3f} | {row['delta_avg']:.3f} | "
              f"{row['occlusion_accuracy']:.3f} | {row['median_3d_error_mm']:.1f} | "
              f"{row.get('static_world_drift_mm', float('nan')):.1f} | {row['track_fps']:.0f} | "
              f"{row.get('generate_fps', float('nan')):.0f} |")
    print("\n| resolution | extraction fps | samples/s | end-to-end fps |\n|---|---|---|---|")
    for size, row in results["throughput"].items():
        print(f"| {size} | {row['extract_fps']:.1f} | {row['samples_per_s']:.1f} | {row['end_to_end_fps']:.1f} |")
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
