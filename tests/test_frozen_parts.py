"""Frozen stays frozen: every way of obtaining a μ0 or a policy trains exactly the parts its config says."""

import torch
from conftest import make_model, make_processor
from transformers import AutoModel

from mu0 import Mu0ActionConfig, Mu0ForActionPrediction, Mu0ForTracePrediction
from mu0.presets import preset_config


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def expected_trainable(model: Mu0ForTracePrediction) -> int:
    """Everything but the backbone and DINOv2, plus the depth LoRA and the depth patch stem, counted by name."""
    total = 0
    for name, parameter in model.named_parameters():
        in_backbone = name.startswith(("model.vlm.", "model.dino."))
        if not in_backbone or ".lora_" in name:
            total += parameter.numel()
    return total


def test_fresh_model_trains_only_the_expert_lora_and_depth_stem(tiny_model):
    assert trainable(tiny_model) == expected_trainable(tiny_model)
    assert tiny_model.model.depth_patch_embedding.weight.requires_grad
    assert not tiny_model.model.vlm.get_input_embeddings().weight.requires_grad
    assert not any(p.requires_grad for p in tiny_model.model.dino.parameters())


def test_from_pretrained_keeps_the_backbone_frozen(tiny_model, tmp_path):
    before = trainable(tiny_model)
    tiny_model.save_pretrained(tmp_path)
    loaded = Mu0ForTracePrediction.from_pretrained(tmp_path)
    assert trainable(loaded) == before
    loaded_with_info, _ = Mu0ForTracePrediction.from_pretrained(tmp_path, output_loading_info=True)
    assert trainable(loaded_with_info) == before
    assert trainable(AutoModel.from_pretrained(tmp_path)) == before


def test_from_backbones_keeps_the_backbone_frozen_and_copies_the_stem(tmp_path, tiny_config):
    vlm = AutoModel.from_config(tiny_config.vlm_config)
    dino = AutoModel.from_config(tiny_config.dino_config)
    vlm.save_pretrained(tmp_path / "vlm")
    dino.save_pretrained(tmp_path / "dino")
    config = preset_config("tiny", backbone_checkpoint=str(tmp_path / "vlm"), dino_checkpoint=str(tmp_path / "dino"))
    model = Mu0ForTracePrediction.from_backbones(config)
    assert trainable(model) == expected_trainable(model)
    torch.testing.assert_close(model.model.vlm.get_input_embeddings().weight, vlm.get_input_embeddings().weight)
    stem = model.model.vision_tower.embeddings.patch_embedding
    torch.testing.assert_close(model.model.depth_patch_embedding.weight, stem.weight)  # starts as the pretrained stem
    assert model.model.depth_patch_embedding.weight.data_ptr() != stem.weight.data_ptr()


def test_action_policy_from_pretrained_keeps_mu0_frozen(tmp_path, tiny_model):
    policy = Mu0ForActionPrediction.from_trace_model(tiny_model, action_dim=4, state_dim=3, num_action_layers=2)
    assert trainable(policy.trace_model) == 0
    expert = trainable(policy)
    policy.save_pretrained(tmp_path)
    loaded = Mu0ForActionPrediction.from_pretrained(tmp_path)
    assert trainable(loaded.trace_model) == 0 and trainable(loaded) == expert


def test_unfrozen_policy_still_freezes_mu0s_backbone(tmp_path, tiny_config):
    config = Mu0ActionConfig(trace_config=tiny_config.to_dict(), action_dim=4, state_dim=3, num_action_layers=2,
                             freeze_trace_model=False)
    policy = Mu0ForActionPrediction(config)
    policy.save_pretrained(tmp_path)
    loaded = Mu0ForActionPrediction.from_pretrained(tmp_path)
    for model in (policy, loaded):
        assert trainable(model.trace_model) == expected_trainable(model.trace_model)


def test_trainer_resume_keeps_the_backbone_frozen(tmp_path):
    from test_pretrain import small_recipe

    from mu0.dataset_builders.trace_extract import TraceExtract
    from mu0.training.pretrain import make_trainer

    builder = TraceExtract(config_name="samples", source="procedural", num_episodes=1, num_frames=20, image_size=64,
                           cache_dir=str(tmp_path / "cache"), work_dir=str(tmp_path / "work"), settings={"frame_stride": 3})
    builder.download_and_prepare()
    samples, statistics = builder.as_dataset(split="train"), builder.compute_statistics()
    first = make_trainer(small_recipe(save_steps=2), samples, statistics, str(tmp_path / "run"), max_steps=2)
    first.train()
    expected = trainable(first.model)
    second = make_trainer(small_recipe(save_steps=2), samples, statistics, str(tmp_path / "run"), max_steps=3)
    second.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert trainable(second.model) == expected == expected_trainable(second.model)


def test_loaded_adapter_keeps_mu0_frozen(tmp_path, tiny_config):
    from mu0.training.adaptation import add_trace_lora, load_adapter, save_adapter

    trace_model = make_model(tiny_config)
    trace_model.save_pretrained(tmp_path / "base")
    make_processor(tiny_config).save_pretrained(tmp_path / "base")
    policy = Mu0ForActionPrediction.from_trace_model(str(tmp_path / "base"), action_dim=4, state_dim=3,
                                                     num_action_layers=2)
    frozen = trainable(policy.trace_model)
    save_adapter(policy, str(tmp_path / "frozen"))
    assert trainable(load_adapter(str(tmp_path / "frozen")).trace_model) == frozen == 0

    lora = add_trace_lora(Mu0ForActionPrediction.from_trace_model(str(tmp_path / "base"), action_dim=4, state_dim=3,
                                                                  num_action_layers=2), rank=2)
    save_adapter(lora, str(tmp_path / "lora"))
    reloaded = load_adapter(str(tmp_path / "lora"))
    backbone = [p for name, p in reloaded.named_parameters() if ".vlm." in name or ".dino." in name]
    assert backbone and not any(p.requires_grad for p in backbone)
