"""Cubic B-spline codec for future traces.

A future trace is a short curve of anchor-relative, normalised deltas. Encoding it as a handful of control points
gives the model a smooth, fixed-size target regardless of the horizon, and decoding is a single matrix product.

Time convention: the anchor (the current point, delta 0) sits at ``s = 0`` and the ``H`` future steps at
``s = k / H`` for ``k = 1..H``, so the last future step lands exactly on ``s = 1``. The anchor row is never a target
to predict; it only pins the start of the curve during fitting.
"""

from typing import Optional

import torch


MAX_PIECES = 3


def clamped_knots(num_control_points: int, degree: int = 3) -> torch.Tensor:
    """Clamped knot vector whose interior knots repeat `degree` times.

    Repeating interior knots turns the spline into a chain of Bézier pieces joined with C0 continuity, so control
    points act locally (on one piece, two at a junction) and the curve passes through every junction control point.
    For `degree=3` this allows `num_control_points` in (4, 7, 10), i.e. one to three pieces.
    """
    if degree < 1:
        raise ValueError(f"degree must be >= 1, got {degree}.")
    allowed = tuple(degree * pieces + 1 for pieces in range(1, MAX_PIECES + 1))
    if num_control_points not in allowed:
        raise ValueError(
            f"num_control_points must be one of {allowed} for degree {degree} "
            f"(degree * pieces + 1 with 1 to {MAX_PIECES} Bézier pieces), got {num_control_points}."
        )
    pieces = (num_control_points - 1) // degree
    interior = [piece / pieces for piece in range(1, pieces) for _ in range(degree)]
    return torch.tensor([0.0] * (degree + 1) + interior + [1.0] * (degree + 1), dtype=torch.float64)


def _safe_ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """`numerator / denominator` with the Cox–de Boor convention 0/0 = 0 for repeated knots."""
    nonzero = denominator > 0
    return torch.where(nonzero, numerator / torch.where(nonzero, denominator, 1.0), 0.0)


def bspline_basis_at(
    s: torch.Tensor,
    num_control_points: int,
    degree: int = 3,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Basis matrix `(len(s), num_control_points)` at curve parameters `s` in [0, 1] via Cox–de Boor.

    Evaluated in float64 and cast at the end so the basis is accurate whatever `dtype` the caller trains in. Plain
    Cox–de Boor uses half-open spans and returns all zeros at `s = 1`; the last non-empty span is closed on the right
    so the clamped end-point interpolation (last basis function = 1) holds exactly.
    """
    knots = clamped_knots(num_control_points, degree)
    s = torch.as_tensor(s, dtype=torch.float64).reshape(-1, 1)
    basis = ((s >= knots[:-1]) & (s < knots[1:])).to(torch.float64)
    last_span = num_control_points - 1
    basis[:, last_span] = torch.where(s[:, 0] == knots[-1], 1.0, basis[:, last_span])
    for order in range(1, degree + 1):
        count = knots.numel() - 1 - order
        t_i, t_i1 = knots[:count], knots[1 : count + 1]
        t_ip, t_ip1 = knots[order : order + count], knots[order + 1 : order + 1 + count]
        rising = _safe_ratio(s - t_i, t_ip - t_i) * basis[:, :count]
        falling = _safe_ratio(t_ip1 - s, t_ip1 - t_i1) * basis[:, 1 : count + 1]
        basis = rising + falling
    return basis.to(dtype=dtype, device=device)


def bspline_basis(
    num_steps: int,
    num_control_points: int,
    degree: int = 3,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Basis `(num_steps, num_control_points)` at the future steps `s = k / num_steps`, `k = 1..num_steps`.

    The anchor at `s = 0` is excluded on purpose: it is not a predicted step (see `anchor_basis`).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    s = torch.arange(1, num_steps + 1, dtype=torch.float64) / num_steps
    return bspline_basis_at(s, num_control_points, degree, dtype=dtype, device=device)


def anchor_basis(
    num_control_points: int,
    degree: int = 3,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Basis row `(num_control_points,)` at the anchor `s = 0`; clamped knots make it `[1, 0, ..., 0]`."""
    return bspline_basis_at(torch.zeros(1), num_control_points, degree, dtype=dtype, device=device)[0]


def fit_control_points(
    traces: torch.Tensor,
    valid: torch.Tensor,
    num_control_points: int = 10,
    degree: int = 3,
    smoothness: float = 0.2,
    clip: Optional[float] = 1.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit control points `(..., D, C)` to traces `(..., H, C)` of anchor-relative deltas by weighted least squares.

    Minimises `sum_k w_k ||B_k P - y_k||^2 + ||B(0) P||^2 + ||smoothness * diff(P)||^2` with `w_k = valid[..., k]`:
    the Tikhonov rows `smoothness * Γ` are stacked under the design matrix, so the normal equations carry
    `smoothness² ΓᵀΓ` (the released fit; λ = 0.2 adds 0.04 ΓᵀΓ).
    The anchor term pins the curve start to the current point and, with the first-difference penalty, makes the
    normal equations SPD for any mask when `smoothness > 0`. `smoothness = 0` gives an exact least-squares fit but
    needs valid steps on every Bézier piece, otherwise the system is singular. Invalid entries (NaN included) are
    zeroed before the solve so they cannot leak into the fit. Control points are clamped to `[-clip, clip]` to keep
    targets bounded when a short valid prefix is extrapolated.

    Returns `(control_points, fit_ok)` where `fit_ok` (`...`) marks queries with at least `D` valid future steps,
    the least data that can pin down all `D` control points without leaning on the regulariser.
    """
    if smoothness < 0:
        raise ValueError(f"smoothness must be >= 0, got {smoothness}.")
    if valid.shape != traces.shape[:-1]:
        raise ValueError(
            f"valid shape {tuple(valid.shape)} must equal traces shape minus channels {tuple(traces.shape[:-1])}."
        )
    # linalg.solve has no half-precision kernels; solve in at least float32 and hand back the input dtype.
    solve_dtype = torch.promote_types(traces.dtype, torch.float32)
    num_steps = traces.shape[-2]
    basis = bspline_basis(num_steps, num_control_points, degree, dtype=solve_dtype, device=traces.device)
    anchor = anchor_basis(num_control_points, degree, dtype=solve_dtype, device=traces.device)
    difference = torch.diff(torch.eye(num_control_points, dtype=solve_dtype, device=traces.device), dim=0)

    valid = valid.to(torch.bool)
    weights = valid.to(solve_dtype)
    targets = torch.where(valid.unsqueeze(-1), traces.to(solve_dtype), 0.0)

    normal = torch.einsum("hd,...h,he->...de", basis, weights, basis)
    normal = normal + torch.outer(anchor, anchor) + smoothness**2 * difference.T @ difference
    rhs = torch.einsum("hd,...h,...hc->...dc", basis, weights, targets)
    control_points = torch.linalg.solve(normal, rhs)
    if clip is not None:
        control_points = control_points.clamp(-clip, clip)
    fit_ok = valid.sum(dim=-1) >= num_control_points
    return control_points.to(traces.dtype), fit_ok


def render_traces(control_points: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Decode control points `(..., D, C)` into traces `(..., H, C)` with a basis `(H, D)` from `bspline_basis`."""
    return torch.matmul(basis, control_points)
