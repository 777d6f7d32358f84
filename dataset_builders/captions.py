"""Hierarchical captions: one per motion chunk in three instruction styles, merged into pairs, triples and the whole.

At training time a sample at frame t draws one caption whose frame range covers t, so a model sees both fine
("lift it") and coarse ("pick up the cube and place it on the right") instructions.
"""

from dataclasses import asdict, dataclass

import numpy as np

STYLES = ("descriptive", "imperative", "casual")


@dataclass
class Caption:
    text: str
    style: str
    level: str
    start: int
    end: int

    def to_dict(self) -> dict:
        return asdict(self)


def describe_motion(uvz: np.ndarray, valid: np.ndarray) -> dict[str, str]:
    """Structured motion descriptors of the moving points in one chunk: direction, depth change and skill."""
    if not valid.any():
        return {"direction": "still", "depth": "", "skill": "hold"}
    first = np.argmax(valid, axis=0)
    last = valid.shape[0] - 1 - np.argmax(valid[::-1], axis=0)
    points = np.arange(uvz.shape[1])
    delta = (uvz[last, points] - uvz[first, points])[valid.any(0)].mean(0)
    heights = -uvz[..., 1]
    rise = np.where(valid, heights, -np.inf).max(axis=0) - heights[first, points]
    horizontal = "right" if delta[0] > 0 else "left"
    vertical = "down" if delta[1] > 0 else "up"
    direction = horizontal if abs(delta[0]) >= abs(delta[1]) else vertical
    depth = "toward the camera" if delta[2] < -0.02 else "away from the camera" if delta[2] > 0.02 else ""
    mean_rise = rise[valid.any(0)].mean()
    lifted = mean_rise > 0.1 and abs(delta[1]) < mean_rise
    skill = "pick and place" if lifted else "lift" if direction == "up" else "push" if direction in ("left", "right") else "lower"
    return {"direction": direction, "depth": depth, "skill": skill}


def chunk_captions(descriptor: dict[str, str], actor: str, start: int, end: int) -> list[Caption]:
    direction = descriptor["direction"]
    toward = f" {descriptor['depth']}" if descriptor["depth"] else ""
    if descriptor["skill"] == "pick and place":
        texts = (
            f"{actor.capitalize()} is picked up and placed further {direction}{toward}.",
            f"Pick up {actor} and place it to the {direction}.",
            f"grab {actor} and put it {direction}",
        )
    else:
        texts = (
            f"{actor.capitalize()} moves {direction}{toward}.",
            f"{descriptor['skill'].capitalize()} {actor} {direction}{toward}.",
            f"move {actor} {direction}",
        )
    return [Caption(text, style, "chunk", start, end) for text, style in zip(texts, STYLES)]


def merge_captions(chunks: list[list[Caption]]) -> list[Caption]:
    """Join consecutive chunk captions (per style) into pair, triple and whole-segment captions."""
    merged = []
    for size, level in ((2, "pair"), (3, "triple")):
        for first in range(len(chunks) - size + 1):
            group = chunks[first : first + size]
            merged.extend(_join(group, style_index, level) for style_index in range(len(STYLES)))
    if len(chunks) > 3:
        merged.extend(_join(chunks, style_index, "segment") for style_index in range(len(STYLES)))
    return merged


def _join(group: list[list[Caption]], style_index: int, level: str) -> Caption:
    parts = [captions[style_index].text.rstrip(".") for captions in group]
    style = STYLES[style_index]
    text = ", then ".join(parts[:1] + [p[0].lower() + p[1:] for p in parts[1:]])
    text = text + ("." if style != "casual" else "")
    return Caption(text, style, level, group[0][0].start, group[-1][0].end)


def template_captions(events: list[tuple[int, int]], uvz: np.ndarray, valid: np.ndarray, moving: np.ndarray) -> list[Caption]:
    """Captions from motion descriptors alone (no language model): who moved, where, how."""
    actor = "the object"
    chunks = [
        chunk_captions(describe_motion(uvz[start:end][:, moving], valid[start:end][:, moving]), actor, start, end)
        for start, end in events
    ]
    return [caption for captions in chunks for caption in captions] + merge_captions(chunks)


def given_captions(task: str | None, num_frames: int) -> list[Caption]:
    if not task:
        raise ValueError("captions='given' but the episode has no text: use captions='template' or 'vlm'.")
    return [Caption(task, "descriptive", "segment", 0, num_frames)]


def covering(captions: list[dict], frame: int) -> list[dict]:
    """Captions whose frame range [start, end) covers `frame`."""
    return [caption for caption in captions if caption["start"] <= frame < caption["end"]]


__all__ = ["Caption", "STYLES", "covering", "describe_motion", "given_captions", "merge_captions", "template_captions"]
