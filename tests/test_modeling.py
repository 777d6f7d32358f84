"""Mu0Config and Mu0ForTracePrediction: construction, losses, sampling, invariances and input validation."""

import json

import pytest
import torch
from conftest import inference_inputs, make_model, make_processor, random_batch
from transformers import AutoConfig

from mu0 import Mu0Config, Mu0ForTracePrediction
from mu0.presets import preset_config


# ----------------------------------------------------------------------------------------------------- config
def test_default_config_builds_on_meta_and_counts_parameters():
    config = Mu0Config()
    assert config.vlm_config.model_type == "smolvlm"
    assert config.vlm_config.text_config.num_hidden_layers == 20
    assert config.expert_hidden_size == 1024
    with torch.device("meta"):
        model = Mu0ForTracePrediction(config)
    total, trainable = model.num_parameters(), model.num_parameters(only_trainable=True)
    assert len(model.model.expert_layers) == 20
    assert 2.0e9 < total < 3.0e9  # a 2.2B backbone slice plus DINOv2-base and the expert
    assert 0.3e9 < trainable < 0.7e9  # ~0.5B trainable: the expert and the depth LoRA
    assert all(not p.requires_grad for p in model.model.vlm.get_decoder().parameters())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_control_points": 5}, "num_control_points"),
        ({"horizon": 6}, "horizon"),
        ({"num_vlm_layers": 9}, "num_vlm_layers"),
        ({"sampler": "ddim"}, "sampler"),
        ({"self_attn_every_n_layers": 0}, "self_attn_every_n_layers"),
        ({"use_depth": True, "depth_lora_rank": 0}, "depth_lora_rank"),
    ],
)
def test_invalid_config_combinations_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        preset_config("tiny", **overrides)


@pytest.mark.parametrize(
    "field, value", [("horizon", "32"), ("use_depth", "no"), ("max_queries", 64.5), ("image_size", True), ("sampler", 1)]
)
def test_config_fields_must_hold_their_types(field, value):
    """A hand-edited config.json once built `use_depth: "no"` as True and `max_queries: 64.5` as is."""
    with pytest.raises(ValueError, match=rf"Mu0Config\.{field} must be"):
        preset_config("tiny", **{field: value})


def test_a_saved_config_without_its_backbone_config_is_refused(tmp_path, tiny_config):
    """Without `vlm_config` the default 2.2 B SmolVLM2 used to be built silently, then fed the tiny weights."""
    tiny_config.save_pretrained(tmp_path)
    settings = json.loads((tmp_path / "config.json").read_text())
    del settings["vlm_config"]
    (tmp_path / "config.json").write_text(json.dumps(settings))
    for load in (Mu0Config.from_pretrained, AutoConfig.from_pretrained):
        with pytest.raises(ValueError, match="lacks \\['vlm_config'\\]"):
            load(tmp_path)


def test_config_round_trip(tmp_path, tiny_config):
    tiny_config.save_pretrained(tmp_path)
    loaded = Mu0Config.from_pretrained(tmp_path)
    assert loaded.to_dict()["vlm_config"] == tiny_config.to_dict()["vlm_config"]
    assert loaded.num_control_points == tiny_config.num_control_points
    assert loaded.expert_hidden_size == tiny_config.expert_hidden_size


# -------------------------------------------------------------------------------------------------- structure
def test_expert_layers_alternate_joint_and_cross(tiny_model):
    kinds = [layer.joint for layer in tiny_model.model.expert_layers]
    assert kinds == [index % 2 == 0 for index in range(len(kinds))]
    cross = tiny_model.model.expert_layers[1].attention
    kv_dim = cross.num_kv_heads * cross.head_dim
    assert cross.k_proj.in_features == kv_dim  # re-projects the backbone's prefix keys
    assert tiny_model.model.expert_layers[0].attention.k_proj.in_features == tiny_model.config.expert_hidden_size


def test_adaln_zero_layers_start_as_identity(tiny_model, tiny_processor):
    batch = random_batch(tiny_processor)
    prefix = tiny_model.model.compute_prefix(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    hidden = torch.randn(2, 6, tiny_model.config.expert_hidden_size)
    condition = torch.randn(2, tiny_model.config.expert_hidden_size)
    mask = tiny_model.model.suffix_attention_mask(prefix.attention_mask, batch["query_mask"])
    cos, sin = tiny_model.model.suffix_rotary(prefix)
    for layer, keys, values in zip(tiny_model.model.expert_layers, prefix.keys, prefix.values):
        out = layer(hidden, condition, keys, values, mask if layer.joint else mask[..., : keys.shape[2]], cos, sin)
        torch.testing.assert_close(out, hidden)


def test_depth_lora_is_active_only_for_the_depth_pass(tiny_model, tiny_processor):
    batch = random_batch(tiny_processor)
    with torch.no_grad():
        rgb_before = tiny_model.model.encode_images(batch["pixel_values"])
        for layer in tiny_model.model.depth_lora_layers:
            layer.lora_B.weight.normal_()
        rgb_after = tiny_model.model.encode_images(batch["pixel_values"])
        with tiny_model.model.depth_pass():
            depth_tokens = tiny_model.model.encode_images(batch["pixel_values"])
    torch.testing.assert_close(rgb_before, rgb_after)
    assert (depth_tokens - rgb_after).abs().max() > 1e-3
    assert not any(layer.depth_active for layer in tiny_model.model.depth_lora_layers)


def test_suffix_attention_mask_rules(tiny_model):
    prefix_mask = torch.tensor([[True, True, False]])
    query_mask = torch.tensor([[True, True, False]])
    history_visible = torch.tensor([[True, False, True]])  # the second query's history was dropped
    mask = tiny_model.model.suffix_attention_mask(prefix_mask, query_mask, history_visible)[0]
    prefix, suffix = mask[:, :3], mask[:, 3:]
    assert prefix.tolist() == [[True, True, False]] * 6
    history_rows, future_rows = suffix[:3], suffix[3:]
    # history tokens see visible history only; future tokens see every visible suffix token; padding is never seen
    assert history_rows.tolist() == [[True, False, False, False, False, False]] * 3
    assert future_rows.tolist() == [[True, False, False, True, True, False]] * 3
    # without history (the no-history protocol) no history token is seen at all
    no_history = tiny_model.model.suffix_attention_mask(prefix_mask, query_mask)[0][:, 3:]
    assert not no_history[:, :3].any() and no_history[3:, 3:].tolist() == [[True, True, False]] * 3


# ------------------------------------------------------------------------------------------------------- loss
def test_forward_returns_each_loss_term_and_trains_only_the_expert(tiny_model, tiny_processor):
    tiny_model.train()
    output = tiny_model(**random_batch(tiny_processor))
    for term in ("loss", "flow_loss", "done_loss", "rigidity_loss"):
        assert torch.isfinite(getattr(output, term))
    expected = output.flow_loss + 0.5 * output.done_loss + 5.0 * output.rigidity_loss
    torch.testing.assert_close(output.loss.detach(), expected)
    output.loss.backward()
    assert all(p.grad is None for p in tiny_model.model.vlm.get_decoder().parameters())
    assert all(p.grad is None for p in tiny_model.model.dino.parameters())
    assert tiny_model.model.expert_layers[0].adaln_modulation.weight.grad.abs().sum() > 0
    assert tiny_model.trace_velocity_head.weight.grad.abs().sum() > 0
    assert any(layer.lora_A.weight.grad is not None for layer in tiny_model.model.depth_lora_layers)


def test_rigidity_loss_is_zero_for_rigid_motion_and_positive_for_stretching():
    translation = torch.linspace(0, 1, 10)[:, None] * torch.tensor([0.5, -0.2, 0.1])
    rigid = torch.stack([translation, translation + torch.tensor([0.3, 0.0, 0.0])])[None]  # (1, 2, 10, 3)
    stretched = rigid.clone()
    stretched[0, 1, :, 0] += torch.linspace(0, 1, 10)  # the second point drifts away from the first
    clusters, valid = torch.tensor([[0, 0]]), torch.tensor([[True, True]])
    assert Mu0ForTracePrediction.rigidity_loss(rigid, clusters, valid) < 1e-10
    # distances grow 0.3 -> 1.3 linearly over 10 control points: population variance of linspace(0.3, 1.3, 10)
    expected = torch.linspace(0.3, 1.3, 10).var(unbiased=False)
    torch.testing.assert_close(Mu0ForTracePrediction.rigidity_loss(stretched, clusters, valid), expected)
    assert Mu0ForTracePrediction.rigidity_loss(stretched, torch.tensor([[0, 1]]), valid) == 0


def test_rigidity_loss_is_the_mean_over_the_pairs_of_a_three_point_cluster():
    """Two control points; point 1 moves from (1, 0, 0) to (2, 0, 0), points 0 and 2 stay at the origin and (0, 1, 0).
    Pair distances: (0, 1) 1 -> 2, (0, 2) 1 -> 1, (1, 2) sqrt(2) -> sqrt(5); population variances 1/4, 0 and
    ((sqrt(5) - sqrt(2)) / 2)^2, averaged over the three pairs of the one cluster."""
    points = torch.tensor([[[0.0, 0, 0], [0, 0, 0]], [[1, 0, 0], [2, 0, 0]], [[0, 1, 0], [0, 1, 0]]])[None]
    expected = (0.25 + 0.0 + ((5**0.5 - 2**0.5) / 2) ** 2) / 3
    loss = Mu0ForTracePrediction.rigidity_loss(points, torch.tensor([[4, 4, 4]]), torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-6, atol=0)


def test_done_loss_targets_the_per_step_validity(tiny_model, tiny_processor):
    """The done head learns "step k is still valid": BCE against labels_mask, averaged over steps, then queries."""
    batch = random_batch(tiny_processor)
    lengths = torch.tensor([[32, 12, 20], [5, 27, 0]])  # the second image has two real queries
    batch["labels_mask"] = torch.arange(32)[None, None] < lengths[..., None]
    with torch.no_grad():
        tiny_model.trace_done_head.weight.normal_(0, 0.5)
        output = tiny_model(**batch, noise=torch.randn(2, 3, 10, 3), time=torch.tensor([0.3, 0.6]))
    probability = torch.sigmoid(output.done_logits.double())
    target = batch["labels_mask"].double()
    per_step = -(target * probability.log() + (1 - target) * (1 - probability).log())
    real = batch["query_mask"]
    expected = per_step.mean(-1)[real].mean()
    torch.testing.assert_close(output.done_loss.double(), expected, rtol=1e-5, atol=0)


def test_non_finite_outputs_stop_sampling_naming_the_step(tiny_model, tiny_processor, monkeypatch):
    inputs = inference_inputs(random_batch(tiny_processor))
    denoise_step, calls = tiny_model.denoise_step, []

    def diverging(*args, **kwargs):
        velocity, done_logits = denoise_step(*args, **kwargs)
        calls.append(1)
        return (velocity * float("nan"), done_logits) if len(calls) == 3 else (velocity, done_logits)

    monkeypatch.setattr(tiny_model, "denoise_step", diverging)
    with pytest.raises(FloatingPointError, match=r"denoising step 3 of 4 \(flow time 0.500\)"):
        tiny_model.predict_traces(**inputs, num_steps=4)


def test_done_head_starts_alive(tiny_model, tiny_processor):
    prediction = tiny_model.predict_traces(**inference_inputs(random_batch(tiny_processor)))
    expected = torch.sigmoid(torch.tensor(3.0))
    torch.testing.assert_close(prediction.done_probs, torch.full_like(prediction.done_probs, expected.item()))
    assert prediction.alive_mask.all()


def test_thirty_steps_lower_the_loss(tiny_config, tiny_processor):
    model = make_model(tiny_config).train()
    batch = random_batch(tiny_processor, num_queries=(6, 6))
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 6, tiny_config.num_control_points, 3, generator=generator)
    time = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        before = model(**batch, noise=noise, time=time).loss.item()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(30):
        optimizer.zero_grad()
        model(**batch, noise=noise, time=time).loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = model(**batch, noise=noise, time=time).loss.item()
    assert after < 0.75 * before


def test_gradient_checkpointing_matches(tiny_config, tiny_processor):
    batch = random_batch(tiny_processor)
    noise, time = torch.randn(2, 3, tiny_config.num_control_points, 3), torch.tensor([0.4, 0.9])
    losses, grads = [], []
    for checkpointing in (False, True):
        model = make_model(tiny_config).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        loss = model(**batch, noise=noise, time=time).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.model.expert_layers[1].attention.q_proj.weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])


# --------------------------------------------------------------------------------------------------- sampling
def test_cached_and_uncached_sampling_agree(tiny_model, tiny_processor):
    inputs = inference_inputs(random_batch(tiny_processor))
    cached = tiny_model.predict_traces(**inputs, num_samples=2, generator=torch.Generator().manual_seed(3))
    uncached = tiny_model.predict_traces(
        **inputs, num_samples=2, generator=torch.Generator().manual_seed(3), use_prefix_cache=False
    )
    torch.testing.assert_close(cached.traces, uncached.traces)
    assert cached.traces.shape == (2, 2, 3, tiny_model.config.horizon, 3)
    assert cached.control_points.shape == (2, 2, 3, tiny_model.config.num_control_points, 3)


def perturb_expert(model, seed=1):
    """Give the zero-initialised gates and heads values, so sampling depends on every input."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def test_scheduler_sampling_matches_plain_euler(tiny_model, tiny_processor):
    model = perturb_expert(tiny_model)
    inputs = inference_inputs(random_batch(tiny_processor))
    noise = torch.randn(2, 1, 3, model.config.num_control_points, 3, generator=torch.Generator().manual_seed(0))
    predicted = model.predict_traces(**inputs, noise=noise, num_steps=4).control_points
    prefix = model.model.compute_prefix(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"],
                                  inputs["depth_pixel_values"], inputs["depth_mask"])
    fourier, dino = model.model.point_context(inputs["query_points"], inputs["dino_pixel_values"])
    sample = noise[:, 0]
    with torch.no_grad():
        for step in range(4):
            time = torch.full((2,), 1.0 - step / 4)
            velocity, _ = model.denoise_step(prefix, sample, time, inputs["query_mask"], fourier, dino,
                                             inputs["history"], inputs["history_mask"])
            sample = sample - 0.25 * velocity
    torch.testing.assert_close(predicted[:, 0], sample, rtol=1e-4, atol=1e-5)
    assert (sample - noise[:, 0]).abs().max() > 1e-3  # the velocity field actually moved the sample


def test_padding_and_query_order_do_not_change_predictions(tiny_model, tiny_processor):
    model = perturb_expert(tiny_model)
    inputs = inference_inputs(random_batch(tiny_processor, num_queries=(3,)))
    noise = torch.randn(1, 1, 3, model.config.num_control_points, 3)
    reference = model.predict_traces(**inputs, noise=noise).traces

    padded = dict(inputs)
    padded["query_points"] = torch.cat([inputs["query_points"], torch.rand(1, 2, 2) * 2 - 1], dim=1)
    padded["query_mask"] = torch.cat([inputs["query_mask"], torch.zeros(1, 2, dtype=torch.bool)], dim=1)
    padded["history"] = torch.cat([inputs["history"], torch.randn(1, 2, 8, 3)], dim=1)
    padded["history_mask"] = torch.cat([inputs["history_mask"], torch.ones(1, 2, 8, dtype=torch.bool)], dim=1)
    padded_noise = torch.cat([noise, torch.randn(1, 1, 2, model.config.num_control_points, 3)], dim=2)
    with_padding = model.predict_traces(**padded, noise=padded_noise).traces
    torch.testing.assert_close(with_padding[:, :, :3], reference, rtol=1e-4, atol=1e-5)

    order = torch.tensor([2, 0, 1])
    permuted = dict(inputs)
    for key in ("query_points", "query_mask", "history", "history_mask"):
        permuted[key] = inputs[key][:, order]
    shuffled = model.predict_traces(**permuted, noise=noise[:, :, order]).traces
    torch.testing.assert_close(shuffled, reference[:, :, order], rtol=1e-4, atol=1e-5)


def test_depth_changes_predictions_only_when_present(tiny_model, tiny_processor):
    model = perturb_expert(tiny_model)
    with_depth = inference_inputs(random_batch(tiny_processor))
    noise = torch.randn(2, 1, 3, model.config.num_control_points, 3)
    without = {k: v for k, v in with_depth.items() if k not in ("depth_pixel_values", "depth_mask")}
    masked_out = dict(with_depth, depth_mask=torch.zeros(2, dtype=torch.bool))
    a = model.predict_traces(**with_depth, noise=noise).traces
    b = model.predict_traces(**without, noise=noise).traces
    c = model.predict_traces(**masked_out, noise=noise).traces
    assert (a - b).abs().max() > 1e-5
    torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backbone", ["smolvlm", "paligemma"])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_backbones_train_and_sample(backbone, sampler, tiny_processor):
    config = preset_config("tiny", backbone, sampler=sampler)
    model = make_model(config).train()
    processor = make_processor(config)
    batch = random_batch(processor)
    output = model(**batch)
    output.loss.backward()
    assert torch.isfinite(output.loss)
    prediction = model.eval().predict_traces(**inference_inputs(batch), num_samples=3, num_steps=2)
    assert prediction.traces.shape == (2, 3, 3, config.horizon, 3)
    assert torch.isfinite(prediction.traces).all()


def test_model_without_depth_dino_or_history(tiny_processor):
    config = preset_config("tiny", use_depth=False, use_dino=False, history_length=0)
    model = make_model(config)
    batch = inference_inputs(random_batch(make_processor(config), with_depth=False))
    batch.pop("history"), batch.pop("history_mask")
    assert model.model.dino is None and model.model.history_proj is None and not model.model.depth_lora_layers
    assert model.predict_traces(**batch).traces.shape == (2, 1, 3, config.horizon, 3)
    with pytest.raises(ValueError, match="use_depth=False"):
        model.predict_traces(**batch, depth_pixel_values=batch["pixel_values"])


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda b: b.update(query_points=b["query_points"].masked_fill(torch.rand(b["query_points"].shape) > -1, float("nan"))), "NaN"),
        (lambda b: b.update(query_points=b["query_points"][:, :0], query_mask=b["query_mask"][:, :0]), "empty"),
        (lambda b: b.update(query_points=torch.zeros(2, 65, 2), query_mask=None), "max_queries"),
        (lambda b: b.update(query_points=b["query_points"][:1], query_mask=b["query_mask"][:1]), "batch size"),
        (lambda b: b.update(query_points=b["query_points"] * 3), "outside"),
        (lambda b: b.update(dino_pixel_values=None), "dino_pixel_values"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny_model, tiny_processor, corrupt, message):
    batch = dict(inference_inputs(random_batch(tiny_processor)))
    corrupt(batch)
    with pytest.raises(ValueError, match=message):
        tiny_model.predict_traces(**batch)


def test_labels_need_their_mask(tiny_model, tiny_processor):
    batch = dict(random_batch(tiny_processor))
    batch.pop("labels_mask")
    with pytest.raises(ValueError, match="labels_mask"):
        tiny_model(**batch)


# ----------------------------------------------------------------------------------------- released computation
def test_prefix_is_the_backbone_with_scaled_embeddings_and_wavelength_10000(tiny_processor):
    """compute_prefix runs the kept text layers itself; the same keys/values come out of the backbone's own forward
    when its rope theta (SmolLM2's 130 000 here) is set to μ0's wavelength and the embeddings are pre-scaled by
    sqrt(hidden)."""
    import copy

    config = preset_config("tiny")
    config.vlm_config.text_config.rope_parameters["rope_theta"] = 130000.0
    tiny_model = make_model(config)
    batch = random_batch(tiny_processor)
    prefix = tiny_model.model.compute_prefix(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    text_model = copy.deepcopy(tiny_model.model.text_model)
    text_model.config.rope_parameters["rope_theta"] = 10000.0
    text_model.rotary_emb = type(text_model.rotary_emb)(text_model.config)
    with torch.no_grad():
        image = tiny_model.model.encode_images(batch["pixel_values"])
        embeds = torch.cat([image, tiny_model.model.vlm.get_input_embeddings()(batch["input_ids"])], dim=1)
        embeds = embeds * embeds.shape[-1] ** 0.5
        output = text_model(
            inputs_embeds=embeds,
            attention_mask=tiny_model.model.prefix_attention_mask(prefix.attention_mask, embeds.dtype),
            position_ids=(prefix.attention_mask.long().cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
        )
    for layer, keys in zip(output.cache.layers, prefix.keys):
        torch.testing.assert_close(layer.keys, keys)


def test_depth_off_equals_a_masked_depth_block(tiny_model, tiny_processor):
    """Leaving depth out and passing it masked (depth_mask False) give the same traces: masked tokens are never
    attended and take no rotary position, as in the released depth-off mode."""
    with torch.no_grad():  # open the adaLN-Zero gates, so the expert reads the prefix at all
        for layer in tiny_model.model.expert_layers:
            layer.adaln_modulation.weight.normal_(0, 0.1)
            layer.adaln_modulation.bias.normal_(0, 0.5)
    batch = inference_inputs(random_batch(tiny_processor))
    noise = torch.randn(2, 1, 3, 10, 3, generator=torch.Generator().manual_seed(3))
    masked = dict(batch, depth_mask=torch.zeros(2, dtype=torch.bool))
    omitted = {k: v for k, v in batch.items() if k not in ("depth_pixel_values", "depth_mask")}
    with torch.no_grad():
        torch.testing.assert_close(tiny_model.predict_traces(**masked, noise=noise).traces,
                                   tiny_model.predict_traces(**omitted, noise=noise).traces, rtol=1e-5, atol=1e-5)
        shown = tiny_model.predict_traces(**batch, noise=noise).traces
    assert (shown - tiny_model.predict_traces(**omitted, noise=noise).traces).abs().max() > 1e-4


def test_the_depth_tower_runs_only_on_rows_whose_depth_is_shown(tiny_model, tiny_processor):
    """Masked depth rows are not encoded (the headline RGB-only mode encoded a whole masked depth panel, about a
    quarter of a prediction); a partly masked batch gives each row what it gives alone."""
    with torch.no_grad():
        for layer in tiny_model.model.expert_layers:
            layer.adaln_modulation.weight.normal_(0, 0.1)
            layer.adaln_modulation.bias.normal_(0, 0.5)
    depth_batches = []
    tiny_model.model.depth_patch_embedding.register_forward_hook(lambda module, args, out: depth_batches.append(len(args[0])))
    batch = inference_inputs(random_batch(tiny_processor))
    noise = torch.randn(2, 1, 3, 10, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tiny_model.predict_traces(**dict(batch, depth_mask=torch.zeros(2, dtype=torch.bool)), noise=noise)
        assert depth_batches == []
        partial = tiny_model.predict_traces(**dict(batch, depth_mask=torch.tensor([False, True])), noise=noise).traces
        assert depth_batches == [1]
        for row, shown in ((0, False), (1, True)):
            alone = {key: value[row : row + 1] for key, value in batch.items()}
            alone["depth_mask"] = torch.tensor([shown])
            expected = tiny_model.predict_traces(**alone, noise=noise[row : row + 1]).traces
            real = batch["query_mask"][row]
            torch.testing.assert_close(partial[row : row + 1, :, real], expected[:, :, real], rtol=1e-5, atol=1e-5)


def test_cross_layer_queries_are_unrotated(tiny_model, tiny_processor):
    """Odd (cross) layers rotate neither their queries nor the re-projected keys: moving the suffix position only
    changes the joint layers."""
    batch = random_batch(tiny_processor)
    prefix = tiny_model.model.compute_prefix(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    cross = tiny_model.model.expert_layers[1].attention
    hidden = torch.randn(2, 6, tiny_model.config.expert_hidden_size)
    mask = tiny_model.model.suffix_attention_mask(prefix.attention_mask, batch["query_mask"])[..., : prefix.keys[1].shape[2]]
    cos, sin = tiny_model.model.suffix_rotary(prefix)
    with torch.no_grad():
        at_prefix_end = cross(hidden, prefix.keys[1], prefix.values[1], mask, cos, sin)
        elsewhere = cross(hidden, prefix.keys[1], prefix.values[1], mask, sin, cos)
    torch.testing.assert_close(at_prefix_end, elsewhere)


def test_control_point_targets_are_fitted_in_fp32_under_bf16_autocast(tiny_model, tiny_processor):
    batch = random_batch(tiny_processor)
    valid = batch["labels_mask"] & batch["query_mask"][..., None]
    reference, _ = tiny_model.trace_targets(batch["labels"], valid, batch["query_mask"])
    captured = {}
    fit = tiny_model.trace_targets

    def recording(*args):
        captured["targets"] = fit(*args)[0]
        return fit(*args)

    tiny_model.trace_targets = recording
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tiny_model(**batch)
    assert captured["targets"].dtype == torch.float32
    torch.testing.assert_close(captured["targets"], reference, rtol=0, atol=0)


def test_from_backbones_reads_and_checks_the_backbone_configs(tmp_path, tiny_config):
    from transformers import AutoModel

    vlm_config = tiny_config.vlm_config.to_dict()
    vlm_config["text_config"]["intermediate_size"] = 3 * tiny_config.vlm_config.text_config.hidden_size
    AutoModel.from_config(type(tiny_config.vlm_config).from_dict(vlm_config)).save_pretrained(tmp_path / "vlm")
    AutoModel.from_config(tiny_config.dino_config).save_pretrained(tmp_path / "dino")
    config = preset_config("tiny", backbone_checkpoint=str(tmp_path / "vlm"), dino_checkpoint=str(tmp_path / "dino"))
    with pytest.raises(ValueError, match="text_config.intermediate_size"):
        Mu0ForTracePrediction.from_backbones(config)
