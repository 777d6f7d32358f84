import math

import numpy as np
import pytest
import torch

from mu0.bspline import (
    anchor_basis,
    bspline_basis,
    bspline_basis_at,
    clamped_knots,
    fit_control_points,
    render_traces,
)


SUPPORTED = (4, 7, 10)
DENSE_S = torch.linspace(0.0, 1.0, 301, dtype=torch.float64)


def bernstein_reference(s: torch.Tensor, num_control_points: int) -> torch.Tensor:
    """Cubic basis built piece by piece from Bernstein polynomials, independent of Cox–de Boor."""
    pieces = (num_control_points - 1) // 3
    basis = torch.zeros(len(s), num_control_points, dtype=torch.float64)
    for row, value in enumerate(s.tolist()):
        piece = min(int(math.floor(value * pieces)), pieces - 1)
        u = value * pieces - piece
        for i in range(4):
            basis[row, 3 * piece + i] = math.comb(3, i) * u**i * (1 - u) ** (3 - i)
    return basis


def smooth_curves(batch: int, num_steps: int, channels: int, seed: int) -> torch.Tensor:
    """Sums of three sines (at most one cycle over the horizon), shifted to 0 at the anchor, amplitude ~0.5."""
    generator = torch.Generator().manual_seed(seed)
    s = (torch.arange(1, num_steps + 1, dtype=torch.float64) / num_steps)[None, :, None, None]
    shape = (batch, 1, channels, 3)
    amplitude = (0.5 / 3) * (2 * torch.rand(shape, generator=generator, dtype=torch.float64) - 1)
    frequency = torch.rand(shape, generator=generator, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(shape, generator=generator, dtype=torch.float64)
    return (amplitude * (torch.sin(2 * math.pi * frequency * s + phase) - torch.sin(phase))).sum(-1)


def random_control_points(batch: int, num_control_points: int, channels: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    points = 2 * torch.rand(batch, num_control_points, channels, generator=generator, dtype=torch.float64) - 1
    points[:, 0] = 0.0
    return points


def test_knots_are_clamped_bezier_chain():
    expected = [0, 0, 0, 0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 1, 1, 1, 1]
    torch.testing.assert_close(clamped_knots(10), torch.tensor(expected, dtype=torch.float64))
    assert clamped_knots(4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    for num_control_points in SUPPORTED:
        assert clamped_knots(num_control_points).numel() == num_control_points + 3 + 1


@pytest.mark.parametrize("num_control_points", SUPPORTED)
def test_partition_of_unity_and_non_negativity(num_control_points):
    basis = bspline_basis_at(DENSE_S, num_control_points, dtype=torch.float64)
    assert basis.shape == (len(DENSE_S), num_control_points)
    torch.testing.assert_close(basis.sum(-1), torch.ones(len(DENSE_S), dtype=torch.float64))
    assert (basis >= 0).all()
    future = bspline_basis(32, num_control_points, dtype=torch.float64)
    torch.testing.assert_close(future.sum(-1), torch.ones(32, dtype=torch.float64))


@pytest.mark.parametrize("num_control_points", SUPPORTED)
def test_clamped_end_points(num_control_points):
    first = torch.zeros(num_control_points)
    first[0] = 1.0
    last = torch.zeros(num_control_points)
    last[-1] = 1.0
    torch.testing.assert_close(anchor_basis(num_control_points), first, rtol=0, atol=0)
    torch.testing.assert_close(bspline_basis_at(torch.tensor([0.0, 1.0]), num_control_points)[0], first, rtol=0, atol=0)
    torch.testing.assert_close(bspline_basis_at(torch.tensor([0.0, 1.0]), num_control_points)[1], last, rtol=0, atol=0)
    # Future step H sits exactly on s = 1, step 1 at s = 1 / H.
    future = bspline_basis(16, num_control_points)
    assert future.shape == (16, num_control_points)
    torch.testing.assert_close(future[-1], last, rtol=0, atol=0)
    torch.testing.assert_close(future[0], bspline_basis_at(torch.tensor([1 / 16]), num_control_points)[0])


@pytest.mark.parametrize("num_control_points", SUPPORTED)
def test_basis_matches_bernstein_pieces(num_control_points):
    basis = bspline_basis_at(DENSE_S, num_control_points, dtype=torch.float64)
    torch.testing.assert_close(basis, bernstein_reference(DENSE_S, num_control_points), rtol=0, atol=1e-12)


@pytest.mark.parametrize("num_control_points", SUPPORTED)
def test_basis_matches_scipy(num_control_points):
    interpolate = pytest.importorskip("scipy.interpolate")
    knots = clamped_knots(num_control_points).numpy()
    reference = interpolate.BSpline(knots, np.eye(num_control_points), 3)(DENSE_S.numpy())
    basis = bspline_basis_at(DENSE_S, num_control_points, dtype=torch.float64)
    np.testing.assert_allclose(basis.numpy(), reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("num_control_points", SUPPORTED)
def test_render_then_fit_is_exact(num_control_points, dtype, atol):
    points = random_control_points(64, num_control_points, 3, seed=num_control_points).to(dtype)
    basis = bspline_basis(32, num_control_points, dtype=dtype)
    traces = render_traces(points, basis)
    assert traces.shape == (64, 32, 3)
    valid = torch.ones(64, 32, dtype=torch.bool)
    fitted, fit_ok = fit_control_points(traces, valid, num_control_points, smoothness=0.0)
    assert fitted.dtype == dtype
    assert fit_ok.all()
    torch.testing.assert_close(fitted, points, rtol=0, atol=atol)


def test_fit_matches_independent_weighted_least_squares():
    # The released fit: least squares on [valid rows of B; anchor row; stacked Tikhonov rows λΓ] (λ itself, not √λ).
    num_steps, num_control_points, smoothness = 24, 10, 0.2
    traces = smooth_curves(8, num_steps, 2, seed=1)
    generator = torch.Generator().manual_seed(2)
    valid = torch.rand(8, num_steps, generator=generator) > 0.3
    fitted, _ = fit_control_points(traces, valid, num_control_points, smoothness=smoothness, clip=None)

    basis = bernstein_reference(torch.arange(1, num_steps + 1, dtype=torch.float64) / num_steps, num_control_points)
    anchor = np.eye(num_control_points)[:1]
    difference = np.diff(np.eye(num_control_points), axis=0)
    for row in range(8):
        weights = valid[row].double().numpy()[:, None]
        system = np.concatenate([weights * basis.numpy(), anchor, smoothness * difference])
        target = np.concatenate(
            [weights * traces[row].numpy(), np.zeros((1 + num_control_points - 1, traces.shape[-1]))]
        )
        expected = np.linalg.lstsq(system, target, rcond=None)[0]
        np.testing.assert_allclose(fitted[row].numpy(), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("num_steps", [16, 32])
def test_fit_error_on_smooth_curves_is_small(num_steps):
    # Measured with the defaults (D=10, smoothness=0.2): mean abs error 0.0030 (H=16) / 0.0020 (H=32), max 0.037 /
    # 0.024, on curves whose mean |value| is 0.11 (the score of predicting zero). Bounds leave >= 2.5x headroom.
    traces = smooth_curves(2000, num_steps, 3, seed=num_steps)
    valid = torch.ones(traces.shape[:-1], dtype=torch.bool)
    fitted, fit_ok = fit_control_points(traces, valid)
    error = (render_traces(fitted, bspline_basis(num_steps, 10, dtype=torch.float64)) - traces).abs()
    assert fit_ok.all()
    assert error.mean() < 0.01
    assert error.max() < 0.1

    # Without smoothing the cubic pieces alone nearly interpolate (measured mean 1e-4, max 2e-3).
    fitted, _ = fit_control_points(traces, valid, smoothness=0.0)
    error = (render_traces(fitted, bspline_basis(num_steps, 10, dtype=torch.float64)) - traces).abs()
    assert error.mean() < 1e-3
    assert error.max() < 1e-2


@pytest.mark.parametrize("corruption", [float("nan"), float("inf"), 1e6, -1e6])
def test_invalid_steps_are_ignored(corruption):
    traces = smooth_curves(2 * 3, 20, 3, seed=3).reshape(2, 3, 20, 3).float()
    generator = torch.Generator().manual_seed(4)
    valid = torch.rand(2, 3, 20, generator=generator) > 0.4
    valid[0, 0, :3] = False
    valid[1, 2, -5:] = False
    other = torch.where(valid.unsqueeze(-1), traces, torch.randn(traces.shape, generator=generator))
    corrupted = torch.where(valid.unsqueeze(-1), traces, corruption)

    reference, reference_ok = fit_control_points(other, valid)
    fitted, fit_ok = fit_control_points(corrupted, valid)
    assert fitted.shape == (2, 3, 10, 3) and fit_ok.shape == (2, 3)
    assert torch.isfinite(fitted).all()
    torch.testing.assert_close(fitted, reference, rtol=0, atol=0)
    assert torch.equal(fit_ok, reference_ok)
    # A valid value, by contrast, does move the fit.
    nudged = other.clone()
    nudged[valid] += 0.3
    assert not torch.allclose(fit_control_points(nudged, valid)[0], reference)


def test_fit_handles_arbitrary_leading_dims():
    traces = smooth_curves(12, 16, 2, seed=5)
    valid = torch.rand(12, 16, generator=torch.Generator().manual_seed(6)) > 0.2
    flat, flat_ok = fit_control_points(traces, valid, 7)
    nested, nested_ok = fit_control_points(traces.reshape(2, 2, 3, 16, 2), valid.reshape(2, 2, 3, 16), 7)
    torch.testing.assert_close(nested.reshape(12, 7, 2), flat)
    assert torch.equal(nested_ok.reshape(12), flat_ok)
    single, single_ok = fit_control_points(traces[4], valid[4], 7)
    torch.testing.assert_close(single, flat[4])
    assert single_ok.shape == () and bool(single_ok) == bool(flat_ok[4])


def test_fit_ok_needs_num_control_points_valid_steps():
    num_steps, num_control_points = 16, 10
    traces = smooth_curves(num_steps + 1, num_steps, 3, seed=7)
    counts = torch.arange(num_steps + 1)
    valid = torch.arange(num_steps)[None, :] < counts[:, None]  # row i keeps a valid prefix of i steps
    fitted, fit_ok = fit_control_points(traces, valid, num_control_points)
    assert torch.equal(fit_ok, counts >= num_control_points)
    assert not fit_ok[num_control_points - 1] and fit_ok[num_control_points]
    # Regularisation keeps even empty queries solvable; with no data the anchor pulls everything to zero.
    assert torch.isfinite(fitted).all()
    torch.testing.assert_close(fitted[0], torch.zeros(num_control_points, 3, dtype=torch.float64))


def test_clipping_is_honoured():
    traces = 10.0 * smooth_curves(32, 16, 3, seed=8)
    valid = torch.ones(traces.shape[:-1], dtype=torch.bool)
    unclipped, _ = fit_control_points(traces, valid, clip=None)
    assert unclipped.abs().max() > 1.5
    clipped, _ = fit_control_points(traces, valid)
    assert clipped.abs().max() == 1.5
    torch.testing.assert_close(clipped, unclipped.clamp(-1.5, 1.5))
    tight, _ = fit_control_points(traces, valid, clip=0.25)
    torch.testing.assert_close(tight, unclipped.clamp(-0.25, 0.25))


def test_half_precision_input_round_trips_dtype():
    traces = smooth_curves(4, 16, 3, seed=9)
    valid = torch.ones(traces.shape[:-1], dtype=torch.bool)
    fitted, _ = fit_control_points(traces.bfloat16(), valid)
    assert fitted.dtype == torch.bfloat16
    torch.testing.assert_close(fitted.double(), fit_control_points(traces, valid)[0], rtol=0, atol=2e-2)


@pytest.mark.parametrize("num_control_points", [1, 3, 5, 6, 8, 9, 11, 13])
def test_unsupported_num_control_points_raise(num_control_points):
    with pytest.raises(ValueError, match=r"\(4, 7, 10\)"):
        clamped_knots(num_control_points)
    with pytest.raises(ValueError, match=r"\(4, 7, 10\)"):
        bspline_basis(16, num_control_points)
    with pytest.raises(ValueError, match=r"\(4, 7, 10\)"):
        fit_control_points(torch.zeros(16, 3), torch.ones(16, dtype=torch.bool), num_control_points)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="smoothness"):
        fit_control_points(torch.zeros(16, 3), torch.ones(16, dtype=torch.bool), smoothness=-0.1)
    with pytest.raises(ValueError, match="valid shape"):
        fit_control_points(torch.zeros(16, 3), torch.ones(15, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_steps"):
        bspline_basis(0, 10)
