"""Camera backends of TraceExtract stage 2 for sources that give no depth or no camera: learned depth, guessed
intrinsics and classical pose estimation from tracked points.

Conventions follow `trace_ops`: pixels have their centre at integer coordinates (OpenCV), extrinsics map
world -> camera (OpenCV axes) and depth is z along the optical axis in metres.
"""

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .checkpoints import resolve_model_and_processor

from .trace_ops import lift_to_world

# Non-positive predictions are raised to this depth: positive, so log-depth stays finite, and well under the 1 mm
# below which `trace_ops.sample_depth` rejects a pixel (even after float32 rounding), so such pixels are dropped
# downstream instead of being lifted onto the camera centre.
MIN_DEPTH = 1e-4
MIN_POSE_POINTS = 6  # PnP needs 4 points; 6 leave RANSAC a little redundancy to vote with
HYPOTHESIS_FRAMES = 8  # frames per chunk whose RANSAC inliers are tried as the static set (cost grows with it)


def estimate_depth_depth_anything(
    frames: np.ndarray,
    model_name_or_path: str | None = None,
    model=None,
    image_processor=None,
    batch_size: int = 8,
) -> np.ndarray:
    """Metric depth (T, H, W) float32 in metres for (T, H, W, 3) uint8 RGB frames with a Depth Anything model.

    Expects a *metric* Depth Anything checkpoint (e.g. "depth-anything/Depth-Anything-V2-Metric-Indoor-Small-hf",
    `config.depth_estimation_type == "metric"`), whose head outputs metres, and returns that output as metres.
    Relative checkpoints predict unscaled, affine-invariant *inverse* depth (larger = closer), which would silently
    corrupt every lifted point, so they are refused with a ValueError rather than returned as depth.

    `model` and `image_processor` are used when given; whichever is missing is loaded from `model_name_or_path`
    (`AutoModelForDepthEstimation` / `AutoImageProcessor`). Each `predicted_depth` is resized bilinearly back to
    (H, W) (bilinear never overshoots below the smallest neighbour, unlike bicubic), then clipped to >= 0.1 mm, a
    depth the lifting stage treats as invalid: the metric head is `sigmoid * max_depth`, which is > 0
    mathematically but can underflow to 0 in float32.
    """
    import torch

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8 RGB, got shape {frames.shape} and dtype {frames.dtype}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    model, image_processor = resolve_model_and_processor(
        model, image_processor, model_name_or_path, AutoModelForDepthEstimation, AutoImageProcessor, "Depth Anything"
    )
    estimation_type = getattr(model.config, "depth_estimation_type", None)
    if estimation_type != "metric":
        raise ValueError(
            f"Depth Anything model {model_name_or_path or type(model).__name__!r} has depth_estimation_type="
            f"{estimation_type!r}; a metric checkpoint is required (e.g. "
            "'depth-anything/Depth-Anything-V2-Metric-Indoor-Small-hf'), since relative ones predict unscaled "
            "inverse depth."
        )
    if getattr(image_processor, "do_pad", False):
        raise ValueError("The image processor pads images, so its depth maps would not align with the frames.")

    height, width = frames.shape[1:3]
    parameter = next(model.parameters())
    model.eval()
    depth = np.empty(frames.shape[:3], dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(frames), batch_size):
            batch = image_processor(images=list(frames[start : start + batch_size]), return_tensors="pt")
            pixel_values = batch["pixel_values"].to(device=parameter.device, dtype=parameter.dtype)
            predicted = model(pixel_values=pixel_values).predicted_depth.float()
            resized = torch.nn.functional.interpolate(
                predicted[:, None], size=(height, width), mode="bilinear", align_corners=False
            )[:, 0]
            depth[start : start + batch_size] = resized.clamp_min(MIN_DEPTH).cpu().numpy()
    if not np.isfinite(depth).all():
        raise ValueError("The depth model produced non-finite values.")
    return depth


def estimate_intrinsics(image_size: tuple[int, int], fov_degrees: float = 60.0) -> np.ndarray:
    """A *guessed* pinhole matrix for sources that give no calibration: square pixels, principal point at the
    image centre ((W - 1) / 2, (H - 1) / 2), focal W / (2 tan(fov / 2)) from a horizontal field of view measured
    edge to edge. Metric depth lifted with a wrong guess gives consistently, not randomly, distorted geometry.
    """
    height, width = image_size
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be a positive (height, width), got {image_size}.")
    if not 0.0 < fov_degrees < 180.0:
        raise ValueError(f"fov_degrees must lie in (0, 180), got {fov_degrees}.")
    focal = width / (2.0 * math.tan(math.radians(fov_degrees) / 2.0))
    return np.array([[focal, 0.0, (width - 1) / 2.0], [0.0, focal, (height - 1) / 2.0], [0.0, 0.0, 1.0]])


def estimate_poses(
    frames: np.ndarray,
    depth: np.ndarray,
    intrinsics: np.ndarray,
    tracks: np.ndarray,
    visible: np.ndarray,
    chunk: int = 60,
    ransac_threshold: float = 2.0,
) -> np.ndarray:
    """Camera poses (T, 4, 4) world -> camera, with the world the camera of frame 0, from tracked points and depth.

    Chunks: frames are split at anchors 0, chunk, 2 * chunk, ... Points visible at an anchor are lifted to 3D in the
    anchor's camera with its depth; every later frame of the chunk and the next anchor are posed against them with
    `cv2.solvePnPRansac` (their 2D tracks in that frame vs. their 3D points), refined by Levenberg-Marquardt on the
    RANSAC inliers. Chunks are chained through the shared anchor frame: the next anchor's pose relative to this
    anchor composes with this anchor's global pose. With one overlapping frame, that is the SE3 alignment of the
    overlap; there is no averaging over several overlapping frames or global anchors, so errors add up per chunk.

    Moving points: PnP must only see the static scene, i.e. points whose 3D position stays consistent. Within a
    chunk, the static set is chosen among hypotheses as the one that fits every frame at once and keeps the most
    points already found static in the previous chunk (see `_solve_chunk`); a point that misses by more than
    `ransac_threshold` pixels in any frame is dropped. Set the threshold near the tracks' noise: points drifting by
    less than it cannot be told from static ones and bias the poses. Two limits follow: a rigid object carrying as
    many points as the background and moving throughout a whole chunk (keep chunks longer than such motions), and
    sub-threshold drift at the start of a motion.

    `frames` only fixes T and (H, W) here; the tracks already carry the appearance. Raises ValueError naming the
    frame when fewer than 6 tracked points with depth at its anchor are visible in it.
    """
    frames, depth, tracks, visible = (np.asarray(a) for a in (frames, depth, tracks, visible))
    intrinsics = np.asarray(intrinsics, dtype=np.float64)
    num_frames = len(frames)
    if frames.ndim != 4 or depth.shape != frames.shape[:3]:
        raise ValueError(f"depth must be (T, H, W) matching frames {frames.shape[:3]}, got {depth.shape}.")
    if tracks.ndim != 3 or tracks.shape[0] != num_frames or tracks.shape[-1] != 2:
        raise ValueError(f"tracks must be (T={num_frames}, N, 2), got {tracks.shape}.")
    if visible.shape != tracks.shape[:2]:
        raise ValueError(f"visible must be (T, N) = {tracks.shape[:2]}, got {visible.shape}.")
    if chunk < 2:
        raise ValueError(f"chunk must be >= 2 frames, got {chunk}.")
    if ransac_threshold <= 0:
        raise ValueError(f"ransac_threshold must be > 0 pixels, got {ransac_threshold}.")

    visible = visible.astype(bool) & np.isfinite(tracks).all(-1)
    extrinsics = np.repeat(np.eye(4)[None], num_frames, axis=0)
    static = np.ones(tracks.shape[1], dtype=bool)  # before any evidence, every point may be static
    for anchor in range(0, num_frames - 1, chunk):
        frame_ids = np.arange(anchor + 1, min(anchor + chunk, num_frames - 1) + 1)
        here = slice(anchor, anchor + 1)
        points, lifted = lift_to_world(tracks[here], visible[here], depth[here], intrinsics, np.eye(4)[None])
        observed = lifted[0] & visible[frame_ids]
        for frame, count in zip(frame_ids, observed.sum(1)):
            if count < MIN_POSE_POINTS:
                raise ValueError(
                    f"Frame {frame}: only {count} of the points tracked with depth at anchor frame {anchor} are "
                    f"visible; pose estimation needs at least {MIN_POSE_POINTS}."
                )
        problem = _Chunk(points[0].astype(np.float64), lifted[0], tracks[frame_ids], visible[frame_ids],
                         intrinsics, ransac_threshold, frame_ids)
        relative, static = _solve_chunk(problem, seeds=lifted[0] & static)
        extrinsics[frame_ids] = relative @ extrinsics[anchor]
    return extrinsics


@dataclass
class _Chunk:
    """One chunk's pose problem: 3D points in the anchor camera (N, 3), which were lifted (N,), and their tracks
    (F, N, 2) and visibility (F, N) in the chunk's other frames `frame_ids` (F,)."""

    points: np.ndarray
    lifted: np.ndarray
    tracks: np.ndarray
    visible: np.ndarray
    intrinsics: np.ndarray
    threshold: float
    frame_ids: np.ndarray


def _solve_chunk(problem: _Chunk, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Anchor -> frame poses (F, 4, 4) of one chunk and the (N,) points found static.

    One frame cannot tell the background from a rigid object carrying as many points: RANSAC then picks either.
    Over a chunk, the background is a set that fits every frame at once, and across chunks it is the set that
    keeps the points already found static. So each hypothesis (the `seeds`, i.e. the previous chunk's static
    points, and the RANSAC inliers of a few frames spread over the chunk) is fitted to the whole chunk, and the fit
    keeping the most seeds, then the most points, wins.
    """
    _, errors = _solve_frames(problem, problem.lifted)
    sampled = np.unique(np.linspace(0, len(problem.frame_ids) - 1, HYPOTHESIS_FRAMES).round().astype(int))
    hypotheses = {mask.tobytes(): mask for mask in [seeds, *(errors[sampled] <= problem.threshold)]}  # NaN: False
    best, best_score = None, (-1, -1)
    for hypothesis in hypotheses.values():
        fit = _fit_hypothesis(problem, hypothesis)
        if fit is not None and (score := (int((fit[1] & seeds).sum()), int(fit[1].sum()))) > best_score:
            best, best_score = fit, score
    if best is None:
        first, last = problem.frame_ids[0] - 1, problem.frame_ids[-1]
        raise ValueError(f"Frames {first}-{last}: no set of tracked points stays consistent with one camera motion.")
    # The winner also fits points outside its hypothesis: pose again from all of them.
    return _fit_hypothesis(problem, best[1]) or best


def _fit_hypothesis(problem: _Chunk, hypothesis: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Pose every frame from the hypothesis points, keep those of them that fit every frame, repeat until all do.

    Returns the poses and every lifted point that fits all of them (hypothesis or not), or None when the
    hypothesis runs out of points in some frame. Dropping misfits and re-solving matters: a moving point still
    within the threshold in early frames bends those poses until it is removed.
    """
    while True:
        if ((hypothesis & problem.visible).sum(1) < MIN_POSE_POINTS).any():
            return None
        try:
            poses, errors = _solve_frames(problem, hypothesis)
        except ValueError:
            return None
        consistent = problem.lifted & ~(errors > problem.threshold).any(0)  # NaN (not visible) never misses
        if consistent[hypothesis].all():
            return poses, consistent
        hypothesis = hypothesis & consistent


def _solve_frames(problem: _Chunk, usable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every frame of a chunk posed from the `usable` points: poses (F, 4, 4) and the reprojection errors (F, N) of
    all lifted points, NaN where not visible."""
    solved = [_solve_frame(problem, k, usable & problem.visible[k]) for k in range(len(problem.frame_ids))]
    return np.stack([pose for pose, _ in solved]), np.stack([errors for _, errors in solved])


def _solve_frame(problem: _Chunk, k: int, usable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Anchor camera -> camera of the chunk's k-th frame (4, 4) by PnP-RANSAC on the `usable` points, refined by
    Levenberg-Marquardt on its inliers, and the (N,) reprojection errors of the lifted points visible there."""
    pixels = problem.tracks[k].astype(np.float64)
    ok, rvec, tvec, inliers = cv2.solvePnPRansac(
        problem.points[usable], pixels[usable], problem.intrinsics, None,
        iterationsCount=200, reprojectionError=problem.threshold, confidence=0.999, flags=cv2.SOLVEPNP_EPNP,
    )
    if not ok or inliers is None or len(inliers) < MIN_POSE_POINTS:
        raise ValueError(
            f"Frame {problem.frame_ids[k]}: PnP-RANSAC found {0 if inliers is None else len(inliers)} consistent "
            f"points out of {int(usable.sum())}; pose estimation needs at least {MIN_POSE_POINTS}."
        )
    chosen = np.flatnonzero(usable)[inliers[:, 0]]
    rvec, tvec = cv2.solvePnPRefineLM(problem.points[chosen], pixels[chosen], problem.intrinsics, None, rvec, tvec)
    measured = problem.lifted & problem.visible[k]
    projected = cv2.projectPoints(problem.points[measured], rvec, tvec, problem.intrinsics, None)[0][:, 0]
    errors = np.full(len(problem.points), np.nan)
    errors[measured] = np.linalg.norm(projected - pixels[measured], axis=-1)
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = cv2.Rodrigues(rvec)[0], tvec[:, 0]
    return pose, errors
