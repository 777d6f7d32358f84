"""Baselines behind μ0's prediction interface, and Mu0Config's ablation switches."""

import json

import pytest
import torch
from conftest import inference_inputs, make_processor, random_batch

from mu0 import Mu0ForTracePrediction
from mu0.presets import preset_config
from mu0.training.baselines import (
    BASELINES,
    Mu0TokenizedTraceBaseline,
    Mu0TokenizedTraceConfig,
    TraceTokenizer,
    build_trace_model,
    load_trace_model,
)


@pytest.fixture(scope="module")
def rgb_config():
    return preset_config("tiny", use_depth=False)


@pytest.fixture(scope="module")
def processor(rgb_config):
    return make_processor(rgb_config)


def build(name, config, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_trace_model(name, config, **overrides)


# ----------------------------------------------------------------------------------------- shared interface
@pytest.mark.parametrize("name", BASELINES)
def test_each_model_lowers_its_loss_on_a_fixed_batch_and_predicts_traces(name, rgb_config, processor):
    model = build(name, rgb_config).train()
    batch = random_batch(processor, with_depth=False)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, rgb_config.trace_length if name != "dense_flow" else rgb_config.horizon, 3,
                        generator=generator)
    fixed = {} if name == "tokenized_vlm" else {"noise": noise, "time": torch.tensor([0.4, 0.7])}
    losses = []
    for _ in range(8):
        loss = model(**batch, **fixed).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    prediction = model.eval().predict_traces(**inference_inputs(batch), num_samples=3,
                                             generator=torch.Generator().manual_seed(0))
    assert prediction.traces.shape == (2, 3, 3, rgb_config.horizon, 3)
    assert prediction.alive_mask.shape == (2, 3, 3, rgb_config.horizon)
    assert torch.isfinite(prediction.traces).all()


def test_regression_is_deterministic_and_repeats_its_one_pass(rgb_config, processor):
    model = build("regression", rgb_config).eval()
    inputs = inference_inputs(random_batch(processor, with_depth=False))
    first = model.predict_traces(**inputs, num_samples=3, generator=torch.Generator().manual_seed(0)).traces
    second = model.predict_traces(**inputs, num_samples=3, generator=torch.Generator().manual_seed(5)).traces
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first[:, 0], first[:, 2], rtol=0, atol=0)
    with pytest.raises(ValueError, match="deterministic"):
        model.predict_traces(**inputs, noise=torch.zeros(2, 1, 3, 10, 3))


def test_regression_trains_clean_values_at_fixed_time(rgb_config, processor):
    model = build("regression", rgb_config).eval()
    batch = random_batch(processor, with_depth=False)
    with torch.no_grad():  # no noise or time is drawn: two calls give one loss
        torch.testing.assert_close(model(**batch).loss, model(**batch).loss, rtol=0, atol=0)
        prediction = model.predict_traces(**inference_inputs(batch)).control_points[:, 0]
        assert torch.allclose(model(**batch).velocity, prediction, atol=1e-5)


def test_dense_flow_generates_every_step_without_a_spline(rgb_config, processor):
    model = build("dense_flow", rgb_config).eval()
    assert model.model.future_proj.in_features == 3 * rgb_config.horizon
    assert model.trace_velocity_head.out_features == 3 * rgb_config.horizon
    inputs = inference_inputs(random_batch(processor, with_depth=False))
    noise = torch.randn(2, 1, 3, rgb_config.horizon, 3)
    prediction = model.predict_traces(**inputs, noise=noise, num_steps=1)
    assert prediction.control_points is None and prediction.traces.shape[-2] == rgb_config.horizon
    velocity = model(**inputs, noise=noise[:, 0], time=torch.ones(2)).velocity
    torch.testing.assert_close(prediction.traces[:, 0], noise[:, 0] - velocity, rtol=1e-4, atol=1e-5)  # one Euler step


def test_dense_loss_ignores_invalid_steps(rgb_config, processor):
    model = build("dense_flow", rgb_config).eval()
    batch = random_batch(processor, with_depth=False)
    noise, time = torch.randn(2, 3, rgb_config.horizon, 3), torch.tensor([0.3, 0.6])
    batch["labels_mask"][:, :, 20:] = False
    changed = dict(batch, labels=batch["labels"].clone())
    changed["labels"][:, :, 20:] += 5.0
    with torch.no_grad():
        torch.testing.assert_close(model(**batch, noise=noise, time=time).flow_loss,
                                   model(**changed, noise=noise, time=time).flow_loss)


# -------------------------------------------------------------------------------------------------- tokenized
def test_tokenisation_round_trips_within_one_bin():
    tokenizer = TraceTokenizer(num_bins=64, value_range=2.0, num_waypoints=4, horizon=16, token_offset=100)
    points = torch.rand(2, 5, 2) * 2 - 1
    labels = (torch.rand(2, 5, 16, 3) * 4 - 2) * 0.999
    token_ids, target = tokenizer.encode(points, labels, torch.ones(2, 5, 16, dtype=torch.bool))
    assert token_ids.shape == (2, 5, tokenizer.tokens_per_query) and token_ids.min() >= 100 and token_ids.max() < 164
    assert not target[..., :2].any() and target[..., 2:].all()
    point_values = tokenizer.dequantise(token_ids[..., :2] - 100, -1.0, 1.0)
    assert (point_values - points).abs().max() <= tokenizer.bin_width(-1.0, 1.0)
    waypoints = tokenizer.decode_waypoints(token_ids[..., 2:])
    assert (waypoints - labels[:, :, tokenizer.waypoint_steps]).abs().max() <= tokenizer.bin_width(-2.0, 2.0)
    traces = tokenizer.render(waypoints)  # the waypoints are the traces at their steps, interpolated between
    torch.testing.assert_close(traces[:, :, tokenizer.waypoint_steps], waypoints)
    torch.testing.assert_close(traces[:, :, 1], waypoints[:, :, 0] / 2)  # halfway from the anchor (delta 0)
    clipped = tokenizer.decode_waypoints(tokenizer.encode(points, labels + 10, torch.ones(2, 5, 16, dtype=torch.bool))[0][..., 2:])
    assert (clipped <= 2.0).all() and (clipped > 2.0 - tokenizer.bin_width(-2.0, 2.0)).all()


def test_tokenized_config_appends_bin_tokens_once(tmp_path, rgb_config):
    model = build("tokenized_vlm", rgb_config)
    config = model.config
    assert config.trace_token_offset == rgb_config.vlm_config.get_text_config().vocab_size
    assert config.vlm_config.get_text_config().vocab_size == config.trace_token_offset + config.num_coordinate_bins
    assert model.vlm.lm_head.out_features == config.trace_token_offset + config.num_coordinate_bins
    model.save_pretrained(tmp_path)
    reloaded = load_trace_model(str(tmp_path))
    assert isinstance(reloaded, Mu0TokenizedTraceBaseline)
    assert reloaded.config.vlm_config.get_text_config().vocab_size == config.vlm_config.get_text_config().vocab_size
    assert not any(p.requires_grad for n, p in model.vlm.named_parameters() if "vision" in n)
    assert all(p.requires_grad for p in model.text_model.parameters())
    with pytest.raises(ValueError, match="num_waypoints"):
        Mu0TokenizedTraceConfig(**{**Mu0TokenizedTraceConfig().to_dict(), "num_waypoints": 5, "trace_token_offset": None})
    with pytest.raises(ValueError, match="RGB image"):
        build("tokenized_vlm", rgb_config, use_dino=True)


@pytest.mark.parametrize("backbone", ["smolvlm", "paligemma"])
def test_greedy_generation_matches_teacher_forcing(backbone):
    """The cached token-by-token generation sees what the teacher-forced pass sees (masks, positions, padding)."""
    config = preset_config("tiny", backbone=backbone, use_depth=False)
    processor = make_processor(config)
    model = build("tokenized_vlm", config, sampling_temperature=0.0).eval()
    batch = random_batch(processor, num_queries=(3, 2), with_depth=False)
    prediction = model.predict_traces(**inference_inputs(batch), num_samples=2)
    torch.testing.assert_close(prediction.traces[:, 0], prediction.traces[:, 1])  # greedy: samples agree
    tokenizer = model.trace_tokenizer
    labels = torch.zeros_like(batch["labels"])
    labels[:, :, tokenizer.waypoint_steps] = prediction.control_points[:, 0]
    with torch.no_grad():
        output = model(**dict(batch, labels=labels, labels_mask=torch.ones_like(batch["labels_mask"])))
    token_ids, target = tokenizer.encode(batch["query_points"], labels, batch["labels_mask"] | True)
    bins = output.logits[..., tokenizer.token_offset : tokenizer.token_offset + tokenizer.num_bins].argmax(-1)
    expected = token_ids.flatten(1) - tokenizer.token_offset
    real = target.flatten(1) & batch["query_mask"].repeat_interleave(tokenizer.tokens_per_query, dim=1)
    assert torch.equal(bins[real], expected[real])


def test_tokenized_baseline_rejects_depth(rgb_config, processor):
    model = build("tokenized_vlm", rgb_config).eval()
    batch = random_batch(make_processor(preset_config("tiny")), with_depth=True)
    with pytest.raises(ValueError, match="no depth"):
        model.predict_traces(**inference_inputs(batch))


# ------------------------------------------------------------------------------------------------ ablations
def test_flow_loss_is_the_released_sum_over_control_point_values(processor):
    """Released reduction: squared error summed over the D x 3 values of a query, averaged over trained queries."""
    from mu0.bspline import fit_control_points

    config = preset_config("tiny")
    assert (config.trace_objective, config.trace_parameterisation, config.use_history, config.use_done_head) == (
        "flow_matching", "bspline", True, True)
    model = Mu0ForTracePrediction(config).eval()
    batch = random_batch(processor)
    noise = torch.randn(2, 3, 10, 3, generator=torch.Generator().manual_seed(0))
    time = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        output = model(**batch, noise=noise, time=time)
    valid = batch["labels_mask"] & batch["query_mask"][..., None]
    targets, fit_ok = fit_control_points(batch["labels"], valid, 10, smoothness=0.2, clip=1.5)
    trained = fit_ok & batch["query_mask"]
    error = output.velocity - (noise - targets)
    expected = ((error**2).sum(dim=(-1, -2)) * trained).sum() / trained.sum()
    torch.testing.assert_close(output.flow_loss, expected)
    assert output.flow_loss > 10 * ((error**2).mean(dim=(-1, -2)) * trained).sum() / trained.sum()


def test_ablation_switches_change_what_they_should(processor):
    batch = random_batch(processor)
    inputs = inference_inputs(batch)
    reference = build("mu0", preset_config("tiny")).eval()

    no_history = build("mu0", preset_config("tiny", use_history=False)).eval()
    assert no_history.model.history_proj is None
    with torch.no_grad():
        hidden = dict(inputs, history_mask=torch.zeros_like(inputs["history_mask"]))
        noise = torch.randn(2, 1, 3, 10, 3)
        torch.testing.assert_close(no_history.predict_traces(**inputs, noise=noise).traces,
                                   no_history.predict_traces(**hidden, noise=noise).traces)  # history is never read

    no_done = build("mu0", preset_config("tiny", use_done_head=False)).eval()
    assert no_done.trace_done_head is None
    output = no_done(**batch)
    assert output.done_logits is None and output.done_loss == 0
    assert no_done.predict_traces(**inputs).alive_mask.all()

    no_rigidity = build("mu0", preset_config("tiny", rigidity_loss_weight=0.0)).eval()
    with torch.no_grad():
        fixed = {"noise": torch.randn(2, 3, 10, 3), "time": torch.tensor([0.2, 0.9])}
        kept, dropped = reference(**batch, **fixed), no_rigidity(**batch, **fixed)
    assert kept.rigidity_loss > 0
    torch.testing.assert_close(dropped.loss, kept.loss - 5.0 * kept.rigidity_loss)

    no_dino = build("mu0", preset_config("tiny", use_dino=False))
    assert no_dino.model.dino is None and no_dino.model.dino_fusion_in is None
    no_depth = build("mu0", preset_config("tiny", use_depth=False))
    assert not no_depth.model.depth_lora_layers
    for control_points in (4, 7):
        model = build("mu0", preset_config("tiny", num_control_points=control_points)).eval()
        assert model.predict_traces(**inputs).control_points.shape[-2] == control_points


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"trace_objective": "diffusion"}, "trace_objective"),
        ({"trace_parameterisation": "fourier"}, "trace_parameterisation"),
        ({"rigidity_loss_weight": -1.0}, "Loss weights"),
        ({"num_control_points": 5}, "num_control_points"),
    ],
)
def test_invalid_switches_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        preset_config("tiny", **overrides)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"trace_objective": "regression"}, "Mu0ForTraceRegression"),
        ({"trace_parameterisation": "dense"}, "Mu0ForDenseTracePrediction"),
        ({"trace_objective": "regression", "trace_parameterisation": "dense"}, "Mu0ForDenseTraceRegression"),
    ],
)
def test_baselines_are_their_own_classes_on_every_loading_path(tmp_path, rgb_config, processor, overrides, expected):
    from transformers import AutoModel

    import mu0.modeling_mu0 as modeling

    config = preset_config("tiny", use_depth=False, **overrides)
    model = build("mu0", config, **overrides).eval()
    assert type(model).__name__ == expected and isinstance(model.model, modeling.Mu0Model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == [expected] and saved["auto_map"]["AutoModel"] == f"modeling_mu0.{expected}"
    inputs = inference_inputs(random_batch(processor, with_depth=False))
    reference = model.predict_traces(**inputs, generator=torch.Generator().manual_seed(0)).traces
    for loaded in (Mu0ForTracePrediction.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path),
                   AutoModel.from_pretrained(tmp_path, trust_remote_code=True)):
        assert type(loaded).__name__ == expected
        traces = loaded.eval().predict_traces(**inputs, generator=torch.Generator().manual_seed(0)).traces
        torch.testing.assert_close(traces, reference)
    with pytest.raises(ValueError, match="does not train trace_objective='flow_matching'"):
        getattr(modeling, expected)(rgb_config)
    assert type(Mu0ForTracePrediction(rgb_config)) is Mu0ForTracePrediction
