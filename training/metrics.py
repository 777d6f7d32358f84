"""Trace metrics on de-normalised absolute traces, over valid steps only (DESIGN §7).

All functions are vectorised over leading dimensions: predictions (..., S, N, H, 3) with S samples per query,
ground truth (..., N, H, 3) and validity (..., N, H). Coordinates are (u, v) in [-1, 1] and z in metres.
"""

import torch

COMPONENTS = {"uv": slice(0, 2), "depth": slice(2, 3), "uvz": slice(0, 3)}
DEFAULT_HORIZONS = (8, 16, 32)


def displacement_errors(
    predictions: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample ADE (mean over valid steps) and FDE (at the last valid step), shapes (..., S, N), plus query validity.

    A query with no valid step is invalid and its errors are 0.
    """
    errors = (predictions - targets.unsqueeze(-4)).norm(dim=-1)  # (..., S, N, H)
    valid = valid.bool().unsqueeze(-3).expand_as(errors)
    counts = valid.sum(-1)
    ade = (errors * valid).sum(-1) / counts.clamp(min=1)
    steps = torch.arange(errors.shape[-1], device=errors.device)
    last = torch.where(valid, steps, -1).amax(-1).clamp(min=0)
    fde = errors.gather(-1, last[..., None])[..., 0] * (counts > 0)
    return ade, fde, counts[..., 0, :] > 0


def trace_metrics(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    horizons: tuple[int, ...] = DEFAULT_HORIZONS,
    components: tuple[str, ...] = ("uv", "depth", "uvz"),
) -> dict[str, float]:
    """ADE/FDE of the first sample and best-of-S minADE/minFDE, per component and horizon, averaged over valid queries.

    Keys look like `uv/ade@32` and `uvz/min_fde@8` (the `min_` keys equal the plain ones when S = 1).
    """
    if predictions.shape[-3:] != targets.shape[-3:] or targets.shape[:-1] != valid.shape:
        raise ValueError(
            f"Shapes do not match: predictions {tuple(predictions.shape)}, targets {tuple(targets.shape)}, "
            f"valid {tuple(valid.shape)}."
        )
    results = {}
    for name in components:
        part = COMPONENTS[name]
        for horizon in horizons:
            if horizon > targets.shape[-2]:
                raise ValueError(f"Horizon {horizon} exceeds the {targets.shape[-2]} steps of the traces.")
            ade, fde, query_valid = displacement_errors(
                predictions[..., :horizon, part], targets[..., :horizon, part], valid[..., :horizon]
            )
            count = query_valid.sum().clamp(min=1)
            for metric, values in (("ade", ade), ("fde", fde)):
                results[f"{name}/{metric}@{horizon}"] = float((values[..., 0, :] * query_valid).sum() / count)
                results[f"{name}/min_{metric}@{horizon}"] = float((values.amin(-2) * query_valid).sum() / count)
    return results


def zero_motion_traces(anchors: torch.Tensor, horizon: int) -> torch.Tensor:
    """Every query stays where it is: (..., N, 3) -> (..., 1, N, H, 3)."""
    return anchors[..., None, :, None, :].expand(*anchors.shape[:-2], 1, anchors.shape[-2], horizon, 3)


def constant_velocity_traces(anchors: torch.Tensor, previous: torch.Tensor, previous_valid: torch.Tensor, horizon: int):
    """Extrapolate the last observed step (anchor - previous position); queries without history stay still."""
    velocity = (anchors - previous) * previous_valid[..., None]
    steps = torch.arange(1, horizon + 1, dtype=anchors.dtype, device=anchors.device)
    return (anchors[..., :, None, :] + steps[:, None] * velocity[..., :, None, :]).unsqueeze(-4)


__all__ = ["trace_metrics", "displacement_errors", "zero_motion_traces", "constant_velocity_traces"]
