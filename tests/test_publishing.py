"""Model, processor and card pushed together to the (stand-in) Hub and loaded back both ways."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from conftest import inference_inputs, make_model, make_processor, random_batch

from mu0 import Mu0ForTracePrediction, Mu0Processor
from mu0.training.publishing import push_mu0_to_hub, render_model_card

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
