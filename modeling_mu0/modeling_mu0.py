"""μ0: a vision-language backbone slice plus a B-spline trace expert trained by flow matching.

The backbone encodes [RGB image tokens, depth image tokens, prompt tokens] once (the prefix). The trace expert is
a narrower decoder with one layer per kept backbone layer: even layers attend jointly to the prefix keys/values of
the matching backbone layer and to the suffix, odd layers cross-attend to the prefix through their own k/v
projections. Each query point contributes two suffix tokens (history, future); flow time enters the expert only
through adaLN-Zero, so the frozen backbone stream is never modulated.
"""

import copy
import math
import numbers
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, DynamicCache, PreTrainedConfig, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .bspline import bspline_basis, fit_control_points, render_traces
from .configuration_mu0 import Mu0Config

DEPTH_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "o_proj", "fc1", "fc2", "gate_proj", "up_proj", "down_proj")


@dataclass
class Mu0ModelOutput(ModelOutput):
    """Final trace-expert states of the future tokens, (B, N, hidden): one per query, what the trace heads read."""

    last_hidden_state: torch.FloatTensor | None = None


@dataclass
class Mu0TraceOutput(ModelOutput):
    """Training output: total loss, each loss term, and the raw head outputs.

    `flow_loss` is the trace term: flow matching, or the L2 error of the regression objective. `velocity` holds the
    clean trace values for regression models; `done_logits` is None without a done head.
    """

    loss: torch.FloatTensor | None = None
    flow_loss: torch.FloatTensor | None = None
    done_loss: torch.FloatTensor | None = None
    rigidity_loss: torch.FloatTensor | None = None
    velocity: torch.FloatTensor | None = None
    done_logits: torch.FloatTensor | None = None


@dataclass
class Mu0TracePrediction(ModelOutput):
    """Sampled traces in normalised anchor-relative units; `Mu0Processor.post_process_traces` maps them to pixels and metres.

    Shapes: traces (B, S, N, H, 3), done_probs (B, S, N, H), alive_mask (B, S, N, H), control_points (B, S, N, D, 3)
    (what the model generated before rendering: None for dense traces, which are generated step by step).
    """

    traces: torch.FloatTensor | None = None
    done_probs: torch.FloatTensor | None = None
    alive_mask: torch.BoolTensor | None = None
    control_points: torch.FloatTensor | None = None


@dataclass
class Mu0Prefix:
    """Backbone keys/values of every kept layer, computed once per image and reused at every denoising step."""

    keys: list[torch.Tensor]  # per layer (B, kv_heads, L, head_dim), rotary already applied
    values: list[torch.Tensor]
    attention_mask: torch.BoolTensor  # (B, L)

    def repeat_interleave(self, repeats: int) -> "Mu0Prefix":
        if repeats == 1:
            return self
        return Mu0Prefix(
            keys=[k.repeat_interleave(repeats, dim=0) for k in self.keys],
            values=[v.repeat_interleave(repeats, dim=0) for v in self.values],
            attention_mask=self.attention_mask.repeat_interleave(repeats, dim=0),
        )


class Mu0DepthLoRALinear(nn.Linear):
    """A vision-tower projection with a LoRA that is switched on only while encoding the depth image.

    Subclassing `nn.Linear` keeps the pretrained weight names, so backbone checkpoints load unchanged.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: int, **factory_kwargs):
        super().__init__(in_features, out_features, bias=bias, **factory_kwargs)
        self.lora_A = nn.Linear(in_features, rank, bias=False, **factory_kwargs)
        self.lora_B = nn.Linear(rank, out_features, bias=False, **factory_kwargs)
        self.scaling = alpha / rank
        self.depth_active = False

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output = super().forward(hidden_states)
        if self.depth_active:
            # The LoRA may stay in fp32 under a bf16 tower (the released dtypes): compute it in its own dtype.
            update = self.lora_B(self.lora_A(hidden_states.to(self.lora_A.weight.dtype))) * self.scaling
            output = output + update.to(output.dtype)
        return output


def encode_images(vlm: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Image tokens in the text width: Idefics3-style towers (vision_model + connector) or `get_image_features`."""
    if hasattr(vlm, "connector") and hasattr(vlm, "vision_model"):
        # Called directly: SmolVLM's get_image_features drops all-zero images, which a depth map can be.
        return vlm.connector(vlm.vision_model(pixel_values=pixel_values).last_hidden_state)
    features = vlm.get_image_features(pixel_values=pixel_values).pooler_output
    return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features


def text_attention_mask(text_model: nn.Module, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4-D boolean "may attend" mask in the form the text model's attention wants (additive for eager)."""
    if text_model.config._attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def validate_queries(
    pixel_values: torch.Tensor,
    query_points: torch.Tensor,
    query_mask: torch.Tensor | None,
    max_queries: int,
    **batched: torch.Tensor | None,
) -> torch.Tensor:
    """Check query points against the batch and return the boolean query mask (all True when none is given)."""
    batch_size = pixel_values.shape[0]
    if query_points.ndim != 3 or query_points.shape[-1] != 2:
        raise ValueError(f"query_points must be (batch, num_queries, 2), got {tuple(query_points.shape)}.")
    if query_points.shape[1] == 0:
        raise ValueError("query_points is empty: pass at least one query point per image.")
    if query_points.shape[1] > max_queries:
        raise ValueError(f"{query_points.shape[1]} query points exceed max_queries={max_queries}; split the queries.")
    if query_mask is None:
        query_mask = torch.ones(query_points.shape[:2], dtype=torch.bool, device=query_points.device)
    query_mask = query_mask.bool()
    for name, tensor in {"query_points": query_points, "query_mask": query_mask, **batched}.items():
        if tensor is not None and tensor.shape[0] != batch_size:
            raise ValueError(f"{name} has batch size {tensor.shape[0]} but pixel_values has {batch_size}.")
    real = query_points[query_mask]
    if not torch.isfinite(real).all():
        raise ValueError("query_points contain NaN or inf values.")
    if (real.abs() > 1).any():
        raise ValueError("query_points must be normalised (u, v) inside [-1, 1]; some points lie outside the image.")
    return query_mask


def sampling_steps(num_steps: int | None, default: int, **counts: int) -> int:
    """`num_steps` (None: the config's `default`), after checking it and every other count (e.g. `num_samples`)
    is a positive integer: 0 once silently meant the default and -1 returned the input noise as the prediction."""
    num_steps = default if num_steps is None else num_steps
    for name, value in {"num_steps": num_steps, **counts}.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return num_steps


def require_finite(where: str, *tensors: torch.Tensor | None) -> None:
    """Stop at the first NaN/inf output, naming where it appeared, instead of returning NaN traces."""
    for tensor in tensors:
        if tensor is not None and not torch.isfinite(tensor).all():
            raise FloatingPointError(
                f"The trace expert produced NaN or inf values at {where}: the weights have diverged or the inputs "
                "are out of range (check them with torch.isfinite)."
            )


def sample_flow_time(
    batch_size: int, alpha: float, beta: float, scale: float, offset: float, device: torch.device
) -> torch.Tensor:
    """Flow-matching times offset + scale * Beta(alpha, beta): weighted towards the noisy end, never exactly 0."""
    distribution = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(beta))
    return (distribution.sample((batch_size,)) * scale + offset).to(device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_embedding(
    positions: torch.Tensor, head_dim: int, max_wavelength: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (B, L, head_dim) of rotary positions (B, L), half-split layout, in fp32 then cast.

    The released recipe rotates the backbone and the expert alike with wavelength 10 000, whatever rope theta the
    backbone was pretrained with, so μ0 computes its own table instead of the backbone's.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    angles = positions[..., None].float() / (max_wavelength**exponents)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, L, head_dim) by cos/sin of shape (B, L, head_dim) (L may be 1 to broadcast one position)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def sinusoidal_time_embedding(time: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """[sin | cos] of the flow time at log-spaced periods, in float64 where the device has it: at the shortest
    period the angle reaches ~1.6e3 rad, where float32 rounding alone moves the embedding by ~1e-4."""
    dtype = torch.float32 if time.device.type == "mps" else torch.float64
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=dtype, device=time.device)
    period = min_period * (max_period / min_period) ** fraction
    angles = time.to(dtype)[:, None] * (2 * math.pi / period)[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def rigidity_loss(clean_control_points: torch.Tensor, cluster_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Variance over the control-point (or step) index of pairwise distances between same-cluster queries.

    A rigid part keeps its points' mutual distances through time, so a prediction that stretches it pays. As
    released: the mean over a cluster's pairs, then the mean over every (sample, cluster) with two or more
    valid queries, so a large cluster weighs as much as a small one.
    """
    points = clean_control_points.transpose(1, 2)  # (B, D, N, 3)
    distances = (points[:, :, :, None, :] - points[:, :, None, :, :]).norm(dim=-1)  # (B, D, N, N)
    member = valid & (cluster_ids >= 0)
    same = (cluster_ids[:, :, None] == cluster_ids[:, None, :]) & member[:, :, None] & member[:, None, :]
    pairs = same & ~torch.eye(same.shape[-1], dtype=torch.bool, device=same.device)[None]
    cluster_size = same.sum(-1).to(distances.dtype)  # (B, N): valid members of each query's cluster
    # Each unordered pair appears twice in `pairs`; a cluster of size K has K (K - 1) ordered pairs.
    pair_weight = pairs / (cluster_size * (cluster_size - 1)).clamp(min=1)[:, :, None]
    num_clusters = (member & (cluster_size >= 2)).to(distances.dtype) / cluster_size.clamp(min=1)
    variance = distances.var(dim=1, unbiased=False)
    return (variance * pair_weight).sum() / num_clusters.sum().clamp(min=1)


def history_visible(history: torch.Tensor | None, history_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Queries whose history token is shown: those with at least one valid past step (None without history)."""
    if history is None:
        return None
    if history_mask is None:
        return torch.ones(history.shape[:2], dtype=torch.bool, device=history.device)
    return history_mask.bool().any(-1)


def flow_scheduler(sampler: str, num_steps: int):
    """The diffusers flow-matching scheduler of `sampler` ("euler" or "heun") over `num_steps` from t=1 to 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    if sampler == "heun":
        scheduler = FlowMatchHeunDiscreteScheduler(shift=1.0)
        scheduler.set_timesteps(num_steps)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
        # Uniform Euler from t=1 to 0 (sigmas 1, 1 - 1/n, ..., 1/n, then the terminal 0).
        scheduler.set_timesteps(sigmas=[1.0 - step / num_steps for step in range(num_steps)])
    return scheduler


def zero_initialised(linear: nn.Linear, bias: float = 0.0) -> nn.Linear:
    """Mark a projection to start at zero (adaLN-Zero gates, residual branches) with an optional constant bias."""
    linear.zero_init = True
    linear.bias_init = bias
    return linear


class Mu0RMSNorm(nn.Module):
    """RMSNorm with a learned scale, computed in fp32 (the Llama form the released expert layers use)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden_states.to(dtype)


class Mu0TimestepEmbedder(nn.Module):
    """Flow time -> sinusoid (`time_embedding_dim` wide) -> Linear -> SiLU -> Linear: the adaLN condition."""

    def __init__(self, config: Mu0Config):
        super().__init__()
        hidden = config.expert_hidden_size
        self.embedding_dim = config.time_embedding_dim
        self.min_period, self.max_period = config.min_period, config.max_period
        self.mlp_in = nn.Linear(self.embedding_dim, hidden)
        self.mlp_out = nn.Linear(hidden, hidden)

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        embedding = sinusoidal_time_embedding(time, self.embedding_dim, self.min_period, self.max_period)
        return self.mlp_out(F.silu(self.mlp_in(embedding.to(self.mlp_in.weight.dtype))))


class Mu0FourierEmbedding(nn.Module):
    """Encodes a point's current (u, v) with log-spaced frequencies pi ... 2^(F-1) pi, so nearby points differ."""

    def __init__(self, num_frequencies: int, hidden_size: int):
        super().__init__()
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(num_frequencies), persistent=False)
        self.mlp_in = nn.Linear(4 * num_frequencies, hidden_size)
        self.mlp_out = zero_initialised(nn.Linear(hidden_size, hidden_size))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        angles = points[..., None].float() * self.frequencies.to(points.device)
        features = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2).to(self.mlp_in.weight.dtype)
        return self.mlp_out(F.silu(self.mlp_in(features)))


class Mu0ExpertAttention(nn.Module):
    """Suffix queries over [prefix; suffix] keys/values (joint layers) or over the prefix alone (cross layers).

    Joint layers rotate the suffix queries and keys at the suffix position. Cross layers re-project the backbone's
    rotated prefix keys and its values through their own k/v projections, and their queries sit at position 0,
    which leaves them unrotated.
    """

    def __init__(self, config: Mu0Config, joint: bool):
        super().__init__()
        text_config = config.vlm_config.get_text_config()
        self.joint = joint
        self.num_heads = text_config.num_attention_heads
        self.num_kv_heads = text_config.num_key_value_heads
        self.head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // self.num_heads
        hidden = config.expert_hidden_size
        kv_dim = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        kv_in = hidden if joint else kv_dim
        self.k_proj = nn.Linear(kv_in, kv_dim, bias=False)
        self.v_proj = nn.Linear(kv_in, kv_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def _heads(self, x: torch.Tensor, num_heads: int) -> torch.Tensor:
        return x.view(*x.shape[:2], num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        prefix_keys: torch.Tensor,
        prefix_values: torch.Tensor,
        attention_mask: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        query = self._heads(self.q_proj(hidden_states), self.num_heads)
        if self.joint:
            query = apply_rotary(query, cos, sin)
            suffix_keys = apply_rotary(self._heads(self.k_proj(hidden_states), self.num_kv_heads), cos, sin)
            suffix_values = self._heads(self.v_proj(hidden_states), self.num_kv_heads)
            keys = torch.cat([prefix_keys.to(query.dtype), suffix_keys], dim=2)
            values = torch.cat([prefix_values.to(query.dtype), suffix_values], dim=2)
        else:
            flat_keys = prefix_keys.transpose(1, 2).flatten(2).to(query.dtype)
            flat_values = prefix_values.transpose(1, 2).flatten(2).to(query.dtype)
            keys = self._heads(self.k_proj(flat_keys), self.num_kv_heads)
            values = self._heads(self.v_proj(flat_values), self.num_kv_heads)
        groups = self.num_heads // self.num_kv_heads
        attended = F.scaled_dot_product_attention(
            query.float(),
            keys.repeat_interleave(groups, dim=1).float(),
            values.repeat_interleave(groups, dim=1).float(),
            attn_mask=attention_mask[:, None],
        )
        return self.o_proj(attended.to(hidden_states.dtype).transpose(1, 2).flatten(2))


class Mu0ExpertMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Mu0ExpertLayer(GradientCheckpointingLayer):
    """One trace-expert block: Llama pre-norms followed by adaLN-Zero (shift, scale) and a gate on each residual
    branch. The modulation starts at zero, so the block starts as the identity."""

    def __init__(self, config: Mu0Config, layer_idx: int):
        super().__init__()
        hidden = config.expert_hidden_size
        eps = getattr(config.vlm_config.get_text_config(), "rms_norm_eps", 1e-6)
        self.layer_idx = layer_idx
        self.joint = layer_idx % config.self_attn_every_n_layers == 0
        self.input_layernorm = Mu0RMSNorm(hidden, eps)
        self.attention = Mu0ExpertAttention(config, joint=self.joint)
        self.post_attention_layernorm = Mu0RMSNorm(hidden, eps)
        self.mlp = Mu0ExpertMLP(hidden, config.expert_intermediate_size)
        self.adaln_modulation = zero_initialised(nn.Linear(hidden, 6 * hidden))

    def forward(
        self,
        hidden_states: torch.Tensor,
        time_condition: torch.Tensor,
        prefix_keys: torch.Tensor,
        prefix_values: torch.Tensor,
        attention_mask: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        modulation = self.adaln_modulation(F.silu(time_condition))[:, None, :]
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
        normed = self.input_layernorm(hidden_states) * (1 + scale_attn) + shift_attn
        hidden_states = hidden_states + gate_attn * self.attention(
            normed, prefix_keys, prefix_values, attention_mask, cos, sin
        )
        normed = self.post_attention_layernorm(hidden_states) * (1 + scale_mlp) + shift_mlp
        return hidden_states + gate_mlp * self.mlp(normed)


# ------------------------------------------------------------------------------------------ backbone plumbing
def _owner_and_attribute(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The submodule of `root` that holds the module called `name`, and the attribute to set to swap it."""
    if "." not in name:
        return root, name
    parent, attribute = name.rsplit(".", 1)
    return root.get_submodule(parent), attribute


def _patch_embedding_owner(vision_tower: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the vision tower's patch convolution and its attribute name (swapped for depth)."""
    for name, module in vision_tower.named_modules():
        if name.endswith("patch_embedding") and isinstance(module, nn.Conv2d):
            return _owner_and_attribute(vision_tower, name)
    raise ValueError(
        f"depth_clone_stem=True but the vision tower {type(vision_tower).__name__} has no Conv2d named "
        "'patch_embedding'; set depth_clone_stem=False for this backbone."
    )


def add_depth_lora(vision_tower: nn.Module, rank: int, alpha: int) -> list[Mu0DepthLoRALinear]:
    """Swap the vision tower's attention/MLP projections for depth-gated LoRA projections (same weights)."""
    layers = []
    for name, module in list(vision_tower.named_modules()):
        parent, attribute = _owner_and_attribute(vision_tower, name)
        if not (isinstance(module, nn.Linear) and attribute in DEPTH_LORA_TARGETS):
            continue
        lora = Mu0DepthLoRALinear(
            module.in_features,
            module.out_features,
            module.bias is not None,
            rank,
            alpha,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        lora.weight, lora.bias = module.weight, module.bias
        setattr(parent, attribute, lora)
        layers.append(lora)
    if not layers:
        raise ValueError(
            f"use_depth=True but the vision tower {type(vision_tower).__name__} has no projections named "
            f"{DEPTH_LORA_TARGETS}; set use_depth=False for this backbone."
        )
    return layers


# Architecture fields a pretrained backbone must share with the μ0 config that will hold its weights.
_ARCHITECTURE_FIELDS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
    "num_hidden_layers", "patch_size", "image_size", "scale_factor",
)


def _architecture_mismatches(expected: PreTrainedConfig, actual: PreTrainedConfig, prefix: str) -> list[str]:
    mismatches = []
    for field in _ARCHITECTURE_FIELDS:
        if field == "num_hidden_layers" and prefix.endswith("text_config"):
            continue  # μ0 keeps the first num_vlm_layers of them
        ours, theirs = getattr(expected, field, None), getattr(actual, field, None)
        if ours is not None and theirs is not None and ours != theirs:
            mismatches.append(f"{prefix}.{field}: Mu0Config has {ours}, the checkpoint {theirs}")
    for name in ("text_config", "vision_config"):
        ours, theirs = getattr(expected, name, None), getattr(actual, name, None)
        if isinstance(ours, PreTrainedConfig) and isinstance(theirs, PreTrainedConfig):
            mismatches += _architecture_mismatches(ours, theirs, f"{prefix}.{name}")
    return mismatches


def checked_backbone_config(config: Mu0Config, **loading_kwargs) -> Mu0Config:
    """`config` with its VLM and DINOv2 configs read from their checkpoints, after checking the two agree."""
    updates = {}
    for field, checkpoint_field, enabled in (
        ("vlm_config", "backbone_checkpoint", True),
        ("dino_config", "dino_checkpoint", config.use_dino),
    ):
        if not enabled:
            continue
        checkpoint = getattr(config, checkpoint_field)
        if checkpoint is None:
            raise ValueError(f"Mu0Config.{checkpoint_field} is None: name the checkpoint whose weights to load.")
        pretrained = AutoConfig.from_pretrained(checkpoint, **loading_kwargs)
        mismatches = _architecture_mismatches(getattr(config, field), pretrained, field)
        if mismatches:
            raise ValueError(f"{checkpoint} does not match Mu0Config.{field}: " + "; ".join(mismatches))
        updates[field] = pretrained.to_dict()
    settings = {**config.to_dict(), **updates}
    for key in ("model_type", "transformers_version", "architectures"):
        settings.pop(key, None)
    return Mu0Config(**settings)


def load_backbone_weights(model: "Mu0Model", **loading_kwargs) -> None:
    """Pretrained VLM and DINOv2 weights (`config.backbone_checkpoint`, `dino_checkpoint`) into a fresh `Mu0Model`,
    and the pretrained patch convolution into its depth stem; the depth LoRA keeps its initialisation."""
    config = model.config
    for module, checkpoint in ((model.vlm, config.backbone_checkpoint), (model.dino, config.dino_checkpoint)):
        if module is None:
            continue
        pretrained = AutoModel.from_pretrained(checkpoint, **loading_kwargs)
        missing, _ = module.load_state_dict(pretrained.state_dict(), strict=False)
        missing = [key for key in missing if ".lora_" not in key]
        if missing:
            raise ValueError(f"{checkpoint} lacks weights for {len(missing)} parameters, e.g. {missing[:3]}.")
    if model.depth_patch_embedding is not None:
        owner, name = _patch_embedding_owner(model.vision_tower)
        model.depth_patch_embedding.load_state_dict(getattr(owner, name).state_dict())


# ------------------------------------------------------------------------------------------ checkpoint layout
# Submodules `Mu0ForTracePrediction` held directly before `Mu0Model` existed; they now live under `model.`.
LEGACY_BASE_MODULES = (
    "vlm", "dino", "depth_patch_embedding", "history_proj", "future_proj", "group_embedding", "point_fourier",
    "dino_fusion_in", "dino_fusion_out", "time_embedder", "expert_layers", "expert_norm",
)


def legacy_key_mapping(owner: str = "") -> dict[str, str]:
    """`from_pretrained` key renames (regex -> replacement) from the flat layout to `model.…` under `owner`."""
    return {rf"^{re.escape(owner)}{name}\.": f"{owner}model.{name}." for name in LEGACY_BASE_MODULES}


def legacy_key(key: str) -> str:
    """A current state-dict key spelled in the flat layout (what trace fingerprints were computed from)."""
    return key.removeprefix("model.")


class Mu0LoadingMixin:
    """Loading rules shared by μ0 models.

    - Which parameters train is a function of the config: `from_pretrained` rebuilds parameters from the checkpoint
      with `requires_grad=True`, which would silently train a frozen 2 B backbone on every resume or fine-tune.
    - `_legacy_key_mapping` renames checkpoints saved before the `Mu0Model` split; the model then saves in the
      current layout.
    - A checkpoint missing weights or holding NaN/inf is refused: transformers would fill the gaps with random
      weights (a warning in a log) and load the non-finite values, and either way predict garbage.
    """

    _legacy_key_mapping: dict[str, str] = {}

    def apply_frozen_parts(self) -> None:
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        kwargs["key_mapping"] = {**cls._legacy_key_mapping, **(kwargs.get("key_mapping") or {})}
        wants_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        missing = sorted(loading_info["missing_keys"])
        if missing:
            raise ValueError(
                f"{pretrained_model_name_or_path} is an incomplete {cls.__name__} checkpoint: {len(missing)} weights are "
                f"missing, e.g. {missing[:5]}. Its model.safetensors was cut short or saved from another configuration."
            )
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
                raise ValueError(
                    f"{pretrained_model_name_or_path} holds NaN or inf values in {name!r}: the checkpoint was saved from "
                    "a diverged run or is corrupt; load an earlier one."
                )
        # Without this, save_pretrained would write the renamed keys back in the legacy layout.
        model.__dict__.pop("_weight_conversions", None)
        model.apply_frozen_parts()
        return (model, loading_info) if wants_loading_info else model


class Mu0PreTrainedModel(Mu0LoadingMixin, PreTrainedModel):
    config: Mu0Config
    config_class = Mu0Config
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["Mu0ExpertLayer", "LlamaDecoderLayer", "GemmaDecoderLayer", "Qwen2DecoderLayer"]
    # A bf16 checkpoint (the released dtypes, `set_backbone_dtype`) reloads with its depth LoRA and expert in fp32.
    _keep_in_fp32_modules_strict = [
        "lora_A", "lora_B", "expert_layers", "expert_norm", "history_proj", "future_proj", "group_embedding",
        "point_fourier", "dino_fusion_in", "dino_fusion_out", "time_embedder", "trace_velocity_head", "trace_done_head",
    ]

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs) -> None:
        """Checkpoint the expert only: the frozen text backbone must keep the prefix KV cache the expert reads, and a
        recomputed vision pass would no longer know whether the depth LoRA was on."""
        super()._set_gradient_checkpointing(enable, *args, **kwargs)
        for module in self.base_model.vlm.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if getattr(module, "zero_init", False):
            nn.init.zeros_(module.weight)
            nn.init.constant_(module.bias, getattr(module, "bias_init", 0.0))
        elif isinstance(module, Mu0RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Mu0FourierEmbedding):
            module.frequencies.copy_(math.pi * 2.0 ** torch.arange(len(module.frequencies)))
        elif isinstance(module, Mu0DepthLoRALinear):
            nn.init.kaiming_uniform_(module.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(module.lora_B.weight)
        elif isinstance(module, Mu0ForTracePrediction):
            # Non-persistent buffers are not in checkpoints: rebuild them after loading from the meta device.
            config = module.config
            module.spline_basis.copy_(bspline_basis(config.horizon, config.num_control_points, config.spline_degree))


class Mu0Model(Mu0PreTrainedModel):
    """The backbone slice and the trace expert, up to the expert's hidden states (no trace heads).

    `compute_prefix` runs the backbone once per image; `forward` runs the expert over the suffix tokens of noisy
    trace values at a flow time and returns the future tokens' final states, which the heads of
    [`Mu0ForTracePrediction`] and the motion tokens of [`Mu0ForActionPrediction`] read.
    """

    def __init__(self, config: Mu0Config, defer_weight_init: bool = False):
        super().__init__(config)
        # Inside a task model, its post_init initialises these weights after building the heads: one seed then draws
        # the same weights as before the base model was split out.
        self.defer_weight_init = defer_weight_init
        text_config = config.vlm_config.get_text_config()
        hidden = config.expert_hidden_size
        self.vlm = AutoModel.from_config(config.vlm_config)
        self.dino = AutoModel.from_config(config.dino_config) if config.use_dino else None
        self.depth_lora_layers = (
            add_depth_lora(self.vision_tower, config.depth_lora_rank, config.depth_lora_alpha) if config.use_depth else []
        )
        if config.use_depth and config.depth_clone_stem:
            owner, name = _patch_embedding_owner(self.vision_tower)
            # A trainable copy of the patch convolution, used only while encoding the depth image.
            self.depth_patch_embedding = copy.deepcopy(getattr(owner, name))
        else:
            self.depth_patch_embedding = None
        self.history_proj = nn.Linear(3 * config.history_length, hidden) if self.uses_history else None
        self.future_proj = nn.Linear(3 * config.trace_length, hidden)
        self.group_embedding = nn.Embedding(2, hidden)
        self.point_fourier = Mu0FourierEmbedding(config.num_fourier_frequencies, hidden)
        if config.use_dino:
            self.dino_fusion_in = nn.Linear(hidden + config.dino_config.hidden_size, hidden)
            self.dino_fusion_out = nn.Linear(hidden, hidden)
        else:
            self.dino_fusion_in = self.dino_fusion_out = None
        self.time_embedder = Mu0TimestepEmbedder(config)
        self.expert_layers = nn.ModuleList(
            [Mu0ExpertLayer(config, layer_idx) for layer_idx in range(text_config.num_hidden_layers)]
        )
        self.expert_norm = Mu0RMSNorm(hidden, getattr(text_config, "rms_norm_eps", 1e-6))
        self.post_init()
        self.apply_frozen_parts()

    def init_weights(self) -> None:
        if not self.defer_weight_init:
            super().init_weights()

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def uses_history(self) -> bool:
        return self.config.use_history and self.config.history_length > 0

    @property
    def text_model(self) -> nn.Module:
        return self.vlm.get_decoder()

    @property
    def vision_tower(self) -> nn.Module:
        return self.vlm.get_encoder(modality="image")

    def get_input_embeddings(self) -> nn.Module:  # FSDP2 (accelerate) gives the token embeddings a unit of their own
        return self.vlm.get_input_embeddings()

    @property
    def backbone_dtype(self) -> torch.dtype:
        return self.get_input_embeddings().weight.dtype

    @property
    def expert_dtype(self) -> torch.dtype:
        return self.future_proj.weight.dtype

    @property
    def head_dim(self) -> int:
        text_config = self.config.vlm_config.get_text_config()
        return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads

    # --------------------------------------------------------------------------------------------- parameters
    def apply_frozen_parts(self) -> None:
        """Freeze the backbone and DINOv2 as configured; the depth LoRA and depth stem always train."""
        if self.config.freeze_vision_tower:
            text_prefix = next(name for name, module in self.vlm.named_modules() if module is self.text_model) + "."
            for name, parameter in self.vlm.named_parameters():
                if not name.startswith(text_prefix):
                    parameter.requires_grad_(False)
        if self.config.freeze_text_layers:
            self.text_model.requires_grad_(False)
        if self.dino is not None:
            self.dino.requires_grad_(False)
        for layer in self.depth_lora_layers:
            layer.lora_A.requires_grad_(True)
            layer.lora_B.requires_grad_(True)
        if self.depth_patch_embedding is not None:
            self.depth_patch_embedding.requires_grad_(True)

    def set_backbone_dtype(self, dtype: torch.dtype) -> "Mu0Model":
        """Frozen backbone, DINOv2 and depth stem in `dtype` (the released checkpoint keeps them in bf16), while the
        trainable depth LoRA and the trace expert stay in their own dtype (fp32 as released)."""
        lora_dtype = None if not self.depth_lora_layers else self.depth_lora_layers[0].lora_A.weight.dtype
        for module in (self.vlm, self.dino, self.depth_patch_embedding):
            if module is not None:
                module.to(dtype)
        for layer in self.depth_lora_layers:
            layer.lora_A.to(lora_dtype)
            layer.lora_B.to(lora_dtype)
        return self

    # ------------------------------------------------------------------------------------------------- prefix
    @contextmanager
    def depth_pass(self):
        """Encode with the depth LoRA on and, when configured, the depth patch stem swapped in."""
        if self.depth_patch_embedding is not None:
            owner, name = _patch_embedding_owner(self.vision_tower)
            rgb_stem = getattr(owner, name)
            setattr(owner, name, self.depth_patch_embedding)
        for layer in self.depth_lora_layers:
            layer.depth_active = True
        try:
            yield
        finally:
            for layer in self.depth_lora_layers:
                layer.depth_active = False
            if self.depth_patch_embedding is not None:
                setattr(owner, name, rgb_stem)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image tokens (B, tokens, text width) of the vision tower and connector, in the backbone dtype."""
        return encode_images(self.vlm, pixel_values.to(self.backbone_dtype))

    def encode_depth(self, depth_pixel_values: torch.Tensor, present: torch.BoolTensor) -> torch.Tensor:
        """Depth-image tokens of the rows where `present` (B,) is True, zeros elsewhere (masked by the caller)."""
        with self.depth_pass():
            if present.all():
                return self.encode_images(depth_pixel_values)
            tokens = self.encode_images(depth_pixel_values[present])
        return tokens.new_zeros(len(present), *tokens.shape[1:]).index_put_((present,), tokens)

    def prefix_attention_mask(self, prefix_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """4-D mask letting every prefix token see every valid prefix token (images, depth and prompt alike).

        Padding rows see themselves only, so no softmax row is empty. Eager attention wants an additive mask.
        """
        eye = torch.eye(prefix_mask.shape[1], dtype=torch.bool, device=prefix_mask.device)
        allowed = (prefix_mask[:, None, :] | eye[None])[:, None]
        return text_attention_mask(self.text_model, allowed, dtype)

    def compute_prefix(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        depth_pixel_values: torch.Tensor | None = None,
        depth_mask: torch.Tensor | None = None,
    ) -> Mu0Prefix:
        """Run the kept backbone layers once over [image, depth, prompt] and keep every layer's keys/values.

        Embeddings are scaled by sqrt(hidden) and rotated with μ0's own rotary table (`rope_max_wavelength`), as in
        the released recipe. A depth image with `depth_mask` False is left out: its tokens would be masked keys with
        no position, so the depth tower runs on the other rows only (not at all when every row is masked, as in the
        RGB-only headline mode) and their places hold masked zeros.
        """
        batch_size = pixel_values.shape[0]
        device = pixel_values.device
        embeds = [self.encode_images(pixel_values)]
        masks = [torch.ones(embeds[0].shape[:2], dtype=torch.bool, device=device)]
        if depth_pixel_values is not None:
            if not self.config.use_depth:
                raise ValueError("depth_pixel_values were given but the model was built with use_depth=False.")
            present = torch.ones(batch_size, dtype=torch.bool, device=device) if depth_mask is None else depth_mask.bool()
            if present.any():
                embeds.append(self.encode_depth(depth_pixel_values, present))
                masks.append(present[:, None].expand(-1, embeds[-1].shape[1]))
        embeds.append(self.vlm.get_input_embeddings()(input_ids))
        text_mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        masks.append(text_mask)
        hidden_states = torch.cat([e.to(embeds[-1].dtype) for e in embeds], dim=1)
        hidden_states = hidden_states * torch.tensor(hidden_states.shape[-1] ** 0.5, dtype=hidden_states.dtype)
        prefix_mask = torch.cat(masks, dim=1)
        position_ids = (prefix_mask.long().cumsum(-1) - 1).clamp(min=0)
        position_embeddings = rotary_embedding(position_ids, self.head_dim, self.config.rope_max_wavelength, hidden_states.dtype)
        layer_mask = self.prefix_attention_mask(prefix_mask, hidden_states.dtype)
        cache = DynamicCache(config=self.text_model.config)
        for layer in self.text_model.layers[: self.config.num_vlm_layers]:
            hidden_states = layer(
                hidden_states,
                attention_mask=layer_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                position_embeddings=position_embeddings,
            )
        return Mu0Prefix(
            keys=[layer.keys for layer in cache.layers],
            values=[layer.values for layer in cache.layers],
            attention_mask=prefix_mask,
        )

    # ------------------------------------------------------------------------------------------------- suffix
    def dino_features(self, dino_pixel_values: torch.Tensor, query_points: torch.Tensor) -> torch.Tensor:
        """DINOv2 patch features (CLS dropped) bilinearly sampled at each query's (u, v) in [-1, 1]."""
        patch_size = self.config.dino_config.patch_size
        grid_h, grid_w = dino_pixel_values.shape[-2] // patch_size, dino_pixel_values.shape[-1] // patch_size
        with torch.no_grad():
            tokens = self.dino(pixel_values=dino_pixel_values.to(self.dino.dtype)).last_hidden_state[:, -grid_h * grid_w :]
        feature_map = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, grid_h, grid_w)
        sampled = F.grid_sample(
            feature_map.float(), query_points[:, :, None, :].float(), mode="bilinear", align_corners=False
        )
        return sampled[..., 0].transpose(1, 2).to(self.expert_dtype)

    def point_context(
        self, query_points: torch.Tensor, dino_pixel_values: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What each query's tokens share across denoising steps: Fourier (u, v) and DINO features."""
        fourier = self.point_fourier(query_points)
        if not self.config.use_dino:
            return fourier, None
        if dino_pixel_values is None:
            raise ValueError("This model uses DINO features (use_dino=True): pass `dino_pixel_values` from Mu0Processor.")
        return fourier, self.dino_features(dino_pixel_values, query_points)

    def embed_suffix(
        self,
        noisy_traces: torch.Tensor,
        query_mask: torch.Tensor,
        fourier: torch.Tensor,
        dino_features: torch.Tensor | None,
        history: torch.Tensor | None,
    ) -> torch.Tensor:
        """Suffix tokens ordered [history_1..N, future_1..N] (future only without history), (B, T, hidden).

        Each token is its projection plus a group embedding and the Fourier (u, v) term (zero for padded queries);
        with DINO, `MLP([token, dino])` replaces the token, as released.
        """
        dtype = self.expert_dtype
        future = self.future_proj(noisy_traces.flatten(2).to(dtype))
        groups = [future]
        if self.history_proj is not None:
            past = future.new_zeros(*future.shape[:2], 3 * self.config.history_length) if history is None else history.flatten(2)
            groups.insert(0, self.history_proj(past.to(dtype)))
        offset = 2 - len(groups)
        tokens = torch.stack(groups, dim=1) + self.group_embedding.weight[offset:, None, :][None]
        tokens = tokens + (fourier * query_mask[..., None].to(fourier.dtype))[:, None]
        if dino_features is not None:
            dino = (dino_features * query_mask[..., None].to(dino_features.dtype))[:, None].expand(-1, len(groups), -1, -1)
            tokens = self.dino_fusion_out(F.silu(self.dino_fusion_in(torch.cat([tokens, dino.to(dtype)], dim=-1))))
        return tokens.flatten(1, 2)

    def suffix_attention_mask(
        self, prefix_mask: torch.Tensor, query_mask: torch.Tensor, history_visible: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T, L + T) boolean mask over prefix keys, then suffix keys (T = 2N with history tokens, else N).

        History tokens see only visible history tokens; future tokens see every visible suffix token; padded queries
        are never seen; every suffix token sees the valid prefix, so no row is empty. `history_visible` (B, N) says
        whose history token may be seen (None: nobody's, the no-history case).
        """
        future_valid = query_mask.bool()
        if self.history_proj is None:
            suffix = future_valid[:, None, :].expand(-1, future_valid.shape[1], -1)
        else:
            visible = torch.zeros_like(future_valid) if history_visible is None else history_visible.bool() & future_valid
            num_queries = query_mask.shape[1]
            is_history = torch.arange(2 * num_queries, device=query_mask.device) < num_queries
            key_valid = torch.cat([visible, future_valid], dim=1)
            suffix = key_valid[:, None, :] & (~is_history[:, None] | is_history[None, :])[None]
        prefix = prefix_mask[:, None, :].expand(-1, suffix.shape[1], -1)
        return torch.cat([prefix, suffix], dim=-1)

    def suffix_rotary(self, prefix: Mu0Prefix) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, 1, head_dim) at the one position every suffix token shares (the real prefix length), so
        query order does not matter. The action expert's tokens sit there too."""
        positions = prefix.attention_mask.long().sum(-1, keepdim=True)
        return rotary_embedding(positions, self.head_dim, self.config.rope_max_wavelength, self.expert_dtype)

    def forward(
        self,
        prefix: Mu0Prefix,
        noisy_traces: torch.Tensor,
        time: torch.Tensor,
        query_mask: torch.Tensor,
        fourier: torch.Tensor,
        dino_features: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
        history_mask: torch.Tensor | None = None,
    ) -> Mu0ModelOutput:
        """Final expert states of the future tokens for trace values (B, N, D, 3) at flow time `time` (B,).

        history (B, N, h, 3): past positions, oldest first, relative to the current point in (u, v) units and metres,
        not divided by `delta_scale`, zero where invalid. history_mask (B, N, h): their validity; a query whose
        history has no valid step shows no history token, and without `history` no history token is shown.
        """
        num_queries = noisy_traces.shape[1]
        if history is not None and tuple(history.shape) != (*noisy_traces.shape[:2], self.config.history_length, 3):
            raise ValueError(
                f"history must have shape (B, N, history_length={self.config.history_length}, 3), got "
                f"{tuple(history.shape)}."
            )
        hidden_states = self.embed_suffix(noisy_traces, query_mask, fourier, dino_features, history)
        condition = self.time_embedder(time)
        mask = self.suffix_attention_mask(prefix.attention_mask, query_mask, history_visible(history, history_mask))
        cos, sin = self.suffix_rotary(prefix)
        for layer, keys, values in zip(self.expert_layers, prefix.keys, prefix.values):
            layer_mask = mask if layer.joint else mask[..., : keys.shape[2]]
            hidden_states = layer(hidden_states, condition, keys, values, layer_mask, cos, sin)
        return Mu0ModelOutput(last_hidden_state=self.expert_norm(hidden_states)[:, -num_queries:])


class Mu0ForTracePrediction(Mu0PreTrainedModel):
    """Predicts the future 3D traces of query points from one image, an instruction and optional depth/history.

    [`Mu0Model`] gives the future tokens' expert states; the velocity and done heads read them. This class owns the
    flow-matching targets and losses over B-spline control points and the sampler. The baselines of
    `trace_objective` / `trace_parameterisation` are its subclasses, and `Mu0ForTracePrediction(config)` (so
    `from_pretrained` and the Auto classes too) builds the one the config names (`trace_model_class`).
    """

    _legacy_key_mapping = legacy_key_mapping()

    def __new__(cls, config: Mu0Config | None = None, *args, **kwargs):
        if cls is Mu0ForTracePrediction and config is not None:
            cls = trace_model_class(config)
        return super().__new__(cls)

    def __init__(self, config: Mu0Config):
        super().__init__(config)
        # The first μ0 class up the MRO: remote-code loading wraps the class in a subclass of its own.
        built = next(cls for cls in type(self).__mro__ if cls in TRACE_MODEL_CLASSES.values())
        if built is not trace_model_class(config):
            raise ValueError(
                f"{built.__name__} does not train trace_objective={config.trace_objective!r} with "
                f"trace_parameterisation={config.trace_parameterisation!r}: build Mu0ForTracePrediction(config), which "
                f"picks {trace_model_class(config).__name__}."
            )
        hidden = config.expert_hidden_size
        self.model = Mu0Model(config, defer_weight_init=True)
        self.trace_velocity_head = nn.Linear(hidden, 3 * config.trace_length)
        self.trace_done_head = (
            zero_initialised(nn.Linear(hidden, config.horizon), bias=config.done_bias_init) if config.use_done_head else None
        )
        self.register_buffer(
            "spline_basis", bspline_basis(config.horizon, config.num_control_points, config.spline_degree), persistent=False
        )
        self.post_init()
        self.apply_frozen_parts()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also declares the `trace-prediction` pipeline in config.json and saves its code beside the model's, so
        `pipeline("trace-prediction", model=folder, trust_remote_code=True)` works where mu0 is not installed."""
        from .pipeline_mu0 import TASK, Mu0TracePredictionPipeline

        self.config.custom_pipelines = {
            TASK: {"impl": "pipeline_mu0.Mu0TracePredictionPipeline", "pt": ["AutoModel"], "type": "multimodal"}
        }
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            del self.config.custom_pipelines  # an in-memory model keeps using the registered pipeline
        custom_object_save(Mu0TracePredictionPipeline, save_directory)

    @property
    def backbone_dtype(self) -> torch.dtype:
        return self.model.backbone_dtype

    @property
    def expert_dtype(self) -> torch.dtype:
        return self.model.expert_dtype

    def apply_frozen_parts(self) -> None:
        """The heads always train; which backbone parts do is [`Mu0Model.apply_frozen_parts`]."""
        self.model.apply_frozen_parts()

    def set_backbone_dtype(self, dtype: torch.dtype) -> "Mu0ForTracePrediction":
        """[`Mu0Model.set_backbone_dtype`]; the heads keep their dtype."""
        self.model.set_backbone_dtype(dtype)
        return self

    def denoise_step(
        self,
        prefix: Mu0Prefix,
        noisy_control_points: torch.Tensor,
        time: torch.Tensor,
        query_mask: torch.Tensor,
        fourier: torch.Tensor,
        dino_features: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
        history_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Velocity (B, N, D, 3) and done logits (B, N, H) for control points at flow time `time` (B,).

        D is `config.trace_length`; regression models output clean trace values instead of a velocity, and models
        without a done head return None logits.
        """
        future_states = self.model(
            prefix, noisy_control_points, time, query_mask, fourier, dino_features, history, history_mask
        ).last_hidden_state
        velocity = self.trace_velocity_head(future_states).float().view(*future_states.shape[:2], -1, 3)
        done_logits = None if self.trace_done_head is None else self.trace_done_head(future_states).float()
        return velocity, done_logits

    # --------------------------------------------------------------------------------------------- training
    def sample_time(self, batch_size: int, device: torch.device) -> torch.Tensor:
        config = self.config
        return sample_flow_time(
            batch_size, config.time_sampling_beta_alpha, config.time_sampling_beta_beta, config.time_sampling_scale,
            config.time_sampling_offset, device,
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.LongTensor,
        query_points: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
        history_mask: torch.Tensor | None = None,
        depth_pixel_values: torch.Tensor | None = None,
        depth_mask: torch.Tensor | None = None,
        dino_pixel_values: torch.Tensor | None = None,
        cluster_ids: torch.LongTensor | None = None,
        labels: torch.Tensor | None = None,
        labels_mask: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        time: torch.Tensor | None = None,
        **kwargs,
    ) -> Mu0TraceOutput:
        r"""
        query_points (`(B, N, 2)`): current (u, v) of each query, normalised to [-1, 1] by width and height.
        query_mask (`(B, N)`): False for padded queries.
        history / history_mask (`(B, N, h, 3)` / `(B, N, h)`): past positions, oldest first, relative to the
            current point ((u, v) units and metres, not divided by `delta_scale`, zero where invalid), and their
            validity. Without `history` no history token is shown (the no-history protocol).
        cluster_ids (`(B, N)`): entity id of each query (-1 for none); drives the rigidity loss.
        labels / labels_mask (`(B, N, H, 3)` / `(B, N, H)`): dense future traces as normalised anchor-relative
            deltas and their per-step validity. Control-point targets are fitted here, so callers never handle
            splines.
        noise, time: optional fixed flow-matching noise (B, N, D, 3) and times (B,), for reproducible losses.
        """
        query_mask = validate_queries(pixel_values, query_points, query_mask, self.config.max_queries, input_ids=input_ids, labels=labels)
        prefix = self.model.compute_prefix(pixel_values, input_ids, attention_mask, depth_pixel_values, depth_mask)
        fourier, dino_features = self.model.point_context(query_points, dino_pixel_values)
        context = dict(
            query_mask=query_mask, fourier=fourier, dino_features=dino_features, history=history, history_mask=history_mask
        )
        if labels is None:
            if noise is None or time is None:
                raise ValueError("Without labels, forward needs `noise` and `time` to evaluate the velocity field.")
            velocity, done_logits = self.denoise_step(prefix, noise, time, **context)
            return Mu0TraceOutput(velocity=velocity, done_logits=done_logits)

        if labels_mask is None:
            raise ValueError("labels were given without labels_mask (per-step validity of the future trace).")
        labels_mask = labels_mask.bool() & query_mask[..., None]
        # Targets are fitted in fp32 even under bf16 autocast: half precision moves control points by up to 6e-3.
        with torch.autocast(device_type=labels.device.type, enabled=False):
            targets, trained = self.trace_targets(labels.float(), labels_mask, query_mask)
        velocity, done_logits, clean, error = self.objective_outputs(prefix, targets, noise, time, context)
        per_query = self.trace_error(error, labels_mask)
        flow_loss = (per_query * trained).sum() / trained.sum().clamp(min=1)
        if done_logits is None:
            done_loss = velocity.new_zeros(())
        else:
            per_step = F.binary_cross_entropy_with_logits(done_logits, labels_mask.float(), reduction="none")
            done_loss = (per_step.mean(-1) * query_mask).sum() / query_mask.sum().clamp(min=1)
        rigidity_loss = (
            self.rigidity_loss(clean, cluster_ids, trained) if cluster_ids is not None else velocity.new_zeros(())
        )
        loss = flow_loss + self.config.done_loss_weight * done_loss + self.config.rigidity_loss_weight * rigidity_loss
        return Mu0TraceOutput(
            loss=loss,
            flow_loss=flow_loss.detach(),
            done_loss=done_loss.detach(),
            rigidity_loss=rigidity_loss.detach(),
            velocity=velocity,
            done_logits=done_logits,
        )

    def objective_outputs(
        self, prefix: Mu0Prefix, targets: torch.Tensor, noise: torch.Tensor | None, time: torch.Tensor | None, context: dict
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Flow matching: the expert sees the targets noised to `time` (drawn when None) and predicts the velocity
        noise - targets. Returns that velocity, the done logits, the clean values it implies (for the rigidity loss)
        and its error. `context` holds the per-query inputs of `denoise_step`."""
        noise = torch.randn_like(targets) if noise is None else noise.float()
        time = self.sample_time(targets.shape[0], targets.device) if time is None else time.float()
        expanded_time = time[:, None, None, None]
        noisy = expanded_time * noise + (1 - expanded_time) * targets
        velocity, done_logits = self.denoise_step(prefix, noisy, time, **context)
        return velocity, done_logits, noisy - expanded_time * velocity, velocity - (noise - targets)

    @staticmethod
    def trace_error(error: torch.Tensor, labels_mask: torch.Tensor) -> torch.Tensor:
        """Squared error summed over a query's trace values (30 for D=10), (B, N), as released."""
        return (error**2).sum(dim=(-1, -2))

    def trace_targets(
        self, labels: torch.Tensor, labels_mask: torch.Tensor, query_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the expert learns to generate, (B, N, D, 3), and which queries it is trained on: control points
        fitted to the valid steps (a query needs at least D of them)."""
        control_points, fit_ok = fit_control_points(
            labels,
            labels_mask,
            num_control_points=self.config.num_control_points,
            degree=self.config.spline_degree,
            smoothness=self.config.spline_smoothness,
            clip=self.config.control_point_clip,
        )
        trained = query_mask & fit_ok
        # As released (the dataset zeroes them), a query without a fit has zero targets: the expert still sees its
        # noisy tokens, so they must not carry an extrapolated fit into the other queries' attention.
        return control_points * trained[..., None, None], trained

    rigidity_loss = staticmethod(rigidity_loss)

    # -------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def predict_traces(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.LongTensor,
        query_points: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
        history_mask: torch.Tensor | None = None,
        depth_pixel_values: torch.Tensor | None = None,
        depth_mask: torch.Tensor | None = None,
        dino_pixel_values: torch.Tensor | None = None,
        num_steps: int | None = None,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        use_prefix_cache: bool = True,
        **kwargs,
    ) -> Mu0TracePrediction:
        """Sample `num_samples` traces per query by integrating the flow from noise (t=1) to data (t=0).

        The backbone prefix is computed once and reused at every step unless `use_prefix_cache=False`, which
        recomputes it per step (same result; kept to measure and test the cache). Best-of-N = `num_samples` noises.
        The regression baseline ([`Mu0ForTraceRegression`]) makes one deterministic pass and repeats it.
        """
        query_mask = validate_queries(pixel_values, query_points, query_mask, self.config.max_queries, input_ids=input_ids)
        num_steps = sampling_steps(num_steps, self.config.num_inference_steps, num_samples=num_samples)
        batch_size, num_queries = query_points.shape[:2]
        shape = (batch_size, num_samples, num_queries, self.config.trace_length, 3)
        noise = self.initial_noise(shape, noise, generator, pixel_values.device)

        def encode_prefix() -> Mu0Prefix:
            return self.model.compute_prefix(pixel_values, input_ids, attention_mask, depth_pixel_values, depth_mask)

        fourier, dino_features = self.model.point_context(query_points, dino_pixel_values)
        context = dict(
            query_mask=query_mask, fourier=fourier, dino_features=dino_features, history=history, history_mask=history_mask
        )
        return self.trace_prediction(*self.generate(encode_prefix, context, noise, num_steps, use_prefix_cache))

    def initial_noise(
        self, shape: tuple[int, ...], noise: torch.Tensor | None, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        """The flow's starting point (B, S, N, D, 3): `noise` after checking its shape, else drawn from `generator`."""
        if noise is None:
            return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}.")
        return noise

    def generate(
        self,
        encode_prefix: Callable[[], Mu0Prefix],
        context: dict[str, torch.Tensor | None],
        noise: torch.Tensor,
        num_steps: int,
        use_prefix_cache: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Trace values (B, S, N, D, 3) and the last done logits, integrating the flow of every sample from `noise`
        (t=1) to data (t=0). `context` holds the per-query inputs of `denoise_step` for the B images."""
        num_samples = noise.shape[1]

        def prefix_for_samples() -> Mu0Prefix:
            return encode_prefix().repeat_interleave(num_samples)

        context = {name: None if value is None else value.repeat_interleave(num_samples, dim=0) for name, value in context.items()}
        prefix = prefix_for_samples() if use_prefix_cache else None
        scheduler = flow_scheduler(self.config.sampler, num_steps)
        sample = noise.flatten(0, 1)
        done_logits = None
        for index, timestep in enumerate(scheduler.timesteps):
            time = (timestep / scheduler.config.num_train_timesteps).expand(sample.shape[0]).to(sample.device)
            velocity, done_logits = self.denoise_step(
                prefix if use_prefix_cache else prefix_for_samples(), sample, time, **context
            )
            require_finite(f"denoising step {index + 1} of {len(scheduler.timesteps)} (flow time {time[0].item():.3f})",
                           velocity, done_logits)
            sample = scheduler.step(velocity, timestep, sample).prev_sample
        return sample.view(noise.shape), done_logits

    def alive(self, values: torch.Tensor, done_logits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Done probabilities and alive mask (B, S, N, H): the trace stops where the done head first drops below 0.5
        (every step is alive without a done head)."""
        batch_size, num_samples, num_queries = values.shape[:3]
        if done_logits is None:
            done_probs = values.new_ones(batch_size, num_samples, num_queries, self.config.horizon)
        else:
            done_probs = torch.sigmoid(done_logits).view(batch_size, num_samples, num_queries, -1)
        return done_probs, torch.cumprod((done_probs >= 0.5).long(), dim=-1).bool()

    def trace_prediction(self, values: torch.Tensor, done_logits: torch.Tensor | None) -> Mu0TracePrediction:
        """Generated control points (B, S, N, D, 3) -> traces rendered through the spline basis, with their stop."""
        done_probs, alive_mask = self.alive(values, done_logits)
        traces = render_traces(values, self.spline_basis.to(values.dtype))
        return Mu0TracePrediction(traces=traces, done_probs=done_probs, alive_mask=alive_mask, control_points=values)

    # --------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_backbones(cls, config: Mu0Config | None = None, **loading_kwargs) -> "Mu0ForTracePrediction":
        """A fresh μ0 whose backbone and DINOv2 carry pretrained weights (`config.backbone_checkpoint`, `dino_checkpoint`).

        The backbone configs are read from those checkpoints with `AutoConfig` (no hard-coded copy): without
        `config`, the default μ0 is built on them; with one, its sub-configs must agree with them. Downloads from the
        Hub unless the ids are local folders; the trace expert starts from its own initialisation and the depth
        stem from the pretrained patch convolution.
        """
        config = checked_backbone_config(config or Mu0Config(), **loading_kwargs)
        model = cls(config)
        load_backbone_weights(model.model, **loading_kwargs)
        model.apply_frozen_parts()
        return model



class Mu0ForDenseTracePrediction(Mu0ForTracePrediction):
    """The no-spline baseline: flow matching over all `horizon` steps directly, loss on valid steps only."""

    def trace_targets(
        self, labels: torch.Tensor, labels_mask: torch.Tensor, query_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The steps themselves, invalid ones zero (out of the loss), for every query with a valid step."""
        return labels * labels_mask[..., None], query_mask & labels_mask.any(-1)

    @staticmethod
    def trace_error(error: torch.Tensor, labels_mask: torch.Tensor) -> torch.Tensor:
        """Squared error summed over a query's valid steps: only they have a target."""
        return ((error**2).sum(-1) * labels_mask).sum(-1)

    def trace_prediction(self, values: torch.Tensor, done_logits: torch.Tensor | None) -> Mu0TracePrediction:
        """The generated steps are the traces (no control points)."""
        done_probs, alive_mask = self.alive(values, done_logits)
        return Mu0TracePrediction(traces=values, done_probs=done_probs, alive_mask=alive_mask)


class Mu0ForTraceRegression(Mu0ForTracePrediction):
    """The deterministic baseline with μ0's backbone and expert: zero trace values at flow time 1 in, the clean
    values out of the velocity head, a masked L2 loss, and sampling in one pass."""

    def objective_outputs(
        self, prefix: Mu0Prefix, targets: torch.Tensor, noise: torch.Tensor | None, time: torch.Tensor | None, context: dict
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The clean values, the done logits, the clean values again and their error (`noise`, `time` unused)."""
        ones = torch.ones(targets.shape[0], device=targets.device)
        values, done_logits = self.denoise_step(prefix, torch.zeros_like(targets), ones, **context)
        return values, done_logits, values, values - targets

    def initial_noise(
        self, shape: tuple[int, ...], noise: torch.Tensor | None, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        if noise is not None:
            raise ValueError("A regression model (trace_objective='regression') is deterministic: do not pass noise.")
        return torch.zeros(shape, device=device)  # the one pass reads zero trace values

    def generate(
        self,
        encode_prefix: Callable[[], Mu0Prefix],
        context: dict[str, torch.Tensor | None],
        noise: torch.Tensor,
        num_steps: int,
        use_prefix_cache: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One pass for the B images, repeated for every sample."""
        batch_size, num_samples = noise.shape[:2]
        values, done_logits = self.denoise_step(
            encode_prefix(), noise[:, 0], torch.ones(batch_size, device=noise.device), **context
        )
        require_finite("the regression pass", values, done_logits)
        if done_logits is not None:
            done_logits = done_logits.repeat_interleave(num_samples, dim=0)
        return values[:, None].expand(noise.shape), done_logits


class Mu0ForDenseTraceRegression(Mu0ForTraceRegression, Mu0ForDenseTracePrediction):
    """Both baselines at once: every step regressed directly."""


# (regression objective, dense parameterisation) -> the class that trains and samples it.
TRACE_MODEL_CLASSES = {
    (False, False): Mu0ForTracePrediction,
    (False, True): Mu0ForDenseTracePrediction,
    (True, False): Mu0ForTraceRegression,
    (True, True): Mu0ForDenseTraceRegression,
}


def trace_model_class(config: Mu0Config) -> type[Mu0ForTracePrediction]:
    """The class that trains and samples the config's `trace_objective` and `trace_parameterisation`."""
    return TRACE_MODEL_CLASSES[config.trace_objective == "regression", config.trace_parameterisation == "dense"]


__all__ = [
    "Mu0PreTrainedModel", "Mu0Model", "Mu0ForTracePrediction", "Mu0ForDenseTracePrediction", "Mu0ForTraceRegression",
    "Mu0ForDenseTraceRegression", "Mu0ModelOutput", "Mu0TraceOutput", "Mu0TracePrediction", "Mu0Prefix",
    "trace_model_class",
]
