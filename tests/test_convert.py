"""Conversion of the authors' released checkpoint: every key mapped or dropped by name, dtypes kept, and the converted
model computing the released forward (checked against tests/released_reference.py, an independent re-implementation
working on the released state dict)."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from released_reference import ReleasedTraceModel, dataset_control_points, released_state_dict
from safetensors.torch import save_file
from transformers import Dinov2Config, SmolVLMConfig

from mu0 import build_character_tokenizer
from mu0.convert import ConversionReport, convert_released_checkpoint, mu0_config_from_released, released_batch_to_inputs
from mu0.presets import preset_config

STATS = {"delta_scale_x": 0.6625, "delta_scale_y": 0.7411, "delta_scale_z": 0.2075, "percentile": 95.0,
         "num_samples": 1000, "history_len": 8, "future_len": 32, "target_kind": "anchor", "video_fraction": 1.0,
         "depth_log_min": -1.3824, "depth_log_max": 0.7629}


def tiny_backbones() -> tuple[SmolVLMConfig, Dinov2Config]:
    """SmolVLM and DINOv2 at the sizes of the "tiny" preset; 4 text layers of which the checkpoint keeps 3."""
    tiny = preset_config("tiny")
    vlm = tiny.vlm_config.to_dict()
    vlm["text_config"]["num_hidden_layers"] = 4
    return SmolVLMConfig(**vlm), Dinov2Config(**tiny.dino_config.to_dict())


def released_config(vlm_name: str, dino_name: str, **overrides) -> dict:
    """A draccus-style SmolVLAConfig dump of the release recipe at tiny sizes (fields in declaration order)."""
    config = {
        "type": "smolvla", "n_obs_steps": 1, "input_features": {
            "observation.images.cam_front": {"type": "VISUAL", "shape": [3, 64, 64]},
            "observation.images.cam_front_depth": {"type": "VISUAL", "shape": [3, 64, 64]}},
        "output_features": {}, "device": "cpu", "use_amp": False, "chunk_size": 50, "n_action_steps": 50,
        "max_state_dim": 32, "max_action_dim": 32, "resize_imgs_with_padding": [64, 64], "empty_cameras": 0,
        "tokenizer_max_length": 16, "num_steps": 4, "use_cache": True, "freeze_vision_encoder": True,
        "train_expert_only": True, "trace_mode": True, "history_len": 8, "future_len": 32, "trace_dim": 3,
        "n_min": 1, "n_max": 64, "trace_uv_num_freqs": 8, "trace_group_horizon": 8,
        "trace_history_full_mask_prob": 0.5, "trace_history_kp_dropout_prob": 0.3, "use_depth": True,
        "depth_lora_rank": 8, "depth_lora_alpha": 16, "depth_lora_dropout": 0.0,
        "depth_lora_targets": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "depth_clone_stem": True,
        "depth_dropout_prob": 0.7, "use_dino": True, "dino_model_name": dino_name, "dino_input_size": 56,
        "dino_num_prefix_tokens": 1, "trace_adaln_freq_embed_size": 256, "rigidity_loss_weight": 5.0,
        "trace_done_head": True, "done_loss_weight": 0.5, "done_bias_init": 3.0, "done_threshold": 0.5,
        "trace_bspline_n_ctrl": 10, "trace_bspline_ctrl_per_token": 10,
        "delta_scale": [STATS["delta_scale_x"], STATS["delta_scale_y"], STATS["delta_scale_z"]],
        "vlm_model_name": vlm_name, "load_vlm_weights": True, "add_image_special_tokens": False,
        "attention_mode": "cross_attn", "prefix_length": -1, "pad_language_to": "max_length",
        "num_expert_layers": -1, "num_vlm_layers": 3, "self_attn_every_n_layers": 2, "expert_width_multiplier": 0.5,
        "min_period": 0.004, "max_period": 4.0,
    }
    config.update(overrides)
    return config


def write_release(root, old_dino_names: bool = True, seed: int = 0, **overrides):
    """The release bundle at tiny size: backbone folders (config + tokenizer, as Hub ids would give), final_ckpt/
    (model.safetensors, config.json, meta.json) and normalizer_stats.json beside it."""
    vlm, dino = tiny_backbones()
    vlm_dir, dino_dir, step = root / "smolvlm-tiny", root / "dinov2-tiny", root / "final_ckpt"
    vlm.save_pretrained(vlm_dir)
    build_character_tokenizer().save_pretrained(vlm_dir)
    dino.save_pretrained(dino_dir)
    step.mkdir()
    cfg = released_config(str(vlm_dir), str(dino_dir), **overrides)
    state = released_state_dict(cfg, vlm, dino, seed=seed, old_dino_names=old_dino_names)
    save_file(state, step / "model.safetensors")
    (step / "config.json").write_text(json.dumps(cfg, indent=4))
    (step / "meta.json").write_text(json.dumps({"step": 1000}))
    (root / "normalizer_stats.json").write_text(json.dumps(STATS, indent=2))
    return step, cfg, state, vlm, dino


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def converted(release):
    report = ConversionReport()
    model, processor = convert_released_checkpoint(str(release[0]), report=report)
    return model, processor, report


def released_batch(cfg, num_queries=(5, 3), seed=0, with_depth=True, with_future=False):
    generator = torch.Generator().manual_seed(seed)
    batch_size, n = len(num_queries), max(num_queries)
    size, length = cfg["resize_imgs_with_padding"][0], cfg["tokenizer_max_length"]
    key_pad = torch.arange(n)[None] < torch.tensor(num_queries)[:, None]
    tokens = torch.randint(1, 97, (batch_size, length), generator=generator)
    lang_mask = torch.arange(length)[None] < torch.tensor([length - 3, 6])[:, None]
    current = torch.cat([torch.rand(batch_size, n, 2, generator=generator) * 1.8 - 0.9,
                         0.5 + torch.rand(batch_size, n, 1, generator=generator)], dim=-1)
    history = 0.05 * torch.randn(batch_size, n, cfg["history_len"], 3, generator=generator) * key_pad[..., None, None]
    batch = {
        "observation.images.cam_front": torch.rand(batch_size, 3, size, size, generator=generator),
        "observation.language.tokens": tokens * lang_mask,
        "observation.language.attention_mask": lang_mask,
        "current_kp": current * key_pad[..., None],
        "traj_history": history,
        "valid_history": key_pad[..., None].expand(-1, -1, cfg["history_len"]),
        "key_pad_mask": key_pad,
    }
    if with_depth:
        batch["observation.images.cam_front_depth"] = torch.rand(batch_size, 3, size, size, generator=generator)
        batch["observation.images.cam_front_depth_padding_mask"] = torch.tensor([True, False])
    if with_future:
        horizon = cfg["future_len"]
        steps = torch.arange(horizon)[None, None]
        lengths = torch.randint(4, horizon + 1, (batch_size, n), generator=generator)
        lengths[0, 0], lengths[0, 1] = 5, horizon  # one query below the 10-step minimum, one with every step
        valid = (steps < lengths[..., None]) & key_pad[..., None]
        future = torch.cumsum(0.05 * torch.randn(batch_size, n, horizon, 3, generator=generator), dim=2)
        batch["traj_future"] = future * valid[..., None]
        batch["valid_future"] = valid
        batch["ctrl_pts_future"], batch["valid_kp"] = dataset_control_points(future * valid[..., None], valid,
                                                                             cfg["trace_bspline_n_ctrl"])
        batch["cluster_ids"] = torch.where(key_pad, torch.randint(0, 2, (batch_size, n), generator=generator), -1)
    return batch


# ----------------------------------------------------------------------------------------------- key mapping
@pytest.mark.parametrize("old_dino_names", [True, False], ids=["dino-attention.attention", "dino-q_proj"])
def test_every_key_is_mapped_or_dropped_by_group(tmp_path, old_dino_names):
    step, cfg, state, _, _ = write_release(tmp_path, old_dino_names=old_dino_names)
    assert any("attention.attention.query" in key for key in state) == old_dino_names
    report = ConversionReport()
    model, processor = convert_released_checkpoint(str(step), report=report)

    layers, vision_layers, dino_layers = 3, 2, 2
    assert report.dropped == {"lm_head_unused": 1, "action_time_mlp_unused": 4}
    assert report.unused_group_rows == 40 - 2
    assert report.mapped["vlm_text_layers"] == 9 * layers
    assert report.mapped["expert_layers"] == 9 * layers and report.mapped["adaln_modulation_heads"] == 2 * layers
    assert report.mapped["depth_lora"] == 12 * vision_layers and report.mapped["vision_encoder_layers"] == 16 * vision_layers
    assert report.mapped["dino_backbone"] == 5 + 18 * dino_layers + 2
    # Every released key is accounted for once (the two group tables become one of ours).
    assert sum(report.mapped.values()) + sum(report.dropped.values()) == len(state)
    assert len(model.state_dict()) == len(state) - 5 - 1

    # Tensors arrive unchanged under their new names, in the released dtypes.
    ours = model.state_dict()
    expert_k = "model.vlm_with_expert.lm_expert.layers.1.self_attn.k_proj.weight"
    assert torch.equal(ours["model.expert_layers.1.attention.k_proj.weight"], state[expert_k])
    lora = "model.vlm_with_expert.vlm.model.vision_model.base_model.model.encoder.layers.1.mlp.fc2.lora_B.default.weight"
    assert torch.equal(ours["model.vlm.vision_model.encoder.layers.1.mlp.fc2.lora_B.weight"], state[lora])
    base = "model.vlm_with_expert.vlm.model.vision_model.base_model.model.encoder.layers.0.self_attn.q_proj.base_layer.bias"
    assert torch.equal(ours["model.vlm.vision_model.encoder.layers.0.self_attn.q_proj.bias"], state[base])
    torch.testing.assert_close(ours["model.group_embedding.weight"], state["model.trace_time_embedding.weight"][:2].float()
                               + state["model.trace_seg_embedding.weight"].float(), rtol=0, atol=0)
    for name, tensor in ours.items():
        backbone = name.startswith(("model.vlm.", "model.dino.", "model.depth_patch_embedding.")) and ".lora_" not in name
        assert tensor.dtype == (torch.bfloat16 if backbone else torch.float32), name
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert "model.vlm.vision_model.encoder.layers.0.mlp.fc1.lora_A.weight" in trainable
    assert not any(name.startswith(("model.vlm.text_model", "model.dino.")) for name in trainable)

    config = model.config
    assert (config.num_vlm_layers, config.history_length, config.horizon, config.image_size) == (3, 8, 32, 64)
    assert (config.max_prompt_length, config.dino_image_size, config.expert_hidden_size) == (16, 56, 32)
    assert config.use_depth and config.use_dino and config.use_done_head and config.rigidity_loss_weight == 5.0
    assert processor.delta_scale == [0.6625, 0.7411, 0.2075]
    assert processor.depth_log_range == [-1.3824, 0.7629]


def test_unknown_keys_shape_mismatches_and_unsupported_configs_fail_by_name(tmp_path, release):
    step, cfg, state, _, _ = release
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(cfg))
    (broken / "normalizer_stats.json").write_text(json.dumps(STATS))
    save_file({**state, "model.trace_extra_head.weight": torch.zeros(2, 2)}, broken / "model.safetensors")
    with pytest.raises(ValueError, match="model.trace_extra_head.weight"):
        convert_released_checkpoint(str(broken))
    save_file({**state, "model.trace_out_proj_future.bias": torch.zeros(31)}, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"trace_velocity_head.bias.*\(31,\)"):
        convert_released_checkpoint(str(broken))
    vlm, dino = tiny_backbones()
    for field, value in (("trace_group_horizon", 1), ("trace_bspline_ctrl_per_token", 5), ("add_image_special_tokens", True)):
        with pytest.raises(ValueError, match=field):
            mu0_config_from_released({**cfg, field: value}, vlm, dino)
    (broken / "normalizer_stats.json").unlink()
    with pytest.raises(FileNotFoundError, match="normalizer_stats.json"):
        convert_released_checkpoint(str(broken))


def test_folders_that_are_not_released_checkpoints_are_refused(tmp_path, converted):
    """A missing folder, an empty one, a μ0 folder and a non-trace policy: each once failed with a bare
    FileNotFoundError or KeyError from deep inside the converter."""
    empty = tmp_path / "empty"
    empty.mkdir()
    ours = tmp_path / "ours"
    converted[0].save_pretrained(ours)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"type": "smolvla", "trace_mode": False}))
    save_file({"x": torch.zeros(1)}, other / "model.safetensors")
    for folder, detail in ((tmp_path / "absent", "is not a folder"), (empty, "has no config.json or model.safetensors"),
                           (ours, "already a μ0 folder"), (other, "not a SmolVLA policy in trace mode")):
        with pytest.raises(ValueError, match=f"not a released checkpoint: .*{detail}"):
            convert_released_checkpoint(str(folder))


# ---------------------------------------------------------------------------------------------------- parity
def fp32_pair(release, converted):
    _, cfg, state, vlm, dino = release
    reference = ReleasedTraceModel({key: value.float() for key, value in state.items()}, cfg, vlm, dino)
    return cfg, reference, copy.deepcopy(converted[0]).float().eval()


@pytest.mark.parametrize("headline", [False, True], ids=["depth+history", "no-depth-no-history"])
def test_predict_traces_matches_the_released_sampler(release, converted, headline):
    cfg, reference, model = fp32_pair(release, converted)
    batch = released_batch(cfg, with_depth=not headline)
    noise = torch.randn(2, 5, cfg["trace_bspline_n_ctrl"], 3, generator=torch.Generator().manual_seed(1))
    expected = reference.sample_traces(batch, noise, num_steps=4, mask_all_history=headline)
    inputs = released_batch_to_inputs(batch, model, mask_all_history=headline)
    predicted = model.predict_traces(**inputs, noise=noise[:, None], num_steps=4)
    real = batch["key_pad_mask"]
    traces_error = (predicted.traces[:, 0] - expected["traces"])[real].abs().max().item()
    done_error = (predicted.done_probs[:, 0] - expected["done_prob"])[real].abs().max().item()
    print(f"parity {'headline' if headline else 'depth+history'}: traces {traces_error:.2e}, done_prob {done_error:.2e}")
    assert expected["traces"][real].abs().mean() > 0.1  # the comparison is not between near-zero outputs
    assert traces_error < 1e-4 and done_error < 1e-4


def test_released_batches_are_sized_by_the_model_they_feed(release, converted):
    """The DINOv2 input size comes from the model's config: a default of 518 px fed this 56-px model a wrong grid."""
    cfg, _, model = fp32_pair(release, converted)
    batch = released_batch(cfg)
    inputs = released_batch_to_inputs(batch, model)
    assert inputs["dino_pixel_values"].shape[-2:] == (56, 56) == (cfg["dino_input_size"],) * 2
    assert "history" in inputs  # the model is not taken for mask_all_history
    torch.testing.assert_close(released_batch_to_inputs(batch, model.config)["dino_pixel_values"], inputs["dino_pixel_values"])
    small = dict(batch, **{"observation.images.cam_front": batch["observation.images.cam_front"][..., :32, :32]})
    with pytest.raises(ValueError, match="image_size"):
        released_batch_to_inputs(small, model)


def test_training_loss_matches_the_released_loss(release, converted):
    cfg, reference, model = fp32_pair(release, converted)
    batch = released_batch(cfg, with_future=True)
    assert not batch["valid_kp"].all() and batch["valid_kp"].any()
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(2, 5, cfg["trace_bspline_n_ctrl"], 3, generator=generator)
    time = torch.tensor([0.3, 0.8])
    expected = reference.loss(batch, noise, time)
    with torch.no_grad():
        output = model(**released_batch_to_inputs(batch, model), noise=noise, time=time)
    relative = abs(output.loss.item() - expected["loss"].item()) / expected["loss"].item()
    print(f"parity loss: ours {output.loss.item():.6f}, released {expected['loss'].item():.6f}, relative {relative:.2e}")
    assert expected["rigidity"] > 0 and expected["done"] > 0
    for ours, theirs in ((output.flow_loss, expected["fm"]), (output.rigidity_loss, expected["rigidity"]),
                         (output.done_loss, expected["done"])):
        assert abs(ours.item() - theirs.item()) <= 1e-4 * theirs.item()
    assert relative < 1e-4


# --------------------------------------------------------------------------------------------- CLI and Hub
RELOAD = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModel, AutoProcessor
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    torch.save({"state": model.state_dict(), "delta_scale": processor.delta_scale}, sys.argv[2])
    """
)


def test_mu0_convert_writes_a_loadable_folder_and_pushes_it(hub, tmp_path, release, converted):
    step = release[0]
    out = tmp_path / "mu0-released"
    with hub.serve() as endpoint:
        env = hub.subprocess_env(endpoint, home=tmp_path / "home")
        result = subprocess.run([sys.executable, "-m", "mu0.training.cli", "convert", str(step), str(out),
                                 "--push-to-hub", "user/mu0-released"], capture_output=True, text=True, env=env,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "dropped lm_head_unused: 1" in result.stdout
        card = (out / "README.md").read_text()
        assert str(os.path.abspath(step)) in card and "converted" in card
        assert {"model.safetensors", "config.json", "modeling_mu0.py", "processor_config.json", "README.md"} <= \
            hub.files("user/mu0-released").keys()
        script, saved = tmp_path / "reload.py", tmp_path / "state.pt"
        script.write_text(RELOAD)
        reload = subprocess.run([sys.executable, str(script), "user/mu0-released", str(saved)], capture_output=True,
                                text=True, env=env, timeout=300, cwd=tmp_path)
    assert reload.returncode == 0, reload.stderr[-3000:]
    loaded = torch.load(saved, weights_only=True)
    assert loaded["delta_scale"] == [0.6625, 0.7411, 0.2075]
    expected = converted[0].state_dict()
    assert loaded["state"].keys() == expected.keys()
    for name, tensor in loaded["state"].items():
        assert tensor.dtype == expected[name].dtype, name
        torch.testing.assert_close(tensor.float(), expected[name].float(), rtol=0, atol=0, msg=name)


def test_the_full_size_release_maps_onto_the_default_mu0_group_by_group():
    """The release recipe at full size (SmolVLM2-2.2B, 20 layers, DINOv2-base) on the meta device: the key groups and
    totals of the released file (1417 keys, 2 587 257 390 parameters) all land on the default Mu0ForTracePrediction."""
    from mu0 import Mu0ForTracePrediction
    from mu0.configuration_mu0 import DINOV2_BASE_ARCHITECTURE, SMOLVLM2_2B_ARCHITECTURE
    from mu0.convert import convert_state_dict

    vlm, dino = SmolVLMConfig(**SMOLVLM2_2B_ARCHITECTURE), Dinov2Config(**DINOV2_BASE_ARCHITECTURE)
    cfg = released_config("HuggingFaceTB/SmolVLM2-2.2B-Instruct", "facebook/dinov2-base", num_vlm_layers=20,
                          resize_imgs_with_padding=[512, 512], tokenizer_max_length=48, dino_input_size=518, n_max=256)
    with torch.device("meta"):
        state = released_state_dict(cfg, vlm, dino)
        model = Mu0ForTracePrediction(mu0_config_from_released(cfg, vlm, dino))
    assert len(state) == 1417 and sum(tensor.numel() for tensor in state.values()) == 2_587_257_390
    _, report = convert_state_dict(state, model.state_dict())
    assert report.mapped == {
        "vision_embeddings": 3, "vision_encoder_layers": 432, "depth_lora": 324, "vision_post_layernorm": 2,
        "depth_patch_stem": 2, "connector": 1, "text_embed_tokens": 1, "vlm_text_layers": 180, "vlm_text_final_norm": 1,
        "expert_layers": 180, "expert_final_norm": 1, "adaln_timestep_embedder": 4, "adaln_modulation_heads": 40,
        "suffix_in_proj_history": 2, "suffix_in_proj_future": 2, "suffix_group_embedding": 1,
        "suffix_segment_embedding": 1, "suffix_uv_fourier_mlp": 4, "dino_backbone": 223, "dino_fusion_mlp": 4,
        "velocity_head": 2, "done_head": 2,
    }
    assert report.dropped == {"lm_head_unused": 1, "action_time_mlp_unused": 4} and report.unused_group_rows == 38
