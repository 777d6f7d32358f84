"""Keypoint selection backends: where to start tracks, and which entity (cluster) each point belongs to."""

import numpy as np


def grid_keypoints(image_size: tuple[int, int], count: int) -> tuple[np.ndarray, np.ndarray]:
    """A regular grid of about `count` pixel positions, all in one cluster (no entity information)."""
    height, width = image_size
    rows = max(1, int(round(np.sqrt(count * height / width))))
    cols = max(1, int(np.ceil(count / rows)))
    ys = (np.arange(rows) + 0.5) * height / rows - 0.5
    xs = (np.arange(cols) + 0.5) * width / cols - 0.5
    points = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)[:count]
    return points.astype(np.float32), np.zeros(len(points), dtype=np.int64)


def kmeans(features: np.ndarray, clusters: int, rng: np.random.Generator, iterations: int = 20) -> np.ndarray:
    """Plain Lloyd's k-means (k-means++ start) returning a label per row."""
    clusters = min(clusters, len(features))
    centres = [features[rng.integers(len(features))]]
    for _ in range(1, clusters):
        distances = np.min(((features[:, None] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
        probabilities = distances / distances.sum() if distances.sum() > 0 else None
        centres.append(features[rng.choice(len(features), p=probabilities)])
    centres = np.array(centres)
    for _ in range(iterations):
        labels = ((features[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        for k in range(clusters):
            if (labels == k).any():
                centres[k] = features[labels == k].mean(0)
    return labels


def motion_keypoints(
    frames: np.ndarray, count: int, rng: np.random.Generator, num_clusters: int = 4, stride: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Flow-salient points: half drawn where Farneback flow accumulates most motion, half spread uniformly.

    Points are clustered into entities by k-means on (position, mean flow), a classical stand-in for DINO entities.
    """
    import cv2

    gray = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames[::stride]]
    height, width = gray[0].shape
    magnitude = np.zeros((height, width), dtype=np.float64)
    mean_flow = np.zeros((height, width, 2), dtype=np.float64)
    for previous, current in zip(gray[:-1], gray[1:]):
        flow = cv2.calcOpticalFlowFarneback(previous, current, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        magnitude += np.linalg.norm(flow, axis=-1)
        mean_flow += flow
    salient = count // 2 if magnitude.sum() > 0 else 0
    flat = magnitude.ravel() / magnitude.sum() if salient else None
    chosen = rng.choice(height * width, salient, replace=False, p=flat) if salient else np.empty(0, dtype=int)
    uniform = rng.choice(height * width, count - salient, replace=False)
    indices = np.concatenate([chosen, uniform])
    points = np.stack([indices % width, indices // width], axis=-1).astype(np.float32)
    flow_at = mean_flow.reshape(-1, 2)[indices] / max(len(gray) - 1, 1)
    features = np.concatenate([points / max(height, width), flow_at / (np.abs(flow_at).max() + 1e-6)], axis=-1)
    return points, kmeans(features, num_clusters, rng).astype(np.int64)


__all__ = ["grid_keypoints", "motion_keypoints", "kmeans"]
