"""TraceExtract accuracy and throughput against exact ground truth, for every tracker backend and plain LK.

Each tracker backend (`support_lk`, `lk`, and `cotracker` when a local repository and checkpoint are given) and
plain chained OpenCV LK (window 21, 3 levels, no checks: the classical reference) track the same queries in the
same run. TAP-Vid metrics at 256-px scale over the frames after each point's query frame: δ_avg (GT-visible
positions within 1/2/4/8/16 px, averaged), average Jaccard (AJ) and occlusion accuracy (OA); plus tracking fps.
Sources: the SceneTracker clip in ../shared/data (if present; 960x540, 256 points queried at frame 0), procedural
and MuJoCo-rendered episodes (moving camera, exact tracks; lifted to 3D with their given depth too), and with
`--egodex DIR` a folder of EgoDex clips (`.mp4` + `.hdf5`), run end to end through the `egodex` source, and their
fingertip joints tracked under the protocol of the shared episode's README (1/3 scale, queried at frame 0), and
all hand joints queried every 40 frames (δ_avg only: EgoDex has no occlusion labels), at each downscale factor of
`--egodex-scales` (default 3, the README's; 1: full HD). `support_lk, appearance_choice` is the default tracker with its
own LK step chosen by appearance where its check fails; `support_lk, previous default` is it without motion coherence,
the corners' step-scaled round trip, the fine window and the windows' growth above 540 rows; `lk` is the fast setting (plain LK steps with the visibility
test).
Then frames per second of the whole extraction at 224² and 480x640. Prints tables and writes JSON. The MuJoCo rows
need `pip install "mu0[sim]"` and an offscreen GL (MUJOCO_GL=egl).

    python benchmarks/bench_extract.py [--episodes 6] [--quick] [--egodex DIR [--egodex-scales 3 2 1]]
        [--cotracker-repo DIR --cotracker-checkpoint FILE] [--output benchmarks/results/bench_extract.json]
    python benchmarks/bench_extract.py --executor ray   # episodes/s on Ray next to local (bench_extract_ray.py)
"""

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from results_io import write_json
from mu0.dataset_builders.extraction import ExtractionSettings, episode_samples, extract_episode
from mu0.dataset_builders.mujoco_scenes import generate_mujoco_episode
from mu0.dataset_builders.procedural import generate_episode, project_points
from mu0.dataset_builders.sources import RawEpisode, load_scenetracker, scenetracker_refs
from mu0.dataset_builders.trace_ops import lift_to_world
from mu0.dataset_builders.tracking import LK_BACKENDS, TrackResult, load_hub_tracker, track_points

SCENETRACKER = Path(__file__).resolve().parents[2] / "shared" / "data" / "scenetracker_000005"
TAP_THRESHOLDS = (1, 2, 4, 8, 16)
PLAIN_LK = "plain LK (cv2)"


def plain_lk(frames: np.ndarray, queries: np.ndarray) -> TrackResult:
    """Chained `cv2.calcOpticalFlowPyrLK` (window 21, 3 levels) forward and backward from each query frame, every
    point always reported visible: the classical reference, written out independently of the backends."""
    import cv2

    gray = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames]
    query_frames = queries[:, 0].astype(np.int64)
    tracks = np.repeat(queries[None, :, 1:].astype(np.float32), len(frames), axis=0)
    for query_frame in np.unique(query_frames):
        points = query_frames == query_frame
        for direction in (1, -1):
            for source in range(query_frame, len(frames) - 1 if direction == 1 else 0, direction):
                moved, _, _ = cv2.calcOpticalFlowPyrLK(gray[source], gray[source + direction],
                                                       tracks[source, points].reshape(-1, 1, 2), None,
                                                       winSize=(21, 21), maxLevel=3)
                tracks[source + direction, points] = moved.reshape(-1, 2)
    return TrackResult(tracks, np.ones(tracks.shape[:2], bool), query_frames, PLAIN_LK)


def tap_metrics(result: TrackResult, truth: np.ndarray, truth_visible: np.ndarray, image_size: tuple[int, int]) -> dict:
    """TAP-Vid δ_avg, average Jaccard and occlusion accuracy at 256-px scale, over frames after each query frame."""
    height, width = image_size
    scale = np.array([256 / width, 256 / height])
    error = np.linalg.norm((result.tracks - truth) * scale, axis=-1)
    evaluated = np.arange(len(truth))[:, None] > result.query_frames[None, :]
    seen, predicted = truth_visible & evaluated, result.visible & evaluated
    within, jaccard = [], []
    for threshold in TAP_THRESHOLDS:
        close = error < threshold
        within.append((close & seen).sum() / max(seen.sum(), 1))
        true_positives = (close & seen & predicted).sum()
        false_positives = (predicted & ~(seen & close)).sum()
        false_negatives = (seen & ~(predicted & close)).sum()
        jaccard.append(true_positives / max(true_positives + false_positives + false_negatives, 1))
    return {
        "delta_avg": float(np.mean(within)),
        "average_jaccard": float(np.mean(jaccard)),
        "occlusion_accuracy": float(((result.visible == truth_visible) & evaluated).sum() / max(evaluated.sum(), 1)),
        "median_error_px": float(np.median(np.linalg.norm(result.tracks - truth, axis=-1)[seen])),
    }


# `support_lk` with its own LK step chosen by appearance where the check fails (see `track_points_support`), and
# the previous default: support weighted by distance only, a fixed round trip for every corner, no fine window, and
# a query window of at most 33 px at any image size.
APPEARANCE_CHOICE = "support_lk, appearance_choice"
PREVIOUS_DEFAULT = "support_lk, previous default"
PREVIOUS_WINDOWS = (9, 17, 25, 33)


def previous_default(image_size: tuple[int, int]) -> dict:
    """The options of `support_lk` that give its previous default on images of `image_size`."""
    window = min(PREVIOUS_WINDOWS, key=lambda side: abs(side - 0.1 * min(image_size)))
    return {"motion_coherence": False, "support_fb_per_px": 0.0, "fine_window": 0, "window": window}


def tracker_runs(frames: np.ndarray, queries: np.ndarray, cotracker) -> dict[str, tuple[TrackResult, float, float]]:
    """Every backend, the variants and plain LK on the same clip: result, wall seconds and process CPU seconds
    (all threads; on a shared machine frames per CPU-second shows what the code needs, whatever the load)."""
    trackers = {name: (name, {}) for name in LK_BACKENDS}
    trackers[APPEARANCE_CHOICE] = ("support_lk", {"appearance_choice": True})
    trackers[PREVIOUS_DEFAULT] = ("support_lk", previous_default(frames.shape[1:3]))
    if cotracker is not None:
        trackers["cotracker"] = ("cotracker", {"model": cotracker})
    runs = {}
    for name, (backend, options) in trackers.items():
        runs[name] = _timed(lambda: track_points(frames, queries, backend, **options))
    runs[PLAIN_LK] = _timed(lambda: plain_lk(frames, queries))
    return runs


def _timed(run) -> tuple[TrackResult, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def scored(runs: dict, truth: np.ndarray, truth_visible: np.ndarray, image_size: tuple[int, int]) -> dict:
    return {
        name: {**tap_metrics(result, truth, truth_visible, image_size), "track_fps": len(truth) / seconds,
               "track_fps_per_cpu_second": len(truth) / cpu_seconds}
        for name, (result, seconds, cpu_seconds) in runs.items()
    }


def mean_rows(rows: list[dict]) -> dict:
    return {name: {key: float(np.mean([row[name][key] for row in rows])) for key in rows[0][name]} for name in rows[0]}


def visibility_reliability(result: TrackResult, truth_visible: np.ndarray) -> dict:
    """Reliability diagram (bins of 0.1) of the default tracker's visibility probability over the frames after
    frame 0, its Brier score beside that of calling every point visible, and its occlusion accuracy at 0.5."""
    probability, seen = result.visibility_probability[1:].ravel(), truth_visible[1:].ravel()
    bins = np.minimum((probability * 10).astype(int), 9)
    return {
        "bins": [{"range": [index / 10, (index + 1) / 10], "count": int((bins == index).sum()),
                  "mean_probability": float(probability[bins == index].mean()),
                  "seen_fraction": float(seen[bins == index].mean())} for index in np.unique(bins)],
        "brier": float(np.mean((probability - seen) ** 2)),
        "brier_all_visible": float(np.mean((1.0 - seen) ** 2)),
        "occlusion_accuracy_at_half": float(((probability > 0.5) == seen).mean()),
        "occlusion_accuracy_all_visible": float(seen.mean()),
    }


def bench_scenetracker(cotracker, height: int | None = None) -> dict | None:
    """The SceneTracker clip at its 960x540, or resized to `height` rows (ground truth scaled alike)."""
    import cv2

    if not SCENETRACKER.exists():
        return None
    raw = load_scenetracker(scenetracker_refs(str(SCENETRACKER))[0])
    frames, truth = raw.frames, raw.tracks
    if height is not None:
        width = round(raw.image_size[1] * height / raw.image_size[0])
        frames = np.stack([cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA) for frame in frames])
        truth = (truth + 0.5) * np.array([width / raw.image_size[1], height / raw.image_size[0]]) - 0.5
    queries = np.column_stack([np.zeros(truth.shape[1]), truth[0]])
    runs = tracker_runs(frames, queries, cotracker)
    rows = scored(runs, truth, raw.track_visible, frames.shape[1:3])
    rows["support_lk"]["visibility_reliability"] = visibility_reliability(runs["support_lk"][0], raw.track_visible)
    return rows


def bench_generated(generate, num_episodes: int, image_size: int, num_frames: int, cotracker) -> dict:
    """Every tracker against the exact tracks of episodes from `generate`, queried at frame 0 where visible; the
    tracks are lifted with the exact depth and cameras for a 3D error too."""
    rows = []
    for seed in range(num_episodes):
        episode = generate(seed, num_frames=num_frames, image_size=image_size, moving_camera=True)
        truth = np.stack([project_points(world, camera, episode.intrinsics)[0]
                          for world, camera in zip(episode.tracks_world, episode.extrinsics)])
        points = np.flatnonzero(episode.visible[0])
        queries = np.column_stack([np.zeros(points.size), truth[0, points]])
        runs = tracker_runs(episode.frames, queries, cotracker)
        row = scored(runs, truth[:, points], episode.visible[:, points], episode.frames.shape[1:3])
        for name, (result, _, _) in runs.items():
            world, valid = lift_to_world(result.tracks, result.visible, episode.depth, episode.intrinsics, episode.extrinsics)
            error = np.linalg.norm(world[valid] - episode.tracks_world[:, points][valid], axis=-1)
            row[name]["median_3d_error_mm"] = float(np.median(error) * 1000) if error.size else float("nan")
        rows.append(row)
    return mean_rows(rows)


def bench_tracker_throughput(cotracker, num_frames: int) -> dict:
    """Tracking fps of every tracker at 224² with 256 points (a procedural episode): wall-clock on all cores, per
    CPU-second, and wall-clock with OpenCV on one thread (a bound for one core that a shared machine's load barely
    moves)."""
    import cv2

    episode = generate_episode(1, num_frames=num_frames, image_size=224, moving_camera=True)
    points = np.random.default_rng(0).uniform(4, 219, size=(256, 2))
    queries = np.column_stack([np.zeros(len(points)), points])
    tracker_runs(episode.frames[:4], queries, cotracker)  # one-off costs (imports, OpenCV's thread pool) not timed
    runs = tracker_runs(episode.frames, queries, cotracker)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        one_thread = tracker_runs(episode.frames, queries, cotracker)
    finally:
        cv2.setNumThreads(threads)
    return {name: {"fps": num_frames / seconds, "fps_per_cpu_second": num_frames / cpu,
                   "fps_one_thread": num_frames / one_thread[name][1]}
            for name, (_, seconds, cpu) in runs.items()}


def bench_end_to_end(height: int, width: int, num_frames: int) -> dict:
    """Frames per second of the whole extraction (default tracker) on a resized procedural episode."""
    import cv2

    episode = generate_episode(1, num_frames=num_frames, image_size=max(height, width), moving_camera=True)
    frames = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in episode.frames])
    depth = np.stack([cv2.resize(d, (width, height), interpolation=cv2.INTER_NEAREST) for d in episode.depth])
    scale = np.diag([width / episode.frames.shape[2], height / episode.frames.shape[1], 1.0])
    raw = RawEpisode("bench", frames, 10.0, depth=depth, intrinsics=scale @ episode.intrinsics,
                     extrinsics=episode.extrinsics, task=episode.task)
    settings = ExtractionSettings(keypoints="grid", tracker="support_lk", captions="template", num_keypoints=256)
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


# The tracking protocol of the EgoDex episode's README: frames at 1/3 scale, every joint whose name contains "Tip"
# queried at frame 0 where confident and in view, scored where it is in front, in view and confident. Its handful of
# points makes it noisy, so every hand joint is also queried every `EGODEX_QUERY_STRIDE` frames. `--egodex-scales`
# adds other downscale factors (1: the full 1920x1080 video, where fast hands move up to ~50 px a frame).
EGODEX_SCALE = 3
EGODEX_QUERY_STRIDE = 40
EGODEX_BODY_PARTS = ("Arm", "Forearm", "Shoulder")  # named left*/right* but not part of the hand


def egodex_tracking_clip(raw, query_frames, scale: int = EGODEX_SCALE) -> tuple[np.ndarray, ...]:
    """(frames, queries, truth, truth_seen) for an EgoDex episode loaded with the joints to track, its frames
    downscaled by `scale`, each joint queried at each of `query_frames` where it is seen there."""
    import cv2

    height, width = (side // scale for side in raw.image_size)
    frames = raw.frames if scale == 1 else np.stack([cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
                                                     for frame in raw.frames])
    truth = (raw.tracks + 0.5) / scale - 0.5
    with np.errstate(invalid="ignore"):
        seen = raw.track_visible & (truth[..., 0] >= -0.5) & (truth[..., 0] < width - 0.5) & \
            (truth[..., 1] >= -0.5) & (truth[..., 1] < height - 0.5)
    joints = [np.flatnonzero(seen[frame]) for frame in query_frames]
    queries = np.concatenate([np.column_stack([np.full(len(ids), frame), truth[frame, ids]])
                              for frame, ids in zip(query_frames, joints)])
    joints = np.concatenate(joints)
    return frames, queries, np.nan_to_num(truth[:, joints]), seen[:, joints]


def bench_egodex(folder: str, cotracker, scales: tuple[int, ...] = (EGODEX_SCALE,)) -> dict:
    """Each EgoDex clip end to end (given 3D joints, no depth map: samples and coverage), and its joints tracked by
    every tracker at each downscale factor of `scales`: the fingertips under the README protocol, and every hand
    joint from strided query frames.
    EgoDex has confidences but no occlusion labels, so only δ_avg and frames per second are reported for tracking
    (AJ and occlusion accuracy need occlusion ground truth)."""
    import h5py

    from mu0.dataset_builders.extraction import EpisodeRejected
    from mu0.dataset_builders.robot_sources import egodex_refs, load_egodex

    settings = ExtractionSettings(depth="given", camera="given", keypoints="given", tracker="given")
    clips = {}
    for ref in egodex_refs(folder):
        start = time.perf_counter()
        raw = load_egodex(ref)
        try:
            episode = extract_episode(raw, settings)
            num_samples, coverage, rejected = sum(1 for _ in episode_samples(episode, settings)), episode.metadata["coverage"], None
        except EpisodeRejected as error:
            num_samples, coverage, rejected = 0, None, str(error)
        row = {"frames": len(raw.frames), "samples": num_samples, "coverage": coverage, "rejected": rejected,
               "seconds": time.perf_counter() - start, "tracking": {}}
        with h5py.File(ref.location, "r") as handle:
            hand = [name for name in handle["transforms"]
                    if name.startswith(("left", "right")) and not name.endswith(EGODEX_BODY_PARTS)]
        protocols = {
            "fingertips from frame 0": ([name for name in hand if "Tip" in name], [0]),
            f"hand joints every {EGODEX_QUERY_STRIDE} frames": (hand, range(0, len(raw.frames), EGODEX_QUERY_STRIDE)),
        }
        for (protocol, (joints, query_frames)), scale in ((item, scale) for scale in scales for item in protocols.items()):
            frames, queries, truth, seen = egodex_tracking_clip(load_egodex(ref, joints=tuple(joints)), query_frames, scale)
            scores = scored(tracker_runs(frames, queries, cotracker), truth, seen, frames.shape[1:3])
            row["tracking"][f"{protocol}, 1/{scale} scale"] = {
                "points": len(queries), "image_size": list(frames.shape[1:3]),
                "trackers": {name: {"delta_avg": score["delta_avg"], "median_error_px": score["median_error_px"],
                                    "track_fps": score["track_fps"]} for name, score in scores.items()},
            }
        clips[ref.episode_id] = row
    return clips


def print_tap_table(title: str, rows: dict | None) -> None:
    if rows is None:
        print(f"\n{title}: not available\n")
        return
    print(f"\n{title}\n| tracker | δ_avg | AJ | OA | median err (px) | track fps | frames per CPU-s |\n"
          "|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['delta_avg']:.3f} | {row['average_jaccard']:.3f} | {row['occlusion_accuracy']:.3f} | "
              f"{row['median_error_px']:.2f} | {row['track_fps']:.1f} | {row['track_fps_per_cpu_second']:.1f} |")


def print_egodex_tables(clips: dict) -> None:
    print("\n| EgoDex clip | frames | samples | coverage | extraction s |\n|---|---|---|---|---|")
    for clip, row in clips.items():
        coverage = "rejected" if row["coverage"] is None else f"{row['coverage']:.2f}"
        print(f"| {clip} | {row['frames']} | {row['samples']} | {coverage} | {row['seconds']:.1f} |")
    for clip, row in clips.items():
        for protocol, tracking in row["tracking"].items():
            height, width = tracking["image_size"]
            print(f"\n{clip}, {protocol}: {tracking['points']} queries, {width}x{height} (AJ: no occlusion labels)"
                  "\n| tracker | δ_avg | median err (px) | track fps |\n|---|---|---|---|")
            for name, score in tracking["trackers"].items():
                print(f"| {name} | {score['delta_avg']:.3f} | {score['median_error_px']:.2f} | {score['track_fps']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=6)
    parser.add_argument("--output", default="benchmarks/results/bench_extract.json")
    parser.add_argument("--quick", action="store_true", help="2 small episodes, no SceneTracker, 224² only (CI smoke run)")
    parser.add_argument("--egodex", help="folder of EgoDex clips (.mp4 + .hdf5) to run end to end")
    parser.add_argument("--egodex-scales", type=int, nargs="+", default=[EGODEX_SCALE],
                        help="downscale factors of the EgoDex tracking protocols (1: full 1920x1080, about 2 minutes "
                             "per clip on 2 cores; default: 3, the README's)")
    parser.add_argument("--cotracker-repo", help="local clone of facebookresearch/co-tracker (adds the cotracker rows)")
    parser.add_argument("--cotracker-checkpoint", help="local CoTracker3 offline checkpoint (.pth)")
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="ray: extraction throughput with 1 and 2 Ray workers next to local, and Ray start-up")
    args = parser.parse_args()
    if args.executor == "ray":
        from bench_extract_ray import run

        run(2 if args.quick else args.episodes, args.output.replace("bench_extract.json", "bench_extract_ray.json"))
        return
    if bool(args.cotracker_repo) != bool(args.cotracker_checkpoint):
        parser.error("--cotracker-repo and --cotracker-checkpoint go together")
    cotracker = load_hub_tracker(args.cotracker_repo, args.cotracker_checkpoint) if args.cotracker_repo else None
    episodes = 2 if args.quick else args.episodes
    num_frames = 32 if args.quick else 48
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average_1min_at_start": load},
        "scenetracker": None if args.quick else bench_scenetracker(cotracker),
        "scenetracker_224_rows": None if args.quick else bench_scenetracker(cotracker, height=224),
        "procedural_128px": bench_generated(generate_episode, episodes, 128, num_frames, cotracker),
        "mujoco_128px": bench_generated(generate_mujoco_episode, episodes, 128, num_frames, cotracker),
        "tracker_fps_224px_256_points": bench_tracker_throughput(cotracker, 24 if args.quick else 60),
        "extraction_throughput": {
            f"{h}x{w}": bench_end_to_end(h, w, 24 if args.quick else 60)
            for h, w in ([(224, 224)] if args.quick else [(224, 224), (480, 640)])
        },
        "egodex": bench_egodex(args.egodex, cotracker, tuple(args.egodex_scales)) if args.egodex else None,
    }
    results["machine"]["load_average_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {results['machine']}")
    print_tap_table("SceneTracker clip (960x540, 256 points from frame 0)", results["scenetracker"])
    print_tap_table("SceneTracker clip resized to 398x224", results["scenetracker_224_rows"])
    if results["scenetracker"] is not None:
        reliability = results["scenetracker"]["support_lk"]["visibility_reliability"]
        print(f"\nVisibility probability of support_lk on the SceneTracker clip: Brier {reliability['brier']:.4f} "
              f"(all visible: {reliability['brier_all_visible']:.4f}); occlusion accuracy at 0.5 "
              f"{reliability['occlusion_accuracy_at_half']:.3f} (all visible: "
              f"{reliability['occlusion_accuracy_all_visible']:.3f})\n| probability | observations | mean probability | "
              "seen fraction |\n|---|---|---|---|")
        for row in reliability["bins"]:
            print(f"| {row['range'][0]:.1f}–{row['range'][1]:.1f} | {row['count']} | {row['mean_probability']:.2f} | "
                  f"{row['seen_fraction']:.2f} |")
    print_tap_table(f"procedural, 128 px, mean of {episodes} episodes", results["procedural_128px"])
    print_tap_table(f"MuJoCo, 128 px, mean of {episodes} episodes", results["mujoco_128px"])
    print("\n| tracker | fps at 224², 256 points | frames per CPU-second | fps, one OpenCV thread |\n|---|---|---|---|")
    for name, row in results["tracker_fps_224px_256_points"].items():
        print(f"| {name} | {row['fps']:.1f} | {row['fps_per_cpu_second']:.1f} | {row['fps_one_thread']:.1f} |")
    print("\n| resolution | extraction fps | samples/s | end-to-end fps |\n|---|---|---|---|")
    for size, row in results["extraction_throughput"].items():
        print(f"| {size} | {row['extract_fps']:.1f} | {row['samples_per_s']:.1f} | {row['end_to_end_fps']:.1f} |")
    if results["egodex"] is not None:
        print_egodex_tables(results["egodex"])
    write_json(results, args.output)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
