"""μ0 action expert: a π0-style flow-matching robot policy that reads a frozen μ0's motion tokens.

μ0 is queried on a uniform point grid for a few denoising steps; the trace expert's future-token states, pooled
into motion tokens, enter every action-expert layer through a gated cross-attention whose gate starts closed, so an
untrained mixer leaves the policy equal to its `use_trace=False` ablation (VLM + action expert).
"""

import copy
import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_mu0_action import Mu0ActionConfig
from .modeling_mu0 import (
    Mu0ExpertAttention,
    Mu0ExpertMLP,
    Mu0ForTracePrediction,
    Mu0LoadingMixin,
    Mu0Prefix,
    sample_flow_time,
    sampling_steps,
    sinusoidal_time_embedding,
    legacy_key,
    legacy_key_mapping,
    zero_initialised,
)


@dataclass
class Mu0ActionOutput(ModelOutput):
    """Flow-matching loss over valid action steps and the predicted velocity (B, chunk, action_dim)."""

    loss: torch.FloatTensor | None = None
    velocity: torch.FloatTensor | None = None


def uniform_grid(size: int, device: torch.device | None = None) -> torch.Tensor:
    """(size², 2) normalised (u, v) at the centres of a size × size grid of cells, row-major."""
    centres = (2 * (torch.arange(size, dtype=torch.float32, device=device) + 0.5) / size) - 1
    v, u = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([u.flatten(), v.flatten()], dim=-1)


def trace_fingerprint(trace_model: Mu0ForTracePrediction) -> str:
    """A cheap identity of a μ0's weights (names, shapes and leading values of every tensor), so an adapter can
    refuse a base it was not trained on without hashing billions of parameters. Names are taken in the flat
    layout of the first releases, so policies saved then still recognise their base."""
    digest = hashlib.sha256()
    state = {legacy_key(name): tensor for name, tensor in trace_model.state_dict().items()}
    for name, tensor in sorted(state.items()):
        head = tensor.detach().flatten()[:64].to(device="cpu", dtype=torch.float64).numpy()
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(head.round(6).tobytes())
    return digest.hexdigest()


def _attention_heads(width: int) -> int:
    """Most heads (up to 16) that split `width` into heads of at least 16 channels."""
    return next((heads for heads in (16, 8, 4, 2) if width % heads == 0 and width // heads >= 16), 1)


class Mu0AdaptiveRMSNorm(nn.Module):
    """RMSNorm whose scale, shift and residual gate come from the flow time (adaRMS); plain pre-norm at init."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.modulation = zero_initialised(nn.Linear(hidden_size, 3 * hidden_size))

    def forward(self, hidden_states: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift, gate = self.modulation(F.silu(condition))[:, None, :].chunk(3, dim=-1)
        normed = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed * (1 + scale) + shift, 1 + gate


class Mu0ActionLayer(GradientCheckpointingLayer):
    """Joint attention over [backbone prefix; state, wrist and action tokens], gated motion cross-attention, MLP."""

    def __init__(self, config: Mu0ActionConfig, attention_config):
        super().__init__()
        width = config.action_hidden_size
        self.attention_norm = Mu0AdaptiveRMSNorm(width)
        self.attention = Mu0ExpertAttention(attention_config, joint=True)
        if config.use_trace:
            self.motion_norm = nn.RMSNorm(width, elementwise_affine=False, eps=1e-6)
            self.motion_attention = nn.MultiheadAttention(width, _attention_heads(width), batch_first=True)
            self.motion_gate = nn.Parameter(torch.zeros(1))
        self.mlp_norm = Mu0AdaptiveRMSNorm(width)
        self.mlp = Mu0ExpertMLP(width, attention_config.expert_intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        condition: torch.Tensor,
        prefix_keys: torch.Tensor,
        prefix_values: torch.Tensor,
        attention_mask: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        motion_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        normed, gate = self.attention_norm(hidden_states, condition)
        hidden_states = hidden_states + gate * self.attention(normed, prefix_keys, prefix_values, attention_mask, cos, sin)
        if motion_tokens is not None:
            mixed, _ = self.motion_attention(
                self.motion_norm(hidden_states), motion_tokens, motion_tokens, need_weights=False
            )
            hidden_states = hidden_states + torch.tanh(self.motion_gate) * mixed
        normed, gate = self.mlp_norm(hidden_states, condition)
        return hidden_states + gate * self.mlp(normed)


class Mu0ActionExpert(nn.Module):
    """Every module the policy adds on top of μ0, under one name so PEFT can save them with `modules_to_save`."""

    def __init__(self, config: Mu0ActionConfig):
        super().__init__()
        trace_config = config.trace_config
        width = config.action_hidden_size
        # The action layers reuse the trace expert's attention, built at the action width.
        attention_config = copy.deepcopy(trace_config)
        attention_config.expert_width_factor = config.action_width_factor
        self.motion_proj = nn.Linear(trace_config.expert_hidden_size, width) if config.use_trace else None
        self.wrist_proj = nn.Linear(trace_config.dino_config.hidden_size, width) if config.use_wrist_camera else None
        self.state_proj = nn.Linear(config.state_dim, width) if config.use_state else None
        self.action_in_proj = nn.Linear(config.action_dim, width)
        self.chunk_position = nn.Embedding(config.chunk_size, width)
        self.time_mlp_in = nn.Linear(width, width)
        self.time_mlp_out = nn.Linear(width, width)
        self.layers = nn.ModuleList([Mu0ActionLayer(config, attention_config) for _ in range(config.num_action_layers)])
        self.final_norm = Mu0AdaptiveRMSNorm(width)
        self.velocity_head = nn.Linear(width, config.action_dim)


class Mu0ActionPreTrainedModel(Mu0LoadingMixin, PreTrainedModel):
    config: Mu0ActionConfig
    config_class = Mu0ActionConfig
    base_model_prefix = "mu0_action"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["Mu0ActionLayer", "Mu0ExpertLayer", "LlamaDecoderLayer", "GemmaDecoderLayer", "Qwen2DecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if getattr(module, "zero_init", False):
            nn.init.zeros_(module.weight)
            nn.init.constant_(module.bias, getattr(module, "bias_init", 0.0))
        elif isinstance(module, Mu0ActionLayer) and hasattr(module, "motion_gate"):
            nn.init.zeros_(module.motion_gate)


class Mu0ForActionPrediction(Mu0ActionPreTrainedModel):
    """Predicts chunks of robot actions from an image, an instruction and the robot state, reading μ0's motion tokens."""

    _legacy_key_mapping = legacy_key_mapping("trace_model.")

    def __init__(self, config: Mu0ActionConfig):
        super().__init__(config)
        self.trace_model = Mu0ForTracePrediction(config.trace_config)
        self.action_expert = Mu0ActionExpert(config)
        self.post_init()
        self.apply_frozen_parts()

    def apply_frozen_parts(self) -> None:
        """μ0 entirely frozen (`freeze_trace_model`), or only its configured backbone parts (LoRA adaptation)."""
        if self.config.freeze_trace_model:
            self.trace_model.requires_grad_(False)
        else:
            self.trace_model.apply_frozen_parts()

    @classmethod
    def from_trace_model(cls, trace_model: str | Mu0ForTracePrediction, **config_kwargs) -> "Mu0ForActionPrediction":
        """A policy with a fresh action expert on top of a pretrained μ0 (a Hub id, a path or a loaded model)."""
        checkpoint = trace_model if isinstance(trace_model, str) else trace_model.config.name_or_path or None
        if isinstance(trace_model, str):
            trace_model = Mu0ForTracePrediction.from_pretrained(trace_model)
        config = Mu0ActionConfig(
            trace_config=trace_model.config.to_dict(),
            trace_checkpoint=checkpoint,
            trace_fingerprint=trace_fingerprint(trace_model),
            **config_kwargs,
        )
        policy = cls(config)
        policy.trace_model.load_state_dict(trace_model.state_dict())
        return policy

    # ---------------------------------------------------------------------------------------------- context
    def _trace_grad_enabled(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.trace_model.parameters())

    def motion_states(
        self,
        prefix: Mu0Prefix,
        dino_pixel_values: torch.Tensor | None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(B, M, trace width): μ0's future-token states on the query grid after the configured steps, pooled."""
        config = self.config
        trace = self.trace_model
        batch_size = prefix.attention_mask.shape[0]
        device = prefix.attention_mask.device
        grid = uniform_grid(config.trace_grid_size, device).expand(batch_size, -1, -1)
        query_mask = torch.ones(grid.shape[:2], dtype=torch.bool, device=device)
        fourier, dino_features = trace.model.point_context(grid, dino_pixel_values)
        shape = (*grid.shape[:2], trace.config.num_control_points, 3)
        if config.trace_noise == "zero":
            sample = torch.zeros(shape, device=device)
        else:
            sample = torch.randn(shape, generator=generator, device=device)
        step = 1.0 / config.trace_schedule_steps
        for index in range(config.trace_denoise_steps):
            time = torch.full((batch_size,), 1.0 - index * step, device=device)
            states = trace.model(prefix, sample, time, query_mask, fourier, dino_features).last_hidden_state
            if index + 1 < config.trace_denoise_steps:
                velocity = trace.trace_velocity_head(states).view(sample.shape).float()
                sample = sample - step * velocity
        side = config.trace_grid_size
        feature_map = states.transpose(1, 2).reshape(batch_size, -1, side, side)
        return F.avg_pool2d(feature_map, config.motion_pool_size).flatten(2).transpose(1, 2)

    def wrist_tokens(self, wrist_dino_pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, P², width): μ0's DINOv2 patch features of the wrist image, average-pooled to a P × P grid."""
        dino_config = self.config.trace_config.dino_config
        grid_h = wrist_dino_pixel_values.shape[-2] // dino_config.patch_size
        grid_w = wrist_dino_pixel_values.shape[-1] // dino_config.patch_size
        dino = self.trace_model.model.dino
        tokens = dino(pixel_values=wrist_dino_pixel_values.to(dino.dtype)).last_hidden_state[:, -grid_h * grid_w :]
        feature_map = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, grid_h, grid_w)
        pooled = F.adaptive_avg_pool2d(feature_map.float(), self.config.wrist_pool_size).flatten(2).transpose(1, 2)
        return self.action_expert.wrist_proj(pooled.to(self.action_expert.wrist_proj.weight.dtype))

    def _validate_context(
        self, pixel_values: torch.Tensor, state: torch.Tensor | None, wrist_dino_pixel_values: torch.Tensor | None
    ) -> None:
        config = self.config
        batch_size = pixel_values.shape[0]
        if config.use_state:
            if state is None:
                raise ValueError(f"This policy reads the robot state (use_state=True): pass `state` of shape (B, {config.state_dim}).")
            if tuple(state.shape) != (batch_size, config.state_dim):
                raise ValueError(f"state must have shape ({batch_size}, {config.state_dim}), got {tuple(state.shape)}.")
        if config.use_wrist_camera and wrist_dino_pixel_values is None:
            raise ValueError("This policy reads a wrist camera (use_wrist_camera=True): pass `wrist_dino_pixel_values`.")

    def encode_context(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        dino_pixel_values: torch.Tensor | None = None,
        depth_pixel_values: torch.Tensor | None = None,
        depth_mask: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        wrist_dino_pixel_values: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Mu0Prefix, torch.Tensor | None, torch.Tensor | None]:
        """What stays fixed while the action flow is integrated: backbone prefix, motion tokens, state/wrist tokens."""
        self._validate_context(pixel_values, state, wrist_dino_pixel_values)
        with torch.set_grad_enabled(self._trace_grad_enabled()):
            prefix = self.trace_model.model.compute_prefix(pixel_values, input_ids, attention_mask, depth_pixel_values, depth_mask)
            motion_states = self.motion_states(prefix, dino_pixel_values, generator) if self.config.use_trace else None
        expert = self.action_expert
        motion = None if motion_states is None else expert.motion_proj(motion_states.to(expert.motion_proj.weight.dtype))
        context_tokens = []
        if self.config.use_state:
            context_tokens.append(expert.state_proj(state.to(expert.state_proj.weight.dtype))[:, None])
        if self.config.use_wrist_camera:
            with torch.no_grad():
                context_tokens.append(self.wrist_tokens(wrist_dino_pixel_values))
        context = torch.cat(context_tokens, dim=1) if context_tokens else None
        return prefix, motion, context

    def velocity(
        self,
        prefix: Mu0Prefix,
        motion: torch.Tensor | None,
        context: torch.Tensor | None,
        noisy_actions: torch.Tensor,
        time: torch.Tensor,
    ) -> torch.Tensor:
        """Flow velocity (B, chunk, action_dim) of normalised actions at flow time `time` (B,)."""
        expert = self.action_expert
        width = self.config.action_hidden_size
        dtype = expert.action_in_proj.weight.dtype
        tokens = expert.action_in_proj(noisy_actions.to(dtype)) + expert.chunk_position.weight[None]
        hidden_states = tokens if context is None else torch.cat([context, tokens], dim=1)
        embedding = sinusoidal_time_embedding(
            time, width, self.config.trace_config.min_period, self.config.trace_config.max_period
        )
        condition = expert.time_mlp_out(F.silu(expert.time_mlp_in(embedding.to(dtype))))
        num_suffix = hidden_states.shape[1]
        prefix_part = prefix.attention_mask[:, None, :].expand(-1, num_suffix, -1)
        mask = torch.cat([prefix_part, prefix_part.new_ones(prefix_part.shape[0], num_suffix, num_suffix)], dim=-1)
        cos, sin = self.trace_model.model.suffix_rotary(prefix)
        for layer, keys, values in zip(expert.layers, prefix.keys, prefix.values):
            hidden_states = layer(hidden_states, condition, keys, values, mask, cos, sin, motion)
        normed, _ = expert.final_norm(hidden_states, condition)
        return expert.velocity_head(normed[:, -self.config.chunk_size :]).float()

    # --------------------------------------------------------------------------------------------- training
    def sample_time(self, batch_size: int, device: torch.device) -> torch.Tensor:
        config = self.config
        return sample_flow_time(batch_size, config.time_sampling_beta_alpha, config.time_sampling_beta_beta, 0.999,
                                0.001, device)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        dino_pixel_values: torch.Tensor | None = None,
        depth_pixel_values: torch.Tensor | None = None,
        depth_mask: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        wrist_dino_pixel_values: torch.Tensor | None = None,
        actions: torch.Tensor | None = None,
        actions_mask: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        time: torch.Tensor | None = None,
        **kwargs,
    ) -> Mu0ActionOutput:
        r"""
        state (`(B, state_dim)`): normalised proprioceptive state.
        actions / actions_mask (`(B, chunk, action_dim)` / `(B, chunk)`): normalised action chunk and which steps
            are real (False past the episode's end).
        noise, time: optional fixed flow noise (B, chunk, action_dim) and times (B,), for reproducible losses.
        """
        config = self.config
        batch_size = pixel_values.shape[0]
        if actions is not None and tuple(actions.shape) != (batch_size, config.chunk_size, config.action_dim):
            raise ValueError(
                f"actions must have shape ({batch_size}, chunk_size={config.chunk_size}, action_dim="
                f"{config.action_dim}), got {tuple(actions.shape)}."
            )
        prefix, motion, context = self.encode_context(
            pixel_values, input_ids, attention_mask, dino_pixel_values, depth_pixel_values, depth_mask, state,
            wrist_dino_pixel_values,
        )
        if actions is None:
            if noise is None or time is None:
                raise ValueError("Without actions, forward needs `noise` and `time` to evaluate the velocity field.")
            return Mu0ActionOutput(velocity=self.velocity(prefix, motion, context, noise, time))
        actions = actions.float()
        noise = torch.randn_like(actions) if noise is None else noise.float()
        time = self.sample_time(batch_size, actions.device) if time is None else time.float()
        noisy = time[:, None, None] * noise + (1 - time[:, None, None]) * actions
        velocity = self.velocity(prefix, motion, context, noisy, time)
        valid = torch.ones(actions.shape[:2], device=actions.device) if actions_mask is None else actions_mask.float()
        per_step = ((velocity - (noise - actions)) ** 2).mean(-1)
        loss = (per_step * valid).sum() / valid.sum().clamp(min=1)
        return Mu0ActionOutput(loss=loss, velocity=velocity)

    @torch.no_grad()
    def predict_actions(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        dino_pixel_values: torch.Tensor | None = None,
        depth_pixel_values: torch.Tensor | None = None,
        depth_mask: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        wrist_dino_pixel_values: torch.Tensor | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """(B, chunk, action_dim) normalised actions: Euler integration of the action flow from noise (t=1) to t=0.

        The prefix and motion tokens are computed once per call; `generator` seeds both μ0's grid noise and the
        action noise, so the same seed gives the same actions.
        """
        num_steps = sampling_steps(num_steps, self.config.num_sampling_steps)
        prefix, motion, context = self.encode_context(
            pixel_values, input_ids, attention_mask, dino_pixel_values, depth_pixel_values, depth_mask, state,
            wrist_dino_pixel_values, generator,
        )
        shape = (pixel_values.shape[0], self.config.chunk_size, self.config.action_dim)
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=pixel_values.device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}.")
        sample = noise.float()
        for index in range(num_steps):
            time = torch.full((shape[0],), 1.0 - index / num_steps, device=sample.device)
            sample = sample - self.velocity(prefix, motion, context, sample, time) / num_steps
        return sample


__all__ = ["Mu0ActionOutput", "Mu0ActionPreTrainedModel", "Mu0ForActionPrediction", "trace_fingerprint", "uniform_grid"]
