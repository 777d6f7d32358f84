"""Saved checkpoints load with the Auto classes, both with mu0 installed and through trust_remote_code without it."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import inference_inputs, make_model, random_batch
from transformers import AutoConfig, AutoModel, AutoProcessor

from mu0 import Mu0ForTracePrediction, Mu0Processor

PREDICT_WITHOUT_MU0 = textwrap.dedent(
    """
    import sys
    sys.modules["mu0"] = None  # make `import mu0` fail: only the code saved beside the weights may be used
    import numpy as np, torch
    from transformers import AutoModel, AutoProcessor
    path, out = sys.argv[1], sys.argv[2]
    model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    assert not type(model).__module__.startswith("mu0"), type(model).__module__
    data = np.load(path + "/inputs.npz")
    batch = processor(images=list(data["images"]), text=["push the block", "open the drawer"],
                      query_points=list(data["points"]))
    prediction = model.predict_traces(**batch, num_samples=2, generator=torch.Generator().manual_seed(7))
    torch.save({"traces": prediction.traces, "pixel_values": batch["pixel_values"]}, out)
    """
)


def save_checkpoint(tmp_path, tiny_config, tiny_processor):
    model = make_model(tiny_config)
    with torch.no_grad():  # give the zero-initialised gates values so predictions depend on the weights
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path)
    tiny_processor.save_pretrained(tmp_path)
    return model


def run_without_mu0(tmp_path, script_text: str) -> dict:
    """Runs `script_text` (argv: the checkpoint folder, an output .pt) in a fresh interpreter that loads the saved
    checkpoint through remote code only, and returns what it saved."""
    script, out = tmp_path / "remote_script.py", tmp_path / "remote.pt"
    script.write_text(script_text)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, str(script), str(tmp_path), str(out)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_save_writes_code_and_statistics(tmp_path, tiny_config, tiny_processor):
    save_checkpoint(tmp_path, tiny_config, tiny_processor)
    files = set(os.listdir(tmp_path))
    assert {"configuration_mu0.py", "modeling_mu0.py", "bspline.py", "processing_mu0.py", "image_processing_mu0.py"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_mu0.Mu0ForTracePrediction"
    processor_config = json.loads((tmp_path / "processor_config.json").read_text())
    assert processor_config["delta_scale"] == [0.1, 0.1, 0.05]


def test_auto_classes_load_with_mu0_installed(tmp_path, tiny_config, tiny_processor):
    model = save_checkpoint(tmp_path, tiny_config, tiny_processor)
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "Mu0Config"
    loaded = AutoModel.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, Mu0ForTracePrediction) and isinstance(processor, Mu0Processor)
    for (name, expected), actual in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(actual, expected, msg=name)
    inputs = inference_inputs(random_batch(processor))
    expected = model.eval().predict_traces(**inputs, generator=torch.Generator().manual_seed(1)).traces
    actual = loaded.eval().predict_traces(**inputs, generator=torch.Generator().manual_seed(1)).traces
    torch.testing.assert_close(actual, expected)


def test_trust_remote_code_without_mu0_gives_identical_predictions(tmp_path, tiny_config, tiny_processor):
    model = save_checkpoint(tmp_path, tiny_config, tiny_processor).eval()
    rng = torch.Generator().manual_seed(0)
    images = (torch.rand(2, 48, 64, 3, generator=rng) * 255).to(torch.uint8).numpy()
    points = (torch.rand(2, 4, 2, generator=rng) * torch.tensor([64.0, 48.0])).numpy()
    import numpy as np

    np.savez(tmp_path / "inputs.npz", images=images, points=points)
    remote = run_without_mu0(tmp_path, PREDICT_WITHOUT_MU0)

    batch = tiny_processor(images=list(images), text=["push the block", "open the drawer"], query_points=list(points))
    local = model.predict_traces(**batch, num_samples=2, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(remote["pixel_values"], batch["pixel_values"])
    torch.testing.assert_close(remote["traces"], local.traces)
    assert local.traces.abs().max() > 0


def test_a_checkpoint_holding_nan_or_inf_is_refused_naming_the_tensor(tmp_path, tiny_config, tiny_processor):
    from safetensors.torch import load_file, save_file

    save_checkpoint(tmp_path, tiny_config, tiny_processor)
    weights = load_file(str(tmp_path / "model.safetensors"))
    for key, bad in (("model.expert_layers.1.mlp.up_proj.weight", float("nan")), ("trace_done_head.bias", float("inf"))):
        broken = dict(weights)
        broken[key] = broken[key].clone()
        broken[key].view(-1)[3] = bad
        save_file(broken, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ValueError, match=re.escape(repr(key))):
            Mu0ForTracePrediction.from_pretrained(tmp_path)


def test_an_incomplete_checkpoint_is_refused_naming_the_missing_weights(tmp_path, tiny_config, tiny_processor):
    """transformers fills missing weights with random ones and only logs it; a real save holds every weight."""
    from safetensors.torch import load_file, save_file

    save_checkpoint(tmp_path, tiny_config, tiny_processor)
    weights = load_file(str(tmp_path / "model.safetensors"))
    _, info = Mu0ForTracePrediction.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    del weights["trace_velocity_head.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"incomplete Mu0ForTracePrediction checkpoint: 1 weights are missing.*trace_velocity_head\.weight"):
        Mu0ForTracePrediction.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trace_velocity_head.weight"):
        AutoModel.from_pretrained(tmp_path)


PIPELINE_WITHOUT_MU0 = textwrap.dedent(
    """
    import sys
    sys.modules["mu0"] = None  # only the code saved beside the weights may be used
    import numpy as np, torch
    from transformers import pipeline
    path, out = sys.argv[1], sys.argv[2]
    predictor = pipeline(model=path, trust_remote_code=True)  # the task comes from config.json's custom_pipelines
    assert predictor.task == "trace-prediction" and not type(predictor).__module__.startswith("mu0")
    data = np.load(path + "/inputs.npz")
    result = predictor({"image": data["image"], "text": "push the block", "query_points": data["points"]},
                       num_samples=2, seed=7)
    torch.save(result, out)
    """
)


def reference_pixels(model, processor, image, points, seed):
    batch = processor(images=[image], text="push the block", query_points=[points])
    prediction = model.predict_traces(**batch, num_samples=2, generator=torch.Generator().manual_seed(seed))
    traces = processor.post_process_traces(prediction.traces, batch["query_points"], batch["image_sizes"])
    return traces["pixels"][0], prediction.alive_mask[0]


def test_trace_prediction_pipeline_from_a_saved_folder_and_in_memory(tmp_path, tiny_config, tiny_processor):
    from transformers import pipeline

    model = save_checkpoint(tmp_path, tiny_config, tiny_processor).eval()
    assert json.loads((tmp_path / "config.json").read_text())["custom_pipelines"]["trace-prediction"]["impl"] == (
        "pipeline_mu0.Mu0TracePredictionPipeline"
    )
    assert (tmp_path / "pipeline_mu0.py").exists() and not hasattr(model.config, "custom_pipelines")
    image = (torch.rand(48, 64, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).numpy()
    points = [[10.0, 20.0], [30.5, 40.0], [60.0, 5.0]]
    pixels, alive = reference_pixels(model, tiny_processor, image, points, seed=7)
    assert pixels.shape == (2, 3, tiny_config.horizon, 2)
    for predictor in (pipeline("trace-prediction", model=model, processor=tiny_processor),
                      pipeline("trace-prediction", model=str(tmp_path), trust_remote_code=True)):
        result = predictor(image, text="push the block", query_points=points, num_samples=2, seed=7)
        torch.testing.assert_close(result["pixels"], pixels)
        assert torch.equal(result["alive"], alive)


def test_trace_prediction_pipeline_through_trust_remote_code_without_mu0(tmp_path, tiny_config, tiny_processor):
    import numpy as np

    model = save_checkpoint(tmp_path, tiny_config, tiny_processor).eval()
    image = (torch.rand(48, 64, 3, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8).numpy()
    points = np.array([[12.0, 30.0], [50.0, 10.0]])
    np.savez(tmp_path / "inputs.npz", image=image, points=points)
    remote = run_without_mu0(tmp_path, PIPELINE_WITHOUT_MU0)
    pixels, alive = reference_pixels(model, tiny_processor, image, points, seed=7)
    torch.testing.assert_close(remote["pixels"], pixels)
    assert torch.equal(remote["alive"], alive)


def test_pushed_model_cards_declare_the_trace_prediction_pipeline(tiny_model, tiny_processor):
    from huggingface_hub import ModelCard

    from mu0.training.publishing import render_model_card

    card = render_model_card(tiny_model, tiny_processor, "user/mu0-tiny", datasets=["user/traces"], metrics={}, recipe="tiny-cpu")
    data = ModelCard(card).data
    assert data.pipeline_tag == "trace-prediction" and {"mu0", "robotics"} <= set(data.tags)
    assert 'pipeline("trace-prediction", model="user/mu0-tiny", trust_remote_code=True)' in card
