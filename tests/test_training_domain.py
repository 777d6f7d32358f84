"""The training data's ranges travel with the statistics, and the processor warns once when inputs fall far outside."""

import logging

import numpy as np
import pytest

from mu0 import Mu0Processor
from mu0.dataset_builders.statistics import TraceStatistics

IN_DOMAIN_RANGES = {"mean_intensity": [0.3, 0.6], "height": [96, 96], "width": [96, 96]}


def test_statistics_record_frame_ranges():
    statistics = TraceStatistics()
    future = np.zeros((2, 4, 3))
    future[:, :, :2] = [[10.0, 10.0]]
    future[:, :, 2] = 0.8
    future[0, :, 0] += np.arange(4) + 1.0
    future[1, :, 1] += np.arange(4) + 1.0
    future[:, :, 2] += np.linspace(0.01, 0.04, 4)
    for brightness in (50, 100, 150):
        statistics.add(np.full((2, 2), 10.0), np.full(2, 0.8), future, np.ones((2, 4), bool), (48, 64),
                       depth=np.full((48, 64), 0.8), image=np.full((48, 64, 3), brightness, np.uint8))
    ranges = statistics.compute()["image_ranges"]
    assert ranges["height"] == [48, 48] and ranges["width"] == [64, 64]
    low, high = ranges["mean_intensity"]
    assert 50 / 255 <= low < 55 / 255 and 145 / 255 < high <= 150 / 255


def processor_with_ranges(tiny_processor) -> Mu0Processor:
    return Mu0Processor(tiny_processor.image_processor, tiny_processor.tokenizer, delta_scale=[0.1, 0.1, 0.05],
                        depth_log_range=[float(np.log(0.4)), float(np.log(1.0))], image_ranges=IN_DOMAIN_RANGES,
                        max_queries=tiny_processor.max_queries)


def domain_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if "outside this checkpoint's training data" in record.getMessage()]


def test_far_depth_and_large_frames_warn_on_every_call(tiny_processor, caplog):
    processor = processor_with_ranges(tiny_processor)
    scene = np.full((540, 960, 3), 120, np.uint8)
    far = np.array([[100.0, 100.0, 5.0], [300.0, 200.0, 85.0], [500.0, 300.0, 1.7]])
    with caplog.at_level(logging.WARNING, logger="mu0.processing.processing_mu0"):
        processor(images=scene, query_points=far)
        processor(images=scene, query_points=far)
    messages = domain_warnings(caplog)
    assert len(messages) == 4  # depth and frame size, on each call: in `mu0 app` every visitor must see them
    assert any("median input depth 5.00 m" in m and "0.40-1.00 m" in m for m in messages)
    assert any("960x540" in m for m in messages)


def test_inputs_like_the_training_data_do_not_warn(tiny_processor, caplog):
    processor = processor_with_ranges(tiny_processor)
    with caplog.at_level(logging.WARNING, logger="mu0.processing.processing_mu0"):
        processor(images=np.full((96, 96, 3), 110, np.uint8), query_points=np.array([[40.0, 50.0, 0.7]]),
                  depth=np.full((96, 96), 0.8, np.float32))
        dark = processor_with_ranges(tiny_processor)
        dark(images=np.zeros((96, 96, 3), np.uint8), query_points=np.array([[40.0, 50.0]]))
    messages = domain_warnings(caplog)
    assert len(messages) == 1 and "mean intensity 0.00" in messages[0]  # only the black frame is out of range


def test_ranges_are_saved_with_the_processor(tiny_processor, tmp_path):
    processor_with_ranges(tiny_processor).save_pretrained(tmp_path)
    assert Mu0Processor.from_pretrained(tmp_path).image_ranges == IN_DOMAIN_RANGES


@pytest.mark.parametrize("missing", ["depth_log_range", "image_ranges"])
def test_no_ranges_no_check(tiny_processor, caplog, missing):
    processor = processor_with_ranges(tiny_processor)
    setattr(processor, missing, None)
    with caplog.at_level(logging.WARNING, logger="mu0.processing.processing_mu0"):
        processor(images=np.full((540, 960, 3), 120, np.uint8), query_points=np.array([[1.0, 2.0, 50.0]]))
    assert len(domain_warnings(caplog)) == 1


def test_model_card_states_the_training_ranges(tiny_config, tiny_processor):
    from conftest import make_model

    from mu0.training.publishing import render_model_card

    card = render_model_card(make_model(tiny_config), processor_with_ranges(tiny_processor), "user/mu0-tiny")
    assert "- Depth: 0.40–1.00 m" in card and "- Frames: 96–96 × 96–96 pixels" in card
    assert "- Mean intensity: 0.30–0.60" in card
    without_frames = render_model_card(make_model(tiny_config), tiny_processor, "user/mu0-tiny")  # no image_ranges
    assert "- Depth:" in without_frames and "- Frames:" not in without_frames
