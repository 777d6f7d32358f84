"""Mu0ForActionPrediction and Mu0ActionProcessor on tiny random μ0 models."""

import numpy as np
import pytest
import torch
from conftest import make_model

from transformers import AutoModel

from mu0 import Mu0ActionConfig, Mu0ActionProcessor, Mu0ForActionPrediction
from mu0.modeling_mu0_action import uniform_grid
from mu0.presets import preset_config
from mu0.processing import robot_statistics

ACTION_DIM, STATE_DIM = 4, 5


def make_policy(tiny_config, seed: int = 0, **overrides) -> Mu0ForActionPrediction:
    trace = make_model(tiny_config, seed=seed)
    settings = dict(action_dim=ACTION_DIM, state_dim=STATE_DIM, trace_grid_size=8, chunk_size=6, num_execute_steps=3)
    torch.manual_seed(seed + 100)
    return Mu0ForActionPrediction.from_trace_model(trace, **{**settings, **overrides}).eval()


def make_action_processor(tiny_processor, chunk_size: int = 6) -> Mu0ActionProcessor:
    rng = np.random.default_rng(0)
    statistics = robot_statistics(rng.normal(1.0, 2.0, (200, ACTION_DIM)), rng.normal(-1.0, 0.5, (200, STATE_DIM)))
    return Mu0ActionProcessor.from_trace_processor(tiny_processor, statistics, chunk_size=chunk_size)


def policy_batch(processor, batch_size: int = 2, seed: int = 0, with_actions: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(batch_size)]
    batch = processor(
        images=images,
        text=["reach the button"] * batch_size,
        state=rng.normal(size=(batch_size, STATE_DIM)),
        actions=rng.normal(size=(batch_size, processor.chunk_size, ACTION_DIM)) if with_actions else None,
    )
    batch.pop("image_sizes")
    return dict(batch)


@pytest.fixture()
def action_processor(tiny_processor):
    return make_action_processor(tiny_processor)


def test_uniform_grid_is_cell_centres():
    grid = uniform_grid(4)
    assert grid.shape == (16, 2)
    assert torch.allclose(grid[0], torch.tensor([-0.75, -0.75]))
    assert torch.allclose(grid[1], torch.tensor([-0.25, -0.75]))  # row-major: u varies first
    assert torch.allclose(grid[-1], torch.tensor([0.75, 0.75]))


def test_training_updates_only_the_new_modules(tiny_config, action_processor):
    policy = make_policy(tiny_config).train()
    output = policy(**policy_batch(action_processor))
    assert torch.isfinite(output.loss) and output.loss > 0
    output.loss.backward()
    trainable = {name for name, parameter in policy.named_parameters() if parameter.requires_grad}
    assert trainable and all(name.startswith("action_expert.") for name in trainable)
    assert all(policy.get_parameter(name).grad is not None for name in trainable)
    assert all(parameter.grad is None for parameter in policy.trace_model.parameters())


def test_motion_gate_starts_closed_and_opens(tiny_config, action_processor):
    policy = make_policy(tiny_config)
    batch = policy_batch(action_processor, with_actions=False)
    prefix, motion, context = policy.encode_context(
        batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["dino_pixel_values"], state=batch["state"]
    )
    assert motion.shape == (2, (8 // 2) ** 2, policy.config.action_hidden_size)
    noisy, time = torch.randn(2, 6, ACTION_DIM), torch.full((2,), 0.5)
    with torch.no_grad():
        closed = policy.velocity(prefix, motion, context, noisy, time)
        without_motion = policy.velocity(prefix, None, context, noisy, time)
        torch.testing.assert_close(closed, without_motion, rtol=0, atol=0)
        for layer in policy.action_expert.layers:
            layer.motion_gate.fill_(0.5)
        opened = policy.velocity(prefix, motion, context, noisy, time)
    assert (opened - without_motion).abs().max() > 1e-4


def test_use_trace_false_has_no_motion_path(tiny_config, action_processor):
    policy = make_policy(tiny_config, use_trace=False)
    assert policy.action_expert.motion_proj is None
    assert not any("motion" in name for name, _ in policy.named_parameters())
    actions = policy.predict_actions(**policy_batch(action_processor, with_actions=False))
    assert actions.shape == (2, 6, ACTION_DIM) and torch.isfinite(actions).all()


@pytest.mark.parametrize("trace_noise", ["random", "zero"])
def test_zero_trace_noise_makes_motion_tokens_a_function_of_the_observation(tiny_config, action_processor, trace_noise):
    """With `trace_noise="zero"` μ0's grid flow starts at the Gaussian's mean: the tokens ignore the generator and
    equal the expert's states for an all-zero input, pooled; a random start gives other tokens for another seed."""
    policy = make_policy(tiny_config, trace_noise=trace_noise)
    batch = policy_batch(action_processor, with_actions=False)
    with torch.no_grad():
        prefix = policy.trace_model.model.compute_prefix(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        first, second = (policy.motion_states(prefix, batch["dino_pixel_values"], torch.Generator().manual_seed(seed))
                         for seed in (1, 2))
        grid = uniform_grid(8).expand(2, -1, -1)
        fourier, dino = policy.trace_model.model.point_context(grid, batch["dino_pixel_values"])
        states = policy.trace_model.model(prefix, torch.zeros(2, 64, tiny_config.num_control_points, 3),
                                          torch.ones(2), torch.ones(2, 64, dtype=torch.bool), fourier, dino).last_hidden_state
    from_zero = states.transpose(1, 2).reshape(2, -1, 8, 8).unflatten(2, (4, 2)).unflatten(4, (4, 2)).mean((3, 5))
    from_zero = from_zero.flatten(2).transpose(1, 2)
    if trace_noise == "zero":
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        torch.testing.assert_close(first, from_zero)
    else:
        assert (first - second).abs().max() > 1e-3 and (first - from_zero).abs().max() > 1e-3


def test_sampling_is_reproducible_per_seed(tiny_config, action_processor):
    policy = make_policy(tiny_config)
    batch = policy_batch(action_processor, with_actions=False)
    first = policy.predict_actions(**batch, generator=torch.Generator().manual_seed(3))
    again = policy.predict_actions(**batch, generator=torch.Generator().manual_seed(3))
    other = policy.predict_actions(**batch, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert (first - other).abs().max() > 1e-4


def test_euler_sampling_matches_a_plain_loop(tiny_config, action_processor):
    policy = make_policy(tiny_config, num_sampling_steps=3)
    batch = policy_batch(action_processor, with_actions=False)
    noise = torch.randn(2, 6, ACTION_DIM)
    sampled = policy.predict_actions(**batch, noise=noise, generator=torch.Generator().manual_seed(1))
    prefix, motion, context = policy.encode_context(
        batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["dino_pixel_values"],
        state=batch["state"], generator=torch.Generator().manual_seed(1),
    )
    expected = noise.clone()
    with torch.no_grad():
        for time in (1.0, 2 / 3, 1 / 3):
            expected = expected - policy.velocity(prefix, motion, context, expected, torch.full((2,), time)) / 3
    torch.testing.assert_close(sampled, expected)


def test_wrist_camera_tokens(tiny_config, tiny_processor):
    policy = make_policy(tiny_config, use_wrist_camera=True, wrist_pool_size=2)
    processor = make_action_processor(tiny_processor)
    images = [np.full((48, 64, 3), 90, np.uint8)] * 2
    batch = dict(processor(images=images, text="push", state=np.zeros((2, STATE_DIM)), wrist_images=images))
    batch.pop("image_sizes")
    actions = policy.predict_actions(**batch)
    assert actions.shape == (2, 6, ACTION_DIM)
    with pytest.raises(ValueError, match="wrist_dino_pixel_values"):
        policy.predict_actions(**{k: v for k, v in batch.items() if k != "wrist_dino_pixel_values"})


def test_bad_inputs_are_named(tiny_config, action_processor):
    policy = make_policy(tiny_config)
    batch = policy_batch(action_processor)
    with pytest.raises(ValueError, match=r"state must have shape \(2, 5\)"):
        policy(**{**batch, "state": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="pass `state`"):
        policy(**{**batch, "state": None})
    with pytest.raises(ValueError, match="action_dim=4"):
        policy(**{**batch, "actions": torch.zeros(2, 6, 7)})
    with pytest.raises(ValueError, match="chunk_size=6"):
        policy(**{**batch, "actions": torch.zeros(2, 5, ACTION_DIM)})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_execute_steps": 20}, "num_execute_steps"),
        ({"trace_grid_size": 9}, "multiple of motion_pool_size"),
        ({"trace_denoise_steps": 5}, "trace_denoise_steps"),
        ({"trace_noise": "gaussian"}, "trace_noise='gaussian'"),
        ({"action_dim": 0}, "action_dim"),
        ({"num_action_layers": 9}, "num_action_layers"),
    ],
)
def test_config_rejects_impossible_settings(tiny_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        Mu0ActionConfig(trace_config=tiny_config.to_dict(), **overrides)


@pytest.mark.parametrize("baseline", [{"trace_objective": "regression"}, {"trace_parameterisation": "dense"}])
def test_action_expert_refuses_baseline_trace_models(baseline):
    with pytest.raises(ValueError, match="flow-matching B-spline"):
        Mu0ActionConfig(trace_config=preset_config("tiny", **baseline).to_dict())


def test_wrist_camera_needs_dino():
    config = preset_config("tiny", use_dino=False)
    with pytest.raises(ValueError, match="use_dino"):
        Mu0ActionConfig(trace_config=config.to_dict(), use_wrist_camera=True)


def test_default_config_is_a_300m_class_action_expert():
    with torch.device("meta"):
        policy = Mu0ForActionPrediction(Mu0ActionConfig())
    expert = sum(parameter.numel() for parameter in policy.action_expert.parameters())
    assert policy.config.num_motion_tokens == 100 and policy.config.chunk_size == 16
    assert 2e8 < expert < 5e8


def test_save_and_auto_load_round_trip(tmp_path, tiny_config, action_processor):
    policy = make_policy(tiny_config)
    policy.save_pretrained(tmp_path)
    action_processor.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, Mu0ForActionPrediction)
    batch = policy_batch(Mu0ActionProcessor.from_pretrained(tmp_path), with_actions=False)
    torch.testing.assert_close(
        loaded.predict_actions(**batch, generator=torch.Generator().manual_seed(0)),
        policy.predict_actions(**batch, generator=torch.Generator().manual_seed(0)),
        rtol=0,
        atol=0,
    )


# ---------------------------------------------------------------------------------------------- processor
def test_processor_normalises_and_restores_actions(action_processor):
    actions = np.random.default_rng(1).normal(1.0, 2.0, (2, 6, ACTION_DIM))
    normalised = action_processor.normalize(actions, "action")
    expected = (actions - np.array(action_processor.action_mean)) / np.array(action_processor.action_std)
    np.testing.assert_allclose(normalised.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(action_processor.unnormalize_actions(normalised).numpy(), actions, rtol=1e-5, atol=1e-5)


def test_processor_without_statistics_fails_loudly(tiny_processor):
    processor = Mu0ActionProcessor(tiny_processor.image_processor, tiny_processor.tokenizer)
    with pytest.raises(ValueError, match="no action statistics"):
        processor.normalize(np.zeros((1, 6, ACTION_DIM)), "action")
    with pytest.raises(ValueError, match="no state statistics"):
        processor(images=[np.zeros((48, 64, 3), np.uint8)], state=np.zeros((1, STATE_DIM)))


def test_processor_rejects_bad_robot_data(action_processor):
    with pytest.raises(ValueError, match="dimension 3"):
        action_processor.normalize(np.zeros((1, 3)), "state")
    with pytest.raises(ValueError, match="NaN"):
        action_processor.normalize(np.full((1, STATE_DIM), np.nan), "state")
    with pytest.raises(ValueError, match="chunk=6"):
        action_processor(images=[np.zeros((48, 64, 3), np.uint8)], actions=np.zeros((1, 4, ACTION_DIM)))
    with pytest.raises(ValueError, match="std > 0"):
        Mu0ActionProcessor(action_mean=[0.0], action_std=[0.0])


REMOTE_CODE_ACTIONS = """
import sys, torch
sys.modules["mu0"] = None  # the saved code must be enough
from transformers import AutoModel
policy = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
batch = torch.load(sys.argv[2], weights_only=True)
actions = policy.predict_actions(**batch, generator=torch.Generator().manual_seed(0))
torch.save({"actions": actions, "type": type(policy).__name__}, sys.argv[3])
"""


def test_trust_remote_code_loads_the_policy_without_mu0(tmp_path, tiny_config, action_processor):
    import os
    import subprocess
    import sys

    policy = make_policy(tiny_config)
    policy.save_pretrained(tmp_path / "policy")
    batch = policy_batch(action_processor, with_actions=False)
    torch.save(batch, tmp_path / "batch.pt")
    (tmp_path / "run.py").write_text(REMOTE_CODE_ACTIONS)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "policy"), str(tmp_path / "batch.pt"),
         str(tmp_path / "out.pt")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt", weights_only=True)
    assert remote["type"] == "Mu0ForActionPrediction"
    local = policy.predict_actions(**batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(remote["actions"], local, rtol=0, atol=0)
