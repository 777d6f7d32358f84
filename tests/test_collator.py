"""Mu0TraceCollator on TraceExtract rows: query sampling, captions, augmentation, and DataLoader streaming."""

import numpy as np
import pytest
import torch
from conftest import make_model, make_processor

from mu0.dataset_builders.trace_extract import TraceExtract
from mu0.presets import preset_config
from mu0.training.collator import Mu0TraceCollator


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    builder = TraceExtract(config_name="samples", source="procedural", num_episodes=2, num_frames=30, image_size=64,
                           cache_dir=str(root / "cache"), work_dir=str(root / "work"), settings={"frame_stride": 4})
    builder.download_and_prepare()
    config = preset_config("tiny")
    return builder, make_processor(config, **builder.compute_statistics()), config


def test_training_batches_sample_moving_queries_and_covering_captions(prepared):
    builder, processor, _ = prepared
    rows = [builder.as_dataset(split="train")[i] for i in range(4)]
    collator = Mu0TraceCollator(processor, min_queries=3, max_queries=5, seed=0, depth_dropout=0.0, history_dropout=0.0,
                                history_query_dropout=0.0)
    batch = collator(rows)
    counts = batch["query_mask"].sum(-1)
    assert ((counts >= 3) & (counts <= 5)).all()
    assert batch["depth_mask"].all() and batch["history_mask"].any()
    texts = [processor.tokenizer.decode(ids, skip_special_tokens=True) for ids in batch["input_ids"]]
    for text, row in zip(texts, rows):
        assert text.strip().removeprefix("Task: ") in {c["text"] for c in row["captions"]} | {row["task"]}


def test_task_text_probability_sets_how_often_training_prompts_are_the_task(prepared):
    """Template captions never name the object; the task text does, and evaluation prompts with it."""
    builder, processor, _ = prepared
    dataset = builder.as_dataset(split="train")
    rows = [dataset[i] for i in range(len(dataset))]
    assert all(row["task"] and len(row["captions"]) > 1 for row in rows)

    def task_share(probability: float) -> float:
        collator = Mu0TraceCollator(processor, max_queries=2, seed=0, task_text_probability=probability)
        texts = [processor.tokenizer.decode(ids, skip_special_tokens=True).strip().removeprefix("Task: ")
                 for ids in collator(rows)["input_ids"]]
        return np.mean([text == row["task"][: len(text)] for text, row in zip(texts, rows)])

    uniform = np.mean([1 / len(row["captions"]) for row in rows])  # the task is one of each row's captions
    assert task_share(1.0) == 1.0
    assert task_share(0.0) < 0.5 and abs(task_share(0.0) - uniform) < 0.2
    assert 0.5 < task_share(0.7) < 1.0
    with pytest.raises(ValueError, match="task_text_probability"):
        Mu0TraceCollator(processor, task_text_probability=1.5)


def test_dropouts_and_evaluation_mode(prepared):
    builder, processor, _ = prepared
    rows = [builder.as_dataset(split="train")[i] for i in range(2)]
    dropped = Mu0TraceCollator(processor, seed=0, depth_dropout=1.0, history_dropout=1.0)(rows)
    assert "depth_pixel_values" not in dropped and not dropped["history_mask"].any()
    evaluation = Mu0TraceCollator(processor, max_queries=7, training=False)
    first, second = evaluation(rows), evaluation(rows)
    assert torch.equal(first["labels"], second["labels"]) and first["query_mask"].sum(-1).tolist() == [7, 7]
    expected = np.asarray(rows[0]["query_uv"])[np.flatnonzero(np.asarray(rows[0]["future_valid"]).any(-1))[:7]]
    width = np.asarray(rows[0]["image"]).shape[1]
    torch.testing.assert_close(first["query_points"][0, :, 0], torch.tensor(2 * (expected[:, 0] + 0.5) / width - 1, dtype=torch.float32))
    with pytest.raises(ValueError, match="min_queries"):
        Mu0TraceCollator(processor, min_queries=5, max_queries=2)


@pytest.mark.parametrize("streaming", [False, True])
def test_torch_format_feeds_a_dataloader_with_two_workers(prepared, streaming):
    builder, processor, config = prepared
    dataset = builder.as_streaming_dataset(split="train") if streaming else builder.as_dataset(split="train")
    loader = torch.utils.data.DataLoader(dataset.with_format("torch"), batch_size=3, num_workers=2,
                                         collate_fn=Mu0TraceCollator(processor, max_queries=8, seed=0))
    batch = next(iter(loader))
    assert batch["labels"].shape[0] == 3 and batch["labels"].shape[-2:] == (config.horizon, 3)
    loss = make_model(config).train()(**batch).loss
    assert torch.isfinite(loss)
