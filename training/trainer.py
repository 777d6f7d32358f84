"""Pretraining μ0 with `transformers.Trainer`: a non-finite-loss guard and trace-metric evaluation (best of N)."""

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from .metrics import trace_metrics

logger = logging.getLogger(__name__)


def absolute_traces(deltas: torch.Tensor, batch, delta_scale: torch.Tensor) -> torch.Tensor:
    """Normalised anchor-relative deltas (..., N, H, 3) -> absolute (u, v, z) using the batch's query anchors."""
    anchors = torch.cat([batch["query_points"], batch["query_depth"][..., None]], dim=-1)
    extra = deltas.ndim - 4  # sample dimension of predictions
    anchors = anchors.view(anchors.shape[0], *([1] * extra), anchors.shape[1], 1, 3)
    return deltas * delta_scale + anchors


Predictor = Callable[[dict], torch.Tensor]


@dataclass
class PredictionSet:
    """Every predictor's traces on the same queries, flattened over the dataset: absolute (u, v, z), Q queries.

    traces: name -> (S, Q, H, 3); targets (Q, H, 3) and valid (Q, H); anchors (Q, 3) the queries' current (u, v, z);
    query_mask (Q,) False for batch padding; row_index (Q,) the dataset row each query came from;
    seconds_per_row: name -> mean prediction time per dataset row.
    """

    traces: dict[str, torch.Tensor]
    targets: torch.Tensor
    valid: torch.Tensor
    anchors: torch.Tensor
    query_mask: torch.Tensor
    row_index: torch.Tensor
    seconds_per_row: dict[str, float]

    def metrics(self, **metric_kwargs) -> dict[str, dict[str, float]]:
        return {name: trace_metrics(values, self.targets, self.valid, **metric_kwargs) for name, values in self.traces.items()}


def predict_dataset(
    predictors: dict[str, Predictor], dataset, collator, delta_scale: torch.Tensor, batch_size: int = 8
) -> PredictionSet:
    """Run several predictors on the same batches (same queries, same targets) and gather absolute traces.

    A predictor maps a collated batch to normalised deltas (B, S, N, H, 3).
    """
    predictions = {name: [] for name in predictors}
    seconds = dict.fromkeys(predictors, 0.0)
    targets, valids, anchors, query_masks, rows = [], [], [], [], []
    num_rows = 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
        for name, predict in predictors.items():
            start = time.perf_counter()
            traces = predict(batch).cpu()
            seconds[name] += time.perf_counter() - start
            # flatten the batch into the query axis so batches with different query counts concatenate
            predictions[name].append(absolute_traces(traces, batch, delta_scale).transpose(0, 1).flatten(1, 2))
        targets.append(absolute_traces(batch["labels"], batch, delta_scale).flatten(0, 1))
        valids.append((batch["labels_mask"] & batch["query_mask"][..., None]).flatten(0, 1))
        anchors.append(torch.cat([batch["query_points"], batch["query_depth"][..., None]], dim=-1).flatten(0, 1))
        query_masks.append(batch["query_mask"].flatten())
        batch_rows, num_queries = batch["query_mask"].shape
        rows.append((torch.arange(batch_rows) + num_rows).repeat_interleave(num_queries))
        num_rows += batch_rows
    return PredictionSet(
        traces={name: torch.cat(values, dim=1) for name, values in predictions.items()},
        targets=torch.cat(targets),
        valid=torch.cat(valids),
        anchors=torch.cat(anchors),
        query_mask=torch.cat(query_masks),
        row_index=torch.cat(rows),
        seconds_per_row={name: total / max(num_rows, 1) for name, total in seconds.items()},
    )


def evaluate_predictors(
    predictors: dict[str, Predictor], dataset, collator, delta_scale: torch.Tensor, batch_size: int = 8
) -> dict[str, dict[str, float]]:
    """Trace metrics of several predictors on the same batches: absolute (u, v, z) over valid steps, best of S for
    the `min_` keys."""
    return predict_dataset(predictors, dataset, collator, delta_scale, batch_size).metrics()


def zero_motion(batch) -> torch.Tensor:
    """Every query stays where it is."""
    return torch.zeros_like(batch["labels"]).unsqueeze(1)


def constant_velocity(delta_scale: torch.Tensor) -> Predictor:
    """Repeat the last observed step; history steps are spaced like future steps, so one step per future step.

    The history is unscaled and oldest first (as the model reads it); the prediction is in `delta_scale` units.
    """

    def predict(batch) -> torch.Tensor:
        last_step = -batch["history"][:, :, -1] * batch["history_mask"][:, :, -1, None] / delta_scale
        steps = torch.arange(1, batch["labels"].shape[2] + 1, dtype=last_step.dtype)
        return (steps[None, None, :, None] * last_step[:, :, None, :]).unsqueeze(1)

    return predict


def sampler(model, num_samples: int, seed: int) -> Predictor:
    """Sampling from μ0 (or any model with its `predict_traces`, e.g. a baseline) as a predictor, with its own
    seeded generator."""
    generator = torch.Generator().manual_seed(seed)

    def predict(batch) -> torch.Tensor:
        inputs = {k: v.to(model.device) for k, v in batch.items() if k not in ("labels", "labels_mask", "cluster_ids")}
        return model.predict_traces(**inputs, num_samples=num_samples, generator=generator).traces

    return predict


class CollatorEpochCallback(TrainerCallback):
    """Tells a `Mu0TraceCollator` which epoch it collates, so its per-row randomness differs between epochs and a
    resumed run (which starts its epoch mid-way) draws what the uninterrupted run drew."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.collator, "epoch"):
            self.collator.epoch = math.floor(state.epoch + 1e-6)


def unsharded_model(model: torch.nn.Module, state_dict: dict) -> torch.nn.Module:
    """An FSDP2-sharded model rebuilt as its own class around its gathered `state_dict` (without a second copy)."""
    from torch.distributed.fsdp import FSDPModule

    model_class = next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))
    with torch.device("meta"):
        unsharded = model_class(model.config)
    unsharded.load_state_dict(state_dict, assign=True)
    return unsharded


def add_initial_adam_state(optimizer) -> None:
    """Give each trainable parameter that has had no gradient yet (e.g. the depth LoRA before the first batch with a
    depth image) the state Adam creates at its first step: step 0 and zero moments, so training is unchanged.

    FSDP checkpoints load key by key into an optimizer that holds state for every trainable parameter, so a
    checkpoint missing one fails to resume.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(f"FSDP checkpoints of Mu0Trainer support Adam/AdamW, not {type(inner).__name__}.")
    for group in inner.param_groups:
        for parameter in group["params"]:
            if parameter.requires_grad and not inner.state[parameter]:
                state = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(parameter),
                         "exp_avg_sq": torch.zeros_like(parameter)}
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(parameter)
                inner.state[parameter] = state


class WeightAverage(TrainerCallback):
    """An exponential moving average of the trainable weights, loaded into the model when training ends.

    Why: a small model at a high constant learning rate ends wherever the last noisy steps left it; the average of
    the recent weights is a smoother estimate of the same solution. `averaged_weights` swaps the average in for an
    evaluation during training. The average is not saved in checkpoints, so a resumed run is refused.
    """

    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"The weight average's decay must be in (0, 1), got {decay}.")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step > 0:
            raise ValueError("A recipe with a weight average (`ema_decay`) cannot resume from a checkpoint: the average is "
                             "not saved. Start the run again, or remove `ema_decay` from the recipe.")
        self.shadow = {name: value.detach().clone() for name, value in model.named_parameters() if value.requires_grad}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            for name, value in model.named_parameters():
                if name in self.shadow:
                    self.shadow[name].lerp_(value.detach(), 1.0 - self.decay)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._swap(model)

    def _swap(self, model) -> None:
        with torch.no_grad():
            for name, value in model.named_parameters():
                if name in self.shadow:
                    current = value.detach().clone()
                    value.copy_(self.shadow[name])
                    self.shadow[name] = current

    @contextlib.contextmanager
    def averaged_weights(self, model):
        self._swap(model)
        try:
            yield model
        finally:
            self._swap(model)


class Mu0Trainer(Trainer):
    """`Trainer` whose evaluation samples traces and reports ADE/FDE/DTW/Fréchet (and best-of-N) instead of a loss.

    A step whose loss or gradient norm is NaN or inf is skipped on every rank: the backward pass runs as usual (so
    every rank joins the gradient all-reduce), then the ranks agree on a "non-finite" flag, and when any raised it
    the gradients are dropped (set to None, so the optimiser leaves every parameter alone). Skips are counted in
    `skipped_nonfinite_steps`.
    """

    def __init__(self, *args, eval_collator=None, num_eval_samples: int = 5, eval_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(CollatorEpochCallback(self.data_collator))
        self.eval_collator = eval_collator
        self.num_eval_samples = num_eval_samples
        self.eval_seed = eval_seed
        self.skipped_nonfinite_steps = 0

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        local = torch.tensor(0.0 if grad_norm is None else float(grad_norm), device=self.accelerator.device)
        nonfinite = (~torch.isfinite(local)).float()
        # With sharded gradients (FSDP) ranks can disagree; the max makes every rank skip together.
        if self.accelerator.num_processes > 1:
            nonfinite = self.accelerator.reduce(nonfinite, reduction="max")
        if nonfinite.item():
            self.skipped_nonfinite_steps += 1
            logger.warning("Non-finite loss or gradient norm at step %d: step skipped on every rank (%d so far).",
                           self.state.global_step, self.skipped_nonfinite_steps)
            model.zero_grad(set_to_none=True)
        return grad_norm

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP the final model is gathered and saved as its own class: `Trainer.save_model` writes no weights
        for sharded state, and saving the sharded model itself would name torch's `FSDP...` class in `auto_map`.
        Checkpoints (`_internal_call`) keep FSDP's sharded files."""
        if not self.is_fsdp_enabled or _internal_call:
            super().save_model(output_dir, _internal_call)
            return
        state_dict = self.accelerator.get_state_dict(self.model)  # every rank takes part in the gather
        if self.args.should_save:
            output_dir = output_dir or self.args.output_dir
            unsharded_model(self.model, state_dict).save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.is_fsdp_enabled:
            add_initial_adam_state(self.optimizer)
        super()._save_optimizer_and_scheduler(output_dir)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None or self.eval_collator is None:
            raise ValueError("Evaluation needs an eval_dataset and an eval_collator (Mu0TraceCollator(training=False)).")
        model = self.accelerator.unwrap_model(self.model).eval()
        scale = self.processing_class.require_delta_scale()
        predictor = sampler(model, self.num_eval_samples, self.eval_seed)
        metrics = evaluate_predictors({"mu0": predictor}, dataset, self.eval_collator, scale,
                                      self.args.per_device_eval_batch_size)["mu0"]
        metrics = {f"{metric_key_prefix}_{key}": value for key, value in metrics.items()}
        self.log(metrics)
        return metrics


__all__ = [
    "Mu0Trainer",
    "PredictionSet",
    "WeightAverage",
    "absolute_traces",
    "constant_velocity",
    "evaluate_predictors",
    "predict_dataset",
    "sampler",
    "zero_motion",
]
