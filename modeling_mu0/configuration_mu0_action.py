"""Configuration of the μ0 action expert: a robot policy that reads a frozen μ0's motion tokens."""

from transformers import PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_mu0 import Mu0Config

TRACE_NOISE = ("random", "zero")


class Mu0ActionConfig(PreTrainedConfig):
    r"""
    Configuration of [`Mu0ForActionPrediction`]: a μ0 trace model (frozen by default) queried on a point grid, whose
    pooled future-token states ("motion tokens") condition a π0-style flow-matching action expert.

    Args:
        trace_config (`Mu0Config` or `dict`, *optional*): the μ0 trace model's configuration.
        trace_checkpoint (`str`, *optional*): Hub id or path of the pretrained μ0 the policy is built on; recorded so
            adapters can be checked against their base.
        trace_fingerprint (`str`, *optional*): identity of the base μ0's weights, set by
            [`Mu0ForActionPrediction.from_trace_model`]; adapters refuse to load on a base with another one.
        action_dim (`int`, defaults to 7), state_dim (`int`, defaults to 8): robot action and proprioceptive state
            sizes (normalised with statistics from [`Mu0ActionProcessor`]).
        chunk_size (`int`, defaults to 16): actions predicted per call; `num_execute_steps` (8) of them are executed.
        num_sampling_steps (`int`, defaults to 10): Euler steps of the action flow at inference.
        trace_grid_size (`int`, defaults to 20): μ0 is queried on a uniform `trace_grid_size`² grid of points.
        trace_schedule_steps (`int`, defaults to 4), trace_denoise_steps (`int`, defaults to 1): μ0 runs the first
            `trace_denoise_steps` of a `trace_schedule_steps`-step flow schedule; the expert states of the last step
            run become motion tokens.
        trace_noise (`str`, defaults to `"random"`): where μ0's flow starts on the grid: `"random"`, a Gaussian draw
            per call (seeded by `generator`), or `"zero"`, the mean of that Gaussian, which makes the motion tokens a
            deterministic function of the observation. At flow time 1 the expert's input is the noise itself, so with
            a random start the tokens vary with the draw; a small μ0 whose states vary far more with the draw than
            with the frame gives tokens that are mostly noise (measured in `benchmarks/bench_metaworld.py`).
        motion_pool_size (`int`, defaults to 2): average pooling of the grid states (20² / 2² → 100 motion tokens).
        use_trace (`bool`, defaults to `True`): False drops the motion tokens — the "VLM + action expert" ablation.
        use_state (`bool`, defaults to `True`): add a proprioceptive state token.
        use_wrist_camera (`bool`, defaults to `False`): add wrist-camera tokens (μ0's DINOv2 features pooled to
            `wrist_pool_size`²); needs a trace model with DINO features.
        freeze_trace_model (`bool`, defaults to `True`): keep every μ0 weight frozen (PEFT LoRA can still adapt it).
        action_width_factor (`float`, defaults to 0.375): action-expert width relative to the backbone text width.
        num_action_layers (`int`, *optional*): action-expert depth; defaults to the kept backbone layers, each
            action layer reading the matching backbone layer's prefix keys/values (π0-style).
    """

    model_type = "mu0_action"
    sub_configs_defaults = {"trace_config": SubConfigSpec(config_class=Mu0Config)}

    trace_config: dict | Mu0Config | None = None
    trace_checkpoint: str | None = None
    trace_fingerprint: str | None = None
    action_dim: int = 7
    state_dim: int = 8
    chunk_size: int = 16
    num_execute_steps: int = 8
    num_sampling_steps: int = 10
    trace_grid_size: int = 20
    trace_schedule_steps: int = 4
    trace_denoise_steps: int = 1
    trace_noise: str = "random"
    motion_pool_size: int = 2
    use_trace: bool = True
    use_state: bool = True
    use_wrist_camera: bool = False
    wrist_pool_size: int = 8
    freeze_trace_model: bool = True
    action_width_factor: float = 0.375
    num_action_layers: int | None = None
    time_sampling_beta_alpha: float = 1.5
    time_sampling_beta_beta: float = 1.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.num_action_layers is None:
            self.num_action_layers = self.trace_config.num_vlm_layers
        self.validate_action()

    @property
    def action_hidden_size(self) -> int:
        return int(self.trace_config.vlm_config.get_text_config().hidden_size * self.action_width_factor)

    @property
    def num_motion_tokens(self) -> int:
        return (self.trace_grid_size // self.motion_pool_size) ** 2 if self.use_trace else 0

    def validate_action(self) -> None:
        """Reject combinations the policy cannot build, naming the field and the fix."""
        if self.action_dim < 1 or self.state_dim < 1:
            raise ValueError(f"action_dim and state_dim must be >= 1, got {self.action_dim} and {self.state_dim}.")
        if not 1 <= self.num_execute_steps <= self.chunk_size:
            raise ValueError(
                f"num_execute_steps={self.num_execute_steps} must lie in [1, chunk_size={self.chunk_size}]."
            )
        if self.num_sampling_steps < 1:
            raise ValueError(f"num_sampling_steps must be >= 1, got {self.num_sampling_steps}.")
        if not 1 <= self.trace_denoise_steps <= self.trace_schedule_steps:
            raise ValueError(
                f"trace_denoise_steps={self.trace_denoise_steps} must lie in [1, trace_schedule_steps="
                f"{self.trace_schedule_steps}]."
            )
        if self.trace_noise not in TRACE_NOISE:
            raise ValueError(f"trace_noise={self.trace_noise!r}: choose one of {TRACE_NOISE}.")
        if self.trace_grid_size < 1 or self.motion_pool_size < 1 or self.trace_grid_size % self.motion_pool_size:
            raise ValueError(
                f"trace_grid_size={self.trace_grid_size} must be a positive multiple of motion_pool_size="
                f"{self.motion_pool_size}."
            )
        if not 1 <= self.num_action_layers <= self.trace_config.num_vlm_layers:
            raise ValueError(
                f"num_action_layers={self.num_action_layers} must lie in [1, {self.trace_config.num_vlm_layers}] "
                "(one backbone layer's prefix per action layer)."
            )
        if self.action_hidden_size < 2 or self.action_hidden_size % 2:
            raise ValueError(
                f"action_width_factor={self.action_width_factor} gives an action-expert width of "
                f"{self.action_hidden_size}; choose a factor that gives an even width of at least 2."
            )
        trace_config = self.trace_config
        if trace_config.trace_objective != "flow_matching" or trace_config.trace_parameterisation != "bspline":
            raise ValueError(
                f"The action expert reads a flow-matching B-spline μ0; this trace model is a baseline "
                f"(trace_objective={trace_config.trace_objective!r}, "
                f"trace_parameterisation={trace_config.trace_parameterisation!r})."
            )
        if self.use_wrist_camera and not self.trace_config.use_dino:
            raise ValueError("use_wrist_camera=True needs a trace model with DINO features (trace_config.use_dino).")


__all__ = ["Mu0ActionConfig"]
