"""TraceExtract datasets published to the (stand-in) Hub as parquet and streamed back into a DataLoader."""

import numpy as np
import torch
from conftest import make_model, make_processor
from datasets import load_dataset

from mu0.dataset_builders.trace_extract import TraceExtract, decode_sample
from mu0.presets import preset_config
from mu0.training.collator import Mu0TraceCollator


def test_push_both_configurations_and_stream_into_a_dataloader(hub, tmp_path):
    options = dict(source="procedural", num_episodes=2, num_frames=30, image_size=64, work_dir=str(tmp_path / "work"),
                   settings={"frame_stride": 6})
    for name in ("samples", "episodes"):
        builder = TraceExtract(config_name=name, cache_dir=str(tmp_path / "cache"), **options)
        builder.download_and_prepare()
        builder.as_dataset(split="train").push_to_hub("user/traces", config_name=name)
    files = hub.files("user/traces", repo_type="dataset")
    assert any(path.startswith("samples/") and path.endswith(".parquet") for path in files)
    assert any(path.startswith("episodes/") and path.endswith(".parquet") for path in files)

    local = TraceExtract(config_name="samples", cache_dir=str(tmp_path / "cache"), **options).as_dataset(split="train")
    streamed = load_dataset("user/traces", "samples", split="train", streaming=True)
    first = decode_sample(next(iter(streamed)))
    expected = decode_sample(local[0])
    np.testing.assert_array_equal(first["image"], expected["image"])
    np.testing.assert_array_equal(first["future"], expected["future"])
    np.testing.assert_allclose(first["depth"], expected["depth"], equal_nan=True)

    config = preset_config("tiny")
    processor = make_processor(config, **builder.compute_statistics())
    loader = torch.utils.data.DataLoader(streamed.with_format("torch"), batch_size=2, num_workers=2,
                                         collate_fn=Mu0TraceCollator(processor, max_queries=8, seed=0))
    batch = next(iter(loader))
    assert torch.isfinite(make_model(config).train()(**batch).loss)
    episodes = load_dataset("user/traces", "episodes", split="train")
    assert sorted(episodes["episode_id"]) == sorted(set(local["episode_id"]))
    assert not hub.unknown_requests and not hub.errors
