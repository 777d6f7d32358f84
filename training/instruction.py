"""Does a trace model follow the instruction? Held-out procedural frames taken before the block moves, queried on
the named block and elsewhere, predicted under the true instruction and under counterfactual ones.

Every procedural push / pick-and-place episode's motion is set by its instruction (which block, which way), and at
the first sample frame the block has not moved yet, so only the words tell the direction. Per frame:

- direction: the named block's mean predicted displacement (mean over samples, steps and its points) against the
  instructed direction (the block's true displacement in the image, from that frame to the episode's end);
- moves more: the named block's points move more, on average, than the other blocks' and the table's;
- flip: with the direction word flipped (left <-> right, forward <-> backward) the predicted direction changes sign;
- colour: with another block's colour named instead, that block's points move more than the first block's.
"""

import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..dataset_builders.extraction import ExtractionSettings
from ..dataset_builders.procedural import _APPROACH_END, generate_episode, project_points

OPPOSITE_DIRECTIONS = {"left": "right", "right": "left", "forward": "backward", "backward": "forward"}
DIRECTED_SKILLS = ("push", "pick_place")  # the skills whose instruction names a direction


@dataclass
class InstructionFrame:
    """One held-out frame: the image, query pixels (N, 2) and depths (N,), which object each query lies on (0 the
    table), the named block's object id and colour, the other blocks' colours by id, the instructed direction (a
    unit vector in pixels) and the prompts (true, flipped, and one per other block's colour)."""

    episode_seed: int
    frame_index: int
    image: np.ndarray
    query_pixels: np.ndarray
    query_depth: np.ndarray
    query_objects: np.ndarray
    named_object: int
    other_blocks: dict[int, str]
    direction: np.ndarray
    prompt: str
    flipped_prompt: str
    colour_prompts: dict[int, str]


def flip_direction(prompt: str) -> str:
    """The prompt with each direction word replaced by its opposite."""
    words = "|".join(OPPOSITE_DIRECTIONS)
    flipped, count = re.subn(rf"\b({words})\b", lambda match: OPPOSITE_DIRECTIONS[match.group(1)], prompt)
    if count == 0:
        raise ValueError(f"The prompt {prompt!r} names no direction ({sorted(OPPOSITE_DIRECTIONS)}) to flip.")
    return flipped


def rename_colour(prompt: str, colour: str, other: str) -> str:
    """The prompt with the colour word `colour` replaced by `other`."""
    renamed, count = re.subn(rf"\b{colour}\b", other, prompt)
    if count == 0:
        raise ValueError(f"The prompt {prompt!r} does not name the colour {colour!r}.")
    return renamed


def instruction_frames(seeds: list[int], num_frames: int = 40, image_size: int = 64, points_per_object: int = 8,
                       frame_index: int | None = None) -> list[InstructionFrame]:
    """Render push and pick-and-place episodes (alternating by seed) and take the frame where samples start
    (`ExtractionSettings.history`), or the last one before the block starts to move if that is earlier, with up to
    `points_per_object` visible tracked points on each block and on the table. Frames where the block's motion is
    mostly along the view axis (under 2 px in the image) are left out."""
    if frame_index is None:
        frame_index = min(ExtractionSettings().history, int(_APPROACH_END * (num_frames - 1)))
    frames = []
    for seed in seeds:
        skill = DIRECTED_SKILLS[seed % len(DIRECTED_SKILLS)]
        episode = generate_episode(seed, num_frames=num_frames, image_size=image_size, task=skill)
        gripper = len(episode.object_names) - 1
        named = int(np.unique(episode.object_ids[episode.moving & (episode.object_ids != gripper)])[0])
        colour = episode.object_names[named].split()[0]
        others = {index: name.split()[0] for index, name in enumerate(episode.object_names)
                  if 0 < index < gripper and index != named}
        pixels, depth = project_points(episode.tracks_world[frame_index], episode.extrinsics[frame_index],
                                       episode.intrinsics)
        end, _ = project_points(episode.tracks_world[-1], episode.extrinsics[frame_index], episode.intrinsics)
        on_named = episode.object_ids == named
        moved = (end - pixels)[on_named].mean(0)
        start_moved = np.abs(pixels - project_points(episode.tracks_world[0], episode.extrinsics[frame_index],
                                                     episode.intrinsics)[0])[on_named].max()
        if np.linalg.norm(moved) < 2.0 or start_moved > 1.0:
            continue  # the block moves mostly along the view axis, or has already moved at this frame
        rng = np.random.default_rng(seed)
        chosen = []
        for object_id in [named, *others, 0]:
            candidates = np.flatnonzero((episode.object_ids == object_id) & episode.visible[frame_index])
            chosen.extend(rng.choice(candidates, size=min(points_per_object, candidates.size), replace=False))
        chosen = np.asarray(chosen, dtype=int)
        frames.append(InstructionFrame(
            episode_seed=seed, frame_index=frame_index, image=episode.frames[frame_index],
            query_pixels=pixels[chosen], query_depth=depth[chosen], query_objects=episode.object_ids[chosen],
            named_object=named, other_blocks=others, direction=moved / np.linalg.norm(moved), prompt=episode.task,
            flipped_prompt=flip_direction(episode.task),
            colour_prompts={index: rename_colour(episode.task, colour, other) for index, other in others.items()},
        ))
    if not frames:
        raise ValueError(f"None of the {len(seeds)} episodes gives a frame whose block moves visibly in the image: "
                         "pass more seeds.")
    return frames


def predicted_displacements(model, processor, frame: InstructionFrame, prompts: list[str], num_samples: int,
                            seed: int) -> np.ndarray:
    """Mean predicted displacement (over samples and steps) of each query, in pixels: (len(prompts), N, 2)."""
    points = np.column_stack([frame.query_pixels, frame.query_depth])
    traces = []
    for prompt in prompts:  # the same noise under every prompt: differences come from the words alone
        inputs = processor(images=frame.image, text=prompt, query_points=points)
        inputs = {key: value.to(model.device) for key, value in inputs.items()}
        with torch.no_grad():
            traces.append(model.predict_traces(**inputs, num_samples=num_samples,
                                               generator=torch.Generator().manual_seed(seed)).traces.cpu())
    traces = torch.cat(traces)
    deltas = traces[..., :2] * processor.require_delta_scale()[:2]  # normalised (u, v): 2 units per image side
    height, width = frame.image.shape[:2]
    return (deltas.mean(dim=(1, 3)) * torch.tensor([width / 2, height / 2])).numpy()


def frame_outcomes(displacements: dict[str, np.ndarray], frame: InstructionFrame) -> dict[str, float]:
    """The four checks on one frame from per-query displacements under the `true`, `flipped` and `colour:<id>`
    prompts: direction, flipped_direction, flip, moves_more (bools as 0/1) and colour (fraction of the other
    blocks that move more than the first one when named; NaN without another block)."""
    on_named = frame.query_objects == frame.named_object
    true, flipped = displacements["true"], displacements["flipped"]
    along_true = float(true[on_named].mean(0) @ frame.direction)
    along_flipped = float(flipped[on_named].mean(0) @ frame.direction)
    magnitude = np.linalg.norm(true, axis=-1)
    colour = [
        float(np.linalg.norm(displacements[f"colour:{index}"], axis=-1)[frame.query_objects == index].mean()
              > np.linalg.norm(displacements[f"colour:{index}"], axis=-1)[on_named].mean())
        for index in frame.other_blocks
    ]
    return {
        "direction": float(along_true > 0),
        "flipped_direction": float(along_flipped < 0),
        "flip": float(np.sign(along_true) != np.sign(along_flipped)),
        "moves_more": float(magnitude[on_named].mean() > magnitude[~on_named].mean()),
        "colour": float(np.mean(colour)) if colour else float("nan"),
    }


def summarise(outcomes: list[dict[str, float]]) -> dict[str, float]:
    """Rates over frames (NaN entries, e.g. colour on a one-block scene, left out), with the frame counts."""
    keys = ("direction", "flipped_direction", "flip", "moves_more", "colour")
    summary = {}
    for key in keys:
        values = np.array([outcome[key] for outcome in outcomes], dtype=float)
        values = values[np.isfinite(values)]
        summary[key] = float(values.mean()) if values.size else float("nan")
        summary[f"{key}_frames"] = int(values.size)
    return summary


def instruction_following(model, processor, frames: list[InstructionFrame], num_samples: int = 5, seed: int = 0,
                          empty_prompt: bool = False) -> dict:
    """The rates of `frame_outcomes` over `frames`; `empty_prompt` replaces every prompt by "" (the ablation)."""
    outcomes = []
    for frame in frames:
        names = ["true", "flipped", *(f"colour:{index}" for index in frame.colour_prompts)]
        prompts = [frame.prompt, frame.flipped_prompt, *frame.colour_prompts.values()]
        values = predicted_displacements(model, processor, frame, [""] * len(prompts) if empty_prompt else prompts,
                                         num_samples, seed)
        outcomes.append(frame_outcomes(dict(zip(names, values)), frame))
    return {**summarise(outcomes), "frames": len(frames)}


def format_instruction_table(results: dict[str, dict]) -> str:
    rows = (("direction accuracy", "direction"), ("direction accuracy, flipped prompt", "flipped_direction"),
            ("flips with the flipped prompt", "flip"), ("named block moves more than the rest", "moves_more"),
            ("another colour named: that block moves more", "colour"))
    methods = list(results)
    lines = ["| rate (held-out frames) | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(
            f"{results[m][key]:.2f} ({results[m][f'{key}_frames']})" for m in methods) + " |")
    return "\n".join(lines)


def draw_two_instructions(model, processor, frame: InstructionFrame, output_path: str, seed: int = 0,
                          num_samples: int = 5) -> str:
    """One frame's predicted traces under the true (left) and the flipped (right) instruction, side by side, each
    panel labelled with its prompt. Each trace is the mean of `num_samples` samples (the same noise under both
    prompts): the instruction's effect, without one sample's scatter."""
    from ..processing.visualization import draw_traces
    from .evaluation import label_panel

    points = np.column_stack([frame.query_pixels, frame.query_depth])
    prompts = [frame.prompt, frame.flipped_prompt]
    panels = []
    for prompt in prompts:  # the same noise under both prompts
        inputs = processor(images=frame.image, text=prompt, query_points=points)
        with torch.no_grad():
            prediction = model.predict_traces(**inputs, num_samples=num_samples,
                                              generator=torch.Generator().manual_seed(seed))
        mean = prediction.traces.mean(dim=1, keepdim=True)
        pixels = processor.post_process_traces(mean, inputs["query_points"], inputs["image_sizes"])["pixels"]
        panels.append(label_panel(draw_traces(frame.image, pixels[0, 0].numpy(), anchors=frame.query_pixels),
                                  f"{prompt} (mean of {num_samples})"))
    canvas = Image.new("RGB", (panels[0].width * 2 + 8, panels[0].height), (255, 255, 255))
    canvas.paste(panels[0], (0, 0))
    canvas.paste(panels[1], (panels[0].width + 8, 0))
    canvas.save(output_path + ".tmp.png")
    os.replace(output_path + ".tmp.png", output_path)
    return output_path


__all__ = [
    "InstructionFrame",
    "draw_two_instructions",
    "flip_direction",
    "format_instruction_table",
    "frame_outcomes",
    "instruction_following",
    "instruction_frames",
    "rename_colour",
    "summarise",
]
