"""2D point tracking backends for TraceExtract (stage 4): where each query point is in every frame, and whether it
is still seen.

Two backends, chosen explicitly and recorded in `TrackResult.backend`:
    * `lk`: OpenCV pyramidal Lucas–Kanade, run from each query frame forward to the end and backward to the start,
      with a forward–backward consistency check at every step. Classical and CPU-only, so extraction works where
      no learned tracker (CoTracker and the like) can be downloaded; it drifts on untextured surfaces, which the
      consistency check mostly turns into "lost" rather than into wrong positions. `track_progressive` adds
      query points at chunk starts of long videos, where the existing tracks no longer cover the image.
    * `given`: ground-truth tracks from the source (simulators, synthetic clips), validated and wrapped.
    * `cotracker`: Meta's CoTracker3 through `torch.hub` (downloads code and weights, so it needs network access and
      the repo's own dependencies); tracks all points jointly over the whole clip, through occlusions.

Pixels follow the project convention: pixel (row i, column j) has its centre at (x, y) = (j, i), which is also
OpenCV's convention for sub-pixel coordinates, so no half-pixel shift is needed anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# OpenCV's default stopping rule for the per-level Gauss–Newton iterations.
_LK_TERMINATION = (30, 0.01)  # at most 30 iterations, or a step below 0.01 px


@dataclass
class TrackResult:
    """Tracks of N points over T frames.

    Attributes:
        tracks: (T, N, 2) float32 pixel (x, y) per frame. Where a point is not visible the value is only a
            placeholder (the last good position for `lk`, whatever the source gave for `given`).
        visible: (T, N) bool, the point was tracked reliably into this frame.
        query_frames: (N,) int64 frame each point was queried in (for `given`, its first visible frame).
        backend: name of the backend that produced the tracks, stored in each record's metadata.
    """

    tracks: np.ndarray
    visible: np.ndarray
    query_frames: np.ndarray
    backend: str


def track_points_lk(
    frames: np.ndarray, queries: np.ndarray, window: int = 21, levels: int = 3, fb_threshold: float = 1.0
) -> TrackResult:
    """Track query points through a video with pyramidal Lucas–Kanade, in both directions from each query frame.

    Tracking goes frame to frame (never straight from the query frame to a distant one), so appearance only has to
    stay similar between neighbours. At each step a point is tracked to the next frame and back again; it is lost
    when the round trip misses its start by more than `fb_threshold` px, when OpenCV reports failure, or when it
    leaves the image. A lost point stays invisible for the rest of that direction: LK cannot tell a reappearing
    point from a different one, and a missing observation is cheaper downstream than a wrong one.

    All points are swept together, one LK call per frame pair and direction, so points that share a query frame
    are tracked in one vectorised call. Frames are converted to grayscale once. The pyramids are rebuilt inside
    every call: OpenCV's Python binding rejects the output of `cv2.buildOpticalFlowPyramid` as LK input
    (opencv/opencv#4777), and at 224² building them costs less than the tracking itself.

    Args:
        frames: (T, H, W, 3) uint8 RGB video.
        queries: (N, 3) rows (frame_index, x, y); frame_index must be an integer value.
        window: side of the square LK integration window in pixels (odd, >= 3).
        levels: number of coarser pyramid levels above full resolution (OpenCV's `maxLevel`); each level doubles
            the largest motion LK can follow.
        fb_threshold: largest forward–backward round-trip error in pixels that still counts as tracked.
    """
    frames = _check_frames(frames)
    query_frames, points = _check_queries(queries, frames.shape)
    return _track_lk(frames, query_frames, points, _LucasKanadeStep.for_video(frames, window, levels, fb_threshold))


def track_progressive(
    frames: np.ndarray,
    initial_queries: np.ndarray,
    new_queries_fn: Callable[[int, np.ndarray, np.ndarray], np.ndarray] | None = None,
    chunk: int = 50,
    window: int = 21,
    levels: int = 3,
    fb_threshold: float = 1.0,
) -> TrackResult:
    """Track a long video, adding query points wherever the existing tracks no longer cover the scene.

    Points seeded in the first frame are lost as objects turn, get occluded or leave, and new content enters;
    so at every chunk start (frames `chunk`, 2·`chunk`, ...) the points still tracked there are handed to
    `new_queries_fn`, whose new points join as queries of that frame. Every point is then tracked exactly as by
    `track_points_lk`: forward to the end and backward to the start of the video from its own query frame.

    Args:
        frames: (T, H, W, 3) uint8 RGB video.
        initial_queries: (N, 3) rows (frame_index, x, y), as for `track_points_lk`.
        new_queries_fn: called as `new_queries_fn(frame_index, frame, tracked)` with the (H, W, 3) frame and the
            (K, 2) positions of the points tracked into it; returns (M, 2) new pixel positions (M may be 0).
            Default: the centre of every `window`-sized grid cell that holds no tracked point, one point per
            window being as dense as LK keeps points independent.
        chunk: frames between two looks for uncovered areas (>= 1).
        window, levels, fb_threshold: as for `track_points_lk`.
    """
    frames = _check_frames(frames)
    query_frames, points = _check_queries(initial_queries, frames.shape)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    height, width = frames.shape[1:3]

    def add_queries(frame_index: int, tracked: np.ndarray) -> np.ndarray:
        if frame_index % chunk:
            return np.empty((0, 2), dtype=np.float32)
        if new_queries_fn is None:
            return uncovered_cell_centres(tracked, (height, width), window)
        new = np.asarray(new_queries_fn(frame_index, frames[frame_index], tracked), dtype=np.float64)
        if new.ndim != 2 or new.shape[1] != 2:
            raise ValueError(f"new_queries_fn must return (M, 2) points for frame {frame_index}, got {new.shape}")
        if len(new) == 0:
            return new.astype(np.float32)
        try:
            return _check_queries(np.column_stack([np.full(len(new), frame_index), new]), frames.shape)[1]
        except ValueError as error:
            raise ValueError(f"new_queries_fn returned bad points for frame {frame_index}: {error}") from None

    step = _LucasKanadeStep.for_video(frames, window, levels, fb_threshold)
    return _track_lk(frames, query_frames, points, step, add_queries)


def uncovered_cell_centres(tracked: np.ndarray, image_size: tuple[int, int], cell: int) -> np.ndarray:
    """(M, 2) pixel centres of the `cell`-sized grid cells of an image that contain none of the (K, 2) points."""
    height, width = image_size
    occupied = np.zeros((-(-height // cell), -(-width // cell)), dtype=bool)
    inside = tracked[_inside(tracked, height, width)]
    cells = np.floor((inside + 0.5) / cell).astype(int)
    occupied[cells[:, 1], cells[:, 0]] = True
    rows, cols = np.nonzero(~occupied)
    # Centre of the part of each cell that lies in the image (edge cells can be narrower).
    x = (cols * cell + np.minimum((cols + 1) * cell, width)) / 2 - 0.5
    y = (rows * cell + np.minimum((rows + 1) * cell, height)) / 2 - 0.5
    return np.column_stack([x, y]).astype(np.float32)


def _track_lk(
    frames: np.ndarray,
    query_frames: np.ndarray,
    points: np.ndarray,
    step: _LucasKanadeStep,
    add_queries: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> TrackResult:
    """The bidirectional sweep shared by both LK entry points.

    Forward sweep first: `add_queries(frame_index, tracked)` may append points at each frame it reaches, and the
    backward sweep then carries those back to the start like any other query.
    """
    num_frames = len(frames)
    tracks = np.repeat(points[None], num_frames, axis=0)
    visible = np.zeros((num_frames, len(points)), dtype=bool)
    visible[query_frames, np.arange(len(points))] = True
    for direction in (1, -1):
        alive = np.zeros(len(query_frames), dtype=bool)
        order = range(num_frames) if direction == 1 else range(num_frames - 1, -1, -1)
        for source in order:
            alive |= query_frames == source  # points join the sweep at their query frame
            if direction == 1 and add_queries is not None and source > 0:
                tracks, visible, query_frames, alive = _append_queries(
                    add_queries(source, tracks[source, alive]), source, tracks, visible, query_frames, alive
                )
            target = source + direction
            if not 0 <= target < num_frames:
                break
            if alive.any():
                indices = np.flatnonzero(alive)
                moved, ok = step(source, target, tracks[source, indices])
                tracks[target, indices] = np.where(ok[:, None], moved, tracks[source, indices])
                visible[target, indices[ok]] = True
                alive[indices[~ok]] = False
            # Points already lost keep their last good position in every later frame of this direction.
            lost = ~alive & (direction * (target - query_frames) > 0)
            tracks[target, lost] = tracks[source, lost]
    return TrackResult(tracks, visible, query_frames, "lk")


def _append_queries(
    new: np.ndarray,
    frame_index: int,
    tracks: np.ndarray,
    visible: np.ndarray,
    query_frames: np.ndarray,
    alive: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Grow the sweep's arrays by (M, 2) points queried in `frame_index` (no copy when M = 0)."""
    if len(new) == 0:
        return tracks, visible, query_frames, alive
    num_frames = len(tracks)
    new_visible = np.zeros((num_frames, len(new)), dtype=bool)
    new_visible[frame_index] = True
    return (
        np.concatenate([tracks, np.repeat(new[None], num_frames, axis=0)], axis=1),
        np.concatenate([visible, new_visible], axis=1),
        np.concatenate([query_frames, np.full(len(new), frame_index, dtype=np.int64)]),
        np.concatenate([alive, np.ones(len(new), dtype=bool)]),
    )


def track_points_given(tracks: np.ndarray, visible: np.ndarray) -> TrackResult:
    """Wrap tracks provided by the source (e.g. a simulator's ground truth) after checking them.

    Non-finite positions (NaN marks "unknown" in most datasets) count as invisible whatever `visible` says, so
    later stages never read a NaN as a pixel. Each point's query frame is its first visible frame (0 if never).
    """
    tracks = np.asarray(tracks)
    visible = np.asarray(visible)
    if tracks.ndim != 3 or tracks.shape[-1] != 2:
        raise ValueError(f"tracks must have shape (T, N, 2), got {tracks.shape}")
    if tracks.shape[0] == 0 or tracks.shape[1] == 0:
        raise ValueError(f"tracks must hold at least one frame and one point, got shape {tracks.shape}")
    if visible.shape != tracks.shape[:2]:
        raise ValueError(f"visible must have shape {tracks.shape[:2]} to match the tracks, got {visible.shape}")
    if visible.dtype != bool and not np.isin(visible, (0, 1)).all():
        raise ValueError("visible must be boolean (or hold only 0 and 1)")
    if not np.issubdtype(tracks.dtype, np.number):
        raise ValueError(f"tracks must be numeric, got dtype {tracks.dtype}")
    tracks = tracks.astype(np.float32)
    visible = visible.astype(bool) & np.isfinite(tracks).all(-1)
    return TrackResult(tracks, visible, visible.argmax(axis=0).astype(np.int64), "given")


class _LucasKanadeStep:
    """One forward–backward-checked LK step between two frames of a video converted to grayscale once."""

    def __init__(self, gray: list[np.ndarray], window: tuple[int, int], levels: int, fb_threshold: float) -> None:
        self.gray = gray
        self.window = window
        self.levels = levels
        self.fb_threshold = fb_threshold
        self.height, self.width = gray[0].shape

    @classmethod
    def for_video(cls, frames: np.ndarray, window: int, levels: int, fb_threshold: float) -> _LucasKanadeStep:
        """Check the LK settings and convert the (checked) RGB frames to grayscale once."""
        if window < 3 or window % 2 == 0:
            raise ValueError(f"window must be an odd integer >= 3, got {window}")
        if levels < 0:
            raise ValueError(f"levels must be >= 0, got {levels}")
        if not fb_threshold > 0:
            raise ValueError(f"fb_threshold must be > 0, got {fb_threshold}")
        import cv2  # OpenCV (the `extract` extra) is needed by LK only, not by given tracks

        gray = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames]
        return cls(gray, (window, window), levels, fb_threshold)

    def _flow(self, source: int, target: int, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        moved, status, _ = cv2.calcOpticalFlowPyrLK(
            self.gray[source],
            self.gray[target],
            points.reshape(-1, 1, 2),
            None,
            winSize=self.window,
            maxLevel=self.levels,
            criteria=(cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, *_LK_TERMINATION),
        )
        return moved.reshape(-1, 2), status.reshape(-1).astype(bool)

    def __call__(self, source: int, target: int, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, 2) float32 points in `source` -> their positions in `target` and whether each was tracked."""
        points = np.ascontiguousarray(points, dtype=np.float32)
        moved, forward_ok = self._flow(source, target, points)
        returned, backward_ok = self._flow(target, source, moved)
        round_trip = np.linalg.norm(returned - points, axis=1)
        inside = _inside(moved, self.height, self.width)
        return moved, forward_ok & backward_ok & (round_trip <= self.fb_threshold) & inside


def _inside(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Whether (n, 2) pixel (x, y) positions fall on a pixel of the image (pixel centres at integers)."""
    x, y = points[:, 0], points[:, 1]
    return np.isfinite(points).all(1) & (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be RGB video of shape (T, H, W, 3), got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got dtype {frames.dtype}")
    if min(frames.shape[:3]) == 0:
        raise ValueError(f"frames is empty: shape {frames.shape}")
    return frames


def _check_queries(queries: np.ndarray, frames_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Validate (N, 3) rows (frame_index, x, y) -> (N,) int64 query frames and (N, 2) float32 points."""
    queries = np.asarray(queries, dtype=np.float64)
    if queries.ndim != 2 or queries.shape[1] != 3:
        raise ValueError(f"queries must have shape (N, 3) with rows (frame_index, x, y), got {queries.shape}")
    if len(queries) == 0:
        raise ValueError("queries is empty: give at least one (frame_index, x, y) row")
    finite = np.isfinite(queries).all(axis=1)
    if not finite.all():
        raise ValueError(f"queries contain NaN or infinite values (rows {np.flatnonzero(~finite).tolist()})")
    num_frames, height, width = frames_shape[:3]
    frame_index = queries[:, 0]
    if (frame_index != np.round(frame_index)).any():
        raise ValueError("query frame indices must be integers")
    out_of_range = (frame_index < 0) | (frame_index >= num_frames)
    if out_of_range.any():
        raise ValueError(
            f"query frame index {frame_index[out_of_range][0]:g} is out of range for a video of {num_frames} frames"
        )
    outside = ~_inside(queries[:, 1:], height, width)
    if outside.any():
        x, y = queries[outside][0, 1:]
        raise ValueError(f"query point ({x:g}, {y:g}) lies outside the {width}x{height} image")
    return frame_index.astype(np.int64), queries[:, 1:].astype(np.float32)


COTRACKER_HUB_REPO = "facebookresearch/co-tracker"


def load_cotracker(entry: str = "cotracker3_offline", repo: str = COTRACKER_HUB_REPO) -> Callable:
    """CoTracker from `torch.hub`; fails with the fix when the hub (or its dependencies) cannot be reached."""
    import torch

    try:
        return torch.hub.load(repo, entry).eval()
    except Exception as error:  # network, missing einops/timm, renamed entry: all end the same way
        raise RuntimeError(
            f"Could not load the CoTracker backend {repo}:{entry} through torch.hub ({type(error).__name__}: {error}). "
            "It needs network access (or a populated torch.hub cache) and the repo's dependencies; on an offline "
            "machine use tracker='lk'."
        ) from error


def track_points_cotracker(
    frames: np.ndarray, queries: np.ndarray, model: Callable | None = None, visibility_threshold: float = 0.5
) -> TrackResult:
    """Track query points with CoTracker: one joint pass over the whole clip (memory grows with T × H × W).

    Args:
        frames: (T, H, W, 3) uint8 RGB video.
        queries: (N, 3) rows (frame_index, x, y) in pixels.
        model: a loaded CoTracker predictor, called as `model(video (1, T, 3, H, W) in [0, 255], queries=(1, N, 3))`
            and returning tracks (1, T, N, 2) and visibility (1, T, N); `load_cotracker()` when None.
        visibility_threshold: visibility scores above it count as seen.
    """
    import torch

    frames, queries = np.asarray(frames), np.asarray(queries, dtype=np.float32)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got {frames.shape}.")
    if queries.ndim != 2 or queries.shape[1] != 3 or len(queries) == 0:
        raise ValueError(f"queries must be a non-empty (N, 3) array of (frame_index, x, y), got {queries.shape}.")
    model = load_cotracker() if model is None else model
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)[None].float()
    with torch.no_grad():
        tracks, visibility = model(video, queries=torch.from_numpy(queries)[None])
    tracks = tracks[0].float().cpu().numpy()
    visibility = visibility[0].float().cpu().numpy()
    if visibility.ndim == 3:  # some versions return (T, N, 1)
        visibility = visibility[..., 0]
    expected = (len(frames), len(queries))
    if tracks.shape != (*expected, 2) or visibility.shape != expected:
        raise ValueError(f"CoTracker returned tracks {tracks.shape} and visibility {visibility.shape}; expected {expected}.")
    height, width = frames.shape[1:3]
    inside = (tracks[..., 0] >= -0.5) & (tracks[..., 0] <= width - 0.5) & (tracks[..., 1] >= -0.5) & (tracks[..., 1] <= height - 0.5)
    return TrackResult(
        tracks=tracks.astype(np.float32),
        visible=(visibility > visibility_threshold) & inside & np.isfinite(tracks).all(-1),
        query_frames=queries[:, 0].astype(np.int64),
        backend="cotracker",
    )
