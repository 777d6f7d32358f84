"""The PEFT adaptation recipe: adapters hold only the new weights, reload on their base, and refuse another base."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_model
from peft import PeftModel
from safetensors import safe_open
from test_action_model import ACTION_DIM, STATE_DIM, make_action_processor, make_policy, policy_batch

from mu0 import Mu0ForActionPrediction
from mu0.training.adaptation import (
    ACTION_EXPERT_WEIGHTS,
    RobotEpisode,
    action_samples,
    add_trace_lora,
    lerobot_robot_episodes,
    load_adapter,
    push_adapter_to_hub,
    save_adapter,
    train_policy,
)


@pytest.fixture()
def action_processor(tiny_processor):
    return make_action_processor(tiny_processor)


def robot_episodes(count: int = 2, length: int = 10, seed: int = 0) -> list[RobotEpisode]:
    rng = np.random.default_rng(seed)
    return [
        RobotEpisode(
            frames=rng.integers(0, 255, (length, 48, 64, 3), dtype=np.uint8),
            states=rng.normal(size=(length, STATE_DIM)),
            actions=rng.normal(size=(length, ACTION_DIM)),
            task="press the button",
        )
        for _ in range(count)
    ]


def actions_of(model, processor, seed: int = 5) -> torch.Tensor:
    return model.predict_actions(**policy_batch(processor, with_actions=False), generator=torch.Generator().manual_seed(seed))


def perturb_lora(model: PeftModel) -> None:
    """LoRA B and the motion gates start at zero; open both so a lost LoRA weight would change the actions."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "motion_gate" in name:
                parameter.normal_(std=0.5)


def saved_tensor_names(path: str) -> list[str]:
    with safe_open(path, framework="pt") as handle:
        return list(handle.keys())


def test_action_samples_pad_and_mask_the_last_chunk():
    episode = robot_episodes(1, length=8)[0]
    rows = action_samples([episode], chunk_size=6)
    assert len(rows) == 8
    np.testing.assert_array_equal(rows[0]["actions"], episode.actions[:6])
    assert rows[0]["actions_mask"].all()
    last = rows[5]
    assert last["actions_mask"].tolist() == [True, True, True, False, False, False]
    np.testing.assert_array_equal(last["actions"][3:], np.repeat(episode.actions[-1:], 3, axis=0))
    np.testing.assert_array_equal(last["state"], episode.states[5])


def test_robot_data_errors_are_clear():
    with pytest.raises(ValueError, match="fewer than one action chunk"):
        action_samples(robot_episodes(1, length=4), chunk_size=6)
    with pytest.raises(ValueError, match="differ in length"):
        RobotEpisode(np.zeros((3, 4, 4, 3), np.uint8), np.zeros((3, 2)), np.zeros((2, 2)), "t")


def test_lerobot_folder_becomes_robot_episodes(tmp_path):
    from mu0.dataset_builders.robot_sources import write_lerobot_episodes

    episodes = robot_episodes(2, length=6)
    write_lerobot_episodes(
        str(tmp_path / "robot"),
        [{"frames": e.frames, "states": e.states, "actions": e.actions, "task": e.task} for e in episodes],
        fps=10.0,
    )
    loaded = lerobot_robot_episodes(str(tmp_path / "robot"))
    assert [e.task for e in loaded] == ["press the button"] * 2
    np.testing.assert_allclose(loaded[1].actions, episodes[1].actions, atol=1e-6)
    np.testing.assert_allclose(loaded[0].states, episodes[0].states, atol=1e-6)
    assert loaded[0].frames.shape == episodes[0].frames.shape
    with pytest.raises(ValueError, match="wrist"):
        lerobot_robot_episodes(str(tmp_path / "robot"), camera_key="observation.images.wrist")


def test_frozen_mu0_adapter_saves_only_the_action_expert(tmp_path, tiny_config, action_processor):
    policy = make_policy(tiny_config)
    save_adapter(policy, str(tmp_path / "adapter"), action_processor)
    files = set(os.listdir(tmp_path / "adapter"))
    assert {ACTION_EXPERT_WEIGHTS, "config.json", "processor_config.json"} <= files
    assert not any(name.startswith("model") for name in files)
    names = saved_tensor_names(str(tmp_path / "adapter" / ACTION_EXPERT_WEIGHTS))
    assert set(names) == set(policy.action_expert.state_dict())

    loaded = load_adapter(str(tmp_path / "adapter"), base=policy.trace_model)
    assert isinstance(loaded, Mu0ForActionPrediction)
    torch.testing.assert_close(actions_of(loaded, action_processor), actions_of(policy, action_processor), rtol=0, atol=0)


def test_lora_adapter_holds_lora_and_new_modules_only(tmp_path, tiny_config, action_processor):
    model = add_trace_lora(make_policy(tiny_config), rank=2)
    perturb_lora(model)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert any("lora_A" in name and "expert_layers" in name for name in trainable)
    assert not any("vlm" in name or "dino" in name for name in trainable)
    save_adapter(model, str(tmp_path / "adapter"), action_processor)
    names = saved_tensor_names(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any("lora_A" in name for name in names) and any("action_expert" in name for name in names)
    assert not any(".vlm." in name or ".dino." in name for name in names)

    loaded = load_adapter(str(tmp_path / "adapter"), base=make_model(tiny_config, seed=0))
    assert isinstance(loaded, PeftModel)
    # Equal up to float rounding (LoRA's separate low-rank matmul may take another BLAS path once reloaded).
    torch.testing.assert_close(actions_of(loaded, action_processor), actions_of(model, action_processor), rtol=0, atol=1e-6)
    # Without the LoRA weights the actions differ: the comparison above really covers them.
    with loaded.disable_adapter():
        without_lora = actions_of(loaded, action_processor)
    assert (without_lora - actions_of(model, action_processor)).abs().max() > 1e-4


def test_adapter_refuses_a_different_base(tmp_path, tiny_config, action_processor):
    save_adapter(make_policy(tiny_config, seed=0), str(tmp_path / "adapter"), action_processor)
    with pytest.raises(ValueError, match="different μ0"):
        load_adapter(str(tmp_path / "adapter"), base=make_model(tiny_config, seed=1))


def test_adapter_without_base_name_asks_for_one(tmp_path, tiny_config):
    save_adapter(make_policy(tiny_config), str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="pass `base=`"):
        load_adapter(str(tmp_path / "adapter"))


def test_training_reduces_the_flow_loss(tmp_path, tiny_config, action_processor):
    policy = make_policy(tiny_config).train()
    rows = action_samples(robot_episodes(2, length=12), chunk_size=6)
    trainer = train_policy(policy, action_processor, rows, str(tmp_path / "run"), steps=40, batch_size=8,
                           learning_rate=3e-3, disable_tqdm=True)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) >= 4 and np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])


LOAD_ADAPTER = """
import sys, torch
from mu0 import Mu0ActionProcessor
from mu0.training.adaptation import load_adapter
policy = load_adapter("user/tiny-adapter")
processor = Mu0ActionProcessor.from_pretrained("user/tiny-adapter")
batch = torch.load(sys.argv[1], weights_only=True)
actions = policy.predict_actions(**batch, generator=torch.Generator().manual_seed(5))
torch.save({"actions": actions, "type": type(policy).__name__, "statistics": processor.action_mean}, sys.argv[2])
"""


def test_adapter_round_trip_through_the_hub_in_a_fresh_process(hub, tmp_path, tiny_config, action_processor):
    make_model(tiny_config, seed=0).push_to_hub("user/tiny-mu0")
    model = add_trace_lora(Mu0ForActionPrediction.from_trace_model("user/tiny-mu0", action_dim=ACTION_DIM,
                                                                  state_dim=STATE_DIM, trace_grid_size=8, chunk_size=6,
                                                                  num_execute_steps=3), rank=2)
    perturb_lora(model)
    model.eval()
    push_adapter_to_hub(model, "user/tiny-adapter", action_processor, metrics={"success_rate": 0.5})
    files = hub.files("user/tiny-adapter")
    assert {"adapter_model.safetensors", "adapter_config.json", "config.json", "README.md"} <= set(files)
    assert not any(name.startswith("model") for name in files)

    script, inputs, out = tmp_path / "load.py", tmp_path / "batch.pt", tmp_path / "actions.pt"
    script.write_text(LOAD_ADAPTER)
    torch.save(policy_batch(action_processor, with_actions=False), inputs)
    with hub.serve() as endpoint:
        env = hub.subprocess_env(endpoint, home=tmp_path / "child_home")  # its own cache: it must download
        result = subprocess.run([sys.executable, str(script), str(inputs), str(out)], capture_output=True, text=True,
                                env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(out, weights_only=True)
    assert remote["type"] == "PeftModel" and remote["statistics"] == action_processor.action_mean
    torch.testing.assert_close(remote["actions"], actions_of(model, action_processor), rtol=0, atol=1e-6)


def test_motion_gates_open_during_training(tmp_path, tiny_config, action_processor):
    policy = make_policy(tiny_config).train()
    rows = action_samples(robot_episodes(2, length=12), chunk_size=6)
    train_policy(policy, action_processor, rows, str(tmp_path / "run"), steps=20, batch_size=8, learning_rate=1e-3,
                 disable_tqdm=True)
    gates = torch.cat([layer.motion_gate.detach() for layer in policy.action_expert.layers])
    # At the base rate Adam could move a gate by at most 20 x 1e-3 = 0.02.
    assert gates.abs().max() > 0.05


def test_adapt_command_trains_and_saves_a_loadable_adapter(tmp_path, tiny_config, tiny_processor, capsys):
    from mu0.dataset_builders.robot_sources import write_lerobot_episodes
    from mu0.training.cli import main

    base = make_model(tiny_config, seed=0)
    base.save_pretrained(tmp_path / "mu0")
    tiny_processor.save_pretrained(tmp_path / "mu0")
    episodes = robot_episodes(2, length=18)
    write_lerobot_episodes(
        str(tmp_path / "robot"),
        [{"frames": e.frames, "states": e.states, "actions": e.actions, "task": e.task} for e in episodes],
        fps=10.0,
    )
    code = main(["adapt", "--base", str(tmp_path / "mu0"), "--dataset", str(tmp_path / "robot"), "--lora-rank", "2",
                 "--grid-size", "4", "--steps", "2", "--batch-size", "4", "--output-dir", str(tmp_path / "adapter")])
    assert code == 0, capsys.readouterr().err
    assert "36 training rows" in capsys.readouterr().out
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card
    policy = load_adapter(str(tmp_path / "adapter"))
    assert isinstance(policy, PeftModel) and policy.config.action_dim == ACTION_DIM
    assert policy.config.state_dim == STATE_DIM and policy.config.trace_grid_size == 4


def test_adapt_command_reports_a_missing_camera_in_one_line(tmp_path, tiny_config, tiny_processor, capsys):
    from mu0.dataset_builders.robot_sources import write_lerobot_episodes
    from mu0.training.cli import main

    make_model(tiny_config).save_pretrained(tmp_path / "mu0")
    capsys.readouterr()  # drop save_pretrained's progress bar
    episode = robot_episodes(1, length=8)[0]
    write_lerobot_episodes(str(tmp_path / "robot"), [{"frames": episode.frames, "states": episode.states,
                                                      "actions": episode.actions, "task": episode.task}], fps=10.0)
    code = main(["adapt", "--base", str(tmp_path / "mu0"), "--dataset", str(tmp_path / "robot"),
                 "--camera-key", "observation.images.wrist"])
    error = capsys.readouterr().err
    assert code == 1 and error.count("\n") == 1 and "observation.images.wrist" in error


def test_adapt_names_the_chunk_size_flag_for_short_episodes(tmp_path, tiny_config, tiny_processor, capsys):
    """Short episodes said "lower chunk_size" (no such flag) and left an empty output folder."""
    from mu0.dataset_builders.robot_sources import write_lerobot_episodes
    from mu0.training.cli import main

    make_model(tiny_config).save_pretrained(tmp_path / "mu0")
    tiny_processor.save_pretrained(tmp_path / "mu0")
    capsys.readouterr()
    episode = robot_episodes(1, length=8)[0]
    write_lerobot_episodes(str(tmp_path / "robot"), [{"frames": episode.frames, "states": episode.states,
                                                      "actions": episode.actions, "task": episode.task}], fps=10.0)
    arguments = ["adapt", "--base", str(tmp_path / "mu0"), "--dataset", str(tmp_path / "robot"), "--grid-size", "4",
                 "--steps", "1", "--batch-size", "2", "--output-dir", str(tmp_path / "adapter")]
    assert main(arguments) == 1
    error = capsys.readouterr().err
    assert "--chunk-size 16: the shortest episode" in error and "pass --chunk-size 8 or less" in error
    assert not (tmp_path / "adapter").exists()
    assert main([*arguments, "--chunk-size", "8"]) == 0, capsys.readouterr().err
    assert load_adapter(str(tmp_path / "adapter")).config.chunk_size == 8
