"""Checkpoints saved before the `Mu0Model` split (flat keys: `vlm.…`, `trace_model.vlm.…`) load to identical outputs."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from mu0 import Mu0ForActionPrediction, Mu0ForTracePrediction
from mu0.modeling_mu0_action import trace_fingerprint
from mu0.training.adaptation import load_adapter

FIXTURES = Path(__file__).parent / "fixtures"
TRACE_DIR = FIXTURES / "mu0_tiny_legacy"
ACTION_DIR = FIXTURES / "mu0_action_tiny_legacy"
ADAPTER_DIR = FIXTURES / "mu0_lora_adapter_legacy"
# The fixtures' outputs were computed with one thread; another thread count only reorders float sums (~1e-8).
SAME_OUTPUTS = {"rtol": 1e-5, "atol": 1e-6}
INFERENCE_KEYS = (
    "pixel_values", "input_ids", "attention_mask", "query_points", "query_mask", "history", "history_mask",
    "depth_pixel_values", "depth_mask", "dino_pixel_values",
)


def expected(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "expected_outputs.safetensors"))


def legacy_inputs(saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key.removeprefix("input."): value for key, value in saved.items() if key.startswith("input.")}


def test_legacy_trace_checkpoint_loads_every_weight():
    model, info = Mu0ForTracePrediction.from_pretrained(TRACE_DIR, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_legacy_trace_checkpoint_gives_identical_outputs():
    model = Mu0ForTracePrediction.from_pretrained(TRACE_DIR).eval()
    saved = expected(TRACE_DIR)
    batch = legacy_inputs(saved)
    with torch.no_grad():
        output = model(**batch, noise=saved["forward_noise"], time=saved["forward_time"])
        prediction = model.predict_traces(
            **{key: batch[key] for key in INFERENCE_KEYS}, num_samples=2, noise=saved["sample_noise"]
        )
    for key in ("loss", "flow_loss", "done_loss", "rigidity_loss", "velocity", "done_logits"):
        torch.testing.assert_close(output[key], saved[f"output.{key}"], **SAME_OUTPUTS, msg=key)
    for key in ("traces", "done_probs", "control_points"):
        torch.testing.assert_close(prediction[key], saved[f"prediction.{key}"], **SAME_OUTPUTS, msg=key)


def test_trace_fingerprint_is_the_one_the_legacy_code_computed():
    """A policy stores its base's fingerprint; a new key layout must not make old policies refuse their base."""
    model = Mu0ForTracePrediction.from_pretrained(TRACE_DIR)
    assert trace_fingerprint(model) == json.loads((TRACE_DIR / "fingerprint.json").read_text())["trace_fingerprint"]


def test_legacy_action_checkpoint_gives_identical_actions():
    policy, info = Mu0ForActionPrediction.from_pretrained(ACTION_DIR, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    batch = legacy_inputs(expected(TRACE_DIR))
    saved = expected(ACTION_DIR)
    context = ("pixel_values", "input_ids", "attention_mask", "dino_pixel_values", "depth_pixel_values", "depth_mask")
    actions = policy.eval().predict_actions(
        **{key: batch[key] for key in context}, state=saved["state"], noise=saved["action_noise"], num_steps=2,
        generator=torch.Generator().manual_seed(4),
    )
    torch.testing.assert_close(actions, saved["actions"], **SAME_OUTPUTS)


def test_legacy_lora_adapter_loads_its_lora_and_gives_identical_actions():
    """A LoRA adapter saved before the split names `trace_model.expert_layers` in its target regex and weights."""
    adapter = load_adapter(str(ADAPTER_DIR), base=Mu0ForTracePrediction.from_pretrained(TRACE_DIR))
    lora = {name: parameter for name, parameter in adapter.named_parameters() if ".default." in name and "lora_" in name}
    assert lora and all(".trace_model.model.expert_layers." in name for name in lora)
    assert all(parameter.abs().sum() > 0 for name, parameter in lora.items() if "lora_B" in name)  # loaded, not fresh
    batch = legacy_inputs(expected(TRACE_DIR))
    saved = expected(ADAPTER_DIR)
    context = ("pixel_values", "input_ids", "attention_mask", "dino_pixel_values", "depth_pixel_values", "depth_mask")
    actions = adapter.predict_actions(
        **{key: batch[key] for key in context}, state=saved["state"], noise=saved["action_noise"], num_steps=2,
        generator=torch.Generator().manual_seed(4),
    )
    torch.testing.assert_close(actions, saved["actions"], **SAME_OUTPUTS)


def test_a_legacy_checkpoint_is_resaved_in_the_current_layout(tmp_path):
    """Loading renames the keys; saving must not rename them back (transformers reverts load-time renames)."""
    Mu0ForTracePrediction.from_pretrained(TRACE_DIR).save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert "model.expert_layers.0.attention.q_proj.weight" in keys and "trace_velocity_head.weight" in keys
    assert not any(key.startswith(("vlm.", "expert_layers.", "dino.")) for key in keys)
    _, info = Mu0ForTracePrediction.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_a_seed_draws_the_weights_it_drew_before_the_split():
    """Seeded experiments and tests keep their initial weights: the base model's init waits for the heads.

    The fixture is seed 0's initialisation, except the tensors that start at zero (adaLN gates, done head, ...),
    which were then drawn at random so that every weight shapes the outputs.
    """
    legacy = Mu0ForTracePrediction.from_pretrained(TRACE_DIR).state_dict()
    torch.manual_seed(0)
    fresh = Mu0ForTracePrediction(legacy_config()).state_dict()
    compared = [key for key, tensor in fresh.items() if tensor.abs().sum() > 0]
    assert len(compared) > 100
    for key in compared:
        torch.testing.assert_close(fresh[key], legacy[key], rtol=0, atol=0, msg=key)


def legacy_config():
    return Mu0ForTracePrediction.config_class.from_pretrained(TRACE_DIR)
