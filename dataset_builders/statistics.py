"""Normalisation statistics for `Mu0Processor`, accumulated while samples are produced (no second pass over video)."""

import json
import os
import tempfile

import numpy as np

STATISTICS_FILE = "trace_statistics.json"


class TraceStatistics:
    """Per-axis 95th percentile of |future - anchor| (u, v normalised to [-1, 1], z in metres), log-depth p1/p99,
    and the range of the frames seen (mean intensity p1/p99, sizes), against which the processor checks its inputs.

    Log depth comes from a sample's depth map, or, for sources that give metric 3D points but no depth map (EgoDex's
    hand joints), from its query points' depths: the only depths such a dataset knows. Percentiles are computed on a
    bounded random reservoir so memory stays flat over large datasets.
    """

    def __init__(self, reservoir_size: int = 200_000, seed: int = 0):
        self.reservoir_size = reservoir_size
        self.rng = np.random.default_rng(seed)
        self.deltas: list[np.ndarray] = []
        self.log_depths: list[np.ndarray] = []
        self.images: list[np.ndarray] = []  # (1, 3) per frame: mean intensity in [0, 1], height, width

    def _keep(self, values: np.ndarray) -> np.ndarray:
        if len(values) > self.reservoir_size // 10:
            values = values[self.rng.choice(len(values), self.reservoir_size // 10, replace=False)]
        return values

    def add(self, query_uv, query_z, future, future_valid, image_size: tuple[int, int], depth=None, image=None) -> None:
        """One sample: pixel anchors (N, 2), depths (N,), future (N, H, 3) pixels + z, validity (N, H), (height, width),
        and optionally the depth map (None: the anchors' depths stand for it) and the uint8 RGB frame (for the
        ranges the processor checks inputs against)."""
        height, width = image_size
        if image is not None:
            self.images.append(np.array([[np.asarray(image, dtype=np.float64).mean() / 255.0, height, width]]))
        scale = np.array([2.0 / width, 2.0 / height, 1.0])
        anchors = np.concatenate([np.asarray(query_uv), np.asarray(query_z)[:, None]], axis=-1)
        delta = (np.asarray(future) - anchors[:, None, :]) * scale
        valid = np.asarray(future_valid, dtype=bool) & np.isfinite(delta).all(-1)
        self.deltas.append(self._keep(np.abs(delta[valid])))
        depth = np.asarray(query_z if depth is None else depth, dtype=np.float64)
        positive = depth[np.isfinite(depth) & (depth > 1e-3)]
        if positive.size:
            self.log_depths.append(self._keep(np.log(positive)))

    def compute(self) -> dict[str, list[float]]:
        if not self.deltas or not sum(len(d) for d in self.deltas):
            raise ValueError("No valid future steps were seen: cannot compute delta_scale.")
        deltas = np.concatenate(self.deltas)
        scale = np.percentile(deltas, 95, axis=0)
        if (scale <= 0).any():
            raise ValueError(f"delta_scale has a zero axis ({scale.tolist()}): the data contains no motion on it.")
        statistics = {"delta_scale": [float(value) for value in scale]}
        log_depths = np.concatenate(self.log_depths) if self.log_depths else np.zeros(0)
        if log_depths.size:  # reservoirs loaded from episodes without positive depths are empty
            statistics["depth_log_range"] = [float(np.percentile(log_depths, 1)), float(np.percentile(log_depths, 99))]
        if self.images:
            images = np.concatenate(self.images)
            statistics["image_ranges"] = {
                "mean_intensity": [float(np.percentile(images[:, 0], 1)), float(np.percentile(images[:, 0], 99))],
                "height": [int(images[:, 1].min()), int(images[:, 1].max())],
                "width": [int(images[:, 2].min()), int(images[:, 2].max())],
            }
        return statistics


def save_reservoirs(statistics: TraceStatistics, path: str) -> None:
    """One episode's reservoirs as `<episode_id>.npz`, atomically: the temp file is `<name>.<random>.tmp` beside it,
    so a kill leaves no file that `load_reservoirs` would read and the builder can find its orphans by name."""
    deltas = np.concatenate(statistics.deltas) if statistics.deltas else np.zeros((0, 3))
    log_depths = np.concatenate(statistics.log_depths) if statistics.log_depths else np.zeros(0)
    images = np.concatenate(statistics.images) if statistics.images else np.zeros((0, 3))
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp", delete=False) as handle:
        np.savez(handle, deltas=deltas, log_depths=log_depths, images=images)
    os.replace(handle.name, path)


def load_reservoirs(statistics: TraceStatistics, path: str) -> None:
    """Add an episode's saved reservoirs to `statistics`."""
    with np.load(path) as data:
        statistics.deltas.append(data["deltas"])
        statistics.log_depths.append(data["log_depths"])
        if "images" in data and len(data["images"]):  # absent from reservoirs saved before frame ranges
            statistics.images.append(data["images"])


def save_statistics(statistics: dict, directory: str) -> str:
    """Write `trace_statistics.json` atomically (temp file + rename)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, STATISTICS_FILE)
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as handle:
        json.dump(statistics, handle, indent=2)
    os.replace(handle.name, path)
    return path


def load_statistics(directory: str) -> dict:
    """Read `trace_statistics.json` from a local folder, or from a Hub dataset repo when no such folder exists."""
    if not os.path.isdir(directory):
        from huggingface_hub import hf_hub_download

        with open(hf_hub_download(directory, STATISTICS_FILE, repo_type="dataset")) as handle:
            return json.load(handle)
    path = os.path.join(directory, STATISTICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No {STATISTICS_FILE} in {directory}: save the dataset with its statistics first.")
    with open(path) as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}): the file is truncated or corrupt; save the "
                             "dataset with its statistics again.") from None


__all__ = ["TraceStatistics", "save_statistics", "load_statistics", "save_reservoirs", "load_reservoirs", "STATISTICS_FILE"]
