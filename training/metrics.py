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


def _compact_valid(values: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each trace's valid steps to the front (order kept), so a DP over the padded length reads its answer at
    index (L - 1, L - 1) untouched by the padding."""
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)
    return values.gather(-2, order[..., None].expand_as(values)), valid.sum(-1)


def _alignment_costs(predictions: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, reduce: str) -> torch.Tensor:
    """DTW (`reduce="sum"`, divided by the valid steps) or discrete Fréchet (`"max"`) per sample and query."""
    targets = targets.unsqueeze(-4).expand_as(predictions)
    valid = valid.bool().unsqueeze(-3).expand(predictions.shape[:-1])
    predictions, lengths = _compact_valid(predictions, valid)
    targets, _ = _compact_valid(targets, valid)
    cost = (predictions[..., :, None, :] - targets[..., None, :, :]).norm(dim=-1)  # (..., H, H)
    steps = cost.shape[-1]
    infinity = torch.full(cost.shape[:-2], float("inf"), dtype=cost.dtype, device=cost.device)
    table = [[None] * steps for _ in range(steps)]
    for i in range(steps):
        for j in range(steps):
            if i == 0 and j == 0:
                best = torch.zeros_like(infinity) if reduce == "sum" else cost[..., 0, 0]
            else:
                up = table[i - 1][j] if i else infinity
                left = table[i][j - 1] if j else infinity
                diagonal = table[i - 1][j - 1] if i and j else infinity
                best = torch.minimum(torch.minimum(up, left), diagonal)
            table[i][j] = best + cost[..., i, j] if reduce == "sum" else torch.maximum(best, cost[..., i, j])
    stacked = torch.stack([torch.stack(row, dim=-1) for row in table], dim=-2)  # (..., H, H)
    last = (lengths - 1).clamp(min=0)
    value = stacked.gather(-2, last[..., None, None].expand(*last.shape, 1, steps))[..., 0, :]
    value = value.gather(-1, last[..., None])[..., 0]
    value = torch.where(lengths > 0, value, torch.zeros_like(value))
    return value / lengths.clamp(min=1) if reduce == "sum" else value


def dtw_distance(predictions: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Dynamic-time-warping distance over valid steps divided by their number: (..., S, N, H, C) -> (..., S, N)."""
    return _alignment_costs(predictions, targets, valid, "sum")


def frechet_distance(predictions: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Discrete Fréchet distance over valid steps: (..., S, N, H, C) -> (..., S, N)."""
    return _alignment_costs(predictions, targets, valid, "max")


def trace_metrics(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    horizons: tuple[int, ...] = DEFAULT_HORIZONS,
    components: tuple[str, ...] = ("uv", "depth", "uvz"),
    alignment: bool = True,
) -> dict[str, float]:
    """ADE, FDE, DTW and discrete Fréchet of the first sample, and their best-of-S `min_` versions, per component and
    horizon, averaged over queries with at least one valid step; also the ADE/FDE of the mean of the S samples
    (`mean_ade`, `mean_fde`) and the samples' spread (`spread`: mean ADE of each sample to that mean).

    Keys look like `uv/ade@32` and `uvz/min_frechet@8` (`min_` and `mean_` equal the plain value when S = 1).
    The spread shows whether samples are as dispersed as the data: a calibrated sampler's spread is about the
    mean's ADE (the truth is one more draw from the same distribution); a larger spread means over-dispersed samples.
    `alignment=False` skips DTW and Fréchet, whose dynamic programme is the slow part.
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
            prediction, target, step_valid = predictions[..., :horizon, part], targets[..., :horizon, part], valid[..., :horizon]
            ade, fde, query_valid = displacement_errors(prediction, target, step_valid)
            per_sample = {"ade": ade, "fde": fde}
            if alignment:
                per_sample["dtw"] = _alignment_costs(prediction, target, step_valid, "sum")
                per_sample["frechet"] = _alignment_costs(prediction, target, step_valid, "max")
            count = query_valid.sum().clamp(min=1)
            for metric, values in per_sample.items():
                results[f"{name}/{metric}@{horizon}"] = float((values[..., 0, :] * query_valid).sum() / count)
                results[f"{name}/min_{metric}@{horizon}"] = float((values.amin(-2) * query_valid).sum() / count)
            mean = prediction.mean(-4, keepdim=True)
            mean_ade, mean_fde, _ = displacement_errors(mean, target, step_valid)
            spread, _, _ = displacement_errors(prediction, mean.squeeze(-4), step_valid)
            for metric, values in {"mean_ade": mean_ade[..., 0, :], "mean_fde": mean_fde[..., 0, :],
                                   "spread": spread.mean(-2)}.items():
                results[f"{name}/{metric}@{horizon}"] = float((values * query_valid).sum() / count)
    return results


__all__ = ["trace_metrics", "displacement_errors", "dtw_distance", "frechet_distance"]
