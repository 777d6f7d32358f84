"""Model, processor and card pushed together to the (stand-in) Hub and loaded back both ways; every card's Hub
metadata."""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from conftest import inference_inputs, make_model, make_processor, random_batch

from mu0 import Mu0ForTracePrediction, Mu0Processor
from mu0.training.publishing import push_mu0_to_hub, render_adapter_card, render_dataset_card, render_model_card

LOAD_REMOTE = textwrap.dedent(
    """
    import sys
    sys.modules["mu0"] = None
    import torch
    from transformers import AutoModel
    model = AutoModel.from_pretrained("user/mu0-tiny", trust_remote_code=True)
    inputs = torch.load(sys.argv[1], weights_only=True)
    torch.save(model.predict_traces(**inputs, generator=torch.Generator().manual_seed(3)).traces, sys.argv[2])
    """
)


def trained_like(config):
    model = make_model(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def test_card_has_valid_hub_metadata_and_real_numbers(tiny_config, tiny_processor):
    model = make_model(tiny_config)
    card = render_model_card(model, tiny_processor, "user/mu0-tiny", datasets=["user/traces"],
                             metrics={"uv/min_ade@32": 0.0123})
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "mu0" and header["license"] == "apache-2.0" and header["datasets"] == ["user/traces"]
    assert f"{model.num_parameters():,} total" in card and "| uv/min_ade@32 | 0.0123 |" in card
    assert "{" not in card.split("## Use")[0]  # every placeholder was filled


def test_push_and_load_with_and_without_mu0(hub, tiny_config, tiny_processor, tmp_path):
    model = trained_like(tiny_config).eval()
    push_mu0_to_hub(model, tiny_processor, "user/mu0-tiny", datasets=["user/traces"], metrics={"uv/ade@32": 0.1})
    files = hub.files("user/mu0-tiny")
    assert {"README.md", "config.json", "model.safetensors", "processor_config.json", "modeling_mu0.py"} <= set(files)
    inputs = inference_inputs(random_batch(tiny_processor))
    expected = model.predict_traces(**inputs, generator=torch.Generator().manual_seed(3)).traces
    loaded = Mu0ForTracePrediction.from_pretrained("user/mu0-tiny").eval()
    assert Mu0Processor.from_pretrained("user/mu0-tiny").delta_scale == tiny_processor.delta_scale
    torch.testing.assert_close(loaded.predict_traces(**inputs, generator=torch.Generator().manual_seed(3)).traces, expected)

    torch.save(dict(inputs), tmp_path / "inputs.pt")
    (tmp_path / "load.py").write_text(LOAD_REMOTE)
    with hub.serve() as endpoint:
        result = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                                env=hub.subprocess_env(endpoint, home=tmp_path / "child", base=dict(os.environ)),
                                capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), expected)


def test_processor_without_statistics_is_never_pushed(hub, tiny_config):
    with pytest.raises(ValueError, match="delta_scale"):
        push_mu0_to_hub(make_model(tiny_config), make_processor(tiny_config, delta_scale=None), "user/bad")
    assert not hub.requests or all("user/bad" not in path for _, path, _ in hub.requests)


def card_header(card: str) -> dict:
    """The YAML header, checked for unfilled placeholders everywhere in the card."""
    assert card.startswith("---\n")
    assert not re.findall(r"\{[a-z_]*(:[^}]*)?\}", card), "unformatted placeholders left in the card"
    return yaml.safe_load(card.split("---\n")[1])


def test_all_cards_render_with_valid_hub_metadata(tiny_config, tiny_processor):
    from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

    model = make_model(tiny_config)
    cards = {
        "model": render_model_card(model, tiny_processor, "user/mu0-tiny", datasets=["user/traces"],
                                   metrics={"uv/min_ade@32": 0.0123}, recipe="tiny-cpu"),
        "adapter": render_adapter_card(
            "user/mu0-tiny", "user/mu0-tiny-robot", action_dim=4, state_dim=39,
            target_modules=r"trace_model\.expert_layers\.\d+\.(attention\.(q_proj|v_proj))", modules_to_save=["action_expert"],
            trainable_parameters=123_456, datasets=["user/robot-demos"], metrics={"success_rate": 0.4},
        ),
        "dataset": render_dataset_card(
            "user/traces", {"source": "procedural", "depth": "given", "tracker": "lk"},
            {"delta_scale": [0.0612345, 0.05, 0.012], "depth_log_range": [-0.5, 0.7]}, num_episodes=12, num_samples=3456,
        ),
    }
    headers = {name: card_header(card) for name, card in cards.items()}
    for name in ("model", "adapter"):
        data = ModelCard(cards[name]).data
        assert isinstance(data, ModelCardData) and data.license == "apache-2.0" and "mu0" in data.tags
        assert ModelCardData(**headers[name]).to_dict() == data.to_dict()
    assert headers["model"]["library_name"] == "mu0"
    adapter = headers["adapter"]
    assert adapter["library_name"] == "peft" and adapter["base_model"] == "user/mu0-tiny"
    assert adapter["pipeline_tag"] == "robotics" and {"mu0", "robotics", "lora"} <= set(adapter["tags"])
    assert adapter["datasets"] == ["user/robot-demos"]
    assert "| trainable parameters | 123,456 |" in cards["adapter"] and "| success_rate | 0.4000 |" in cards["adapter"]
    assert "q_proj\\|v_proj" in cards["adapter"]  # the regex does not split its table cell
    assert "| LoRA target modules | none (μ0 frozen) |" in render_adapter_card(
        "user/mu0-tiny", "user/a", 4, 39, None, ["action_expert"], 10)

    data = DatasetCard(cards["dataset"]).data
    assert isinstance(data, DatasetCardData) and data.license == "apache-2.0" and data.task_categories == ["robotics"]
    assert data.pretty_name == "traces" and "mu0" in data.tags
    assert {config["config_name"]: config["data_files"][0]["path"] for config in headers["dataset"]["configs"]} == {
        "episodes": "episodes/train-*", "samples": "samples/train-*"}
    assert "| episodes | 12 |" in cards["dataset"] and "| samples (a frame and its query points) | 3,456 |" in cards["dataset"]
    assert "[0.06123, 0.05, 0.012]" in cards["dataset"] and "| tracker | lk |" in cards["dataset"]


def test_pushed_samples_carry_a_dataset_card_that_keeps_the_pushed_configs(hub, tmp_path):
    from huggingface_hub import DatasetCard

    from mu0.dataset_builders.trace_extract import TraceExtract
    from mu0.training.pretrain import load_samples, push_samples_to_hub

    builder = TraceExtract(config_name="samples", source="procedural", num_episodes=1, num_frames=20, image_size=48,
                           cache_dir=str(tmp_path / "cache"), work_dir=str(tmp_path / "work"), settings={"frame_stride": 4})
    builder.download_and_prepare()
    samples, statistics = builder.as_dataset(split="train"), builder.compute_statistics()
    push_samples_to_hub(samples, statistics, "user/traces", settings_summary={"source": "procedural", "tracker": "given"})
    card = hub.read("user/traces", "README.md", repo_type="dataset").decode()
    header = card_header(card)
    assert [config["config_name"] for config in header["configs"]] == ["samples"]  # episodes were not pushed
    assert header["dataset_info"] and DatasetCard(card).data.license == "apache-2.0"
    assert f"| samples (a frame and its query points) | {len(samples):,} |" in card and "| episodes | 1 |" in card
    assert "| tracker | given |" in card
    streamed, streamed_statistics = load_samples("user/traces")
    assert streamed_statistics == statistics and next(iter(streamed))["episode_id"] == samples[0]["episode_id"]
