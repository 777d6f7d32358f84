"""Tests for `Mu0Processor` / `Mu0ImageProcessor`: every expected value below is derived by hand, not by the code."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import math
import string

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from mu0 import Mu0ImageProcessor, Mu0Processor, build_character_tokenizer
from mu0.processing import render_depth, turbo_colormap

W, H = 128, 96  # width, height of the reference image
DELTA_SCALE = [0.1, 0.1, 0.05]
DEPTH_LOG_RANGE = [-1.0, 1.5]
MAX_PROMPT = 24
MAX_QUERIES = 8
HORIZON = 32  # processor default
HISTORY = 8  # processor default

# The character tokenizer's documented vocabulary: <pad>=0, <unk>=1, then these characters in order.
CHARACTERS = string.ascii_letters + string.digits + string.punctuation + " \n"
PAD_ID = 0

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Turbo polynomial (Mikhailov 2019) evaluated by hand: at 0 the constant terms; at 1 the clipped row sums
#   R: 0.13572138 + 4.61539260 - 42.66032258 + 132.13108234 - 152.94239396 + 59.28637943 = 0.56585921
#   G: 0.09140261 + 2.19418839 + 4.84296658 - 14.18503333 + 4.27729857 + 2.82956604 = 0.05038886
#   B: 0.10667330 + 12.64194608 - 60.58204836 + 110.36276771 - 89.90310912 + 27.34824973 = -0.02552066 -> 0
TURBO_AT_0 = np.array([0.13572138, 0.09140261, 0.10667330])
TURBO_AT_1 = np.array([0.56585921, 0.05038886, 0.0])


def make_processor(**overrides) -> Mu0Processor:
    settings = dict(
        delta_scale=DELTA_SCALE, depth_log_range=DEPTH_LOG_RANGE, max_prompt_length=MAX_PROMPT, max_queries=MAX_QUERIES
    )
    settings.update(overrides)
    return Mu0Processor(
        Mu0ImageProcessor(image_size=64, dino_image_size=56), build_character_tokenizer(), **settings
    )


@pytest.fixture()
def proc() -> Mu0Processor:
    return make_processor()


def blank(width: int = W, height: int = H, value: int = 0) -> np.ndarray:
    return np.full((height, width, 3), value, dtype=np.uint8)


def char_ids(text: str) -> list[int]:
    return [2 + CHARACTERS.index(character) for character in text]


def tokens(processor: Mu0Processor, ids: torch.Tensor) -> list[str]:
    return processor.tokenizer.convert_ids_to_tokens(ids.tolist())


# ------------------------------------------------------------------------------------------------ query points
def test_pixel_to_normalized_corners_and_centre(proc):
    # OpenCV convention: pixel centres at integers, the image spans [-0.5, W - 0.5] x [-0.5, H - 0.5]
    points = np.array([[-0.5, -0.5], [127.5, 95.5], [63.5, 47.5], [31.5, 71.5], [0.0, 0.0], [64.0, 48.0]])
    batch = proc(images=blank(), query_points=points)
    # u = 2(x + 0.5)/W - 1, v = 2(y + 0.5)/H - 1:
    #   outer edges (-0.5, -0.5) -> (-1, -1) and (127.5, 95.5) -> (256/128 - 1, 192/96 - 1) = (1, 1)
    #   (63.5, 47.5) -> (128/128 - 1, 96/96 - 1) = (0, 0); (31.5, 71.5) -> (64/128 - 1, 144/96 - 1) = (-0.5, 0.5)
    #   first pixel centre (0, 0) -> (1/128 - 1, 1/96 - 1) = (-0.9921875, -0.98958333)
    #   pixel centre (64, 48) -> (129/128 - 1, 97/96 - 1) = (0.0078125, 0.01041667)
    expected = torch.tensor(
        [[[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0], [-0.5, 0.5], [-127 / 128, -95 / 96], [1 / 128, 1 / 96]]]
    )
    torch.testing.assert_close(batch["query_points"], expected, atol=1e-6, rtol=0)
    assert batch["query_mask"].tolist() == [[True, True, True, True, True, True]]
    assert "query_depth" not in batch


def test_points_normalized_pass_through(proc):
    points = np.array([[-0.5, 0.25], [1.0, -1.0], [0.125, 0.0]])
    batch = proc(images=blank(), query_points=points, points_normalized=True)
    torch.testing.assert_close(
        batch["query_points"], torch.tensor([[[-0.5, 0.25], [1.0, -1.0], [0.125, 0.0]]]), atol=1e-7, rtol=0
    )


def test_query_mask_pads_shorter_samples_and_image_sizes_are_height_width(proc):
    points = [np.array([[-0.5, -0.5], [63.5, 47.5], [127.5, 95.5]]), np.array([[15.5, 11.5]])]
    batch = proc(images=[blank(), blank(width=64, height=48)], query_points=points)
    assert batch["query_mask"].tolist() == [[True, True, True], [True, False, False]]
    # first image 128x96: u = 2(x + 0.5)/128 - 1 -> -1, 0, 1 (and likewise v)
    # second image is W=64, H=48: (15.5, 11.5) -> (32/64 - 1, 24/48 - 1) = (-0.5, -0.5)
    #   (on a 128x96 image it would be (-0.75, -0.75)); padding stays zero
    torch.testing.assert_close(
        batch["query_points"],
        torch.tensor([[[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]], [[-0.5, -0.5], [0.0, 0.0], [0.0, 0.0]]]),
        atol=1e-6,
        rtol=0,
    )
    assert batch["image_sizes"].tolist() == [[96, 128], [48, 64]]


def test_image_sizes_for_pil_and_channel_first_tensor(proc):
    pil = Image.fromarray(blank())  # PIL .size is (width, height)
    tensor = torch.zeros(3, H, W)
    # the bottom-right image corner (W - 0.5, H - 0.5) -> (2*128/128 - 1, 2*96/96 - 1) = (1, 1)
    batch = proc(images=[pil, tensor], query_points=[np.array([[127.5, 95.5]]), np.array([[127.5, 95.5]])])
    assert batch["image_sizes"].tolist() == [[96, 128], [96, 128]]
    torch.testing.assert_close(batch["query_points"], torch.ones(2, 1, 2))


def test_query_depth_is_third_column(proc):
    batch = proc(images=blank(), query_points=np.array([[0.0, 0.0, 1.25], [64.0, 48.0, 2.5]]))
    torch.testing.assert_close(batch["query_depth"], torch.tensor([[1.25, 2.5]]))
    # (0, 0) -> (1/128 - 1, 1/96 - 1); (64, 48) -> (129/128 - 1, 97/96 - 1) = (1/128, 1/96)
    torch.testing.assert_close(
        batch["query_points"], torch.tensor([[[-127 / 128, -95 / 96], [1 / 128, 1 / 96]]]), atol=1e-6, rtol=0
    )


# -------------------------------------------------------------------------------------------- future / history
ANCHOR = np.array([40.0, 30.0, 1.5])  # x, y pixels; z metres
STEP = np.array([2.0, -1.5, 0.02])  # dx, dy pixels; dz metres per step


def future_track(length: int = HORIZON) -> np.ndarray:
    k = np.arange(1, length + 1)[:, None]
    return ANCHOR + k * STEP  # (length, 3)


def history_track(length: int = HISTORY) -> np.ndarray:
    k = np.arange(1, length + 1)[:, None]
    return ANCHOR - k * STEP


def hand_deltas(k: np.ndarray, width: float, height: float) -> np.ndarray:
    """((2 dx / W k) / 0.1, (2 dy / H k) / 0.1, (dz k) / 0.05) for signed step counts k."""
    k = np.asarray(k, dtype=np.float64)[:, None]
    return np.concatenate(
        [2 * STEP[0] / width * k / 0.1, 2 * STEP[1] / height * k / 0.1, STEP[2] * k / 0.05], axis=-1
    )


def test_future_labels_are_hand_computed_deltas(proc):
    future = future_track()[None]  # (1, H, 3)
    batch = proc(
        images=blank(),
        query_points=ANCHOR[None],
        future=future,
        future_mask=np.ones((1, HORIZON), dtype=bool),
    )
    labels = batch["labels"]
    assert labels.shape == (1, 1, HORIZON, 3)
    assert batch["labels_mask"].shape == (1, 1, HORIZON) and bool(batch["labels_mask"].all())
    # step 1 on 128x96: (2*2/128/0.1, 2*-1.5/96/0.1, 0.02/0.05) = (0.3125, -0.3125, 0.4)
    torch.testing.assert_close(labels[0, 0, 0], torch.tensor([0.3125, -0.3125, 0.4]), atol=1e-5, rtol=0)
    expected = hand_deltas(np.arange(1, HORIZON + 1), W, H)
    torch.testing.assert_close(labels[0, 0], torch.tensor(expected, dtype=torch.float32), atol=1e-4, rtol=1e-5)
    # the last step: 32 * (0.3125, -0.3125, 0.4) = (10, -10, 12.8)
    torch.testing.assert_close(labels[0, 0, -1], torch.tensor([10.0, -10.0, 12.8]), atol=1e-4, rtol=0)


def test_future_uses_each_samples_own_image_size_and_pads(proc):
    small_w, small_h = 64, 48
    futures = [np.stack([future_track(), future_track()]), future_track()[None]]
    masks = [np.ones((2, HORIZON), dtype=bool), np.ones((1, HORIZON), dtype=bool)]
    batch = proc(
        images=[blank(), blank(width=small_w, height=small_h)],
        query_points=[np.stack([ANCHOR, ANCHOR]), ANCHOR[None]],
        future=futures,
        future_mask=masks,
    )
    steps = np.arange(1, HORIZON + 1)
    torch.testing.assert_close(batch["labels"][0, 1], torch.tensor(hand_deltas(steps, W, H), dtype=torch.float32),
                               atol=1e-4, rtol=1e-5)
    # 64x48 image: step 1 = (2*2/64/0.1, 2*-1.5/48/0.1, 0.4) = (0.625, -0.625, 0.4)
    torch.testing.assert_close(batch["labels"][1, 0, 0], torch.tensor([0.625, -0.625, 0.4]), atol=1e-5, rtol=0)
    # padded query slot of sample 1: zeros, all invalid
    assert torch.count_nonzero(batch["labels"][1, 1]) == 0
    assert not batch["labels_mask"][1, 1].any()
    assert batch["labels_mask"][1, 0].all() and batch["labels_mask"][0].all()


def test_invalid_future_steps_give_zero_labels_and_false_mask(proc):
    future = future_track()
    mask = np.ones(HORIZON, dtype=bool)
    mask[2] = False  # explicitly masked
    future[4, 0] = np.nan  # NaN x
    future[6, 2] = np.nan  # NaN z only
    future[8, 1] = np.inf  # inf y
    batch = proc(images=blank(), query_points=ANCHOR[None], future=future[None], future_mask=mask[None])
    invalid = [2, 4, 6, 8]
    expected_mask = [index not in invalid for index in range(HORIZON)]
    assert batch["labels_mask"][0, 0].tolist() == expected_mask
    assert torch.isfinite(batch["labels"]).all()
    for index in invalid:
        assert batch["labels"][0, 0, index].tolist() == [0.0, 0.0, 0.0]
    # a valid neighbour keeps its hand value: step 4 (index 3) = 4 * (0.3125, -0.3125, 0.4)
    torch.testing.assert_close(batch["labels"][0, 0, 3], torch.tensor([1.25, -1.25, 1.6]), atol=1e-5, rtol=0)


def test_history_goes_to_history_and_history_mask(proc):
    history = history_track()
    mask = np.ones(HISTORY, dtype=bool)
    mask[1] = False
    history[5, 1] = np.nan
    batch = proc(images=blank(), query_points=ANCHOR[None], history=history[None], history_mask=mask[None])
    assert "labels" not in batch and "labels_mask" not in batch
    assert batch["history"].shape == (1, 1, HISTORY, 3)
    # oldest first, anchor-relative and unscaled ((u, v) units and metres), as the released history token reads it
    expected = hand_deltas(-np.arange(HISTORY, 0, -1), W, H) * np.array(DELTA_SCALE)  # anchor - k * step
    expected[[HISTORY - 2, HISTORY - 6]] = 0.0
    torch.testing.assert_close(batch["history"][0, 0], torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=0)
    # most recent past step, last: (-0.3125, 0.3125, -0.4) in delta units of (0.1, 0.1, 0.05)
    torch.testing.assert_close(batch["history"][0, 0, -1], torch.tensor([-0.03125, 0.03125, -0.02]), atol=1e-5, rtol=0)
    assert batch["history_mask"][0, 0].tolist() == [i not in (HISTORY - 2, HISTORY - 6) for i in range(HISTORY)]


def test_normalized_future_is_divided_by_scale_only(proc):
    # in normalised units: anchor (0.2, -0.4, 1.0), each step (+0.01, +0.02, -0.005)
    anchor = np.array([0.2, -0.4, 1.0])
    step = np.array([0.01, 0.02, -0.005])
    future = anchor + np.arange(1, HORIZON + 1)[:, None] * step
    batch = proc(
        images=blank(),
        query_points=anchor[None],
        points_normalized=True,
        future=future[None],
        future_mask=np.ones((1, HORIZON), dtype=bool),
    )
    # step 1: (0.01/0.1, 0.02/0.1, -0.005/0.05) = (0.1, 0.2, -0.1)
    torch.testing.assert_close(batch["labels"][0, 0, 0], torch.tensor([0.1, 0.2, -0.1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(batch["labels"][0, 0, 9], torch.tensor([1.0, 2.0, -1.0]), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ round trip
def test_round_trip_recovers_future_pixels_depth_and_xyz(proc):
    anchors = [np.array([[40.0, 30.0, 1.5], [100.0, 80.0, 0.8]]), np.array([[10.0, 20.0, 2.0]])]
    steps = [np.array([[2.0, -1.5, 0.02], [-1.0, 0.5, 0.01]]), np.array([[0.5, 0.25, -0.03]])]
    k = np.arange(1, HORIZON + 1)[None, :, None]
    futures = [a[:, None] + k * s[:, None] for a, s in zip(anchors, steps)]
    masks = [np.ones(f.shape[:2], dtype=bool) for f in futures]
    batch = proc(
        images=[blank(), blank(width=64, height=48)],
        query_points=anchors,
        future=futures,
        future_mask=masks,
    )
    batch_size, num_queries = batch["labels"].shape[:2]
    traces = batch["labels"].reshape(batch_size, 1, num_queries, HORIZON, 3)

    # intrinsics chosen by hand for each image
    fx, fy, cx, cy = [100.0, 50.0], [120.0, 60.0], [64.0, 32.0], [48.0, 24.0]
    intrinsics = torch.zeros(2, 3, 3)
    for b in range(2):
        intrinsics[b] = torch.tensor([[fx[b], 0.0, cx[b]], [0.0, fy[b], cy[b]], [0.0, 0.0, 1.0]])

    out = proc.post_process_traces(
        traces, batch["query_points"], batch["image_sizes"], query_depth=batch["query_depth"], intrinsics=intrinsics
    )
    assert out["pixels"].shape == (2, 1, num_queries, HORIZON, 2)
    assert out["xyz"].shape == (2, 1, num_queries, HORIZON, 3)
    for b, future in enumerate(futures):
        n = len(future)
        torch.testing.assert_close(
            out["pixels"][b, 0, :n], torch.tensor(future[..., :2], dtype=torch.float32), atol=2e-3, rtol=0
        )
        torch.testing.assert_close(
            out["uvz"][b, 0, :n, :, 2], torch.tensor(future[..., 2], dtype=torch.float32), atol=1e-5, rtol=0
        )
        x, y, z = future[..., 0], future[..., 1], future[..., 2]
        xyz = np.stack([(x - cx[b]) / fx[b] * z, (y - cy[b]) / fy[b] * z, z], axis=-1)
        torch.testing.assert_close(out["xyz"][b, 0, :n], torch.tensor(xyz, dtype=torch.float32), atol=1e-4, rtol=0)

    # one point by hand: sample 0, query 0, step 1 -> pixel (42, 28.5), z 1.52
    #   xyz = ((42 - 64)/100 * 1.52, (28.5 - 48)/120 * 1.52, 1.52) = (-0.3344, -0.247, 1.52)
    torch.testing.assert_close(out["pixels"][0, 0, 0, 0], torch.tensor([42.0, 28.5]), atol=1e-3, rtol=0)
    torch.testing.assert_close(out["xyz"][0, 0, 0, 0], torch.tensor([-0.3344, -0.247, 1.52]), atol=1e-5, rtol=0)


def test_post_process_without_depth_gives_pixels_only(proc):
    traces = torch.zeros(1, 1, 1, 4, 3)
    traces[0, 0, 0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # u deltas of 0.1 per unit
    out = proc.post_process_traces(traces, torch.tensor([[[0.0, 0.0]]]), torch.tensor([[H, W]]))
    # u = 0 + 0.1k -> x = (0.1k + 1) / 2 * 128 - 0.5 = 63.5 + 6.4k; v stays 0 -> y = 96/2 - 0.5 = 47.5
    expected = torch.tensor([[69.9, 47.5], [76.3, 47.5], [82.7, 47.5], [89.1, 47.5]])
    torch.testing.assert_close(out["pixels"][0, 0, 0], expected, atol=1e-4, rtol=0)
    assert "xyz" not in out
    with pytest.raises(ValueError, match="query_depth"):
        proc.post_process_traces(
            traces, torch.tensor([[[0.0, 0.0]]]), torch.tensor([[H, W]]), intrinsics=torch.eye(3)[None]
        )


@pytest.mark.parametrize("focal", [0.0, -100.0])
def test_post_process_refuses_non_positive_focal_lengths(proc, focal):
    """fx = fy = 0 gave Infinity in `xyz_m`; negative ones mirrored the traces."""
    intrinsics = torch.tensor([[[focal, 0.0, 64.0], [0.0, focal, 48.0], [0.0, 0.0, 1.0]]])
    with pytest.raises(ValueError, match="positive focal lengths"):
        proc.post_process_traces(torch.zeros(1, 1, 1, 4, 3), torch.zeros(1, 1, 2), torch.tensor([[H, W]]),
                                 query_depth=torch.ones(1, 1), intrinsics=intrinsics)


def test_a_nested_list_of_points_is_one_images_points(proc):
    """`query_points=[[40, 50], [60, 30]]` for one image was read as two images' points."""
    as_list = proc(images=blank(), query_points=[[40.0, 50.0], [60.0, 30.0]])
    as_array = proc(images=blank(), query_points=np.array([[40.0, 50.0], [60.0, 30.0]]))
    assert as_list["query_points"].shape == (1, 2, 2)
    torch.testing.assert_close(as_list["query_points"], as_array["query_points"])
    one = proc(images=blank(), query_points=[[40.0, 50.0]], cluster_ids=[3])
    assert one["query_points"].shape == (1, 1, 2)
    with pytest.raises(ValueError, match="2 entries in `query_points` for 3 images"):
        proc(images=[blank()] * 3, query_points=[[40.0, 50.0], [60.0, 30.0]])


def test_prompts_the_model_cannot_read_in_full_warn(proc, caplog):
    """A long prompt was cut to max_prompt_length tokens, and characters unknown to the tokenizer became <unk>,
    silently, while `traces.json` recorded the full prompt."""
    with caplog.at_level("WARNING", logger="mu0.processing.processing_mu0"):
        proc(images=blank(), text="x" * 10_000, query_points=np.ones((1, 2)))
        proc(images=blank(), text="déplacer la tasse", query_points=np.ones((1, 2)))
        proc(images=blank(), text="push it", query_points=np.ones((1, 2)))
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert f"10007 tokens long; the model reads only the first {MAX_PROMPT}" in messages[0]
    assert "1 of the prompt's 24 tokens are unknown" in messages[1]


def test_training_batches_report_a_cut_prompt_once_per_processor(proc, caplog):
    """Merged training captions often run past the window: one line per batch buried the training log, while
    inference calls keep reporting every time."""
    future, mask = future_track()[None], np.ones((1, HORIZON), dtype=bool)
    with caplog.at_level("WARNING", logger="mu0.processing.processing_mu0"):
        for _ in range(3):
            proc(images=blank(), text="x" * 200, query_points=ANCHOR[None], future=future, future_mask=mask)
        training_messages = [record.getMessage() for record in caplog.records]
        proc(images=blank(), text="x" * 200, query_points=ANCHOR[None])
        proc(images=blank(), text="x" * 200, query_points=ANCHOR[None])
    assert len(training_messages) == 1 and "reported once per processor while training" in training_messages[0]
    assert len(caplog.records) == 3


# ------------------------------------------------------------------------------------------------ statistics
def test_missing_delta_scale_raises_for_future_history_and_post_process():
    proc = make_processor(delta_scale=None)
    # plain inference inputs still work
    assert proc(images=blank(), query_points=ANCHOR[None])["query_depth"].tolist() == [[1.5]]
    with pytest.raises(ValueError, match="delta_scale"):
        proc(images=blank(), query_points=ANCHOR[None], future=future_track()[None],
             future_mask=np.ones((1, HORIZON), dtype=bool))
    with pytest.raises(ValueError, match="delta_scale"):
        proc(images=blank(), query_points=ANCHOR[None], history=history_track()[None],
             history_mask=np.ones((1, HISTORY), dtype=bool))
    with pytest.raises(ValueError, match="delta_scale"):
        proc.post_process_traces(torch.zeros(1, 1, 1, 4, 3), torch.zeros(1, 1, 2), torch.tensor([[H, W]]))


def test_missing_depth_log_range_raises_when_depth_given():
    proc = make_processor(depth_log_range=None)
    assert "depth_pixel_values" not in proc(images=blank(), query_points=np.array([[1.0, 1.0]]))
    with pytest.raises(ValueError, match="depth_log_range"):
        proc(images=blank(), query_points=np.array([[1.0, 1.0]]), depth=np.ones((H, W)))


@pytest.mark.parametrize(
    "overrides, name",
    [
        (dict(delta_scale=[0.1, -0.1, 0.05]), "delta_scale"),
        (dict(delta_scale=[0.1, 0.0, 0.05]), "delta_scale"),
        (dict(delta_scale=[0.1, 0.1]), "delta_scale"),
        (dict(delta_scale=[0.1, float("nan"), 0.05]), "delta_scale"),
        (dict(depth_log_range=[1.5, -1.0]), "depth_log_range"),
        (dict(depth_log_range=[1.0, 1.0]), "depth_log_range"),
        (dict(depth_log_range=[1.0]), "depth_log_range"),
    ],
)
def test_invalid_statistics_raise_at_construction(overrides, name):
    with pytest.raises(ValueError, match=name):
        make_processor(**overrides)


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "points, message",
    [
        (np.array([[1.0, np.nan]]), "NaN or inf"),
        (np.array([[np.inf, 1.0]]), "NaN or inf"),
        (np.array([[1.0, 1.0, np.nan]]), "NaN or inf"),
        (np.zeros((0, 2)), "no query points"),
        (np.ones((MAX_QUERIES + 1, 2)), "max_queries=8"),
        (np.ones((2, 4)), r"\(N, 2\) or \(N, 3\)"),
    ],
)
def test_bad_query_points_raise(proc, points, message):
    with pytest.raises(ValueError, match=message):
        proc(images=blank(), query_points=points)


def test_max_queries_is_inclusive(proc):
    batch = proc(images=blank(), query_points=np.ones((MAX_QUERIES, 2)))
    assert batch["query_mask"].shape == (1, MAX_QUERIES) and bool(batch["query_mask"].all())


@pytest.mark.parametrize(
    "outside",
    # the 128x96 image spans [-0.5, 127.5] x [-0.5, 95.5]: x = W -> u = 1 + 1/128, x = -0.6 -> u = -1 - 0.2/128
    [[128.5, 10.0], [128.0, 10.0], [-0.6, 10.0], [10.0, 96.5], [10.0, 96.0], [10.0, -0.6], [10.0, -1.0]],
)
def test_points_outside_image_name_the_sample(proc, outside):
    # the boundary points (-0.5, -0.5) -> (-1, -1) and (W - 0.5, H - 0.5) -> (1, 1) are inside: only point 1 of
    # sample 1 may be named
    points = [np.array([[-0.5, -0.5]]), np.array([[127.5, 95.5], outside])]
    with pytest.raises(ValueError, match="Query point 1 of sample 1") as error:
        proc(images=[blank(), blank()], query_points=points)
    assert "128x96" in str(error.value)


def test_normalized_points_outside_range_raise(proc):
    with pytest.raises(ValueError, match="sample 0"):
        proc(images=blank(), query_points=np.array([[1.01, 0.0]]), points_normalized=True)


def test_mismatched_list_lengths_raise(proc):
    with pytest.raises(ValueError, match="1 entries in `query_points` for 2 images"):
        proc(images=[blank(), blank()], query_points=[np.array([[1.0, 1.0]])])
    with pytest.raises(ValueError, match="`text` for 2 images"):
        proc(images=[blank(), blank()], text=["a", "b", "c"], query_points=[np.ones((1, 2))] * 2)
    with pytest.raises(ValueError, match="`depth` for 2 images"):
        proc(images=[blank(), blank()], query_points=[np.ones((1, 2))] * 2, depth=[np.ones((H, W))])


def test_depth_size_mismatch_raises(proc):
    with pytest.raises(ValueError, match=r"Depth map 0 has shape \(96, 127\)"):
        proc(images=blank(), query_points=np.ones((1, 2)), depth=np.ones((H, W - 1)))
    with pytest.raises(ValueError, match="Depth map 1 has shape"):
        proc(images=[blank(), blank()], query_points=[np.ones((1, 2))] * 2, depth=[None, np.ones((W, H))])


def test_all_nan_depth_raises(proc):
    with pytest.raises(ValueError, match="entirely NaN"):
        proc(images=blank(), query_points=np.ones((1, 2)), depth=np.full((H, W), np.nan))


def test_future_without_query_depth_raises(proc):
    with pytest.raises(ValueError, match=r"current depth: pass query_points as \(N, 3\)"):
        proc(images=blank(), query_points=ANCHOR[None, :2], future=future_track()[None],
             future_mask=np.ones((1, HORIZON), dtype=bool))
    with pytest.raises(ValueError, match="`history` needs each query point's current depth"):
        proc(images=blank(), query_points=ANCHOR[None, :2], history=history_track()[None],
             history_mask=np.ones((1, HISTORY), dtype=bool))


def test_future_without_mask_or_wrong_shape_raises(proc):
    with pytest.raises(ValueError, match="without `future_mask`"):
        proc(images=blank(), query_points=ANCHOR[None], future=future_track()[None])
    with pytest.raises(ValueError, match=r"must be \(1, 32, 3\)"):
        proc(images=blank(), query_points=ANCHOR[None], future=future_track(HORIZON - 1)[None],
             future_mask=np.ones((1, HORIZON - 1), dtype=bool))


def test_missing_images_or_points_and_bad_image_raise(proc):
    with pytest.raises(ValueError, match="needs `images` and `query_points`"):
        proc(images=blank())
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        proc(images=np.full((H, W, 3), 255.0), query_points=np.ones((1, 2)))
    with pytest.raises(ValueError, match=r"RGB image of shape \(H, W, 3\)"):
        proc(images=np.zeros((H, W), dtype=np.uint8), query_points=np.ones((1, 2)))


# ------------------------------------------------------------------------------------------------------ depth
def test_depth_outputs_and_mask(proc):
    # depth at p1 everywhere -> nearest -> turbo(1); the second image has no depth -> zeros -> -1 after normalising
    depth = np.full((H, W), math.exp(DEPTH_LOG_RANGE[0]))
    batch = proc(images=[blank(), blank(width=64, height=48)], query_points=[np.ones((1, 2))] * 2, depth=[depth, None])
    assert batch["depth_mask"].tolist() == [True, False]
    assert batch["depth_pixel_values"].shape == (2, 3, 64, 64)
    near = torch.tensor(2 * TURBO_AT_1 - 1, dtype=torch.float32)  # (0.1317184, -0.8992223, -1.0)
    torch.testing.assert_close(
        batch["depth_pixel_values"][0], near[:, None, None].expand(3, 64, 64), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(batch["depth_pixel_values"][1], torch.full((3, 64, 64), -1.0), atol=1e-6, rtol=0)


def test_no_depth_means_no_depth_keys(proc):
    batch = proc(images=blank(), query_points=np.ones((1, 2)))
    assert "depth_pixel_values" not in batch and "depth_mask" not in batch


def test_render_depth_endpoints_and_invalid():
    log_min, log_max = DEPTH_LOG_RANGE
    depth = np.array([[math.exp(log_min), math.exp(log_max), np.nan, np.inf, 0.0005, 0.01, 100.0]])
    rendered = render_depth(depth, log_min, log_max)
    assert rendered.shape == (1, 7, 3) and rendered.dtype == np.float32
    np.testing.assert_allclose(rendered[0, 0], TURBO_AT_1, atol=1e-6)  # p1 -> nearest
    np.testing.assert_allclose(rendered[0, 0], turbo_colormap(np.array(1.0)), atol=1e-6)
    np.testing.assert_allclose(rendered[0, 1], TURBO_AT_0, atol=1e-6)  # p99 -> far
    np.testing.assert_allclose(rendered[0, 1], turbo_colormap(np.array(0.0)), atol=1e-6)
    for column in (2, 3, 4):  # NaN, inf and <= 1 mm render as far
        np.testing.assert_allclose(rendered[0, column], TURBO_AT_0, atol=1e-6)
    np.testing.assert_allclose(rendered[0, 5], TURBO_AT_1, atol=1e-6)  # nearer than p1 clips to near
    np.testing.assert_allclose(rendered[0, 6], TURBO_AT_0, atol=1e-6)  # farther than p99 clips to far


def test_turbo_colormap_endpoints_by_hand():
    np.testing.assert_allclose(turbo_colormap(np.array([0.0, 1.0])), np.stack([TURBO_AT_0, TURBO_AT_1]), atol=1e-7)
    # values outside [0, 1] clip to the ends
    np.testing.assert_allclose(turbo_colormap(np.array([-3.0, 7.0])), np.stack([TURBO_AT_0, TURBO_AT_1]), atol=1e-7)


# ------------------------------------------------------------------------------------------------ image tensors
def test_pixel_values_range_and_shape(proc):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (H, W, 3), dtype=np.uint8), rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)]
    batch = proc(images=images, query_points=[np.ones((1, 2))] * 2)
    pixels = batch["pixel_values"]
    assert pixels.shape == (2, 3, 64, 64) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 - 1e-6 and pixels.max() <= 1 + 1e-6
    assert pixels.std() > 0.1  # actually carries the random content
    assert batch["dino_pixel_values"].shape == (2, 3, 56, 56)


def test_white_and_black_images(proc):
    batch = proc(images=[blank(value=255), blank(value=0)], query_points=[np.ones((1, 2))] * 2)
    torch.testing.assert_close(batch["pixel_values"][0], torch.ones(3, 64, 64), atol=1e-6, rtol=0)
    torch.testing.assert_close(batch["pixel_values"][1], -torch.ones(3, 64, 64), atol=1e-6, rtol=0)
    # DINOv2: (1 - mean) / std = (0.515/0.229, 0.544/0.224, 0.594/0.225) = (2.24891, 2.42857, 2.64)
    white = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(white, torch.tensor([2.24891, 2.42857, 2.64]), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        batch["dino_pixel_values"][0], white[:, None, None].expand(3, 56, 56), atol=1e-5, rtol=0
    )
    black = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(
        batch["dino_pixel_values"][1], black[:, None, None].expand(3, 56, 56), atol=1e-5, rtol=0
    )


def test_float_and_channel_first_images_match_uint8(proc):
    # a half-left-red image in three encodings gives the same tensors
    image = np.zeros((H, W, 3), dtype=np.uint8)
    image[:, : W // 2, 0] = 255
    as_float = image.astype(np.float32) / 255.0
    as_tensor = torch.from_numpy(as_float).permute(2, 0, 1)
    batch = proc(images=[image, as_float, as_tensor], query_points=[np.ones((1, 2))] * 3)
    torch.testing.assert_close(batch["pixel_values"][1], batch["pixel_values"][0])
    torch.testing.assert_close(batch["pixel_values"][2], batch["pixel_values"][0])
    # left quarter of red is +1, right quarter -1; green and blue are -1 everywhere
    assert torch.allclose(batch["pixel_values"][0, 0, :, :16], torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(batch["pixel_values"][0, 0, :, -16:], torch.tensor(-1.0), atol=1e-5)
    assert torch.allclose(batch["pixel_values"][0, 1:], torch.tensor(-1.0), atol=1e-5)


# ----------------------------------------------------------------------------------------------------- prompts
def test_prompt_tokens_and_padding(proc):
    batch = proc(images=blank(), text="push the block", query_points=np.ones((1, 2)))
    prompt = "Task: push the block\n"  # 21 characters
    ids = batch["input_ids"][0]
    assert ids.shape == (MAX_PROMPT,)
    assert ids.tolist() == char_ids(prompt) + [PAD_ID] * (MAX_PROMPT - 21)
    assert "".join(tokens(proc, ids)) == prompt + "<pad>" * 3
    assert batch["attention_mask"][0].tolist() == [1] * 21 + [0] * 3


@pytest.mark.parametrize("text", [None, "", "   "])
def test_default_prompt(text):
    proc = make_processor(max_prompt_length=40)
    batch = proc(images=[blank(), blank()], text=text, query_points=[np.ones((1, 2))] * 2)
    prompt = "Task: predict future trajectory\n"  # 32 characters
    for row in range(2):
        assert batch["input_ids"][row].tolist() == char_ids(prompt) + [PAD_ID] * 8
        assert "".join(tokens(proc, batch["input_ids"][row])) == prompt + "<pad>" * 8
        assert batch["attention_mask"][row].tolist() == [1] * 32 + [0] * 8


def test_per_image_prompts_and_stripping(proc):
    batch = proc(images=[blank(), blank()], text=["  open it ", None], query_points=[np.ones((1, 2))] * 2)
    assert batch["input_ids"].shape == (2, MAX_PROMPT)
    assert batch["input_ids"][0].tolist() == char_ids("Task: open it\n") + [PAD_ID] * 10
    # the default prompt (32 characters) is cut to 24
    assert batch["input_ids"][1].tolist() == char_ids("Task: predict future tra")


def test_long_prompt_is_truncated(proc):
    text = "stack the red cube on the blue one, then wave"
    batch = proc(images=blank(), text=text, query_points=np.ones((1, 2)))
    assert batch["input_ids"].shape == (1, MAX_PROMPT)
    assert batch["input_ids"][0].tolist() == char_ids("Task: stack the red cube")
    assert batch["attention_mask"][0].tolist() == [1] * MAX_PROMPT


# --------------------------------------------------------------------------------------------------- save/load
def _check_loaded(loaded):
    assert isinstance(loaded, Mu0Processor)
    assert loaded.delta_scale == [0.1, 0.1, 0.05]
    assert loaded.depth_log_range == [-1.0, 1.5]
    assert loaded.max_prompt_length == MAX_PROMPT and loaded.max_queries == MAX_QUERIES
    assert loaded.horizon == HORIZON and loaded.history_length == HISTORY
    assert isinstance(loaded.image_processor, Mu0ImageProcessor)
    assert loaded.image_processor.image_size == 64 and loaded.image_processor.dino_image_size == 56
    batch = loaded(
        images=blank(value=255),
        text="push the block",
        query_points=ANCHOR[None],
        future=future_track()[None],
        future_mask=np.ones((1, HORIZON), dtype=bool),
        depth=np.full((H, W), math.exp(-1.0)),
    )
    assert batch["input_ids"][0].tolist() == char_ids("Task: push the block\n") + [PAD_ID] * 3
    assert batch["attention_mask"][0].tolist() == [1] * 21 + [0] * 3
    assert batch["pixel_values"].shape == (1, 3, 64, 64) and batch["dino_pixel_values"].shape == (1, 3, 56, 56)
    torch.testing.assert_close(batch["labels"][0, 0, 0], torch.tensor([0.3125, -0.3125, 0.4]), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        batch["depth_pixel_values"][0, :, 0, 0], torch.tensor(2 * TURBO_AT_1 - 1, dtype=torch.float32), atol=1e-5,
        rtol=0,
    )


def test_save_and_load_round_trip(proc, tmp_path):
    proc.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["delta_scale"] == [0.1, 0.1, 0.05]
    assert config["depth_log_range"] == [-1.0, 1.5]
    assert config["max_prompt_length"] == MAX_PROMPT and config["max_queries"] == MAX_QUERIES
    _check_loaded(Mu0Processor.from_pretrained(tmp_path))
    _check_loaded(AutoProcessor.from_pretrained(tmp_path))


def test_save_and_load_without_statistics_stays_without(tmp_path):
    make_processor(delta_scale=None, depth_log_range=None).save_pretrained(tmp_path)
    loaded = Mu0Processor.from_pretrained(tmp_path)
    assert loaded.delta_scale is None and loaded.depth_log_range is None
    with pytest.raises(ValueError, match="delta_scale"):
        loaded.post_process_traces(torch.zeros(1, 1, 1, 4, 3), torch.zeros(1, 1, 2), torch.tensor([[H, W]]))


# ------------------------------------------------------------------------------------- regressions
def test_infinite_depth_log_range_is_rejected():
    with pytest.raises(ValueError, match="depth_log_range"):
        make_processor(depth_log_range=[-math.inf, 1.5])


def test_mixed_query_point_widths_are_rejected(proc):
    with pytest.raises(ValueError):
        proc(images=[blank(), blank()], query_points=[np.array([[1.0, 2.0, 3.0]]), np.array([[1.0, 2.0]])])


def test_character_tokenizer_decode_is_inverse():
    tokenizer = build_character_tokenizer()
    assert tokenizer.decode(tokenizer("Task: push\n")["input_ids"]) == "Task: push\n"
