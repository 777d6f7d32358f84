"""Mu0ActionProcessor: camera images, instruction and robot state in; policy tensors out; actions back out.

Actions and states are z-scored with per-dimension statistics of the robot dataset. The statistics travel with the
processor (`processor_config.json`) and are never defaulted: a policy fed unnormalised data fails loudly instead.
"""

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature

from .processing_mu0 import Mu0Processor

STATISTIC_NAMES = ("action_mean", "action_std", "state_mean", "state_std")


class Mu0ActionProcessor(Mu0Processor):
    r"""
    Builds [`Mu0ForActionPrediction`] inputs. Everything [`Mu0Processor`] takes, plus:

    Args:
        action_mean, action_std (`list[float]`, *optional*): per-dimension action statistics.
        state_mean, state_std (`list[float]`, *optional*): per-dimension proprioceptive-state statistics.
        chunk_size (`int`, defaults to 16): actions per training target.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        action_mean: list[float] | None = None,
        action_std: list[float] | None = None,
        state_mean: list[float] | None = None,
        state_std: list[float] | None = None,
        chunk_size: int = 16,
        delta_scale: list[float] | None = None,
        depth_log_range: list[float] | None = None,
        history_length: int = 8,
        horizon: int = 32,
        max_prompt_length: int = 48,
        max_queries: int = 256,
        **kwargs,
    ):
        # The parent's settings are repeated here because processors save only the arguments their own
        # `__init__` names.
        for name, mean, std in (("action", action_mean, action_std), ("state", state_mean, state_std)):
            if (mean is None) != (std is None):
                raise ValueError(f"Give both {name}_mean and {name}_std, or neither.")
            if mean is not None:
                mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
                if mean.shape != std.shape or mean.ndim != 1 or not np.isfinite(mean).all() or not (std > 0).all():
                    raise ValueError(f"{name}_mean/{name}_std must be equal-length finite vectors with std > 0.")
        self.action_mean = None if action_mean is None else [float(x) for x in action_mean]
        self.action_std = None if action_std is None else [float(x) for x in action_std]
        self.state_mean = None if state_mean is None else [float(x) for x in state_mean]
        self.state_std = None if state_std is None else [float(x) for x in state_std]
        self.chunk_size = chunk_size
        super().__init__(
            image_processor,
            tokenizer,
            delta_scale=delta_scale,
            depth_log_range=depth_log_range,
            history_length=history_length,
            horizon=horizon,
            max_prompt_length=max_prompt_length,
            max_queries=max_queries,
            **kwargs,
        )

    @classmethod
    def from_trace_processor(cls, processor: Mu0Processor, statistics: dict, chunk_size: int = 16) -> "Mu0ActionProcessor":
        """The μ0 processor's settings plus robot statistics (`action_mean`, `action_std`, `state_mean`, `state_std`)."""
        missing = [name for name in STATISTIC_NAMES if name not in statistics]
        if missing:
            raise ValueError(f"Robot statistics lack {missing}: compute them with `robot_statistics(episodes)`.")
        return cls(
            processor.image_processor,
            processor.tokenizer,
            **{name: statistics[name] for name in STATISTIC_NAMES},
            chunk_size=chunk_size,
            delta_scale=processor.delta_scale,
            depth_log_range=processor.depth_log_range,
            history_length=processor.history_length,
            horizon=processor.horizon,
            max_prompt_length=processor.max_prompt_length,
            max_queries=processor.max_queries,
        )

    # ------------------------------------------------------------------------------------------ statistics
    def _statistics(self, kind: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = getattr(self, f"{kind}_mean"), getattr(self, f"{kind}_std")
        if mean is None:
            raise ValueError(
                f"Mu0ActionProcessor has no {kind} statistics ({kind}_mean/{kind}_std). Build it with "
                "`Mu0ActionProcessor.from_trace_processor(processor, robot_statistics(episodes))` or load a processor "
                "saved with the policy."
            )
        if len(mean) != size:
            raise ValueError(f"Got {kind}s of dimension {size} but the processor's statistics have {len(mean)}.")
        return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)

    def normalize(self, values, kind: str) -> torch.Tensor:
        """z-score actions (`kind="action"`) or states (`kind="state"`) with the stored statistics."""
        values = torch.as_tensor(np.asarray(values), dtype=torch.float32)
        if not torch.isfinite(values).all():
            raise ValueError(f"The {kind}s contain NaN or inf values.")
        mean, std = self._statistics(kind, values.shape[-1])
        return (values - mean) / std

    def unnormalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """Map the policy's normalised actions back to the robot's units."""
        mean, std = self._statistics("action", actions.shape[-1])
        return actions.float() * std.to(actions.device) + mean.to(actions.device)

    # ----------------------------------------------------------------------------------------------- inputs
    def __call__(
        self,
        images=None,
        text: str | list[str | None] | None = None,
        state=None,
        actions=None,
        actions_mask=None,
        wrist_images=None,
        depth=None,
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        r"""
        images: the third-person camera image(s); text: the instruction per image.
        state: (B, state_dim) proprioceptive states in robot units.
        actions / actions_mask: (B, chunk, action_dim) action chunks in robot units and (B, chunk) validity.
        wrist_images: wrist-camera images, turned into DINOv2 pixels for the wrist tokens.
        """
        if images is None:
            raise ValueError("Mu0ActionProcessor needs `images`.")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        texts = [text] * len(images) if text is None or isinstance(text, str) else list(text)
        if len(texts) != len(images):
            raise ValueError(f"Got {len(texts)} instructions for {len(images)} images.")
        data = self.encode_images_and_prompts(images, texts, depth)
        if state is not None:
            data["state"] = self.normalize(state, "state").reshape(len(images), -1)
        if actions is not None:
            data["actions"] = self.normalize(actions, "action")
            if data["actions"].ndim != 3 or data["actions"].shape[:2] != (len(images), self.chunk_size):
                raise ValueError(
                    f"actions must be (batch={len(images)}, chunk={self.chunk_size}, action_dim), got "
                    f"{tuple(data['actions'].shape)}."
                )
            mask = np.ones(data["actions"].shape[:2], dtype=bool) if actions_mask is None else np.asarray(actions_mask)
            data["actions_mask"] = torch.as_tensor(mask, dtype=torch.bool)
        if wrist_images is not None:
            wrist_images = list(wrist_images) if isinstance(wrist_images, (list, tuple)) else [wrist_images]
            data["wrist_dino_pixel_values"] = self.image_processor(wrist_images, return_tensors="pt")["dino_pixel_values"]
        return BatchFeature(data=data, tensor_type=return_tensors)


def robot_statistics(actions: np.ndarray, states: np.ndarray, min_std: float = 1e-3) -> dict[str, list[float]]:
    """Per-dimension mean and std of actions (T, action_dim) and states (T, state_dim) over a robot dataset.

    `min_std` keeps constant dimensions (e.g. an unused gripper) from blowing up when z-scored.
    """
    statistics = {}
    for kind, values in (("action", actions), ("state", states)):
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or len(values) == 0 or not np.isfinite(values).all():
            raise ValueError(f"{kind}s must be a non-empty finite (T, dim) array, got shape {values.shape}.")
        statistics[f"{kind}_mean"] = values.mean(0).tolist()
        statistics[f"{kind}_std"] = np.maximum(values.std(0), min_std).tolist()
    return statistics


__all__ = ["Mu0ActionProcessor", "robot_statistics"]
