"""Checkpoints saved before the `Mu0Model` split (flat keys: `vlm.…`, `trace_model.vlm.…`) load to identical outputs."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from mu0 import Mu0ForActionPrediction, Mu0ForTracePrediction
from mu0.modeling_mu0_action import trace_fingerprint

FIXTURES = Path(__file__).parent / "fixtures"
TRACE_DIR = FIXTURES / "mu0_tiny_legacy"
ACTION_DIR = FIXTURES / "mu0_action_tiny_legacy"
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
        torch.testing.assert_close(output[key], saved[f"output.{key}"], rtol=0, atol=0, msg=key)
    for key in ("traces", "done_probs", "control_points"):
        torch.testing.assert_close(prediction[key], saved[f"prediction.{key}"], rtol=0, atol=0, msg=key)


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
    torch.testing.assert_close(actions, saved["actions"], rtol=0, atol=0)
