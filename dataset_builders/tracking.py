"""2D point tracking for TraceExtract (stage 4): where each query point is in every frame, and whether it is seen.

`track_points(frames, queries, backend=None)` is the entry point; the backend is recorded in `TrackResult.backend`:
    * `support_lk` (the default): pyramidal Lucas–Kanade whose unreliable steps are carried by the motion of the
      reliably tracked corners around each point (`track_points_support`). CPU-only and weight-free; on the
      SceneTracker clip it reaches δ_avg 0.667 where plain chained LK reaches 0.544, on a real EgoDex episode's
      fingertips 0.292 where plain LK reaches 0.279, and it tracks 256 points at 224² at about 100 frames per
      second on 2 cores (benchmarks/bench_extract.py).
    * `lk`: plain chained pyramidal LK (`track_points_lk`), the classical baseline.
    * `cotracker`: Meta's CoTracker3 (or any `torch.hub`-style tracker with its interface), loaded by
      `load_hub_tracker` from a local clone of its repository and a local checkpoint file, so it runs offline.
`track_points_given` wraps ground-truth tracks from a source (simulators, synthetic clips); `track_progressive`
adds query points at chunk starts of long videos, where the existing tracks no longer cover the image.

Every backend returns a position in every frame (also while a point is hidden or the tracker unsure, as TAP
trackers do) and visibility as a separate output; for the LK backends visibility compares each point's patch
with its query-frame patch (`_Appearance`), as a yes/no judgement and as a calibrated probability.

Pixels follow the project convention: pixel (row i, column j) has its centre at (x, y) = (j, i), which is also
OpenCV's convention for sub-pixel coordinates, so no half-pixel shift is needed anywhere.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Stopping rules of LK's per-level Gauss–Newton iterations: at most this many, or a step below this many px.
# OpenCV's default is kept by plain `lk` and by re-detections (across many frames, for few points); a `support_lk`
# frame step stops earlier, with no loss (δ_avg on the SceneTracker clip 0.665 against 0.661 at 540 rows) and
# about 20 % faster at 224².
OPENCV_TERMINATION = (30, 0.01)
SUPPORT_STEP_TERMINATION = (10, 0.03)
# Visibility by appearance: patch radius as a fraction of the shorter image side (22 px at 540 rows, 9 at 224),
# the correlation with the query patch a seen point keeps, and the grey-level spread below which a patch is flat.
# The threshold is calibrated for occlusion accuracy: from 0.0 down to -0.5 it rose from 0.876 to 0.892 on the
# SceneTracker clip (all-visible: 0.888) and stayed within 0.002 of its best on procedural episodes; appearance
# changes of a seen point (turning, shading) cost more than the occlusions a higher threshold finds.
APPEARANCE_RADIUS_FRACTION = 1 / 24
APPEARANCE_MIN_RADIUS = 4
APPEARANCE_MIN_NCC = -0.5
MIN_TEMPLATE_STD = 2.0
# Visibility as a probability: a logistic function of that correlation, fitted to the SceneTracker clip's occlusion
# labels at 540 rows (default tracker, textured query patches), and the seen fractions measured there for the two
# cases the correlation does not cover: a flat patch where the query patch was textured (0.91: mostly shading or
# blur, not occluders) and a flat query patch (0.94). Outside the image it is 0.
VISIBILITY_LOGISTIC = (2.10, 1.31)  # slope and offset on the correlation
FLAT_PATCH_SEEN = 0.91
FLAT_TEMPLATE_SEEN = 0.94
# Round trip, in px, a re-detection from the query frame must pass (looser than a frame step's: farther apart).
REDETECT_FB_THRESHOLD = 1.0
REDETECT_MIN_NCC = 0.8
# Support corners whose steps predict a query point's step.
SUPPORT_NEIGHBOURS = 16
# A support corner's round trip may grow by this many px per px of its step: a fast corner (a moving hand) loses
# sub-pixel precision to blur and interpolation, and without the allowance only the still background supports.
SUPPORT_FB_PER_PX = 0.05
# Motion coherence: a corner's step counts as agreeing with a point's own LK step within this many px, or this
# fraction of the own step's length where larger; the support median weighs corners by that agreement.
MOTION_AGREEMENT_PX = 3.0
MOTION_AGREEMENT_FRACTION = 0.5
# Smallest default fine window (`track_points_support`'s `fine_window`): on the SceneTracker clip at 224 rows a
# fine window of 9 px measured δ_avg 0.625 and one of 17 px 0.633, against 0.660 without.
MIN_FINE_WINDOW = 17
# Half side, in px, of the patch that decides between a point's own LK step and its support prediction
# (`appearance_choice`): the point itself, not the window around it, which a small finger shares with the background.
CHOICE_PATCH_RADIUS = 4
# OpenCV's LK runs along window rows in vector blocks of 8 px: windows of these sides cost less than even the next
# smaller odd sides (600 points at 224², one thread: 1.5 / 3.2 / 8.8 / 10 ms against 4.1 / 5.4 / 14 / 15 ms for
# 7 / 15 / 23 / 31 px), so the default windows are picked among them.
FAST_WINDOWS = (9, 17, 25, 33)
# Above this many rows (the largest size the defaults were measured best at) the default query window grows with the
# image from 33 px at 540 rows, to a side of 8k + 1 px (fast alike): 65 px with a fine window of 33 at 1080 rows. The
# capped 33 px window cannot follow a hand's fast steps at full HD: on the EgoDex episode at 1920x1080 this moved
# δ_avg of all hand joints from 0.394 to 0.413 (fingertips 0.269 to 0.265, one point's noise), and on the
# SceneTracker clip upscaled to 1080 rows from 0.662 to 0.673; more pyramid levels (5) measured no better.
LARGEST_TUNED_ROWS = 540


@dataclass
class TrackResult:
    """Tracks of N points over T frames.

    Attributes:
        tracks: (T, N, 2) float32 pixel (x, y) per frame: a position estimate in every frame, also where the point
            is hidden or the tracker is unsure (as TAP trackers report), so an unsure point is never frozen.
        visible: (T, N) bool, whether the point is judged to be seen in this frame; separate from the position.
        query_frames: (N,) int64 frame each point was queried in (for `given`, its first visible frame).
        backend: name of the backend that produced the tracks, stored in each record's metadata.
        visibility_probability: (T, N) float32 probability that the point is seen (LK backends: calibrated on the
            SceneTracker clip's occlusion labels, 1 at the query frame), or None where the backend gives none.
    """

    tracks: np.ndarray
    visible: np.ndarray
    query_frames: np.ndarray
    backend: str
    visibility_probability: np.ndarray | None = None


def track_points(frames: np.ndarray, queries: np.ndarray, backend: str | None = None, **options) -> TrackResult:
    """Track (N, 3) query rows (frame_index, x, y) through (T, H, W, 3) uint8 RGB `frames`.

    `backend` names an entry of `TRACKERS` (None: `DEFAULT_TRACKER`, the most accurate one that needs neither
    weights nor a GPU); `options` go to that backend's function, e.g. `window=` for the LK backends or `model=`
    for `cotracker`.
    """
    backend = DEFAULT_TRACKER if backend is None else backend
    if backend not in TRACKERS:
        raise ValueError(f"Unknown tracker backend {backend!r}; choose from {sorted(TRACKERS)}.")
    _backend_settings(backend, options)
    return TRACKERS[backend](frames, queries, **options)


def track_points_lk(frames: np.ndarray, queries: np.ndarray, window: int = 21, levels: int = 3) -> TrackResult:
    """Plain chained pyramidal Lucas–Kanade: each point follows its own LK step from frame to frame.

    Tracking goes frame to frame in both directions from each query frame, so appearance only has to stay similar
    between neighbours; a wrong step is never corrected. The classical baseline `support_lk` improves on.

    Args:
        frames: (T, H, W, 3) uint8 RGB video.
        queries: (N, 3) rows (frame_index, x, y); frame_index must be an integer value.
        window: side of the square LK integration window in pixels (odd, >= 3).
        levels: number of coarser pyramid levels above full resolution (OpenCV's `maxLevel`); each level doubles
            the largest motion LK can follow.
    """
    return _track(frames, queries, "lk", window=window, levels=levels)


def track_points_support(
    frames: np.ndarray,
    queries: np.ndarray,
    window: int | None = None,
    levels: int | None = None,
    support_window: int | None = None,
    fb_threshold: float = 0.3,
    num_support: int = 600,
    support_spacing: float | None = None,
    appearance_choice: bool = False,
    fine_window: int | None = None,
    motion_coherence: bool = True,
    support_fb_per_px: float = SUPPORT_FB_PER_PX,
) -> TrackResult:
    """Lucas–Kanade whose unreliable steps are carried by the reliably tracked corners around each point.

    Chained LK fails on untextured surfaces, under motion blur and occlusion, and never undoes a wrong step. So at
    every frame pair up to `num_support` corners (Shi–Tomasi, at least `support_spacing` px apart) are tracked as
    well, and those that pass a forward–backward check of `fb_threshold` px (plus `SUPPORT_FB_PER_PX` per px of
    their step) form a sparse motion field. A query point's predicted step is the weighted median of the support
    steps around it: weighted by a Gaussian of the distance (sigma = 2 · `support_spacing`) and, with
    `motion_coherence`, by how well each corner's step agrees with the point's own LK step, so that a fingertip
    moving over a still background is carried by the corners on the moving hand, not by the background. The
    point's own LK step is kept where it passes the check (first with the `fine_window`, then with `window`);
    otherwise the point moves by the prediction. So no point is ever frozen, and a hidden point moves on with its
    surroundings until it reappears.

    Args:
        frames, queries: as for `track_points_lk`.
        window, levels: LK window side (odd, >= 3) of the query points, and pyramid levels. None: the side in
            `FAST_WINDOWS` closest to 10 % of the shorter image side (9 up to 130 rows, 25 at 224, 33 from 290 to
            540 rows; above, growing with the image: 65 at 1080, see `LARGEST_TUNED_ROWS`),
            measured best of `FAST_WINDOWS` on procedural and MuJoCo 128 px episodes and on the SceneTracker clip
            at 224 rows (and within 0.003 δ_avg of it at 540); and the fewest levels that follow a step of a fifth
            of that side (3 at 128 rows, 2 at 224, 3 at 540, 3 at 1080). On the SceneTracker clip, more levels
            measured no better (δ_avg within 0.001 at 224 and 540 rows) at 10-20 % more cost.
        support_window: LK window side (odd, >= 3) of the support corners. They are picked for their texture, so a
            smaller window suffices. None: the side in `FAST_WINDOWS` closest to 3 % of the shorter image side
            (9 below 433 rows, 17 at 540). On the SceneTracker clip at 224 and 540 rows, these two defaults measured
            within 0.005 δ_avg of the best pair of `FAST_WINDOWS`; at 224² a 9 px support window costs 1.5 ms per
            600 corners, a 21 px one 7.0.
        fb_threshold: largest forward–backward round trip, in px, of a step that counts as reliable.
        num_support: most support corners per frame pair.
        support_spacing: least distance between support corners in px; None: 1/54 of the shorter image side
            (10 px at 540 rows, about 4 px at 224), at least 3.
        appearance_choice: where a point's own LK step fails the check, still take it instead of the prediction if
            the 9x9 patch it lands on matches the point's patch in `source` better (smaller mean squared
            difference). On the EgoDex episode (1/3 scale) this moves δ_avg from 0.292 to 0.299 on the 15
            fingertips and from 0.444 to 0.441 on all hand joints, but on the SceneTracker clip, where the support
            is mostly right where the two disagree, it costs 0.032 at 540 rows and 0.011 at 224, so it is off by
            default (benchmarks/bench_extract.py).
        fine_window: LK window side (odd, >= 3) tried first for the query points' own steps; `window` where it fails
            the check. A small finger shares a large window with the background, which drags its step. None: the
            side of 8k + 1 px closest to half `window` where that is at least `MIN_FINE_WINDOW` (17 from 290
            rows up, where it costs about 10 % more time at 540 rows; 33 at 1080), else no fine window; 0: none.
        motion_coherence: weigh the support corners by the agreement of their step with the point's own LK step
            (within `MOTION_AGREEMENT_PX` px or `MOTION_AGREEMENT_FRACTION` of the own step); False: by distance only.
        support_fb_per_px: px a support corner's round trip may grow per px of its step; 0 is a fixed round trip.
            With `motion_coherence=False` and `fine_window=0` it gives the previous default, which lets a fast
            fingertip over a still background fall behind (`bench_extract` runs it as "previous default").
    """
    return _track(
        frames,
        queries,
        "support_lk",
        window=window,
        levels=levels,
        support_window=support_window,
        fb_threshold=fb_threshold,
        num_support=num_support,
        support_spacing=support_spacing,
        appearance_choice=appearance_choice,
        fine_window=fine_window,
        motion_coherence=motion_coherence,
        support_fb_per_px=support_fb_per_px,
    )


def track_progressive(
    frames: np.ndarray,
    initial_queries: np.ndarray,
    new_queries_fn: Callable[[int, np.ndarray, np.ndarray], np.ndarray] | None = None,
    chunk: int = 50,
    backend: str | None = None,
    **options,
) -> TrackResult:
    """Track a long video, adding query points wherever the existing tracks no longer cover the scene.

    Points seeded in the first frame are lost as objects turn, get occluded or leave, and new content enters;
    so at every chunk start (frames `chunk`, 2·`chunk`, ...) the points visible there are handed to
    `new_queries_fn`, whose new points join as queries of that frame. Every point is then tracked exactly as by
    the backend alone: forward to the end and backward to the start of the video from its own query frame.

    Args:
        frames: (T, H, W, 3) uint8 RGB video.
        initial_queries: (N, 3) rows (frame_index, x, y), as for `track_points`.
        new_queries_fn: called as `new_queries_fn(frame_index, frame, tracked)` with the (H, W, 3) frame and the
            (K, 2) positions of the points visible in it; returns (M, 2) new pixel positions (M may be 0).
            Default: the centre of every LK-window-sized grid cell that holds no visible point, one point per
            window being as dense as LK keeps points independent.
        chunk: frames between two looks for uncovered areas (>= 1).
        backend: one of `LK_BACKENDS` (None: `DEFAULT_TRACKER`); `options` are its settings (`window=` etc.).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    checked_frames = _check_frames(frames)
    height, width = checked_frames.shape[1:3]

    def add_queries(frame_index: int, tracked: np.ndarray, cell: int) -> np.ndarray:
        if frame_index % chunk:
            return np.empty((0, 2), dtype=np.float32)
        if new_queries_fn is None:
            return uncovered_cell_centres(tracked, (height, width), cell)
        new = np.asarray(new_queries_fn(frame_index, checked_frames[frame_index], tracked), dtype=np.float64)
        if new.ndim != 2 or new.shape[1] != 2:
            raise ValueError(f"new_queries_fn must return (M, 2) points for frame {frame_index}, got {new.shape}")
        if len(new) == 0:
            return new.astype(np.float32)
        try:
            return _check_queries(np.column_stack([np.full(len(new), frame_index), new]), checked_frames.shape)[1]
        except ValueError as error:
            raise ValueError(f"new_queries_fn returned bad points for frame {frame_index}: {error}") from None

    return _track(checked_frames, initial_queries, DEFAULT_TRACKER if backend is None else backend, add_queries, **options)


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


def _track(
    frames: np.ndarray,
    queries: np.ndarray,
    backend: str,
    add_queries: Callable[[int, np.ndarray, int], np.ndarray] | None = None,
    **options,
) -> TrackResult:
    """Check the input, set up an LK backend's step and run the bidirectional sweep."""
    if backend not in LK_BACKENDS:
        raise ValueError(f"Unknown LK tracker backend {backend!r}; choose from {LK_BACKENDS}.")
    frames = _check_frames(frames)
    query_frames, points = _check_queries(queries, frames.shape)
    settings = _backend_settings(backend, options)
    short_side = min(frames.shape[1:3])
    window, levels = settings.pop("window"), settings.pop("levels")
    if window is None:
        window = _default_window(short_side)
    _check_window(window, "window")
    if levels is None:
        levels = _levels_reaching(window, short_side / 5)
    termination = OPENCV_TERMINATION if backend == "lk" else SUPPORT_STEP_TERMINATION
    lucas_kanade = _LucasKanade.for_video(frames, window, levels, termination)
    if backend == "lk":
        return _sweep(lucas_kanade, query_frames, points, lucas_kanade.step, backend, add_queries)
    if settings["fine_window"] is None:
        fine = _fast_side(window / 2)
        settings["fine_window"] = fine if MIN_FINE_WINDOW <= fine < window else 0
    step = _SupportedStep(lucas_kanade, **settings)
    return _sweep(lucas_kanade, query_frames, points, step, backend, add_queries, redetect=True)


def _backend_settings(backend: str, options: dict) -> dict:
    """Every setting of a backend's function: the given `options`, the defaults for the rest; rejects unknown names."""
    parameters = dict(inspect.signature(TRACKERS[backend]).parameters)
    del parameters["frames"], parameters["queries"]
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for the {backend} tracker; it takes {sorted(parameters)}.")
    required = sorted(name for name, parameter in parameters.items()
                      if parameter.default is inspect.Parameter.empty and name not in options)
    if required:
        raise ValueError(f"The {backend} tracker needs {required} (for cotracker: model=load_hub_tracker(...)).")
    return {name: options.get(name, parameter.default) for name, parameter in parameters.items()}


def _sweep(
    lucas_kanade: _LucasKanade,
    query_frames: np.ndarray,
    points: np.ndarray,
    step: Callable[[int, int, np.ndarray], tuple[np.ndarray, np.ndarray]],
    backend: str,
    add_queries: Callable[[int, np.ndarray, int], np.ndarray] | None = None,
    redetect: bool = False,
) -> TrackResult:
    """Move every point from its query frame forward to the end, then backward to the start, judging visibility
    in each frame it reaches. `step(source, target, points)` returns the points' positions in `target` and whether
    each step was reliable; with `redetect`, points unseen, or reliable again after an unreliable step (the first
    frame a point carried by its surroundings can be located again), are looked for again (`_redetect`).

    Forward sweep first: `add_queries(frame_index, visible_positions, cell)` may append points at each frame it
    reaches, and the backward sweep then carries those back to the start like any other query.
    """
    num_frames = len(lucas_kanade.gray)
    tracks = np.repeat(points[None], num_frames, axis=0)
    visible = np.zeros((num_frames, len(points)), dtype=bool)
    visible[query_frames, np.arange(len(points))] = True
    appearance = _Appearance(lucas_kanade.gray, query_frames, points)
    for direction in (1, -1):
        joined = np.zeros(len(query_frames), dtype=bool)
        was_unreliable = np.zeros(len(query_frames), dtype=bool)  # the point's previous step was unreliable
        order = range(num_frames) if direction == 1 else range(num_frames - 1, -1, -1)
        for source in order:
            joined |= query_frames == source  # points join the sweep at their query frame
            if direction == 1 and add_queries is not None and source > 0:
                new = add_queries(source, tracks[source, joined & visible[source]], lucas_kanade.window[0])
                if len(new):
                    tracks, visible, query_frames, joined = _append_queries(
                        new, source, tracks, visible, query_frames, joined
                    )
                    was_unreliable = np.concatenate([was_unreliable, np.zeros(len(new), dtype=bool)])
                    appearance.add(source, new)
            target = source + direction
            if not 0 <= target < num_frames:
                break
            indices = np.flatnonzero(joined)
            if len(indices):
                tracks[target, indices], reliable = step(source, target, tracks[source, indices])
                visible[target, indices] = appearance.seen(target, indices, tracks[target, indices])
                if redetect:
                    regained = reliable & was_unreliable[indices]
                    unsure = indices[~visible[target, indices] | regained]
                    _redetect(lucas_kanade, appearance, target, unsure, tracks, visible, query_frames)
                was_unreliable[indices] = ~reliable
    probability = np.ones(visible.shape, dtype=np.float32)  # a point is seen in its query frame
    for frame_index in range(num_frames):
        others = np.flatnonzero(query_frames != frame_index)
        probability[frame_index, others] = appearance.probability(frame_index, others, tracks[frame_index, others])
    return TrackResult(tracks, visible, query_frames, backend, probability)


def _redetect(
    lucas_kanade: _LucasKanade,
    appearance: _Appearance,
    frame_index: int,
    unsure: np.ndarray,
    tracks: np.ndarray,
    visible: np.ndarray,
    query_frames: np.ndarray,
) -> None:
    """Look for the points `unsure` in `frame_index` by LK from their query-frame patch, starting at their current
    estimate; a match within an LK window side of it that passes the forward–backward check and correlates with
    the query patch by more than `REDETECT_MIN_NCC` replaces the estimate (farther or weaker matches are mostly
    other content that happens to look alike).

    A point carried through an occlusion by its surroundings comes out a few pixels off, and chained LK would
    then follow the wrong spot for good; matching against the query frame finds it again as it reappears.
    """
    for query_frame in np.unique(query_frames[unsure]):
        points = unsure[query_frames[unsure] == query_frame]
        found, ok = lucas_kanade.checked(query_frame, frame_index, tracks[query_frame, points], REDETECT_FB_THRESHOLD,
                                         initial=tracks[frame_index, points], termination=OPENCV_TERMINATION)
        ok &= np.linalg.norm(found - tracks[frame_index, points], axis=1) <= lucas_kanade.window[0]
        ok &= _inside(found, lucas_kanade.height, lucas_kanade.width) & appearance.textured[points]
        ok[ok] = appearance.similarity(frame_index, points[ok], found[ok]) > REDETECT_MIN_NCC
        tracks[frame_index, points[ok]] = found[ok]
        visible[frame_index, points[ok]] = True


def _append_queries(
    new: np.ndarray,
    frame_index: int,
    tracks: np.ndarray,
    visible: np.ndarray,
    query_frames: np.ndarray,
    joined: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Grow the sweep's arrays by (M, 2) points queried in `frame_index`."""
    num_frames = len(tracks)
    new_visible = np.zeros((num_frames, len(new)), dtype=bool)
    new_visible[frame_index] = True
    return (
        np.concatenate([tracks, np.repeat(new[None], num_frames, axis=0)], axis=1),
        np.concatenate([visible, new_visible], axis=1),
        np.concatenate([query_frames, np.full(len(new), frame_index, dtype=np.int64)]),
        np.concatenate([joined, np.ones(len(new), dtype=bool)]),
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


class _LucasKanade:
    """Pyramidal LK between two frames of a video converted to grayscale once."""

    def __init__(self, gray: list[np.ndarray], window: int, levels: int, termination: tuple[int, float]) -> None:
        self.gray = gray
        self.window = (window, window)
        self.levels = levels
        self.termination = termination
        self.height, self.width = gray[0].shape

    @classmethod
    def for_video(cls, frames: np.ndarray, window: int, levels: int, termination: tuple[int, float]) -> _LucasKanade:
        """Check the LK settings and convert the (checked) RGB frames to grayscale once.

        The pyramids are rebuilt inside every LK call: OpenCV's Python binding rejects the output of
        `cv2.buildOpticalFlowPyramid` as LK input (opencv/opencv#4777), and at 224² building them costs less than
        the tracking itself.
        """
        if levels < 0:
            raise ValueError(f"levels must be >= 0, got {levels}")
        import cv2  # OpenCV (the `extract` extra) is needed by the LK backends only, not by given tracks

        return cls([cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames], window, levels, termination)

    def flow(
        self,
        source: int,
        target: int,
        points: np.ndarray,
        initial: np.ndarray | None = None,
        window: int | None = None,
        termination: tuple[int, float] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(n, 2) points in `source` -> their LK positions in `target` and OpenCV's success flags; `window` and
        `termination` override the video's settings for this call."""
        import cv2

        points = np.ascontiguousarray(points, dtype=np.float32).reshape(-1, 1, 2)
        flags = 0
        if initial is not None:
            initial = np.array(initial, dtype=np.float32).reshape(-1, 1, 2)
            flags = cv2.OPTFLOW_USE_INITIAL_FLOW
        moved, status, _ = cv2.calcOpticalFlowPyrLK(
            self.gray[source],
            self.gray[target],
            points,
            initial,
            winSize=self.window if window is None else (window, window),
            maxLevel=self.levels,
            criteria=(cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, *(termination or self.termination)),
            flags=flags,
        )
        return moved.reshape(-1, 2), status.reshape(-1).astype(bool)

    def step(self, source: int, target: int, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Plain LK step and OpenCV's success flags; where OpenCV gives up (no gradient, out of the pyramid) it
        still returns its estimate."""
        return self.flow(source, target, points)

    def checked(
        self,
        source: int,
        target: int,
        points: np.ndarray,
        fb_threshold: float,
        initial: np.ndarray | None = None,
        window: int | None = None,
        termination: tuple[int, float] | None = None,
        fb_per_px: float = 0.0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """LK there and back: positions in `target` and whether the round trip lands within `fb_threshold` px,
        plus `fb_per_px` per px of the step."""
        moved, forward_ok = self.flow(source, target, points, initial, window, termination)
        returned, backward_ok = self.flow(target, source, moved, points, window, termination)
        round_trip = np.linalg.norm(returned - points, axis=1)
        allowance = fb_per_px * np.linalg.norm(moved - points, axis=1) if fb_per_px else 0.0
        return moved, forward_ok & backward_ok & (round_trip <= fb_threshold + allowance)


class _SupportedStep:
    """One `support_lk` step: LK where it is reliable, else the motion of the reliable corners around the point."""

    def __init__(
        self,
        lucas_kanade: _LucasKanade,
        support_window: int | None,
        fb_threshold: float,
        num_support: int,
        support_spacing: float | None,
        appearance_choice: bool,
        fine_window: int,
        motion_coherence: bool,
        support_fb_per_px: float,
    ):
        short_side = min(lucas_kanade.height, lucas_kanade.width)
        support_window = _fast_window(0.03 * short_side) if support_window is None else support_window
        _check_window(support_window, "support_window")
        if not fb_threshold > 0:
            raise ValueError(f"fb_threshold must be > 0, got {fb_threshold}")
        if num_support < 1:
            raise ValueError(f"num_support must be >= 1, got {num_support}")
        spacing = max(3.0, short_side / 54) if support_spacing is None else support_spacing
        if not spacing > 0:
            raise ValueError(f"support_spacing must be > 0, got {support_spacing}")
        self.lucas_kanade = lucas_kanade
        self.support_window = support_window
        self.fb_threshold = fb_threshold
        self.num_support = num_support
        self.spacing = float(spacing)
        self.appearance_choice = appearance_choice
        if fine_window:
            _check_window(fine_window, "fine_window")
        self.fine_window = fine_window
        self.motion_coherence = motion_coherence
        if not support_fb_per_px >= 0:
            raise ValueError(f"support_fb_per_px must be >= 0, got {support_fb_per_px}")
        self.support_fb_per_px = support_fb_per_px

    def __call__(self, source: int, target: int, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions in `target` of the (n, 2) `points` of `source`, and whether LK itself was reliable for each."""
        import cv2

        corners = cv2.goodFeaturesToTrack(self.lucas_kanade.gray[source], self.num_support, 0.01, self.spacing)
        corners = np.empty((0, 2), np.float32) if corners is None else corners.reshape(-1, 2)
        corners_moved, reliable = self.lucas_kanade.checked(source, target, corners, self.fb_threshold,
                                                           window=self.support_window, fb_per_px=self.support_fb_per_px)
        support, steps = corners[reliable], (corners_moved - corners)[reliable]
        moved, ok = self.lucas_kanade.checked(source, target, points, self.fb_threshold)
        if self.fine_window:
            fine, fine_ok = self.lucas_kanade.checked(source, target, points, self.fb_threshold,
                                                      window=self.fine_window)
            moved, ok = np.where(fine_ok[:, None], fine, moved), ok | fine_ok
        own_steps = moved - points if self.motion_coherence else None
        prediction = points + _weighted_median_steps(points, support, steps, 2 * self.spacing, own_steps)
        keep_own = ok
        if self.appearance_choice:
            gray = self.lucas_kanade.gray
            own_cost, predicted_cost = (_patch_difference(gray[source], points, gray[target], candidate)
                                        for candidate in (moved, prediction))
            keep_own = ok | (own_cost < predicted_cost)
        return np.where(keep_own[:, None], moved, prediction), ok


def _weighted_median_steps(
    points: np.ndarray, corners: np.ndarray, steps: np.ndarray, sigma: float, own_steps: np.ndarray | None = None
) -> np.ndarray:
    """Per point, the per-axis median of the steps of its `SUPPORT_NEIGHBOURS` nearest corners, weighted by a
    Gaussian of the distance and, given the points' (n, 2) `own_steps`, by a Gaussian of each corner's step's
    difference from it (the corners moving like the point count most; where none does, distance decides alone);
    zero steps where no corner was tracked (a blank or wholly changed frame holds no evidence of motion)."""
    from scipy.spatial import cKDTree

    if len(corners) == 0:
        return np.zeros_like(points)
    count = min(SUPPORT_NEIGHBOURS, len(corners))
    distance, nearest = cKDTree(corners).query(points, k=count)
    distance, nearest = distance.reshape(len(points), count), nearest.reshape(len(points), count)
    # Relative to each point's nearest corner, so that a point far from all corners still weighs its nearest.
    weights = np.exp(-(distance**2 - distance[:, :1] ** 2) / (2 * sigma**2))
    values = steps[nearest]  # (n, count, 2): both axes sorted at once
    if own_steps is not None:
        tolerance = np.maximum(MOTION_AGREEMENT_PX, MOTION_AGREEMENT_FRACTION * np.linalg.norm(own_steps, axis=1))
        difference = ((values - own_steps[:, None]) ** 2).sum(-1)
        # A floor keeps distance deciding among corners that all disagree.
        weights = weights * np.maximum(np.exp(-difference / (2 * tolerance[:, None] ** 2)), 1e-6)
    order = np.argsort(values, axis=1)
    cumulative = np.cumsum(np.take_along_axis(np.repeat(weights[..., None], 2, axis=2), order, axis=1), axis=1)
    middle = (cumulative < cumulative[:, -1:] / 2).sum(1, keepdims=True)
    return np.take_along_axis(np.take_along_axis(values, order, axis=1), middle, axis=1)[:, 0].astype(points.dtype)


def _patch_difference(source: np.ndarray, points: np.ndarray, target: np.ndarray, moved: np.ndarray) -> np.ndarray:
    """(n,) mean squared grey-level difference between the patches around `points` in `source` and around `moved`
    in `target` (side 2 * `CHOICE_PATCH_RADIUS` + 1)."""
    import cv2

    offsets = np.arange(-CHOICE_PATCH_RADIUS, CHOICE_PATCH_RADIUS + 1, dtype=np.float32)
    dx, dy = (axis.ravel() for axis in np.meshgrid(offsets, offsets))

    def patches(gray: np.ndarray, centres: np.ndarray) -> np.ndarray:
        map_x, map_y = (centres[:, :1] + dx).astype(np.float32), (centres[:, 1:] + dy).astype(np.float32)
        return cv2.remap(gray, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE).astype(np.float32)

    return ((patches(source, points) - patches(target, moved)) ** 2).mean(axis=1)


class _Appearance:
    """Visibility from appearance: a point is seen where it lies in the image and its patch still correlates
    with the patch around it in its query frame (normalised cross-correlation above `APPEARANCE_MIN_NCC`).

    An occluder, or a track that slid off its surface, shows other content: anticorrelated, or flat where the query
    patch was textured (an untextured occluder). A flat query patch holds no appearance to compare, so such a point
    counts as seen wherever it is in the image.
    """

    def __init__(self, gray: list[np.ndarray], query_frames: np.ndarray, points: np.ndarray) -> None:
        self.gray = gray
        self.height, self.width = gray[0].shape
        radius = max(APPEARANCE_MIN_RADIUS, round(min(self.height, self.width) * APPEARANCE_RADIUS_FRACTION))
        offsets = np.arange(-radius, radius + 1, dtype=np.float32)
        self.dx, self.dy = (axis.ravel() for axis in np.meshgrid(offsets, offsets))
        self.templates, self.textured = self._templates(query_frames, points)

    def _templates(self, query_frames: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        templates = np.empty((len(points), self.dx.size), np.float32)
        for frame_index in np.unique(query_frames):
            rows = np.flatnonzero(query_frames == frame_index)
            templates[rows] = self._patches(frame_index, points[rows])
        spread = templates.std(axis=1)
        return templates - templates.mean(axis=1, keepdims=True), spread >= MIN_TEMPLATE_STD

    def add(self, frame_index: int, points: np.ndarray) -> None:
        templates, textured = self._templates(np.full(len(points), frame_index), points)
        self.templates = np.concatenate([self.templates, templates])
        self.textured = np.concatenate([self.textured, textured])

    def _patches(self, frame_index: int, points: np.ndarray) -> np.ndarray:
        import cv2

        map_x = (points[:, :1] + self.dx[None]).astype(np.float32)
        map_y = (points[:, 1:] + self.dy[None]).astype(np.float32)
        return cv2.remap(self.gray[frame_index], map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
                         ).astype(np.float32)

    def similarity(self, frame_index: int, indices: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """(n,) normalised cross-correlation of the points `indices`' query patches with the patches at `positions`
        in `frame_index`: 0 where the query patch is flat, -1 where only the patch at `positions` is (the query
        patch's texture is gone)."""
        if len(positions) == 0:
            return np.zeros(0, dtype=np.float32)
        patches = self._patches(frame_index, positions)
        flat = patches.std(axis=1) < MIN_TEMPLATE_STD
        patches -= patches.mean(axis=1, keepdims=True)
        templates = self.templates[indices]
        energy = (templates**2).sum(1) * (patches**2).sum(1)
        correlation = (templates * patches).sum(1) / np.sqrt(np.maximum(energy, 1e-6))
        return np.where(flat & self.textured[indices], -1.0, correlation).astype(np.float32)

    def probability(self, frame_index: int, indices: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """(n,) calibrated probability that the points `indices` are seen at `positions` in `frame_index`."""
        similarity = self.similarity(frame_index, indices, positions).astype(np.float64)
        slope, offset = VISIBILITY_LOGISTIC
        probability = 1 / (1 + np.exp(-(slope * similarity + offset)))
        probability = np.where(similarity == -1.0, FLAT_PATCH_SEEN, probability)
        probability = np.where(self.textured[indices], probability, FLAT_TEMPLATE_SEEN)
        return np.where(_inside(positions, self.height, self.width), probability, 0.0).astype(np.float32)

    def seen(self, frame_index: int, indices: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """(n,) whether the points `indices` are seen at `positions` in `frame_index`."""
        similar = ~self.textured[indices] | (self.similarity(frame_index, indices, positions) > APPEARANCE_MIN_NCC)
        return _inside(positions, self.height, self.width) & similar


def _default_window(short_side: int) -> int:
    """`support_lk`'s query window for an image whose shorter side is `short_side` px (see `track_points_support`)."""
    if short_side <= LARGEST_TUNED_ROWS:
        return _fast_window(0.1 * short_side)
    return _fast_side(max(FAST_WINDOWS) * short_side / LARGEST_TUNED_ROWS)


def _fast_window(side: float) -> int:
    """The LK window side in `FAST_WINDOWS` closest to `side` px."""
    return min(FAST_WINDOWS, key=lambda fast: abs(fast - side))


def _fast_side(side: float) -> int:
    """The side of 8k + 1 px (k >= 1: fast for OpenCV's LK, as `FAST_WINDOWS`) closest to `side` px."""
    return 8 * max(1, round((side - 1) / 8)) + 1


def _levels_reaching(window: int, reach: float) -> int:
    """The fewest pyramid levels whose coarsest level lets a `window`-side LK window follow a step of `reach` px
    (half a window at that level, scaled up by 2 per level)."""
    return max(1, math.ceil(math.log2(reach / (window // 2))))


def _check_window(window: int, name: str) -> None:
    if window < 3 or window % 2 == 0:
        raise ValueError(f"{name} must be an odd integer >= 3, got {window}")


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


COTRACKER_REPOSITORY = "https://github.com/facebookresearch/co-tracker"
COTRACKER_CHECKPOINT_URL = "https://huggingface.co/facebook/cotracker3/resolve/main/scaled_offline.pth"


def check_hub_tracker_files(repo_dir: str, checkpoint: str) -> None:
    """Raise FileNotFoundError, with how to get them, unless `repo_dir/hubconf.py` and `checkpoint` exist."""
    if not os.path.isfile(os.path.join(repo_dir, "hubconf.py")):
        raise FileNotFoundError(
            f"No hubconf.py in {repo_dir!r}: the tracker's code must be a local repository folder. Get it with "
            f"`git clone {COTRACKER_REPOSITORY} {repo_dir}` (then `git checkout <commit>` to pin it) and pass that folder."
        )
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(
            f"Tracker checkpoint {checkpoint!r} does not exist. Download it where the network is reachable (for "
            f"CoTracker3 offline: {COTRACKER_CHECKPOINT_URL}) and pass the local file."
        )


def load_hub_tracker(repo_dir: str, checkpoint: str, entry: str = "cotracker3_offline", **entry_options) -> Callable:
    """A `torch.hub`-style tracker (CoTracker3 by default) from a local repository folder and checkpoint file.

    Nothing is fetched at run time: `torch.hub.load(repo_dir, entry, source="local", pretrained=False)` builds the
    model from the folder's `hubconf.py`, then the state dict in `checkpoint` is loaded into it (into its `.model`
    where the entry returns a predictor wrapping the network, as CoTracker's does), strictly, so a checkpoint of
    another model fails. Pin the code by checking out a fixed commit of the repository.

    Args:
        repo_dir: folder holding `hubconf.py`, e.g. a clone of facebookresearch/co-tracker.
        checkpoint: local `.pth` file with the model's state dict (a top-level "model" entry is unwrapped).
        entry: the hubconf function to call.
        entry_options: further keyword arguments of the entry.
    """
    import torch

    check_hub_tracker_files(repo_dir, checkpoint)
    try:
        model = torch.hub.load(repo_dir, entry, source="local", pretrained=False, **entry_options)
    except Exception as error:  # a missing dependency of the repo (einops, timm...) or a renamed entry
        raise RuntimeError(
            f"Could not build the tracker {entry!r} from {repo_dir!r} ({type(error).__name__}: {error}); install the "
            "repository's own dependencies, or check that it defines this entry in hubconf.py."
        ) from error
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    network = model.model if isinstance(getattr(model, "model", None), torch.nn.Module) else model
    network.load_state_dict(state)
    return model.eval()


def track_points_cotracker(
    frames: np.ndarray, queries: np.ndarray, model: Callable, visibility_threshold: float = 0.5
) -> TrackResult:
    """Track query points with CoTracker: one joint pass over the whole clip (memory grows with T × H × W).

    Args:
        frames: (T, H, W, 3) uint8 RGB video.
        queries: (N, 3) rows (frame_index, x, y) in pixels.
        model: a loaded CoTracker predictor (`load_hub_tracker`), called as
            `model(video (1, T, 3, H, W) in [0, 255], queries=(1, N, 3))` and returning tracks (1, T, N, 2) and
            visibility (1, T, N).
        visibility_threshold: visibility scores above it count as seen.
    """
    import torch

    frames = _check_frames(frames)
    query_frames, points = _check_queries(queries, frames.shape)
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)[None].float()
    rows = np.column_stack([query_frames, points]).astype(np.float32)
    with torch.no_grad():
        tracks, visibility = model(video, queries=torch.from_numpy(rows)[None])
    tracks = tracks[0].float().cpu().numpy()
    visibility = visibility[0].float().cpu().numpy()
    if visibility.ndim == 3:  # some versions return (T, N, 1)
        visibility = visibility[..., 0]
    expected = (len(frames), len(points))
    if tracks.shape != (*expected, 2) or visibility.shape != expected:
        raise ValueError(f"CoTracker returned tracks {tracks.shape} and visibility {visibility.shape}; expected {expected}.")
    inside = _inside(tracks.reshape(-1, 2), *frames.shape[1:3]).reshape(expected)
    return TrackResult(tracks.astype(np.float32), (visibility > visibility_threshold) & inside, query_frames, "cotracker")


TRACKERS: dict[str, Callable[..., TrackResult]] = {
    "support_lk": track_points_support,
    "lk": track_points_lk,
    "cotracker": track_points_cotracker,
}
LK_BACKENDS = ("support_lk", "lk")
DEFAULT_TRACKER = "support_lk"
