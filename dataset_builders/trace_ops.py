"""Geometry and motion stages of TraceExtract: lifting, camera-frame projection, retargeting, motion and events.

Conventions: pixels have their centre at integer coordinates (OpenCV); extrinsics map world -> camera (OpenCV
axes); depth is z along the optical axis in metres. Normalised (u, v) = 2 * (x + 0.5) / width - 1, so the image
spans [-1, 1] edge to edge.
"""

import numpy as np

ROBUST_FRACTION = 0.02  # the fastest 2 % of tracks define a group's speed
RETARGET_STEP = 0.05  # released: one retargeted step = 0.05 of robust path length in (x / W, y / H, z) units
MOVING_DIAGONAL_FRACTION = 1 / 20
MIN_COVERAGE = 0.6


def check_camera(intrinsics: np.ndarray, extrinsics: np.ndarray, num_frames: int) -> None:
    """Refuse missing, NaN or non-invertible camera matrices before they silently corrupt traces."""
    intrinsics = np.asarray(intrinsics, dtype=np.float64)
    extrinsics = np.asarray(extrinsics, dtype=np.float64)
    if intrinsics.shape != (3, 3) or not np.isfinite(intrinsics).all() or abs(np.linalg.det(intrinsics)) < 1e-12:
        raise ValueError(f"intrinsics must be a finite, invertible 3x3 matrix, got {intrinsics.tolist()}.")
    if extrinsics.shape != (num_frames, 4, 4) or not np.isfinite(extrinsics).all():
        raise ValueError(f"extrinsics must be finite world->camera matrices of shape ({num_frames}, 4, 4), got {extrinsics.shape}.")
    rotations = extrinsics[:, :3, :3]
    if np.abs(np.linalg.det(rotations)).min() < 1e-6:
        bad = int(np.argmin(np.abs(np.linalg.det(rotations))))
        raise ValueError(f"The extrinsics of frame {bad} are not invertible.")


def normalize_pixels(pixels: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    height, width = image_size
    return np.stack([2 * (pixels[..., 0] + 0.5) / width - 1, 2 * (pixels[..., 1] + 0.5) / height - 1], axis=-1)


EDGE_RELATIVE_SPREAD = 0.05


def sample_depth(depth: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Depth at (T, N, 2) pixels from (T, H, W) maps; NaN when invalid or off-image.

    Bilinear on smooth surfaces; at a silhouette (the four neighbours differ by more than 5 %) the nearest pixel,
    since interpolating there would invent a depth between the object and the background.
    """
    num_frames, height, width = depth.shape
    finite = np.isfinite(pixels).all(-1)
    x = np.where(finite, pixels[..., 0], -1.0)
    y = np.where(finite, pixels[..., 1], -1.0)
    inside = finite & (x > -0.5) & (y > -0.5) & (x < width - 0.5) & (y < height - 0.5)
    x0 = np.clip(np.floor(x).astype(int), 0, width - 2)
    y0 = np.clip(np.floor(y).astype(int), 0, height - 2)
    fx, fy = np.clip(x - x0, 0, 1), np.clip(y - y0, 0, 1)
    frame = np.arange(num_frames)[:, None]
    corners = np.stack([depth[frame, y0 + dy, x0 + dx] for dy in (0, 1) for dx in (0, 1)], axis=-1)
    weights = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], axis=-1)
    bilinear = (corners * weights).sum(-1)
    nearest = np.take_along_axis(corners, weights.argmax(-1)[..., None], axis=-1)[..., 0]
    spread = np.nanmax(corners, axis=-1) / np.maximum(np.nanmin(corners, axis=-1), 1e-6) - 1
    values = np.where(spread > EDGE_RELATIVE_SPREAD, nearest, bilinear)
    return np.where(inside & np.isfinite(values) & (values > 1e-3), values, np.nan)


def lift_to_world(
    tracks: np.ndarray, visible: np.ndarray, depth: np.ndarray, intrinsics: np.ndarray, extrinsics: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Unproject visible 2D tracks (T, N, 2) with depth and map them to the world: (T, N, 3) and validity (T, N)."""
    num_frames = tracks.shape[0]
    if depth.shape[0] != num_frames:
        raise ValueError(f"Depth has {depth.shape[0]} frames but the tracks have {num_frames}.")
    check_camera(intrinsics, extrinsics, num_frames)
    z = sample_depth(depth, tracks)
    valid = visible & np.isfinite(z)
    pixels = np.concatenate([tracks, np.ones_like(tracks[..., :1])], axis=-1)
    rays = pixels @ np.linalg.inv(intrinsics).T
    camera = rays * np.where(valid, z, 0.0)[..., None]
    camera_to_world = np.linalg.inv(extrinsics)
    world = np.einsum("tij,tnj->tni", camera_to_world[:, :3, :3], camera) + camera_to_world[:, None, :3, 3]
    return np.where(valid[..., None], world, np.nan).astype(np.float32), valid


def fill_world_tracks(world: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate world positions across short gaps (occlusions) between valid observations; ends stay invalid."""
    filled = world.copy()
    known = valid.copy()
    frames = np.arange(world.shape[0])
    for point in range(world.shape[1]):
        observed = np.flatnonzero(valid[:, point])
        if observed.size < 2:
            continue
        inside = (frames >= observed[0]) & (frames <= observed[-1])
        for axis in range(3):
            filled[inside, point, axis] = np.interp(frames[inside], observed, world[observed, point, axis])
        known[inside, point] = True
    return filled, known


def project_to_camera(
    world: np.ndarray, valid: np.ndarray, extrinsics: np.ndarray, intrinsics: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """World points (..., N, 3) through one camera: pixel (x, y) and z as (..., N, 3), valid where in front."""
    camera = world @ extrinsics[:3, :3].T + extrinsics[:3, 3]
    z = camera[..., 2]
    # Decided on the float32 depth that is returned, so a depth just above 1 mm cannot round down to it.
    in_front = valid & (z.astype(np.float32) > 1e-3)
    safe_z = np.where(in_front, z, 1.0)
    pixels = (camera[..., :2] / safe_z[..., None]) * np.diag(intrinsics)[:2] + intrinsics[:2, 2]
    traces = np.concatenate([pixels, z[..., None]], axis=-1)
    return np.where(in_front[..., None], traces, 0.0).astype(np.float32), in_front


def moving_tracks(tracks: np.ndarray, valid: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """A track moves if its largest displacement from its first valid position exceeds 1/20 of the image diagonal."""
    diagonal = float(np.hypot(*image_size))
    first = np.argmax(valid, axis=0)
    start = tracks[first, np.arange(tracks.shape[1])]
    displacement = np.linalg.norm(tracks - start[None], axis=-1)
    displacement = np.where(valid, displacement, 0.0)
    return displacement.max(axis=0) > MOVING_DIAGONAL_FRACTION * diagonal


def path_coordinates(tracks: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """(x / W, y / H, z) of pixel-and-metre tracks (..., 3): the space the released retargeting measures paths in
    ([0, 1] image units, so a step of 0.05 there is 0.1 in the [-1, 1] units of u, v; z in metres)."""
    height, width = image_size
    return np.stack([tracks[..., 0] / width, tracks[..., 1] / height, tracks[..., 2]], axis=-1)


def robust_speed(path_tracks: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-frame speed of a group: the mean step of its fastest 2 % of tracks, (T - 1,), in the units of
    `path_coordinates`."""
    steps = np.linalg.norm(np.diff(path_tracks, axis=0), axis=-1)
    step_valid = valid[1:] & valid[:-1]
    steps = np.where(step_valid, steps, -np.inf)
    keep = max(1, int(np.ceil(ROBUST_FRACTION * steps.shape[1])))
    fastest = -np.sort(-steps, axis=1)[:, :keep]
    return np.where(np.isfinite(fastest), fastest, 0.0).mean(axis=1)


def retarget_times(
    speed: np.ndarray, anchor: int, num_steps: int, direction: int = 1, step: float = RETARGET_STEP
) -> np.ndarray:
    """Fractional frame times reached after every `step` of cumulative robust path length from `anchor`.

    Retargeting makes one step mean a fixed amount of motion, whatever the embodiment's speed. Steps beyond the
    motion available in the episode come back as NaN (invalid).
    """
    if direction == 1:
        segment = speed[anchor:]
    else:
        segment = speed[:anchor][::-1]
    cumulative = np.concatenate([[0.0], np.cumsum(segment)])
    targets = step * np.arange(1, num_steps + 1)
    times = np.full(num_steps, np.nan)
    reachable = targets <= cumulative[-1]
    if reachable.any() and cumulative[-1] > 0:
        increasing = np.concatenate([[True], np.diff(cumulative) > 0])
        offsets = np.interp(targets[reachable], cumulative[increasing], np.arange(len(cumulative))[increasing])
        times[reachable] = anchor + direction * offsets
    return times


def interpolate_at(traces: np.ndarray, valid: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation of (T, N, C) traces at fractional `times` (S,): (N, S, C) and validity (N, S)."""
    num_frames = traces.shape[0]
    finite = np.isfinite(times)
    safe = np.clip(np.where(finite, times, 0.0), 0, num_frames - 1)
    lower = np.floor(safe).astype(int)
    upper = np.minimum(lower + 1, num_frames - 1)
    weight = (safe - lower)[:, None, None]
    values = (1 - weight) * traces[lower] + weight * traces[upper]
    ok = finite[:, None] & valid[lower] & (valid[upper] | (weight[..., 0] == 0))  # an exact frame needs no neighbour
    return np.where(ok[..., None], values, 0.0).transpose(1, 0, 2).astype(np.float32), ok.T


def motion_events(
    tracks: np.ndarray, valid: np.ndarray, moving: np.ndarray, min_length: int = 25, max_length: int = 200
) -> list[tuple[int, int]]:
    """Split an episode into chunks at valleys of the moving points' smoothed acceleration.

    Returns [start, end) frame ranges of 25-200 frames (shorter episodes give one chunk); segments between two
    acceleration peaks are separated at the lowest point between them, where one motion ends and the next begins.
    """
    from scipy.signal import find_peaks, savgol_filter

    num_frames = tracks.shape[0]
    if num_frames < 3 or not moving.any():
        return [(0, num_frames)]
    acceleration = np.linalg.norm(tracks[2:] - 2 * tracks[1:-1] + tracks[:-2], axis=-1)
    acceleration_valid = valid[2:] & valid[1:-1] & valid[:-2] & moving[None]
    per_frame = np.where(acceleration_valid, acceleration, 0.0).sum(1) / np.maximum(acceleration_valid.sum(1), 1)
    per_frame = np.concatenate([[per_frame[0]], per_frame, [per_frame[-1]]])
    if num_frames >= 11:
        per_frame = savgol_filter(per_frame, 11, 2)
    peaks, _ = find_peaks(per_frame)
    cuts = [int(p + np.argmin(per_frame[p:q])) for p, q in zip(peaks[:-1], peaks[1:])]
    boundaries = [0]
    for cut in cuts:
        if cut - boundaries[-1] >= min_length and num_frames - cut >= min_length:
            boundaries.append(cut)
    boundaries.append(num_frames)
    chunks = []
    for start, end in zip(boundaries[:-1], boundaries[1:]):
        pieces = int(np.ceil((end - start) / max_length))
        edges = np.linspace(start, end, pieces + 1).round().astype(int)
        chunks.extend(zip(edges[:-1].tolist(), edges[1:].tolist()))
    return chunks


def visible_coverage(visible: np.ndarray) -> float:
    """Mean fraction of tracks visible per frame; episodes below 0.6 are rejected as unreliable."""
    return float(visible.mean()) if visible.size else 0.0


__all__ = [
    "check_camera",
    "fill_world_tracks",
    "interpolate_at",
    "lift_to_world",
    "motion_events",
    "moving_tracks",
    "normalize_pixels",
    "path_coordinates",
    "project_to_camera",
    "retarget_times",
    "robust_speed",
    "sample_depth",
    "visible_coverage",
]
