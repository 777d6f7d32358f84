"""μ0 model configuration."""

import math
import numbers
import types
import typing

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# The SmolVLM2-2.2B-Instruct architecture (HuggingFaceTB/SmolVLM2-2.2B-Instruct): a SigLIP-so400m vision
# tower, a 3x3 pixel-shuffle connector and a 24-layer SmolLM2-1.7B text tower, of which μ0 keeps 20.
SMOLVLM2_2B_ARCHITECTURE = {
    "text_config": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 64,
        "vocab_size": 49280,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 130000.0},
    },
    "vision_config": {
        "model_type": "smolvlm_vision",
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "patch_size": 14,
        "image_size": 384,
    },
    "scale_factor": 3,
    "image_token_id": 49190,
}

# DINOv2 ViT-B/14 (facebook/dinov2-base), whose 37x37 patch grid at 518 px gives the per-point features.
DINOV2_BASE_ARCHITECTURE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "patch_size": 14,
    "image_size": 518,
}

SUPPORTED_CONTROL_POINTS = (4, 7, 10)
TRACE_OBJECTIVES = ("flow_matching", "regression")
TRACE_PARAMETERISATIONS = ("bspline", "dense")


class Mu0Config(PreTrainedConfig):
    r"""
    Configuration of [`Mu0ForTracePrediction`]: a vision-language backbone slice plus a trace expert that
    generates every query point's future 3D trace as B-spline control points by flow matching.

    Args:
        vlm_config (`dict` or `PreTrainedConfig`, *optional*):
            Any image-text-to-text backbone with a 1-D RoPE decoder (SmolVLM/Idefics3, PaliGemma, ...).
            Defaults to the SmolVLM2-2.2B architecture.
        dino_config (`dict` or `PreTrainedConfig`, *optional*):
            DINOv2 configuration for the per-point appearance features. Defaults to DINOv2-base.
        backbone_checkpoint (`str`, *optional*):
            Hub id whose backbone weights [`Mu0ForTracePrediction.from_backbones`] loads.
        dino_checkpoint (`str`, *optional*):
            Hub id of the DINOv2 weights loaded by [`Mu0ForTracePrediction.from_backbones`].
        num_vlm_layers (`int`, *optional*, defaults to 20):
            Number of backbone text layers kept (the first ones); the expert has the same depth.
        image_size (`int`, defaults to 512): side of the square image fed to the vision tower.
        dino_image_size (`int`, defaults to 518): side of the image fed to DINOv2.
        max_prompt_length (`int`, defaults to 48): maximum number of prompt tokens.
        history_length (`int`, defaults to 8): past steps encoded in each history token.
        horizon (`int`, defaults to 32): future steps of a trace.
        num_control_points (`int`, defaults to 10): B-spline control points D (4, 7 or 10).
        spline_degree (`int`, defaults to 3): B-spline degree (cubic).
        spline_smoothness (`float`, defaults to 0.2): first-difference Tikhonov weight λ of the control-point fit,
            stacked as rows λΓ under the design matrix (normal equations AᵀWA + λ²ΓᵀΓ), as released.
        control_point_clip (`float`, defaults to 1.5): control points are clipped to this magnitude.
        expert_width_factor (`float`, defaults to 0.5): expert width relative to the backbone text width.
        self_attn_every_n_layers (`int`, defaults to 2):
            Every n-th expert layer (starting at 0) attends jointly to [prefix; suffix]; the others cross-attend
            to the prefix only.
        num_inference_steps (`int`, defaults to 4): Euler steps of the sampler.
        sampler (`str`, defaults to `"euler"`): `"euler"` or `"heun"` (diffusers flow-matching schedulers).
        time_sampling_beta_alpha, time_sampling_beta_beta, time_sampling_scale, time_sampling_offset:
            training time `t = scale * Beta(alpha, beta) + offset`.
        min_period, max_period (`float`): range of the sinusoidal flow-time embedding.
        time_embedding_dim (`int`, defaults to 256): width of that sinusoid, before the adaLN time MLP.
        rope_max_wavelength (`float`, defaults to 10000.0):
            rotary wavelength of the prefix and the expert. The released recipe uses 10 000 whatever rope theta the
            backbone was pretrained with (SmolLM2: 130 000).
        done_loss_weight (`float`, defaults to 0.5): weight of the done-head BCE.
        rigidity_loss_weight (`float`, defaults to 5.0): weight of the same-cluster rigidity term.
        done_bias_init (`float`, defaults to 3.0): initial bias of the done head (traces start "alive").
        use_depth (`bool`, defaults to `True`): accept a rendered depth image as a second prefix image.
        depth_lora_rank, depth_lora_alpha (`int`): LoRA on the vision tower, active for the depth pass only.
        depth_clone_stem (`bool`, defaults to `True`): the depth pass uses its own trainable copy of the vision
            tower's patch convolution.
        use_dino (`bool`, defaults to `True`): fuse DINOv2 features sampled at each query point.
        use_history (`bool`, defaults to `True`):
            Encode each query's past steps in its history token; `False` keeps the token but never shows it the past
            (the no-history ablation; the processor may still pass history, which is then ignored).
        use_done_head (`bool`, defaults to `True`):
            Predict per-step validity and cut sampled traces where it drops below 0.5; `False` removes the head, its
            loss and the truncation (every predicted step is alive).
        trace_objective (`str`, defaults to `"flow_matching"`):
            `"flow_matching"` samples traces from noise; `"regression"` is the deterministic baseline with the same
            backbone and expert: the expert sees zero trace values at flow time 1 and its head outputs the clean
            values directly, trained with a masked L2 loss, and sampling is one pass.
        trace_parameterisation (`str`, defaults to `"bspline"`):
            `"bspline"` generates D control points per query; `"dense"` generates all `horizon` steps directly (the
            no-spline baseline: loss on valid steps only, no fit, no clipping).
        num_fourier_frequencies (`int`, defaults to 8): log-spaced frequencies pi ... 2^(n-1) pi for (u, v).
        max_queries (`int`, defaults to 256): most query points per image.
        freeze_vision_tower, freeze_text_layers (`bool`): keep the pretrained backbone frozen.
    """

    model_type = "mu0"
    sub_configs_defaults = {
        "vlm_config": SubConfigSpec(config_class=AutoConfig, model_type="smolvlm", init_kwargs=SMOLVLM2_2B_ARCHITECTURE),
        "dino_config": SubConfigSpec(config_class=AutoConfig, model_type="dinov2", init_kwargs=DINOV2_BASE_ARCHITECTURE),
    }

    vlm_config: dict | PreTrainedConfig | None = None
    dino_config: dict | PreTrainedConfig | None = None
    backbone_checkpoint: str | None = "HuggingFaceTB/SmolVLM2-2.2B-Instruct"
    dino_checkpoint: str | None = "facebook/dinov2-base"
    num_vlm_layers: int | None = 20
    image_size: int = 512
    dino_image_size: int = 518
    max_prompt_length: int = 48
    history_length: int = 8
    horizon: int = 32
    num_control_points: int = 10
    spline_degree: int = 3
    spline_smoothness: float = 0.2
    control_point_clip: float = 1.5
    expert_width_factor: float = 0.5
    self_attn_every_n_layers: int = 2
    num_inference_steps: int = 4
    sampler: str = "euler"
    time_sampling_beta_alpha: float = 1.5
    time_sampling_beta_beta: float = 1.0
    time_sampling_scale: float = 0.999
    time_sampling_offset: float = 0.001
    min_period: float = 4e-3
    max_period: float = 4.0
    time_embedding_dim: int = 256
    rope_max_wavelength: float = 10000.0
    done_loss_weight: float = 0.5
    rigidity_loss_weight: float = 5.0
    done_bias_init: float = 3.0
    use_depth: bool = True
    depth_lora_rank: int = 8
    depth_lora_alpha: int = 16
    depth_clone_stem: bool = True
    use_dino: bool = True
    use_history: bool = True
    use_done_head: bool = True
    trace_objective: str = "flow_matching"
    trace_parameterisation: str = "bspline"
    num_fourier_frequencies: int = 8
    max_queries: int = 256
    freeze_vision_tower: bool = True
    freeze_text_layers: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_field_types()
        text_config = self.vlm_config.get_text_config()
        if self.num_vlm_layers is None:
            self.num_vlm_layers = text_config.num_hidden_layers
        if self.num_vlm_layers > text_config.num_hidden_layers:
            raise ValueError(
                f"num_vlm_layers={self.num_vlm_layers} exceeds the backbone's {text_config.num_hidden_layers} text "
                "layers; choose at most that many."
            )
        # Keep only the first layers: pretrained checkpoints load with the extra layers ignored.
        text_config.num_hidden_layers = self.num_vlm_layers
        self.validate_mu0()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """A saved config names its backbones: without `vlm_config` (or `dino_config` with DINO on) the defaults
        would silently build the 2.2 B SmolVLM2 (or DINOv2-base) instead of the saved model's backbone."""
        required = ["vlm_config"] + (["dino_config"] if config_dict.get("use_dino", cls.use_dino) else [])
        missing = [name for name in required if config_dict.get(name) is None]
        if missing:
            raise ValueError(
                f"The saved {cls.__name__} lacks {missing}: it does not say which backbone the weights belong to. "
                "Re-save the config with save_pretrained, or build it in code (Mu0Config() is the default model)."
            )
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        """The saved config, refused with a ValueError naming the file when it is not a JSON object (a `[]`
        config.json otherwise surfaces as a TypeError from deep inside the config constructor)."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if not isinstance(config_dict, dict):
            raise ValueError(
                f"The config.json of {pretrained_model_name_or_path!r} holds a JSON {type(config_dict).__name__}, not an "
                "object of settings: the folder is not a saved model (re-save it with save_pretrained)."
            )
        return config_dict, kwargs

    @property
    def expert_hidden_size(self) -> int:
        return int(self.vlm_config.get_text_config().hidden_size * self.expert_width_factor)

    @property
    def trace_length(self) -> int:
        """Trace values per query the expert generates: D control points, or every future step when dense."""
        return self.horizon if self.trace_parameterisation == "dense" else self.num_control_points

    @property
    def expert_intermediate_size(self) -> int:
        """SwiGLU width of 8/3 x hidden rounded up to a multiple of 256, as in the released recipe (1024 -> 2816)."""
        return 256 * math.ceil(int(2 * self.expert_hidden_size / 3) * 4 / 256)

    def validate_field_types(self) -> None:
        """Every int, float, bool and str field holds that type, so a hand-edited config.json with
        `"horizon": "32"`, `"use_depth": "no"` or `"max_queries": 64.5` fails here, naming the field."""
        for cls in type(self).__mro__:
            if not issubclass(cls, Mu0Config):
                continue  # transformers' own fields are its business
            for name, annotation in vars(cls).get("__annotations__", {}).items():
                allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
                value = getattr(self, name, None)
                if value is None and type(None) in allowed:
                    continue
                if bool in allowed:
                    ok = isinstance(value, bool)
                elif int in allowed:
                    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
                elif float in allowed:
                    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
                elif str in allowed:
                    ok = isinstance(value, str)
                else:
                    continue  # sub-configs: checked by their own classes
                if not ok:
                    expected = " or ".join("None" if kind is type(None) else kind.__name__ for kind in allowed)
                    raise ValueError(f"{type(self).__name__}.{name} must be {expected}, got {value!r}.")

    def validate_mu0(self) -> None:
        """Reject combinations the model cannot build, naming the field and the fix."""
        text_config = self.vlm_config.get_text_config()
        if self.spline_degree != 3 or self.num_control_points not in SUPPORTED_CONTROL_POINTS:
            raise ValueError(
                f"num_control_points={self.num_control_points} with spline_degree={self.spline_degree} is not "
                f"supported: use a cubic spline (degree 3) with D in {SUPPORTED_CONTROL_POINTS}."
            )
        if self.horizon < self.num_control_points:
            raise ValueError(
                f"horizon={self.horizon} must be at least num_control_points={self.num_control_points} for the "
                "control-point fit to be determined."
            )
        if self.history_length < 0 or self.max_queries < 1 or self.num_inference_steps < 1:
            raise ValueError("history_length must be >= 0, max_queries >= 1 and num_inference_steps >= 1.")
        if self.self_attn_every_n_layers < 1:
            raise ValueError(f"self_attn_every_n_layers must be >= 1, got {self.self_attn_every_n_layers}.")
        if not 0 < self.expert_width_factor <= 4:
            raise ValueError(f"expert_width_factor must be in (0, 4], got {self.expert_width_factor}.")
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        if head_dim % 2:
            raise ValueError(f"The backbone's head_dim ({head_dim}) must be even for rotary position embeddings.")
        if self.expert_hidden_size % 2:
            raise ValueError(f"The expert width ({self.expert_hidden_size}) must be even.")
        if self.sampler not in ("euler", "heun"):
            raise ValueError(f"sampler must be 'euler' or 'heun', got {self.sampler!r}.")
        if self.trace_objective not in TRACE_OBJECTIVES:
            raise ValueError(f"trace_objective must be one of {TRACE_OBJECTIVES}, got {self.trace_objective!r}.")
        if self.trace_parameterisation not in TRACE_PARAMETERISATIONS:
            raise ValueError(
                f"trace_parameterisation must be one of {TRACE_PARAMETERISATIONS}, got {self.trace_parameterisation!r}."
            )
        if self.done_loss_weight < 0 or self.rigidity_loss_weight < 0:
            raise ValueError(
                f"Loss weights must be >= 0 (0 switches a term off), got done_loss_weight={self.done_loss_weight}, "
                f"rigidity_loss_weight={self.rigidity_loss_weight}."
            )
        if self.use_depth and self.depth_lora_rank < 1:
            raise ValueError("use_depth=True needs depth_lora_rank >= 1 (the depth pass has its own LoRA).")
        if not 0.0 < self.time_sampling_scale + self.time_sampling_offset <= 1.0:
            raise ValueError("time_sampling_scale + time_sampling_offset must lie in (0, 1].")
        if self.time_embedding_dim < 2 or self.time_embedding_dim % 2:
            raise ValueError(f"time_embedding_dim must be a positive even number, got {self.time_embedding_dim}.")
        if not self.rope_max_wavelength > 1:
            raise ValueError(f"rope_max_wavelength must be > 1, got {self.rope_max_wavelength}.")
        if self.num_fourier_frequencies < 1:
            raise ValueError("num_fourier_frequencies must be >= 1.")
        if self.image_size < 1 or self.dino_image_size < 1 or self.max_prompt_length < 1:
            raise ValueError("image_size, dino_image_size and max_prompt_length must be positive.")


__all__ = ["Mu0Config"]
