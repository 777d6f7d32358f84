"""Instruction-following checks: counterfactual prompts, the per-frame outcomes by hand, and the held-out frames."""

import math

import numpy as np
import pytest

from mu0.training.instruction import (
    InstructionFrame,
    flip_direction,
    frame_outcomes,
    instruction_frames,
    rename_colour,
    summarise,
)


def hand_frame() -> InstructionFrame:
    """Two points on the named block (id 1), two on the table (0), two on a blue block (2); instructed: +u."""
    return InstructionFrame(
        episode_seed=0, frame_index=8, image=np.zeros((8, 8, 3), np.uint8), query_pixels=np.zeros((6, 2)),
        query_depth=np.ones(6), query_objects=np.array([1, 1, 0, 0, 2, 2]), named_object=1, other_blocks={2: "blue"},
        direction=np.array([1.0, 0.0]), prompt="push the red block to the right",
        flipped_prompt="push the red block to the left", colour_prompts={2: "push the blue block to the right"},
    )


def displacements(named, table, other) -> np.ndarray:
    return np.array([named, named, table, table, other, other], dtype=float)


def test_counterfactual_prompts():
    assert flip_direction("push the red block to the left") == "push the red block to the right"
    assert flip_direction("slide the blue block forward") == "slide the blue block backward"
    assert flip_direction("pick up the green cube and place it on the right") == "pick up the green cube and place it on the left"
    assert rename_colour("push the red block to the left", "red", "blue") == "push the blue block to the left"
    with pytest.raises(ValueError, match="names no direction"):
        flip_direction("stack the red block on the blue block")
    with pytest.raises(ValueError, match="does not name the colour"):
        rename_colour("push the red block to the left", "green", "blue")


def test_outcomes_of_a_model_that_follows_every_word():
    follows = {"true": displacements([2, 0], [0, 0.1], [0, 0]), "flipped": displacements([-2, 0], [0, 0.1], [0, 0]),
               "colour:2": displacements([0, 0], [0, 0.1], [1, 0])}
    assert frame_outcomes(follows, hand_frame()) == {"direction": 1.0, "flipped_direction": 1.0, "flip": 1.0,
                                                     "moves_more": 1.0, "colour": 1.0}


def test_outcomes_of_a_model_that_ignores_the_words():
    # the same prediction whatever the prompt: the named block moves the wrong way, the table moves most
    same = displacements([-1, 0], [0, 3], [0, 0])
    outcome = frame_outcomes({"true": same, "flipped": same, "colour:2": same}, hand_frame())
    assert outcome == {"direction": 0.0, "flipped_direction": 1.0, "flip": 0.0, "moves_more": 0.0, "colour": 0.0}


def test_summary_leaves_out_frames_without_another_block():
    outcomes = [{"direction": 1.0, "flipped_direction": 0.0, "flip": 1.0, "moves_more": 1.0, "colour": float("nan")},
                {"direction": 0.0, "flipped_direction": 0.0, "flip": 1.0, "moves_more": 1.0, "colour": 1.0}]
    summary = summarise(outcomes)
    assert summary["direction"] == 0.5 and summary["flip"] == 1.0 and summary["direction_frames"] == 2
    assert summary["colour"] == 1.0 and summary["colour_frames"] == 1
    assert math.isnan(summarise([outcomes[0]])["colour"])


def test_held_out_frames_are_taken_before_the_named_block_moves():
    frames = instruction_frames([3, 4, 5, 6], num_frames=40, image_size=64, points_per_object=4)
    assert frames
    for frame in frames:
        assert frame.frame_index == 7 and frame.prompt != frame.flipped_prompt
        assert (frame.query_objects == frame.named_object).sum() == 4 and (frame.query_objects == 0).sum() == 4
        assert np.linalg.norm(frame.direction) == pytest.approx(1.0)
        assert len(frame.colour_prompts) == len(frame.other_blocks)
        horizontal = "left" in frame.prompt or "right" in frame.prompt
        if horizontal:  # a fixed camera looks along the table: world left/right is image left/right
            assert abs(frame.direction[0]) > 0.7
            assert (frame.direction[0] > 0) == ("right" in frame.prompt)
