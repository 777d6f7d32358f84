"""Shared fixtures: tiny random μ0 models and processors; everything offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np
import pytest
import torch

from mu0 import Mu0ForTracePrediction, Mu0ImageProcessor, Mu0Processor, build_character_tokenizer
from mu0.presets import preset_config


def make_processor(config, **overrides) -> Mu0Processor:
    settings = dict(
        delta_scale=[0.1, 0.1, 0.05],
        depth_log_range=[-1.0, 1.5],
        history_length=config.history_length,
        horizon=config.horizon,
        max_prompt_length=config.max_prompt_length,
        max_queries=config.max_queries,
    )
    settings.update(overrides)
    image_processor = Mu0ImageProcessor(image_size=config.image_size, dino_image_size=config.dino_image_size)
    return Mu0Processor(image_processor, build_character_tokenizer(), **settings)


def make_model(config, seed: int = 0) -> Mu0ForTracePrediction:
    torch.manual_seed(seed)
    return Mu0ForTracePrediction(config).eval()


def random_batch(processor, num_queries=(3, 2), seed: int = 0, with_future: bool = True, with_depth: bool = True):
    """A processed batch of random images with smooth straight-line futures and short histories."""
    rng = np.random.default_rng(seed)
    height, width, horizon, history = 48, 64, processor.horizon, processor.history_length
    images, points, futures, future_masks, histories, history_masks, depths, clusters = [], [], [], [], [], [], [], []
    for count in num_queries:
        images.append(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        anchor = np.column_stack([rng.uniform(5, width - 5, count), rng.uniform(5, height - 5, count), rng.uniform(0.8, 2, count)])
        velocity = rng.normal(0, [0.3, 0.3, 0.01], (count, 3))
        steps = np.arange(1, horizon + 1)[None, :, None]
        points.append(anchor)
        futures.append(anchor[:, None] + steps * velocity[:, None])
        future_masks.append(np.ones((count, horizon), dtype=bool))
        histories.append(anchor[:, None] - np.arange(1, history + 1)[None, :, None] * velocity[:, None])
        history_masks.append(np.ones((count, history), dtype=bool))
        depths.append(rng.uniform(0.5, 3.0, (height, width)))
        clusters.append(np.arange(count) % 2)
    kwargs = dict(images=images, text=["push the block"] * len(images), query_points=points,
                  history=histories, history_mask=history_masks, cluster_ids=clusters)
    if with_future:
        kwargs.update(future=futures, future_mask=future_masks)
    if with_depth:
        kwargs.update(depth=depths)
    return processor(**kwargs)


def inference_inputs(batch) -> dict:
    return {k: v for k, v in batch.items() if k not in ("labels", "labels_mask", "cluster_ids")}


@pytest.fixture(scope="session")
def tiny_config():
    return preset_config("tiny")


@pytest.fixture(scope="session")
def tiny_processor(tiny_config):
    return make_processor(tiny_config)


@pytest.fixture()
def tiny_model(tiny_config):
    return make_model(tiny_config)


from hub_stand_in import hub  # noqa: E402,F401  (the offline Hub fixture)
