"""Convert the authors' released μ0 checkpoint (a LeRobot `SmolVLAPolicy` step folder) to `Mu0ForTracePrediction`.

The release `final_ckpt/` holds `model.safetensors` (the whole policy state dict, keys prefixed `model.`), a draccus
`config.json` of `SmolVLAConfig` and `meta.json`; `normalizer_stats.json` (delta scale, depth log range) sits beside
it. Every released key is mapped to exactly one of ours or dropped as unused (the SmolVLM LM head, the action-time
MLP SmolVLA builds but trace mode never calls); anything else is an error naming the key.

```python
from mu0.convert import convert_released_checkpoint

model, processor = convert_released_checkpoint("mu0_rollout/final_ckpt")
model.save_pretrained("mu0-released"); processor.save_pretrained("mu0-released")
```
"""

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, PreTrainedConfig
from transformers.initialization import no_init_weights

from .configuration_mu0 import Mu0Config
from .modeling_mu0 import Mu0ForTracePrediction

RELEASED_VLM = "model.vlm_with_expert.vlm.model."
RELEASED_VISION = RELEASED_VLM + r"vision_model\.(?:base_model\.model\.)?"  # peft inserts base_model.model.
RELEASED_EXPERT = r"model\.vlm_with_expert\.lm_expert\."
STATS_FILE = "normalizer_stats.json"

# (group, released key pattern, our key template; None drops the key as unused). The first match wins.
KEY_RULES = (
    ("lm_head_unused", r"model\.vlm_with_expert\.vlm\.lm_head\.weight", None),
    ("action_time_mlp_unused", r"model\.action_time_mlp_(?:in|out)\.(?:weight|bias)", None),
    ("depth_lora", RELEASED_VISION + r"(encoder\.layers\.\d+\.[\w.]+)\.lora_(A|B)\.default\.weight",
     r"model.vlm.vision_model.\1.lora_\2.weight"),
    ("vision_embeddings", RELEASED_VISION + r"(embeddings\.[\w.]+)", r"model.vlm.vision_model.\1"),
    ("vision_encoder_layers", RELEASED_VISION + r"(encoder\.layers\.\d+\.[\w.]+?)(?:\.base_layer)?\.(weight|bias)",
     r"model.vlm.vision_model.\1.\2"),
    ("vision_post_layernorm", RELEASED_VISION + r"(post_layernorm\.(?:weight|bias))", r"model.vlm.vision_model.\1"),
    ("depth_patch_stem", r"model\.vlm_with_expert\._depth_patch_embedding\.(weight|bias)", r"model.depth_patch_embedding.\1"),
    ("connector", re.escape(RELEASED_VLM) + r"(connector\.[\w.]+)", r"model.vlm.\1"),
    ("text_embed_tokens", re.escape(RELEASED_VLM) + r"(text_model\.embed_tokens\.weight)", r"model.vlm.\1"),
    ("vlm_text_layers", re.escape(RELEASED_VLM) + r"(text_model\.layers\.\d+\.[\w.]+)", r"model.vlm.\1"),
    ("vlm_text_final_norm", re.escape(RELEASED_VLM) + r"(text_model\.norm\.weight)", r"model.vlm.\1"),
    ("expert_layers", RELEASED_EXPERT + r"layers\.(\d+)\.self_attn\.([\w.]+)", r"model.expert_layers.\1.attention.\2"),
    ("expert_layers", RELEASED_EXPERT + r"layers\.(\d+)\.((?:mlp|input_layernorm|post_attention_layernorm)\.[\w.]+)",
     r"model.expert_layers.\1.\2"),
    ("expert_final_norm", RELEASED_EXPERT + r"norm\.weight", "model.expert_norm.weight"),
    ("adaln_timestep_embedder", r"model\.trace_timestep_embedder\.mlp\.0\.(weight|bias)", r"model.time_embedder.mlp_in.\1"),
    ("adaln_timestep_embedder", r"model\.trace_timestep_embedder\.mlp\.2\.(weight|bias)", r"model.time_embedder.mlp_out.\1"),
    ("adaln_modulation_heads", r"model\.trace_adaln_modulation\.(\d+)\.1\.(weight|bias)",
     r"model.expert_layers.\1.adaln_modulation.\2"),
    ("suffix_in_proj_history", r"model\.trace_in_proj_history\.(weight|bias)", r"model.history_proj.\1"),
    ("suffix_in_proj_future", r"model\.trace_in_proj_future\.(weight|bias)", r"model.future_proj.\1"),
    ("suffix_uv_fourier_mlp", r"model\.trace_uv_pos_mlp\.0\.(weight|bias)", r"model.point_fourier.mlp_in.\1"),
    ("suffix_uv_fourier_mlp", r"model\.trace_uv_pos_mlp\.2\.(weight|bias)", r"model.point_fourier.mlp_out.\1"),
    ("dino_backbone", r"model\.dino\.([\w.]+)", r"model.dino.\1"),
    ("dino_fusion_mlp", r"model\.trace_dino_fuse_(in|out)\.(weight|bias)", r"model.dino_fusion_\1.\2"),
    ("velocity_head", r"model\.trace_out_proj_future\.(weight|bias)", r"trace_velocity_head.\1"),
    ("done_head", r"model\.trace_done_proj_bsp\.(weight|bias)", r"trace_done_head.\1"),
)
# The released suffix adds a per-group row and a per-segment row; with one history and one future token per query
# their sum is our two-row group embedding.
GROUP_KEYS = ("model.trace_time_embedding.weight", "model.trace_seg_embedding.weight")
# DINOv2 attention names before and after transformers 5.x; the checkpoint may use either.
DINO_SPELLINGS = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


@dataclass
class ConversionReport:
    """Released keys per group: mapped onto ours, or dropped (with why)."""

    mapped: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    unused_group_rows: int = 0  # rows of the released per-group table no token uses (38 in the release)

    def summary(self) -> str:
        lines = [f"mapped {sum(self.mapped.values())} keys, dropped {sum(self.dropped.values())}"]
        lines += [f"  mapped  {group}: {count}" for group, count in sorted(self.mapped.items())]
        lines += [f"  dropped {group}: {count}" for group, count in sorted(self.dropped.items())]
        lines.append(f"  unused rows of the group table: {self.unused_group_rows}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ config
def _require(released: dict, name: str, expected, why: str) -> None:
    if released.get(name, expected) != expected:
        raise ValueError(f"Released config {name}={released[name]!r} is not supported ({why}); expected {expected!r}.")


def mu0_config_from_released(
    released: dict,
    vlm_config: PreTrainedConfig | dict | None = None,
    dino_config: PreTrainedConfig | dict | None = None,
) -> Mu0Config:
    """`Mu0Config` equivalent to a released draccus `SmolVLAConfig` dump (trace mode)."""
    _require(released, "type", "smolvla", "not a SmolVLA policy config")
    _require(released, "trace_mode", True, "only the trace model converts")
    _require(released, "trace_group_horizon", released.get("history_len"), "one history token per query")
    _require(released, "trace_bspline_ctrl_per_token", released.get("trace_bspline_n_ctrl"), "one future token per query")
    _require(released, "add_image_special_tokens", False, "no image envelope tokens in the prefix")
    _require(released, "trace_dim", 3, "traces are (u, v, z)")
    _require(released, "done_threshold", 0.5, "the done head cuts traces at 0.5")
    _require(released, "prefix_length", -1, "the prefix is not padded")
    if released.get("num_expert_layers", -1) not in (-1, released.get("num_vlm_layers")):
        raise ValueError(
            f"Released config num_expert_layers={released['num_expert_layers']} is not supported: the expert must have "
            f"one layer per kept VLM layer ({released.get('num_vlm_layers')})."
        )
    if "cross" in released.get("attention_mode", "cross_attn"):
        every_n = released.get("self_attn_every_n_layers", 2)
        if every_n < 1:
            raise ValueError(f"Released config self_attn_every_n_layers={every_n} (cross attention only) is not supported.")
    else:
        every_n = 1  # every layer attends jointly
    size = released.get("resize_imgs_with_padding") or [512, 512]
    if size[0] != size[1]:
        raise ValueError(f"Released config resize_imgs_with_padding={size} is not square; μ0 expects square images.")
    if released.get("use_depth", False):
        targets = released.get("depth_lora_targets", ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
        if sorted(targets) != sorted(["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]):
            raise ValueError(f"Released config depth_lora_targets={targets} is not supported: μ0 adapts every SigLIP projection.")
    vlm_name, dino_name = released["vlm_model_name"], released.get("dino_model_name")
    use_dino = bool(released.get("use_dino", False))
    vlm_config = vlm_config if vlm_config is not None else AutoConfig.from_pretrained(vlm_name)
    if use_dino and dino_config is None:
        dino_config = AutoConfig.from_pretrained(dino_name)
    as_dict = lambda config: config.to_dict() if isinstance(config, PreTrainedConfig) else dict(config)  # noqa: E731
    settings = dict(
        vlm_config=as_dict(vlm_config),
        backbone_checkpoint=vlm_name,
        dino_checkpoint=dino_name if use_dino else None,
        num_vlm_layers=released["num_vlm_layers"],
        image_size=size[0],
        dino_image_size=released.get("dino_input_size", 518),
        max_prompt_length=released.get("tokenizer_max_length", 48),
        history_length=released["history_len"],
        horizon=released["future_len"],
        num_control_points=released.get("trace_bspline_n_ctrl", 10),
        expert_width_factor=released["expert_width_multiplier"],
        self_attn_every_n_layers=every_n,
        num_inference_steps=released.get("num_steps", 4),
        min_period=released.get("min_period", 4e-3),
        max_period=released.get("max_period", 4.0),
        time_embedding_dim=released.get("trace_adaln_freq_embed_size", 256),
        num_fourier_frequencies=released.get("trace_uv_num_freqs", 8),
        done_loss_weight=released.get("done_loss_weight", 0.5),
        rigidity_loss_weight=released.get("rigidity_loss_weight", 0.0),
        done_bias_init=released.get("done_bias_init", 3.0),
        use_depth=bool(released.get("use_depth", False)),
        depth_lora_rank=released.get("depth_lora_rank", 8),
        depth_lora_alpha=released.get("depth_lora_alpha", 16),
        depth_clone_stem=bool(released.get("depth_clone_stem", True)),
        use_dino=use_dino,
        use_done_head=bool(released.get("trace_done_head", False)),
        max_queries=max(released.get("n_max", 256), 1),
    )
    if use_dino:
        settings["dino_config"] = as_dict(dino_config)
    return Mu0Config(**settings)


# -------------------------------------------------------------------------------------------------- state dict
def _rule_for(key: str) -> tuple[str, str | None]:
    """(group, our key or None when dropped) of one released key; raises on a key no rule knows."""
    for group, pattern, template in KEY_RULES:
        match = re.fullmatch(pattern, key)
        if match:
            return group, None if template is None else match.expand(template)
    raise ValueError(f"Released key {key!r} matches no conversion rule: the checkpoint is not a released μ0 trace model.")


def _dino_key(key: str, targets: set[str]) -> str:
    """Our DINOv2 key in the spelling of the installed transformers, whichever spelling the checkpoint used."""
    if key in targets:
        return key
    for old, new in DINO_SPELLINGS:
        for source, target in ((old, new), (new, old)):
            if source in key and key.replace(source, target) in targets:
                return key.replace(source, target)
    return key


def convert_state_dict(
    released: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Released tensors under our names (dtypes kept), checked against `expected` (our state dict) key by key."""
    report = ConversionReport()
    converted: dict[str, torch.Tensor] = {}
    targets = set(expected)
    missing_group = [key for key in GROUP_KEYS if key not in released]
    if missing_group:
        raise ValueError(f"The released checkpoint lacks {missing_group} (the suffix group embeddings).")
    time_rows, segment_rows = (released[key] for key in GROUP_KEYS)
    converted["model.group_embedding.weight"] = time_rows[: len(segment_rows)].float() + segment_rows.float()
    report.mapped["suffix_group_embedding"] += 1
    report.mapped["suffix_segment_embedding"] += 1
    report.unused_group_rows = len(time_rows) - len(segment_rows)
    for key, tensor in released.items():
        if key in GROUP_KEYS:
            continue
        group, ours = _rule_for(key)
        if ours is None:
            report.dropped[group] += 1
            continue
        ours = _dino_key(ours, targets) if group == "dino_backbone" else ours
        if ours in converted:
            raise ValueError(f"Released keys map twice onto {ours!r} (second: {key!r}).")
        converted[ours] = tensor
        report.mapped[group] += 1
    unexpected = sorted(set(converted) - targets)
    missing = sorted(targets - set(converted))
    if unexpected or missing:
        raise ValueError(
            f"Converted keys do not match Mu0ForTracePrediction: {len(missing)} missing (e.g. {missing[:5]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:5]}). Check the released config against the checkpoint."
        )
    for key, tensor in converted.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"Shape mismatch for {key!r}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[key].shape)}.")
    return converted, report


# ------------------------------------------------------------------------------------------------- statistics
def load_normalizer_stats(path: str) -> dict:
    """`delta_scale` and `depth_log_range` from a released `normalizer_stats.json` (`delta_stats.json`)."""
    with open(path) as handle:
        stats = json.load(handle)
    if stats.get("target_kind", "anchor") != "anchor":
        raise ValueError(f"{path}: target_kind={stats['target_kind']!r}; only anchor-relative targets are supported.")
    try:
        delta_scale = [float(stats[f"delta_scale_{axis}"]) for axis in "xyz"]
    except KeyError as error:
        raise ValueError(f"{path} lacks {error.args[0]!r}: not a released normalizer_stats.json.") from None
    low, high = stats.get("depth_log_min"), stats.get("depth_log_max")
    return {"delta_scale": delta_scale, "depth_log_range": None if low is None or high is None else [float(low), float(high)]}


def _find_stats(path: str) -> str:
    """`normalizer_stats.json` inside the step folder or beside it (the release keeps it next to `final_ckpt/`)."""
    for candidate in (os.path.join(path, STATS_FILE), os.path.join(os.path.dirname(os.path.abspath(path)), STATS_FILE)):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"No {STATS_FILE} in {path} or its parent folder: pass normalizer_stats= (the file shipped with the release)."
    )


def read_released_config(path: str) -> dict:
    """The draccus config of a released step folder, after checking the folder is one (config.json of a SmolVLA
    trace-mode policy beside model.safetensors); anything else is refused as "not a released checkpoint"."""
    if not os.path.isdir(path):
        raise ValueError(f"not a released checkpoint: {path} is not a folder (pass the release's final_ckpt/ step folder).")
    absent = [name for name in ("config.json", "model.safetensors") if not os.path.isfile(os.path.join(path, name))]
    if absent:
        raise ValueError(f"not a released checkpoint: {path} has no {' or '.join(absent)} (pass the release's final_ckpt/).")
    try:
        with open(os.path.join(path, "config.json")) as handle:
            released = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"not a released checkpoint: {path}/config.json is not JSON ({error}).") from None
    if not isinstance(released, dict) or released.get("type") != "smolvla" or not released.get("trace_mode"):
        kind = released.get("model_type") or released.get("type") if isinstance(released, dict) else type(released).__name__
        raise ValueError(
            f"not a released checkpoint: {path}/config.json describes {kind!r}, not a SmolVLA policy in trace mode"
            + (" (it is already a μ0 folder: load it with from_pretrained)." if kind == "mu0" else ".")
        )
    return released


def convert_released_checkpoint(
    path: str,
    vlm_config: PreTrainedConfig | dict | None = None,
    dino_config: PreTrainedConfig | dict | None = None,
    normalizer_stats: str | dict | None = None,
    tokenizer=None,
    report: ConversionReport | None = None,
):
    """(Mu0ForTracePrediction, Mu0Processor) from a released step folder.

    Backbone configs default to `AutoConfig` of the Hub ids in the released config, the tokenizer to that VLM's.
    `normalizer_stats` is a path or an already loaded dict (default: `normalizer_stats.json` in or beside `path`).
    Tensor dtypes are kept (bf16 VLM, DINOv2 and depth stem; fp32 LoRA and expert in the release). Pass a
    `ConversionReport` to receive the per-group key counts.
    """
    from safetensors.torch import load_file

    from .processing import Mu0ImageProcessor, Mu0Processor

    released_config = read_released_config(path)
    config = mu0_config_from_released(released_config, vlm_config, dino_config)
    if not isinstance(normalizer_stats, dict):
        normalizer_stats = load_normalizer_stats(normalizer_stats or _find_stats(path))
    configured_scale = released_config.get("delta_scale")
    if configured_scale is not None and not torch.allclose(
        torch.tensor(configured_scale, dtype=torch.float64), torch.tensor(normalizer_stats["delta_scale"], dtype=torch.float64)
    ):
        raise ValueError(
            f"delta_scale differs between config.json ({configured_scale}) and the statistics "
            f"({normalizer_stats['delta_scale']}): the statistics file belongs to another run."
        )

    released = load_file(os.path.join(path, "model.safetensors"))
    with no_init_weights():  # every parameter is overwritten; the buffers are computed in __init__
        model = Mu0ForTracePrediction(config)
    converted, conversion = convert_state_dict(released, model.state_dict())
    model.load_state_dict(converted, strict=True, assign=True)  # assign keeps the checkpoint's dtypes
    model.apply_frozen_parts()
    model.eval()
    if report is not None:
        report.mapped.update(conversion.mapped)
        report.dropped.update(conversion.dropped)
        report.unused_group_rows = conversion.unused_group_rows

    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(released_config["vlm_model_name"])
    processor = Mu0Processor(
        Mu0ImageProcessor(image_size=config.image_size, dino_image_size=config.dino_image_size),
        tokenizer,
        delta_scale=normalizer_stats["delta_scale"],
        depth_log_range=normalizer_stats.get("depth_log_range"),
        history_length=config.history_length,
        horizon=config.horizon,
        max_prompt_length=config.max_prompt_length,
        max_queries=config.max_queries,
    )
    return model, processor


# ----------------------------------------------------------------------------------------------------- batches
def released_batch_to_inputs(
    batch: dict, model: Mu0ForTracePrediction | Mu0Config, mask_all_history: bool = False
) -> dict:
    """Keyword arguments of `forward` / `predict_traces` of `model` (or a model of that config) for a batch of the
    released data pipeline.

    Images are (B, 3, S, S) in [0, 1], S being the model's `image_size`; DINOv2 gets them resized to its
    `dino_image_size`. The depth panel is dropped from the prefix where
    `observation.images.cam_front_depth_padding_mask` is False. `mask_all_history` hides every history token
    (the released `predict_trace(mask_all_history=True)`). Training keys (`traj_future`, `valid_future`,
    `cluster_ids`) become `labels` / `labels_mask` / `cluster_ids` when present.
    """
    from .processing.image_processing_mu0 import IMAGENET_MEAN, IMAGENET_STD

    config = model if isinstance(model, Mu0Config) else getattr(model, "config", None)
    if not isinstance(config, Mu0Config):
        raise TypeError(f"released_batch_to_inputs needs the Mu0ForTracePrediction (or its Mu0Config) to feed, got {type(model).__name__}.")
    required = ("observation.images.cam_front", "observation.language.tokens", "current_kp", "key_pad_mask")
    absent = [key for key in required if key not in batch]
    if absent:
        raise ValueError(f"The released batch lacks {absent}.")
    image = batch["observation.images.cam_front"].float()
    if tuple(image.shape[-2:]) != (config.image_size, config.image_size):
        raise ValueError(
            f"observation.images.cam_front is {tuple(image.shape[-2:])} but the model reads {config.image_size} px "
            "square images (config.image_size): resize in the released pipeline (resize_imgs_with_padding)."
        )
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device)[None, :, None, None]
    size = (config.dino_image_size, config.dino_image_size)
    dino = torch.nn.functional.interpolate((image - mean) / std, size=size, mode="bilinear", align_corners=False)
    current = batch["current_kp"].float()
    query_mask = batch["key_pad_mask"].bool()
    inputs = {
        "pixel_values": image * 2 - 1,
        "dino_pixel_values": dino,
        "input_ids": batch["observation.language.tokens"].long(),
        "attention_mask": batch.get("observation.language.attention_mask"),
        "query_points": current[..., :2],
        "query_depth": current[..., 2],
        "query_mask": query_mask,
    }
    if "observation.images.cam_front_depth" in batch:
        inputs["depth_pixel_values"] = batch["observation.images.cam_front_depth"].float() * 2 - 1
        inputs["depth_mask"] = batch.get("observation.images.cam_front_depth_padding_mask")
    if "traj_history" in batch and not mask_all_history:
        history = batch["traj_history"].float()
        # The released model shows a real query's history token whatever its per-step validity.
        inputs["history"] = history
        inputs["history_mask"] = query_mask[..., None].expand(*history.shape[:3])
    if "traj_future" in batch:
        inputs["labels"] = batch["traj_future"].float()
        inputs["labels_mask"] = batch["valid_future"].bool()
    if "cluster_ids" in batch:
        inputs["cluster_ids"] = batch["cluster_ids"].long()
    return inputs


__all__ = [
    "ConversionReport",
    "convert_released_checkpoint",
    "convert_state_dict",
    "load_normalizer_stats",
    "mu0_config_from_released",
    "read_released_config",
    "released_batch_to_inputs",
]
