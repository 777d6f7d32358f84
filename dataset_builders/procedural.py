"""Procedural tabletop episodes with exact 3D ground truth.

Real robot videos only come with *estimated* depth and tracks, so they cannot tell whether a bug lives in the
model or in the labels. This module renders small manipulation episodes with a vectorised numpy ray caster, so
depth, visibility and 3D point tracks are exact by construction. It needs nothing but numpy, which keeps tests,
the demo and benchmarks free of downloads and GPUs.

Conventions:
    * World frame: the table is the plane z = 0, z points up; "left"/"right" are -x/+x and "forward"/"backward"
      are +y/-y as seen from the default camera, which sits at -y looking towards +y.
    * Camera frame: OpenCV axes (x right, y down, z along the optical axis). `extrinsics` map world -> camera and
      depth is the z coordinate in that frame (not the ray length).
    * Pixels: pixel (row i, column j) has its centre at (u, v) = (j, i).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .extraction import camera_sample, frame_times
from .trace_ops import project_to_camera

TASK_TYPES = ("push", "pick_place", "stack", "rotate")

# Albedos in linear [0, 1] RGB; the names are the words used in the instructions.
BLOCK_COLORS = {
    "red": (0.80, 0.12, 0.10),
    "green": (0.15, 0.62, 0.20),
    "blue": (0.12, 0.25, 0.80),
    "yellow": (0.90, 0.78, 0.12),
    "orange": (0.95, 0.48, 0.08),
    "purple": (0.52, 0.18, 0.68),
}
TABLE_COLORS = ((0.62, 0.50, 0.38), (0.48, 0.38, 0.28))
GRIPPER_COLOR = (0.13, 0.13, 0.15)
GRIPPER_HALF_EXTENTS = (0.014, 0.014, 0.03)

# A point counts as unoccluded when the rendered depth at its pixel is within this relative tolerance of its own
# depth; 2 % absorbs the sub-pixel depth slope of surfaces seen at grazing angles.
VISIBILITY_RTOL = 0.02

_FIELD_OF_VIEW_DEG = 45.0
_LOOK_AT = np.array([0.0, 0.03, 0.04])
_AMBIENT = 0.35
_APPROACH_END, _RETREAT_START = 0.2, 0.8  # phases of the script, as fractions of the episode
_GRIPPER_HOVER = 0.06  # how far above its grasp the gripper starts and ends
_MAX_LAYOUT_ATTEMPTS = 200
_PUSH_DIRECTIONS = {
    "left": (-1.0, 0.0, 0.0),
    "right": (1.0, 0.0, 0.0),
    "forward": (0.0, 1.0, 0.0),
    "backward": (0.0, -1.0, 0.0),
}


@dataclass
class ProceduralEpisode:
    """One rendered episode; every array is exact ground truth, not an estimate.

    Attributes:
        frames: (T, H, W, 3) uint8 RGB images.
        depth: (T, H, W) float32 metric depth along the optical axis.
        intrinsics: (3, 3) float32 pinhole matrix K, shared by all frames.
        extrinsics: (T, 4, 4) float32 world -> camera transforms.
        tracks_world: (T, N, 3) float32 world positions of N tracked surface points.
        visible: (T, N) bool, in the image, in front of the camera and not occluded.
        object_ids: (N,) int64 object of each point: 0 is the table, k >= 1 indexes `object_names`.
        moving: (N,) bool, point belongs to the manipulated block or to the gripper.
        task: natural-language instruction, e.g. "push the red block to the left".
        skill: one of `TASK_TYPES`.
        seed: seed that reproduces the episode.
        object_names: name of each object id, e.g. ["table", "red block", "blue block", "gripper"].
    """

    frames: np.ndarray
    depth: np.ndarray
    intrinsics: np.ndarray
    extrinsics: np.ndarray
    tracks_world: np.ndarray
    visible: np.ndarray
    object_ids: np.ndarray
    moving: np.ndarray
    task: str
    skill: str
    seed: int
    object_names: list[str]


@dataclass
class _Box:
    """An oriented box that only rotates about the vertical axis (yaw)."""

    name: str
    albedo: np.ndarray  # (3,)
    half_extents: np.ndarray  # (3,)
    centers: np.ndarray  # (T, 3)
    yaws: np.ndarray  # (T,)


@dataclass
class _Texture:
    """Sum of random plane waves: cheap, smooth, aperiodic noise that (with a checker) gives trackers texture."""

    wave_vectors: np.ndarray  # (K, 3) in rad/m
    wave_phases: np.ndarray  # (K,)

    @classmethod
    def sample(cls, rng: np.random.Generator, num_waves: int = 8) -> _Texture:
        directions = rng.normal(size=(num_waves, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavelengths = rng.uniform(0.012, 0.08, size=(num_waves, 1))
        return cls(directions * (2 * np.pi / wavelengths), rng.uniform(0, 2 * np.pi, size=num_waves))

    def noise(self, points: np.ndarray) -> np.ndarray:
        """Smooth noise in roughly [-1, 1] at (P, 3) points."""
        return np.sin(points @ self.wave_vectors.T + self.wave_phases).sum(axis=1) / np.sqrt(len(self.wave_phases))


def project_points(
    points_world: np.ndarray, extrinsics: np.ndarray, intrinsics: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Project (..., 3) world points through one camera; returns (..., 2) pixel coordinates and (...,) depths.

    Pixel coordinates of points with depth <= 0 are meaningless; callers mask them with the returned depth.
    """
    extrinsics = np.asarray(extrinsics, dtype=np.float64)
    points_camera = np.asarray(points_world, dtype=np.float64) @ extrinsics[:3, :3].T + extrinsics[:3, 3]
    depth = points_camera[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        normalized = points_camera[..., :2] / depth[..., None]
    intrinsics = np.asarray(intrinsics, dtype=np.float64)
    uv = normalized @ intrinsics[:2, :2].T + intrinsics[:2, 2]
    return uv, depth


def generate_episode(
    seed: int,
    num_frames: int = 48,
    image_size: int = 128,
    num_points: int = 256,
    moving_camera: bool = False,
    task: str | None = None,
) -> ProceduralEpisode:
    """Render a deterministic tabletop episode in which a gripper manipulates one of 1-3 coloured blocks.

    Args:
        seed: seeds a `numpy.random.Generator`; the same arguments always give identical arrays.
        num_frames: number of frames T (>= 2).
        image_size: height and width of the square images (>= 16).
        num_points: number of tracked points N (>= 2); about half lie on the block and gripper, all visible
            at frame 0.
        moving_camera: slowly orbit the camera instead of keeping it fixed.
        task: task type, one of `TASK_TYPES`; sampled from the seed when None.
    """
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2, got {num_frames}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}")
    if task is not None and task not in TASK_TYPES:
        raise ValueError(f"task must be one of {TASK_TYPES} or None, got {task!r}")

    rng = np.random.default_rng(seed)
    skill = task if task is not None else TASK_TYPES[rng.integers(len(TASK_TYPES))]
    intrinsics = _intrinsics(image_size)
    extrinsics = _camera_path(rng, num_frames, moving_camera)
    light = np.array([rng.uniform(-0.5, 0.5), -0.6, 1.0])
    light /= np.linalg.norm(light)
    textures = [_Texture.sample(rng) for _ in range(5)]  # table, up to 3 blocks, gripper
    ray_directions_camera = _pixel_rays(intrinsics, image_size)

    for _ in range(_MAX_LAYOUT_ATTEMPTS):
        boxes, moved_index, instruction = _sample_scene(rng, skill, num_frames)
        if not _scene_is_valid(boxes, moved_index, extrinsics, intrinsics, image_size):
            continue
        _, first_object_ids = _cast(
            _camera_center(extrinsics[0]), ray_directions_camera @ extrinsics[0, :3, :3], boxes, 0
        )
        moving_ids = (moved_index + 1, len(boxes))  # the gripper is always the last box
        if np.isin(first_object_ids, moving_ids).sum() >= 4:  # a few pixels to put moving points on
            break
    else:
        raise RuntimeError(f"could not sample a valid scene for seed {seed}")

    frames = np.empty((num_frames, image_size, image_size, 3), dtype=np.uint8)
    depth = np.empty((num_frames, image_size, image_size), dtype=np.float32)
    for frame_index in range(num_frames):
        origin = _camera_center(extrinsics[frame_index])
        directions = ray_directions_camera @ extrinsics[frame_index, :3, :3]
        distance, object_id = _cast(origin, directions, boxes, frame_index)
        points = origin + distance[:, None] * directions
        frames[frame_index] = _shade(points, object_id, boxes, frame_index, textures, light).reshape(frames.shape[1:])
        depth[frame_index] = distance.reshape(image_size, image_size)

    points, object_ids = _sample_points(
        rng, num_points, first_object_ids, depth[0], moving_ids, boxes, extrinsics[0], intrinsics
    )
    tracks_world = _carry_points(points, object_ids, boxes).astype(np.float32)
    visible = np.stack(
        [_visibility(tracks_world[t], depth[t], extrinsics[t], intrinsics) for t in range(num_frames)]
    )
    return ProceduralEpisode(
        frames=frames,
        depth=depth,
        intrinsics=intrinsics.astype(np.float32),
        extrinsics=extrinsics.astype(np.float32),
        tracks_world=tracks_world,
        visible=visible,
        object_ids=object_ids,
        moving=np.isin(object_ids, moving_ids),
        task=instruction,
        skill=skill,
        seed=seed,
        object_names=["table"] + [box.name for box in boxes],
    )


def episode_to_samples(
    episode: ProceduralEpisode,
    frame_indices: int | Sequence[int] | np.ndarray,
    history: int = 8,
    horizon: int = 32,
    num_queries: int | None = None,
    rng: np.random.Generator | None = None,
) -> list[dict[str, np.ndarray | int | str]]:
    """Turn an episode into model samples: one per frame t, with traces expressed in camera t.

    The per-query fields come from `extraction.camera_sample`, the builder every source's samples share, with
    steps of one frame instead of TraceExtract's arc-length steps. Each sample holds, for the points visible at t:
        query_uv (n, 2) pixels and query_z (n,) depth at t; future (n, horizon, 3) (u, v, z) at t+1..t+horizon
        with future_valid (n, horizon); history (n, history, 3) at t-1, t-2, ..., t-history (most recent first)
        with history_valid; image, depth and intrinsics of frame t; cluster_ids, moving, point_indices (into
        the episode's tracks), frame_index and task. Invalid steps (outside the episode or behind the camera)
        are zero-filled.

    Args:
        num_queries: if given, exactly this many points per sample: up to half are moving points (the scarce,
            informative ones), the rest are drawn from the remaining visible points, repeating points only
            when fewer are visible.
        rng: generator for the query subset; defaults to one seeded with the episode seed.
    """
    num_frames = episode.tracks_world.shape[0]
    if history < 0 or horizon < 1:
        raise ValueError(f"need history >= 0 and horizon >= 1, got history={history}, horizon={horizon}")
    if num_queries is not None and num_queries < 1:
        raise ValueError(f"num_queries must be >= 1, got {num_queries}")
    rng = rng if rng is not None else np.random.default_rng(episode.seed)

    samples = []
    for frame_index in np.atleast_1d(np.asarray(frame_indices)).tolist():
        if not isinstance(frame_index, int) or not 0 <= frame_index < num_frames:
            raise ValueError(f"frame index {frame_index!r} is out of range for an episode of {num_frames} frames")
        point_indices = np.flatnonzero(episode.visible[frame_index])
        if point_indices.size == 0:
            raise ValueError(f"frame {frame_index} of episode seed={episode.seed} has no visible points")
        if num_queries is not None:
            point_indices = _choose_queries(point_indices, episode.moving, num_queries, rng)

        traces, valid = project_to_camera(
            episode.tracks_world[:, point_indices], np.ones(episode.tracks_world.shape[:1] + point_indices.shape, dtype=bool),
            episode.extrinsics[frame_index], episode.intrinsics,
        )
        samples.append(
            {
                **camera_sample(
                    traces, valid, frame_index, frame_times(frame_index, horizon, 1, num_frames),
                    frame_times(frame_index, history, -1, num_frames),
                ),
                "image": episode.frames[frame_index],
                "depth": episode.depth[frame_index],
                "intrinsics": episode.intrinsics,
                "cluster_ids": episode.object_ids[point_indices],
                "moving": episode.moving[point_indices],
                "point_indices": point_indices,
                "frame_index": frame_index,
                "task": episode.task,
            }
        )
    return samples


def _choose_queries(
    point_indices: np.ndarray, moving: np.ndarray, num_queries: int, rng: np.random.Generator
) -> np.ndarray:
    """Up to half moving points, the rest from the other visible points, repeats only if too few are visible."""
    moving_candidates = point_indices[moving[point_indices]]
    chosen = rng.choice(moving_candidates, min(moving_candidates.size, math.ceil(num_queries / 2)), replace=False)
    remaining = np.setdiff1d(point_indices, chosen)
    fill = rng.choice(remaining, min(remaining.size, num_queries - chosen.size), replace=False)
    chosen = np.concatenate([chosen, fill])
    if chosen.size < num_queries:
        chosen = np.concatenate([chosen, rng.choice(chosen, num_queries - chosen.size, replace=True)])
    return chosen


# ----------------------------------------------------------------------------------------------- camera


def _intrinsics(image_size: int) -> np.ndarray:
    focal = image_size / (2 * math.tan(math.radians(_FIELD_OF_VIEW_DEG) / 2))
    center = (image_size - 1) / 2
    return np.array([[focal, 0.0, center], [0.0, focal, center], [0.0, 0.0, 1.0]])


def _look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """World -> camera transform (OpenCV axes) of a camera at `eye` looking at `target` with world z up."""
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rotation = np.stack([right, down, forward])
    extrinsics = np.eye(4)
    extrinsics[:3, :3] = rotation
    extrinsics[:3, 3] = -rotation @ eye
    return extrinsics


def _camera_path(rng: np.random.Generator, num_frames: int, moving_camera: bool) -> np.ndarray:
    """(T, 4, 4) extrinsics: ~45 degrees down at the table, orbiting by up to ~25 degrees when moving."""
    azimuth = np.full(num_frames, rng.uniform(-0.25, 0.25))
    elevation = np.full(num_frames, rng.uniform(np.radians(40), np.radians(50)))
    distance = np.full(num_frames, rng.uniform(0.48, 0.54))
    if moving_camera:
        progress = _ease(np.linspace(0.0, 1.0, num_frames))
        azimuth += rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.45) * (progress - 0.5)
        elevation += rng.uniform(-0.08, 0.08) * (progress - 0.5)
        distance += rng.uniform(-0.05, 0.05) * progress
    offsets = np.stack(
        [np.sin(azimuth) * np.cos(elevation), -np.cos(azimuth) * np.cos(elevation), np.sin(elevation)], axis=1
    )
    return np.stack([_look_at(_LOOK_AT + d * offset, _LOOK_AT) for d, offset in zip(distance, offsets)])


def _camera_center(extrinsics: np.ndarray) -> np.ndarray:
    return -extrinsics[:3, :3].T @ extrinsics[:3, 3]


def _pixel_rays(intrinsics: np.ndarray, image_size: int) -> np.ndarray:
    """(H*W, 3) camera-frame ray directions with z = 1, so a hit's ray parameter is directly its depth."""
    rows, cols = np.meshgrid(np.arange(image_size), np.arange(image_size), indexing="ij")
    pixels = np.stack([cols.ravel(), rows.ravel(), np.ones(image_size * image_size)], axis=1)
    return pixels @ np.linalg.inv(intrinsics).T


# ------------------------------------------------------------------------------------------------ scene


def _ease(x: np.ndarray) -> np.ndarray:
    """Minimum-jerk profile on [0, 1]: zero velocity and acceleration at both ends, like a real arm."""
    x = np.clip(x, 0.0, 1.0)
    return x**3 * (10 - 15 * x + 6 * x**2)


def _yaw_rotations(yaws: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotations about world z whose columns are the box axes in world coordinates."""
    cos, sin = np.cos(yaws), np.sin(yaws)
    zeros, ones = np.zeros_like(yaws), np.ones_like(yaws)
    return np.stack(
        [np.stack([cos, -sin, zeros], -1), np.stack([sin, cos, zeros], -1), np.stack([zeros, zeros, ones], -1)], -2
    )


def _sample_scene(rng: np.random.Generator, skill: str, num_frames: int) -> tuple[list[_Box], int, str]:
    """Lay out blocks and script the manipulation; returns the boxes (gripper last), moved index, instruction.

    Layouts may collide or leave the image; the caller rejects those with `_scene_is_valid`.
    """
    num_blocks = int(rng.integers(2 if skill == "stack" else 1, 4))
    color_names = rng.choice(list(BLOCK_COLORS), size=num_blocks, replace=False)
    half_extents = rng.uniform(0.022, 0.036, size=(num_blocks, 3))
    xy = np.stack([rng.uniform(-0.11, 0.11, num_blocks), rng.uniform(-0.08, 0.08, num_blocks)], axis=1)
    yaws = rng.uniform(-0.3, 0.3, num_blocks)
    blocks = [
        _Box(
            name=f"{color} block",
            albedo=np.array(BLOCK_COLORS[color]),
            half_extents=half_extents[k],
            centers=np.tile([*xy[k], half_extents[k, 2]], (num_frames, 1)),
            yaws=np.full(num_frames, yaws[k]),
        )
        for k, color in enumerate(color_names)
    ]
    moved, target = blocks[0], blocks[1] if num_blocks > 1 else None
    progress = np.linspace(0.0, 1.0, num_frames)
    phase = np.clip((progress - _APPROACH_END) / (_RETREAT_START - _APPROACH_END), 0.0, 1.0)
    start = moved.centers[0].copy()
    up = np.array([0.0, 0.0, 1.0])
    gripper_half = np.array(GRIPPER_HALF_EXTENTS)
    on_top = up * (moved.half_extents[2] + gripper_half[2] + 0.001)
    approach_offset = _GRIPPER_HOVER * up

    if skill == "push":
        direction_name = list(_PUSH_DIRECTIONS)[rng.integers(len(_PUSH_DIRECTIONS))]
        direction = np.array(_PUSH_DIRECTIONS[direction_name])
        moved.centers = start + np.outer(_ease(phase), direction * rng.uniform(0.07, 0.12))
        direction_in_block = np.abs(_yaw_rotations(moved.yaws[0]).T @ direction)  # gripper shares the block's yaw
        grip_offset = -direction * (direction_in_block @ (moved.half_extents + gripper_half) + 0.002)
        grip_offset[2] = gripper_half[2] + 0.003 - moved.half_extents[2]  # hover just above the table
        approach_offset = approach_offset - 0.03 * direction
        verb = "push the {} to the {}" if direction_name in ("left", "right") else "slide the {} {}"
        instruction = verb.format(moved.name, direction_name)
    elif skill == "pick_place":
        direction_name = ("left", "right")[rng.integers(2)]
        shift = np.array([-1.0 if direction_name == "left" else 1.0, 0.0, 0.0]) * rng.uniform(0.08, 0.14)
        moved.centers = _carry_path(start, start + shift, phase)
        grip_offset = on_top
        instruction = f"pick up the {moved.name.replace('block', 'cube')} and place it on the {direction_name}"
    elif skill == "stack":
        goal = target.centers[0] + up * (target.half_extents[2] + moved.half_extents[2])
        moved.centers = _carry_path(start, goal, phase)
        grip_offset = on_top
        instruction = f"stack the {moved.name} on the {target.name}"
    else:
        clockwise = bool(rng.integers(2))
        angle = rng.uniform(np.radians(60), np.radians(90)) * (-1 if clockwise else 1)  # clockwise seen from above
        moved.yaws = moved.yaws + angle * _ease(phase)
        grip_offset = on_top
        instruction = f"rotate the {moved.name} {'clockwise' if clockwise else 'counterclockwise'}"

    # The gripper is rigidly attached to the block while manipulating, descends before and rises after.
    approach = 1.0 - _ease(progress / _APPROACH_END)
    retreat = _ease((progress - _RETREAT_START) / (1.0 - _RETREAT_START))
    gripper = _Box(
        name="gripper",
        albedo=np.array(GRIPPER_COLOR),
        half_extents=gripper_half,
        centers=moved.centers
        + np.einsum("tij,j->ti", _yaw_rotations(moved.yaws - moved.yaws[0]), grip_offset)
        + np.outer(approach, approach_offset)
        + np.outer(retreat, _GRIPPER_HOVER * up),
        yaws=moved.yaws.copy(),
    )
    order = rng.permutation(num_blocks)  # so the moved block does not always get the same object id
    boxes = [blocks[k] for k in order] + [gripper]
    return boxes, int(np.flatnonzero(order == 0)[0]), instruction


def _carry_path(start: np.ndarray, goal: np.ndarray, phase: np.ndarray, clearance: float = 0.04) -> np.ndarray:
    """Lift, carry level, lower: overlapping eased stages give a smooth arc that clears the blocks it passes."""
    carry_height = max(start[2], goal[2]) + clearance
    horizontal = _ease((phase - 0.2) / 0.6)
    rise, fall = _ease(phase / 0.35), _ease((phase - 0.65) / 0.35)
    height = start[2] + (carry_height - start[2]) * rise - (carry_height - goal[2]) * fall
    path = start + np.outer(horizontal, goal - start)
    path[:, 2] = height
    return path


def _scene_is_valid(
    boxes: list[_Box], moved_index: int, extrinsics: np.ndarray, intrinsics: np.ndarray, image_size: int
) -> bool:
    """Reject layouts whose boxes interpenetrate or leave the image at any frame."""
    signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64)
    for box in boxes:
        corners = box.centers[:, None] + np.einsum("tij,cj->tci", _yaw_rotations(box.yaws), signs * box.half_extents)
        for t in range(len(extrinsics)):
            uv, z = project_points(corners[t], extrinsics[t], intrinsics)
            if (z <= 0).any() or (uv < 1).any() or (uv > image_size - 2).any():
                return False
    gripper_pair = {moved_index, len(boxes) - 1}  # in contact by design
    for a in range(len(boxes)):
        for b in range(a + 1, len(boxes)):
            if {a, b} != gripper_pair and _overlap(boxes[a], boxes[b]):
                return False
    return True


def _overlap(a: _Box, b: _Box, margin: float = 0.005) -> bool:
    """Conservative test: bounding cylinders that overlap in the plane and in height at any frame."""
    radius = np.linalg.norm(a.half_extents[:2]) + np.linalg.norm(b.half_extents[:2]) + margin
    planar = np.linalg.norm(a.centers[:, :2] - b.centers[:, :2], axis=1) < radius
    a_bottom, a_top = a.centers[:, 2] - a.half_extents[2], a.centers[:, 2] + a.half_extents[2]
    b_bottom, b_top = b.centers[:, 2] - b.half_extents[2], b.centers[:, 2] + b.half_extents[2]
    vertical = (a_bottom < b_top - 1e-6) & (b_bottom < a_top - 1e-6)
    return bool((planar & vertical).any())


# ------------------------------------------------------------------------------------------- ray casting


def _cast(
    origins: np.ndarray, directions: np.ndarray, boxes: list[_Box], frame_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit of each ray with the table plane and the boxes -> (P,) ray parameter and object id (0 = table).

    `origins` is (3,) or (P, 3). Each box is tested with the slab method in its own frame; misses give inf.
    """
    origins = np.atleast_2d(origins)
    with np.errstate(divide="ignore"):
        distance = np.where(directions[:, 2] < 0, -origins[:, 2] / directions[:, 2], np.inf)
    object_id = np.zeros(len(directions), dtype=np.int64)
    for box_id, box in enumerate(boxes, start=1):
        rotation = _yaw_rotations(box.yaws[frame_index])
        local_origins = (origins - box.centers[frame_index]) @ rotation
        local_directions = directions @ rotation
        entry, exit_ = np.full(len(directions), -np.inf), np.full(len(directions), np.inf)
        for axis in range(3):
            step = local_directions[:, axis]
            step = np.where(np.abs(step) < 1e-12, 1e-12, step)  # rays parallel to a slab: avoid 0 * inf
            low = (-box.half_extents[axis] - local_origins[:, axis]) / step
            high = (box.half_extents[axis] - local_origins[:, axis]) / step
            entry, exit_ = np.maximum(entry, np.minimum(low, high)), np.minimum(exit_, np.maximum(low, high))
        closer = (entry <= exit_) & (entry > 1e-9) & (entry < distance)
        distance = np.where(closer, entry, distance)
        object_id[closer] = box_id
    return distance, object_id


def _surface_frames(
    points: np.ndarray, object_id: np.ndarray, boxes: list[_Box], frame_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """World normals and object-frame texture coordinates of (P, 3) surface points, so texture moves with boxes.

    The coordinate across the hit face is zeroed: it is constant there and would make the checker flicker.
    """
    normals = np.tile([0.0, 0.0, 1.0], (len(points), 1))
    texture_coords = points * [1.0, 1.0, 0.0]
    for box_id, box in enumerate(boxes, start=1):
        mask = object_id == box_id
        rotation = _yaw_rotations(box.yaws[frame_index])
        local = (points[mask] - box.centers[frame_index]) @ rotation
        face_axis = np.argmax(np.abs(local) / box.half_extents, axis=1)
        rows = np.arange(len(local))
        local_normals = np.zeros_like(local)
        local_normals[rows, face_axis] = np.sign(local[rows, face_axis])
        normals[mask] = local_normals @ rotation.T
        local[rows, face_axis] = 0.0
        texture_coords[mask] = local
    return normals, texture_coords


def _shade(
    points: np.ndarray,
    object_id: np.ndarray,
    boxes: list[_Box],
    frame_index: int,
    textures: list[_Texture],
    light: np.ndarray,
) -> np.ndarray:
    """Textured Lambert shading with hard box shadows -> (P, 3) uint8 sRGB colours."""
    normals, texture_coords = _surface_frames(points, object_id, boxes, frame_index)
    checker = (np.floor(texture_coords / 0.03).sum(axis=1) % 2).astype(int)
    albedo = np.array(TABLE_COLORS)[checker]
    box_checker = np.floor(texture_coords / 0.012).sum(axis=1) % 2
    for box_id, box in enumerate(boxes, start=1):
        mask = object_id == box_id
        albedo[mask] = box.albedo * (0.82 + 0.18 * box_checker[mask, None])
    for textured_id in range(len(boxes) + 1):
        mask = object_id == textured_id
        albedo[mask] *= 1.0 + 0.18 * textures[textured_id].noise(texture_coords[mask])[:, None]

    direct = np.clip(normals @ light, 0.0, None)
    lit = direct > 0
    shadow_origins = points[lit] + 1e-5 * normals[lit]
    direct[lit] *= _cast(shadow_origins, np.broadcast_to(light, shadow_origins.shape), boxes, frame_index)[1] == 0
    color = albedo * (_AMBIENT + (1.0 - _AMBIENT) * direct)[:, None]
    return (np.clip(color, 0.0, 1.0) ** (1 / 2.2) * 255 + 0.5).astype(np.uint8)


# ------------------------------------------------------------------------------------------ tracked points


def _surface_points(
    uv: np.ndarray, boxes: list[_Box], extrinsics: np.ndarray, intrinsics: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """World points and object ids of the first surfaces seen through (P, 2) pixel coordinates at frame 0."""
    directions = np.concatenate([uv, np.ones((len(uv), 1))], axis=1) @ np.linalg.inv(intrinsics).T @ extrinsics[:3, :3]
    origin = _camera_center(extrinsics)
    distance, object_id = _cast(origin, directions, boxes, 0)
    return origin + distance[:, None] * directions, object_id


def _sample_points(
    rng: np.random.Generator,
    num_points: int,
    first_object_ids: np.ndarray,
    first_depth: np.ndarray,
    moving_ids: tuple[int, int],
    boxes: list[_Box],
    extrinsics: np.ndarray,
    intrinsics: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Points visible at frame 0, at sub-pixel positions: half on the block and gripper, half static.

    A quarter of the static half is shared among the visible static blocks so that every object gets points
    (they are small next to the table). Jittered rays that slip off their pixel's surface (silhouette edges) fall
    back to the pixel centre, which is visible by construction.
    """
    num_moving = num_points // 2
    static_blocks = [k for k in np.unique(first_object_ids) if k > 0 and k not in moving_ids]
    per_static_block = (num_points - num_moving) // (4 * max(len(static_blocks), 1))
    groups = [(np.isin(first_object_ids, moving_ids), num_moving)]
    groups += [(first_object_ids == k, per_static_block) for k in static_blocks]
    groups.append((first_object_ids == 0, num_points - num_moving - per_static_block * len(static_blocks)))
    pixels = np.concatenate([_draw(rng, np.flatnonzero(mask), count) for mask, count in groups])
    centers = np.stack([pixels % first_depth.shape[1], pixels // first_depth.shape[1]], axis=1).astype(np.float64)
    jittered_points, jittered_ids = _surface_points(
        centers + rng.uniform(-0.5, 0.5, size=centers.shape), boxes, extrinsics, intrinsics
    )
    center_points, center_ids = _surface_points(centers, boxes, extrinsics, intrinsics)
    keep = (jittered_ids == center_ids) & _visibility(jittered_points, first_depth, extrinsics, intrinsics)
    return np.where(keep[:, None], jittered_points, center_points), center_ids.astype(np.int64)


def _draw(rng: np.random.Generator, candidates: np.ndarray, count: int) -> np.ndarray:
    return rng.choice(candidates, count, replace=candidates.size < count)


def _carry_points(points: np.ndarray, object_ids: np.ndarray, boxes: list[_Box]) -> np.ndarray:
    """Move frame-0 points rigidly with their objects -> (T, N, 3) world tracks; table points stay put."""
    num_frames = boxes[0].centers.shape[0]
    tracks = np.repeat(points[None], num_frames, axis=0)
    for box_id, box in enumerate(boxes, start=1):
        mask = object_ids == box_id
        local = (points[mask] - box.centers[0]) @ _yaw_rotations(box.yaws[0])
        tracks[:, mask] = box.centers[:, None] + np.einsum("tij,nj->tni", _yaw_rotations(box.yaws), local)
    return tracks


def _visibility(points: np.ndarray, depth: np.ndarray, extrinsics: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """(N,) z-buffer test: in the image, in front of the camera and matching the rendered depth at its pixel."""
    uv, z = project_points(points, extrinsics, intrinsics)
    height, width = depth.shape
    inside = (z > 0) & np.all(uv >= -0.5, axis=-1) & (uv[:, 0] < width - 0.5) & (uv[:, 1] < height - 0.5)
    cols, rows = np.floor(np.where(inside[:, None], uv, 0.0) + 0.5).astype(int).T
    return inside & (np.abs(depth[rows, cols] - z) <= VISIBILITY_RTOL * z)
