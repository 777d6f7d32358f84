"""Tests aimed at mistakes the rest of the suite let through: each names the hand-made mutant it kills.

The flow models are checked against an oracle velocity (the exact field of a point mass at the data, so training
loss is zero and integration lands on the data), the samplers against hand-written loops, DINO sampling against a
stub whose patches encode their position, and the statistics against plain numpy percentiles.
"""

import types

import numpy as np
import pytest
import torch
from conftest import inference_inputs, make_model, random_batch
from test_action_model import ACTION_DIM, make_policy, policy_batch

from mu0.bspline import bspline_basis, render_traces
from mu0.dataset_builders.statistics import TraceStatistics
from mu0.presets import preset_config


def straight_line_velocity(sample: torch.Tensor, time: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """The flow from `data` (t=0) to noise (t=1) along x_t = t * noise + (1 - t) * data has velocity
    noise - data = (x_t - data) / t: known exactly at every point of the path."""
    time = time.reshape(-1, *([1] * (sample.ndim - 1))).to(sample.dtype)
    return (sample - data) / time.clamp(min=1e-6)


# ---------------------------------------------------------------------------------------------- trace model
def oracle_trace_model(model, data: torch.Tensor):
    """`model` whose denoiser returns the exact velocity towards `data` (B, N, D, 3); the rest runs as is."""
    denoise_step = model.denoise_step

    def exact(self, prefix, sample, time, *args, **kwargs):
        _, done_logits = denoise_step(prefix, sample, time, *args, **kwargs)
        repeats = sample.shape[0] // data.shape[0]  # predict_traces stacks the samples into the batch
        return straight_line_velocity(sample, time, data.repeat_interleave(repeats, dim=0)), done_logits

    model.denoise_step = types.MethodType(exact, model)
    return model


@pytest.fixture()
def trace_setup(tiny_config, tiny_processor):
    batch = random_batch(tiny_processor, num_queries=(3, 3))
    model = make_model(tiny_config)
    # the data the oracle flows to: the control points the model fits to these labels (every query trained)
    from mu0.bspline import fit_control_points

    targets, fit_ok = fit_control_points(batch["labels"], batch["labels_mask"], tiny_config.num_control_points,
                                         smoothness=tiny_config.spline_smoothness, clip=tiny_config.control_point_clip)
    assert fit_ok.all()
    return model, batch, targets


def test_exact_trace_velocity_gives_zero_flow_loss(trace_setup):
    """Kills: the trace model's flow target with its sign flipped (`velocity - (targets - noise)`)."""
    model, batch, targets = trace_setup
    oracle_trace_model(model, targets)
    noise = torch.randn(targets.shape, generator=torch.Generator().manual_seed(0))
    for time in (0.9, 0.5, 0.1):
        output = model(**batch, noise=noise, time=torch.full((2,), time))
        assert output.flow_loss.item() < 1e-10, time
    wrong = oracle_trace_model(make_model(model.config), -targets)  # a velocity that is not the target's
    assert wrong(**batch, noise=noise, time=torch.full((2,), 0.5)).flow_loss.item() > 1e-3


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_sampling_the_exact_velocity_recovers_the_data(trace_setup, sampler):
    """Kills: an integration step with the wrong sign or size (`sample + velocity * dt`, a missing dt)."""
    _, batch, targets = trace_setup
    model = oracle_trace_model(make_model(preset_config("tiny", sampler=sampler)), targets)
    prediction = model.predict_traces(**inference_inputs(batch), num_steps=5, num_samples=2,
                                      generator=torch.Generator().manual_seed(0))
    expected = render_traces(targets, bspline_basis(model.config.horizon, model.config.num_control_points))
    for sample in range(2):
        torch.testing.assert_close(prediction.control_points[:, sample], targets, atol=1e-4, rtol=0)
        torch.testing.assert_close(prediction.traces[:, sample], expected, atol=1e-4, rtol=0)


def network_velocity(model, inputs, sample, time: float) -> torch.Tensor:
    """The model's velocity at `sample` and flow time `time`, through the public forward (no labels)."""
    return model(**inputs, noise=sample, time=torch.full((sample.shape[0],), time)).velocity


@pytest.mark.parametrize("num_steps", [1, 4])
def test_euler_sampler_matches_a_hand_written_loop(tiny_config, tiny_processor, num_steps):
    """Kills: a shifted or non-uniform time grid in the Euler sampler (the released code: t = 1, 1 - 1/n, ...)."""
    model = make_model(tiny_config)
    inputs = inference_inputs(random_batch(tiny_processor, num_queries=(2,)))
    noise = torch.randn(1, 1, 2, tiny_config.num_control_points, 3, generator=torch.Generator().manual_seed(3))
    sampled = model.predict_traces(**inputs, num_steps=num_steps, noise=noise).control_points[:, 0]
    expected = noise[:, 0]
    with torch.no_grad():
        for step in range(num_steps):
            expected = expected - network_velocity(model, inputs, expected, 1 - step / num_steps) / num_steps
    torch.testing.assert_close(sampled, expected, atol=1e-5, rtol=1e-5)


def test_heun_sampler_matches_a_hand_written_loop(tiny_config, tiny_processor):
    """Kills: Heun without its corrector (plain Euler on the same grid) or a corrector that averages the wrong
    velocities. The grid is diffusers' flow-matching Heun grid: n times evenly from 1 to 1/1000, then 0 by Euler."""
    model = make_model(preset_config("tiny", sampler="heun"))
    inputs = inference_inputs(random_batch(tiny_processor, num_queries=(2,)))
    noise = torch.randn(1, 1, 2, tiny_config.num_control_points, 3, generator=torch.Generator().manual_seed(4))
    num_steps = 3
    sampled = model.predict_traces(**inputs, num_steps=num_steps, noise=noise).control_points[:, 0]
    times = [*np.linspace(1.0, 1e-3, num_steps), 0.0]
    expected = noise[:, 0]
    with torch.no_grad():
        for now, after in zip(times[:-1], times[1:]):
            velocity = network_velocity(model, inputs, expected, now)
            predicted = expected + (after - now) * velocity
            if after == 0:
                expected = predicted
            else:
                expected = expected + (after - now) * (velocity + network_velocity(model, inputs, predicted, after)) / 2
    torch.testing.assert_close(sampled, expected, atol=1e-5, rtol=1e-5)
    euler = noise[:, 0]
    with torch.no_grad():
        for now, after in zip(times[:-1], times[1:]):
            euler = euler + (after - now) * network_velocity(model, inputs, euler, now)
    assert (sampled - euler).abs().max() > 1e-4  # the corrector matters: the test can tell Heun from Euler


# ------------------------------------------------------------------------------------------ DINO sampling
class HotPatchDino(torch.nn.Module):
    """A DINOv2 stand-in: every patch token is zero except one, at (row, column) of the patch grid."""

    dtype = torch.float32

    def __init__(self, hidden_size: int, grid: int, hot: tuple[int, int] | None):
        super().__init__()
        self.hidden_size, self.grid, self.hot = hidden_size, grid, hot

    def forward(self, pixel_values: torch.Tensor, **kwargs):
        tokens = torch.zeros(pixel_values.shape[0], 1 + self.grid * self.grid, self.hidden_size, dtype=pixel_values.dtype)
        if self.hot is not None:
            row, column = self.hot
            tokens[:, 1 + row * self.grid + column] = 1.0  # row-major after the CLS token, like DINOv2
        return types.SimpleNamespace(last_hidden_state=tokens)


def test_dino_features_are_read_at_the_query_pixel(tiny_config, tiny_processor):
    """Kills: u and v swapped in the DINO `grid_sample` (the feature of patch (row, column) read for the query at
    (row=column, column=row)). A query on the hot patch must see it; one on the mirrored patch must not."""
    model = make_model(tiny_config)
    with torch.no_grad():  # zero-initialised fusion layers would hide the DINO features at initialisation
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    grid = tiny_config.dino_image_size // tiny_config.dino_config.patch_size
    hot = (0, grid - 1)  # top right: its mirror (bottom left) is another patch
    inputs = inference_inputs(random_batch(tiny_processor, num_queries=(1,)))
    noise = torch.randn(1, 1, tiny_config.num_control_points, 3, generator=torch.Generator().manual_seed(0))

    def centre(row: int, column: int) -> torch.Tensor:  # grid_sample (align_corners=False) patch centres
        return torch.tensor([[[(2 * column + 1) / grid - 1, (2 * row + 1) / grid - 1]]])

    def velocity(query: torch.Tensor, hot_patch) -> torch.Tensor:
        model.model.dino = HotPatchDino(tiny_config.dino_config.hidden_size, grid, hot_patch)
        return model(**{**inputs, "query_points": query}, noise=noise, time=torch.full((1,), 0.5)).velocity

    on_hot, on_mirror = centre(*hot), centre(hot[1], hot[0])
    assert (velocity(on_hot, hot) - velocity(on_hot, None)).abs().max() > 1e-6
    torch.testing.assert_close(velocity(on_mirror, hot), velocity(on_mirror, None), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------- action model
def test_exact_action_velocity_gives_zero_loss_and_euler_recovers_the_actions(tiny_config, action_processor):
    """Kills: the action model's flow target with its sign flipped (`velocity - (actions - noise)`), and a wrong
    sign or size in its Euler step."""
    policy = make_policy(tiny_config, num_sampling_steps=4)
    batch = policy_batch(action_processor)
    actions = batch["actions"].float()

    def exact(self, prefix, motion, context, sample, time):
        return straight_line_velocity(sample, time, actions)

    policy.velocity = types.MethodType(exact, policy)
    noise = torch.randn(actions.shape, generator=torch.Generator().manual_seed(0))
    for time in (0.9, 0.5, 0.1):
        assert policy(**batch, noise=noise, time=torch.full((2,), time)).loss.item() < 1e-10
    inference = {key: value for key, value in batch.items() if key not in ("actions", "actions_mask")}
    torch.testing.assert_close(policy.predict_actions(**inference, noise=noise), actions, atol=1e-5, rtol=0)


@pytest.fixture()
def action_processor(tiny_processor):
    from test_action_model import make_action_processor

    return make_action_processor(tiny_processor)


# --------------------------------------------------------------------------------------------- statistics
def test_statistics_are_plain_numpy_percentiles():
    """Kills: `delta_scale` at another percentile (p80 for p95) or over the wrong axis, depth range not p1/p99."""
    rng = np.random.default_rng(0)
    statistics = TraceStatistics()
    height, width, deltas, log_depths = 40, 80, [], []
    for _ in range(5):
        anchors_uv = rng.uniform(0, 60, (7, 2))
        anchors_z = rng.uniform(0.5, 2.0, 7)
        future = np.concatenate([anchors_uv, anchors_z[:, None]], -1)[:, None] + rng.normal(0, [3.0, 1.0, 0.1], (7, 6, 3))
        valid = rng.random((7, 6)) > 0.3
        depth = rng.uniform(0.3, 4.0, (height, width))
        statistics.add(anchors_uv, anchors_z, future, valid, (height, width), depth)
        anchors = np.concatenate([anchors_uv, anchors_z[:, None]], -1)
        deltas.append((np.abs(future - anchors[:, None]) * [2 / width, 2 / height, 1])[valid])
        log_depths.append(np.log(depth.ravel()))
    result = statistics.compute()
    np.testing.assert_allclose(result["delta_scale"], np.percentile(np.concatenate(deltas), 95, axis=0), rtol=1e-12)
    np.testing.assert_allclose(result["depth_log_range"], np.percentile(np.concatenate(log_depths), [1, 99]), rtol=1e-12)


# ------------------------------------------------------------------------------------------------ tracking
@pytest.mark.parametrize("round_trip_error, trusted", [(0.2, True), (0.5, False)])
def test_forward_backward_check_uses_its_threshold(monkeypatch, round_trip_error, trusted):
    """Kills: the forward-backward threshold loosened 3x. Optical flow is replaced by a field with a known round
    trip: forward moves every point by (+2, +1) px per frame, backward undoes that but lands `round_trip_error` px
    off in x. With the default fb_threshold of 0.3 px the LK step is kept only when the miss is below it; otherwise
    the point moves with its support corners, of which a blank frame has none (no motion)."""
    cv2 = pytest.importorskip("cv2")
    from mu0.dataset_builders.tracking import track_points_support

    def known_flow(previous, following, points, *args, **kwargs):
        step = int(following[0, 0]) - int(previous[0, 0])  # each frame's grey level is its index
        moved = points.reshape(-1, 2) + step * np.array([2.0, 1.0], np.float32)
        if step < 0:
            moved[:, 0] += round_trip_error
        count = len(moved)
        return moved.reshape(-1, 1, 2), np.ones((count, 1), np.uint8), np.zeros((count, 1), np.float32)

    monkeypatch.setattr(cv2, "calcOpticalFlowPyrLK", known_flow)
    frames = np.stack([np.full((32, 32, 3), index, np.uint8) for index in range(3)])
    result = track_points_support(frames, np.array([[0, 10.0, 10.0]]))
    expected = [[10, 10], [12, 11], [14, 12]] if trusted else [[10, 10]] * 3
    np.testing.assert_allclose(result.tracks[:, 0], expected, atol=1e-5)


def test_policy_learns_a_state_to_action_map(tiny_config, action_processor):
    """Kills: a flipped action flow target, a state token the expert cannot see, a sampler that ignores the
    learned field. Actions are a fixed linear function of the robot state (same image and prompt for every row),
    so a policy that trains correctly predicts held-out states' actions far better than their mean does."""
    rng = np.random.default_rng(0)
    weights = rng.normal(0, 1.0, (5, ACTION_DIM)) / np.sqrt(5)

    def rows(count: int, seed: int) -> dict:
        states = np.random.default_rng(seed).normal(-1.0, 0.5, (count, 5))
        normalised = (states + 1.0) / 0.5  # the processor's state statistics: mean -1, std 0.5
        actions = 1.0 + 2.0 * np.repeat((normalised @ weights)[:, None], action_processor.chunk_size, axis=1)
        image = np.full((48, 64, 3), 90, np.uint8)
        batch = action_processor(images=[image] * count, text=["reach"] * count, state=states, actions=actions)
        batch.pop("image_sizes")
        return dict(batch)

    torch.manual_seed(0)
    policy = make_policy(tiny_config, use_trace=False, num_sampling_steps=4).train()
    train, held_out = rows(64, 1), rows(16, 2)
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        chosen = torch.randint(0, 64, (16,), generator=generator)
        loss = policy(**{key: value[chosen] for key, value in train.items()}).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
    targets = held_out.pop("actions").float()
    held_out.pop("actions_mask", None)
    predicted = policy.predict_actions(**held_out, generator=torch.Generator().manual_seed(0))
    error = ((predicted - targets) ** 2).mean().item()
    baseline = ((targets - targets.mean(0)) ** 2).mean().item()
    assert error < 0.25 * baseline, (error, baseline)
