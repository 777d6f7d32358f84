"""Trace metrics against brute-force references on random inputs and hand-worked small cases."""

import math

import pytest
import torch

from mu0.training.metrics import (
    displacement_errors,
    dtw_distance,
    frechet_distance,
    trace_metrics,
)


def brute_force_alignment(a: list, b: list, reduce: str) -> float:
    """Textbook O(n^2) recursion with memoisation on plain Python lists."""
    n = len(a)
    table = {}
    for i in range(n):
        for j in range(n):
            cost = math.dist(a[i], b[j])
            if i == 0 and j == 0:
                table[i, j] = cost
                continue
            best = min(table.get((i - 1, j), math.inf), table.get((i, j - 1), math.inf), table.get((i - 1, j - 1), math.inf))
            table[i, j] = best + cost if reduce == "sum" else max(best, cost)
    return table[n - 1, n - 1] / n if reduce == "sum" else table[n - 1, n - 1]


def as_trace(points):
    """(H, C) list -> (1 sample, 1 query, H, C) prediction and (1, H, C) target shapes."""
    return torch.tensor(points, dtype=torch.float64)[None, None]


def test_hand_worked_ade_fde():
    prediction = as_trace([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    target = torch.zeros(1, 3, 2, dtype=torch.float64)
    ade, fde, valid = displacement_errors(prediction, target, torch.ones(1, 3, dtype=torch.bool))
    assert ade.item() == pytest.approx(1.0) and fde.item() == pytest.approx(2.0) and valid.all()
    # the last step invalid: FDE is read at the last valid step, ADE averages the valid ones
    ade, fde, _ = displacement_errors(prediction, target, torch.tensor([[True, True, False]]))
    assert ade.item() == pytest.approx(0.5) and fde.item() == pytest.approx(1.0)


def test_hand_worked_dtw_and_frechet():
    # the same path at different speeds: warping removes the error, per-step ADE does not
    prediction = as_trace([[0.0], [0.0], [1.0], [2.0]])
    target = torch.tensor([[[0.0], [1.0], [2.0], [2.0]]], dtype=torch.float64)
    valid = torch.ones(1, 4, dtype=torch.bool)
    assert dtw_distance(prediction, target, valid).item() == pytest.approx(0.0)
    assert frechet_distance(prediction, target, valid).item() == pytest.approx(0.0)
    assert displacement_errors(prediction, target, valid)[0].item() == pytest.approx(0.5)
    # a constant offset of 3: DTW = 4 * 3 / 4 steps, Fréchet = 3
    shifted = target[None] + 3.0
    assert dtw_distance(shifted, target, valid).item() == pytest.approx(3.0)
    assert frechet_distance(shifted, target, valid).item() == pytest.approx(3.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_metrics_match_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    samples, queries, steps = 3, 4, 9
    predictions = torch.randn(2, samples, queries, steps, 3, generator=generator, dtype=torch.float64)
    targets = torch.randn(2, queries, steps, 3, generator=generator, dtype=torch.float64)
    valid = torch.rand(2, queries, steps, generator=generator) > 0.3
    valid[0, 0] = False  # a query with no valid step is excluded
    dtw = dtw_distance(predictions, targets, valid)
    frechet = frechet_distance(predictions, targets, valid)
    ade, fde, query_valid = displacement_errors(predictions, targets, valid)
    for b in range(2):
        for s in range(samples):
            for q in range(queries):
                steps_kept = valid[b, q].nonzero().flatten().tolist()
                if not steps_kept:
                    assert not query_valid[b, q]
                    continue
                a = [predictions[b, s, q, k].tolist() for k in steps_kept]
                t = [targets[b, q, k].tolist() for k in steps_kept]
                assert dtw[b, s, q].item() == pytest.approx(brute_force_alignment(a, t, "sum"))
                assert frechet[b, s, q].item() == pytest.approx(brute_force_alignment(a, t, "max"))
                errors = [math.dist(x, y) for x, y in zip(a, t)]
                assert ade[b, s, q].item() == pytest.approx(sum(errors) / len(errors))
                assert fde[b, s, q].item() == pytest.approx(errors[-1])


def test_trace_metrics_keys_components_and_best_of_n():
    target = torch.zeros(1, 2, 32, 3)
    good = torch.zeros(1, 1, 2, 32, 3)
    bad = torch.ones(1, 1, 2, 32, 3)
    predictions = torch.cat([bad, good], dim=1)  # the first sample is wrong, the second exact
    metrics = trace_metrics(predictions, target, torch.ones(1, 2, 32, dtype=torch.bool))
    assert metrics["uv/ade@32"] == pytest.approx(math.sqrt(2))
    assert metrics["depth/ade@8"] == pytest.approx(1.0)
    assert metrics["uvz/fde@16"] == pytest.approx(math.sqrt(3))
    assert metrics["uvz/min_ade@32"] == 0 and metrics["uv/min_frechet@8"] == 0 and metrics["depth/min_dtw@32"] == 0
    assert {key.split("@")[1] for key in metrics} == {"8", "16", "32"}
    with pytest.raises(ValueError, match="Shapes"):
        trace_metrics(predictions, target[:, :1], torch.ones(1, 1, 32, dtype=torch.bool))


def test_mean_of_samples_and_spread_by_hand():
    # two samples at +1 and -1 (constant in time) around a target at 0: each sample is off by 1, their mean is exact,
    # and each sample lies 1 from the mean
    target = torch.zeros(1, 4, 2, dtype=torch.float64)
    predictions = torch.stack([target + torch.tensor([1.0, 0.0]), target - torch.tensor([1.0, 0.0])])
    metrics = trace_metrics(predictions, target, torch.ones(1, 4, dtype=torch.bool), horizons=(4,), components=("uv",),
                            alignment=False)
    assert metrics["uv/ade@4"] == pytest.approx(1.0) and metrics["uv/min_ade@4"] == pytest.approx(1.0)
    assert metrics["uv/mean_ade@4"] == pytest.approx(0.0) and metrics["uv/mean_fde@4"] == pytest.approx(0.0)
    assert metrics["uv/spread@4"] == pytest.approx(1.0)
    # a shared offset of 3 along v moves the mean (ADE 3) but not the spread
    shifted = predictions + torch.tensor([0.0, 3.0])
    metrics = trace_metrics(shifted, target, torch.ones(1, 4, dtype=torch.bool), horizons=(4,), components=("uv",),
                            alignment=False)
    assert metrics["uv/mean_ade@4"] == pytest.approx(3.0) and metrics["uv/spread@4"] == pytest.approx(1.0)
    assert metrics["uv/ade@4"] == pytest.approx(math.sqrt(10.0))
