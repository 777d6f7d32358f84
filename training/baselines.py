"""Baselines behind μ0's prediction interface, for the comparison the paper makes.

Every trained baseline takes the same processed batches as [`Mu0ForTracePrediction`] (so the same collator and
`Mu0Trainer` recipe train it), returns its loss from `forward(**batch)`, and answers
`predict_traces(..., num_samples, generator)` with traces (B, S, N, H, 3) in normalised anchor-relative units, so
`trainer.sampler` and `trainer.evaluate_predictors` score all of them alike. Where a baseline is μ0's backbone and
expert with another objective or output it is a subclass of [`Mu0ForTracePrediction`] over the same `Mu0Model`
(`Mu0ForTraceRegression`, `Mu0ForDenseTracePrediction`), named by a `Mu0Config` switch ([`BASELINE_OVERRIDES`]) so
that every loading path builds it; the tokenized VLM, which decodes through the backbone's language-model head
instead of the trace expert, is its own model here.

Not included: a TraceGen-style model decoding a fixed 20x20 query grid jointly. It needs dense grid tracks for its
targets, and TraceExtract samples carry tracks at selected keypoints only.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForImageTextToText, PreTrainedModel
from transformers.utils import ModelOutput

from .. import Mu0Config, Mu0ForTracePrediction
from ..modeling_mu0 import Mu0TracePrediction, encode_images, text_attention_mask, validate_queries

BASELINE_OVERRIDES = {
    "regression": {"trace_objective": "regression"},
    "dense_flow": {"trace_parameterisation": "dense"},
}


# ------------------------------------------------------------------------------------------------ tokenisation
@dataclass(frozen=True)
class TraceTokenizer:
    """The tokenized baseline's trace <-> token scheme.

    Per query the sequence is `[u, v, du_1, dv_1, dz_1, ..., du_W, dv_W, dz_W]`: the query's current (u, v) quantised
    over [-1, 1], then W waypoints, the anchor-relative normalised deltas at future steps H/W, 2H/W, ..., H,
    quantised over [-value_range, value_range] (values outside are clipped). Both use the same K uniform bins;
    bin b is token id `token_offset + b`. Decoding takes bin centres and interpolates linearly from the anchor
    (delta 0) through the waypoints to every step, so the round trip is exact to half a bin at the waypoints.
    """

    num_bins: int
    value_range: float
    num_waypoints: int
    horizon: int
    token_offset: int

    @property
    def tokens_per_query(self) -> int:
        return 2 + 3 * self.num_waypoints

    def bin_width(self, low: float, high: float) -> float:
        return (high - low) / self.num_bins

    def quantise(self, values: torch.Tensor, low: float, high: float) -> torch.LongTensor:
        scaled = (values.float().clamp(low, high) - low) / (high - low) * self.num_bins
        return scaled.floor().long().clamp(0, self.num_bins - 1)

    def dequantise(self, bins: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return low + (bins.float() + 0.5) * self.bin_width(low, high)

    @property
    def waypoint_steps(self) -> torch.LongTensor:
        """Indices into the H future steps (step k + 1 is index k) of the W waypoints."""
        stride = self.horizon // self.num_waypoints
        return torch.arange(1, self.num_waypoints + 1) * stride - 1

    def interpolation_matrix(self) -> torch.Tensor:
        """(H, W) weights rendering waypoints to steps, the anchor (delta 0) being waypoint 0 at step 0."""
        stride = self.horizon // self.num_waypoints
        steps = torch.arange(1, self.horizon + 1, dtype=torch.float32) / stride  # in waypoint units
        knots = torch.arange(1, self.num_waypoints + 1, dtype=torch.float32)
        return (1 - (steps[:, None] - knots[None, :]).abs()).clamp(min=0)

    def encode(
        self, query_points: torch.Tensor, labels: torch.Tensor, labels_mask: torch.Tensor
    ) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Token ids (B, N, T) and which of them carry a target (the waypoints with a valid step)."""
        steps = self.waypoint_steps.to(labels.device)
        point_bins = self.quantise(query_points, -1.0, 1.0)
        waypoint_bins = self.quantise(labels[:, :, steps], -self.value_range, self.value_range).flatten(2)
        bins = torch.cat([point_bins, waypoint_bins], dim=-1)
        waypoint_valid = labels_mask[:, :, steps].bool()[..., None].expand(-1, -1, -1, 3).flatten(2)
        target = torch.cat([torch.zeros_like(point_bins, dtype=torch.bool), waypoint_valid], dim=-1)
        return bins + self.token_offset, target

    def decode_waypoints(self, token_ids: torch.LongTensor) -> torch.Tensor:
        """Generated trace ids (..., 3W) -> waypoints (..., W, 3)."""
        values = self.dequantise(token_ids - self.token_offset, -self.value_range, self.value_range)
        return values.view(*values.shape[:-1], self.num_waypoints, 3)

    def render(self, waypoints: torch.Tensor) -> torch.Tensor:
        """Waypoints (..., W, 3) -> traces (..., H, 3)."""
        return self.interpolation_matrix().to(waypoints) @ waypoints


# ------------------------------------------------------------------------------------------------------ model
class Mu0TokenizedTraceConfig(Mu0Config):
    r"""
    [`Mu0Config`] of the tokenized-VLM baseline (Hamster / MolmoAct family): the same backbone, no trace expert;
    traces are text tokens generated through the backbone's language-model head (see [`TraceTokenizer`]).

    Args:
        num_coordinate_bins (`int`, defaults to 128): K uniform bins per coordinate; K token ids are appended to
            the backbone's vocabulary.
        trace_value_range (`float`, defaults to 2.0): normalised deltas are quantised over [-range, range].
        num_waypoints (`int`, defaults to 8): W waypoints per query (must divide `horizon`).
        sampling_temperature (`float`, defaults to 1.0): softmax temperature of generation (0 = greedy).
        trace_token_offset (`int`, *optional*): id of bin 0, set to the backbone's original vocabulary size on
            first construction (saved, so a reloaded config does not append the bins twice).
    The backbone text layers are trained (`freeze_text_layers=False`), as the tokenized VLMs fine-tune their LM;
    depth, DINO features and history are not read.
    """

    model_type = "mu0_tokenized_trace"
    _auto_class = None  # lives in mu0.training, not in the self-contained model folder copied to the Hub

    num_coordinate_bins: int = 128
    trace_value_range: float = 2.0
    num_waypoints: int = 8
    sampling_temperature: float = 1.0
    trace_token_offset: int | None = None
    use_depth: bool = False
    use_dino: bool = False
    use_history: bool = False
    use_done_head: bool = False
    freeze_text_layers: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.trace_token_offset is None:
            text_config = self.vlm_config.get_text_config()
            self.trace_token_offset = text_config.vocab_size
            text_config.vocab_size += self.num_coordinate_bins

    def validate_mu0(self) -> None:
        super().validate_mu0()
        if self.use_depth or self.use_dino or self.use_history or self.use_done_head:
            raise ValueError(
                "The tokenized baseline reads the RGB image, the prompt and the query points only: set use_depth, "
                "use_dino, use_history and use_done_head to False."
            )
        if self.num_coordinate_bins < 2 or self.trace_value_range <= 0 or self.sampling_temperature < 0:
            raise ValueError("Need num_coordinate_bins >= 2, trace_value_range > 0 and sampling_temperature >= 0.")
        if self.num_waypoints < 1 or self.horizon % self.num_waypoints:
            raise ValueError(f"num_waypoints={self.num_waypoints} must divide horizon={self.horizon}.")


@dataclass
class Mu0TokenizedTraceOutput(ModelOutput):
    """Training output: next-token cross-entropy over the waypoint tokens, and their logits (B, N * T, vocab)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


class Mu0TokenizedTraceBaseline(PreTrainedModel):
    """Predicts traces by generating quantised waypoint tokens autoregressively, one query after another.

    The sequence is [image tokens, prompt tokens, query 1 tokens, ..., query N tokens] (see [`TraceTokenizer`]);
    the image and prompt attend to each other bidirectionally, trace tokens causally. Generation feeds each query's
    (u, v) tokens and samples its 3W waypoint tokens among the K bin tokens, with the key/value cache reused.
    """

    config: Mu0TokenizedTraceConfig
    config_class = Mu0TokenizedTraceConfig
    base_model_prefix = "mu0_tokenized"
    main_input_name = "pixel_values"
    _supports_sdpa = True

    def __init__(self, config: Mu0TokenizedTraceConfig):
        super().__init__(config)
        self.vlm = AutoModelForImageTextToText.from_config(config.vlm_config)
        self.trace_tokenizer = TraceTokenizer(
            config.num_coordinate_bins, config.trace_value_range, config.num_waypoints, config.horizon,
            config.trace_token_offset,
        )
        self.post_init()
        self._freeze_backbone()

    @property
    def text_model(self) -> nn.Module:
        return self.vlm.get_decoder()

    def _freeze_backbone(self) -> None:
        text_prefix = next(name for name, module in self.vlm.named_modules() if module is self.text_model) + "."
        for name, parameter in self.vlm.named_parameters():
            in_language_model = name.startswith(text_prefix) or name.startswith("lm_head")
            if (self.config.freeze_vision_tower and not in_language_model) or (
                self.config.freeze_text_layers and name.startswith(text_prefix) and "embed_tokens" not in name
            ):
                parameter.requires_grad_(False)

    def _prefix(self, pixel_values, input_ids, attention_mask) -> tuple[torch.Tensor, torch.BoolTensor]:
        images = encode_images(self.vlm.model, pixel_values.to(self.dtype))
        text = self.vlm.get_input_embeddings()(input_ids)
        text_mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        image_mask = torch.ones(images.shape[:2], dtype=torch.bool, device=images.device)
        return torch.cat([images.to(text.dtype), text], dim=1), torch.cat([image_mask, text_mask], dim=1)

    def _run(self, embeds, keys_valid, num_new: int, past=None, prefix_length: int | None = None, use_cache: bool = True):
        """Text-model pass over `num_new` new tokens whose keys are `keys_valid` (B, P + num_new).

        Keys before `prefix_length` (the image and prompt) are visible to every query; the others causally.
        """
        total = keys_valid.shape[1]
        query_index = torch.arange(total - num_new, total, device=keys_valid.device)
        key_index = torch.arange(total, device=keys_valid.device)
        visible = key_index[None, :] <= query_index[:, None]
        if prefix_length is not None:
            visible = visible | (key_index[None, :] < prefix_length)
        allowed = (keys_valid[:, None, :] & visible[None]) | (key_index[None, :] == query_index[:, None])[None]
        positions = (keys_valid.long().cumsum(-1) - 1).clamp(min=0)[:, total - num_new :]
        return self.text_model(
            inputs_embeds=embeds,
            attention_mask=text_attention_mask(self.text_model, allowed[:, None], embeds.dtype),
            position_ids=positions,
            cache=past,
            use_cache=use_cache,
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.LongTensor,
        query_points: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        labels_mask: torch.Tensor | None = None,
        **unused,
    ) -> Mu0TokenizedTraceOutput:
        """Teacher-forced next-token cross-entropy on the waypoint tokens of every valid step (the batch's other
        inputs, e.g. history or cluster ids, are accepted and not read)."""
        query_mask = validate_queries(pixel_values, query_points, query_mask, self.config.max_queries, labels=labels)
        if labels is None or labels_mask is None:
            raise ValueError("forward trains on `labels` and `labels_mask`; use predict_traces to generate traces.")
        token_ids, target = self.trace_tokenizer.encode(query_points, labels, labels_mask.bool() & query_mask[..., None])
        tokens_per_query = token_ids.shape[-1]
        token_ids, target = token_ids.flatten(1), target.flatten(1)
        token_valid = query_mask.repeat_interleave(tokens_per_query, dim=1)
        prefix_embeds, prefix_mask = self._prefix(pixel_values, input_ids, attention_mask)
        embeds = torch.cat([prefix_embeds, self.vlm.get_input_embeddings()(token_ids)], dim=1)
        keys_valid = torch.cat([prefix_mask, token_valid], dim=1)
        hidden = self._run(
            embeds, keys_valid, embeds.shape[1], prefix_length=prefix_embeds.shape[1], use_cache=False
        ).last_hidden_state
        logits = self.vlm.lm_head(hidden[:, prefix_embeds.shape[1] - 1 : -1]).float()  # position i predicts token i
        per_token = F.cross_entropy(logits.transpose(1, 2), token_ids, reduction="none")
        loss = (per_token * target).sum() / target.sum().clamp(min=1)
        return Mu0TokenizedTraceOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def predict_traces(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.LongTensor,
        query_points: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        depth_pixel_values: torch.Tensor | None = None,
        **unused,
    ) -> Mu0TracePrediction:
        """Generate `num_samples` token sequences per image (best-of-N), decoded to traces (B, S, N, H, 3).

        Every step is alive (the baseline has no done head); `control_points` holds the decoded waypoints.
        """
        if depth_pixel_values is not None:
            raise ValueError("The tokenized baseline reads no depth image: evaluate it without depth.")
        query_mask = validate_queries(pixel_values, query_points, query_mask, self.config.max_queries, input_ids=input_ids)
        tokenizer = self.trace_tokenizer
        batch_size, num_queries = query_points.shape[:2]
        prefix_embeds, prefix_mask = self._prefix(pixel_values, input_ids, attention_mask)
        cache = self._run(prefix_embeds, prefix_mask, prefix_embeds.shape[1], prefix_length=prefix_embeds.shape[1]).cache
        cache.batch_repeat_interleave(num_samples)
        keys_valid = prefix_mask.repeat_interleave(num_samples, dim=0)
        query_valid = query_mask.repeat_interleave(num_samples, dim=0)
        point_ids = tokenizer.quantise(query_points, -1.0, 1.0).repeat_interleave(num_samples, dim=0) + tokenizer.token_offset
        embed = self.vlm.get_input_embeddings()
        pending, pending_valid = point_ids[:, 0], query_valid[:, :1].expand(-1, 2)
        generated = []
        for query in range(num_queries):
            for index in range(3 * tokenizer.num_waypoints):
                keys_valid = torch.cat([keys_valid, pending_valid], dim=1)
                hidden = self._run(embed(pending), keys_valid, pending.shape[1], past=cache).last_hidden_state
                logits = self.vlm.lm_head(hidden[:, -1]).float()[:, tokenizer.token_offset : tokenizer.token_offset + tokenizer.num_bins]
                token = self._sample(logits, generator) + tokenizer.token_offset
                generated.append(token)
                pending, pending_valid = token[:, None], query_valid[:, query : query + 1]
            if query + 1 < num_queries:  # feed the last waypoint token together with the next query's point
                pending = torch.cat([pending, point_ids[:, query + 1]], dim=1)
                pending_valid = torch.cat([pending_valid, query_valid[:, query + 1 : query + 2].expand(-1, 2)], dim=1)
        token_ids = torch.stack(generated, dim=-1).view(batch_size, num_samples, num_queries, -1)
        waypoints = tokenizer.decode_waypoints(token_ids)
        traces = tokenizer.render(waypoints)
        alive = torch.ones(traces.shape[:-1], dtype=torch.bool, device=traces.device)
        return Mu0TracePrediction(traces=traces, done_probs=alive.float(), alive_mask=alive, control_points=waypoints)

    def _sample(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.LongTensor:
        temperature = self.config.sampling_temperature
        if temperature == 0:
            return logits.argmax(-1)
        probabilities = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probabilities.cpu(), 1, generator=generator)[:, 0].to(logits.device)


# ------------------------------------------------------------------------------------------------ constructors
BASELINES = ("mu0", *BASELINE_OVERRIDES, "tokenized_vlm")


def build_trace_model(name: str, config: Mu0Config, **overrides) -> PreTrainedModel:
    """μ0 or a trained baseline on the same backbone settings: `name` in `BASELINES`; `overrides` set fields of the
    resulting config (e.g. `num_waypoints` of the tokenized baseline)."""
    if name not in BASELINES:
        raise ValueError(f"Unknown model {name!r}; choose from {BASELINES}.")
    settings = config.to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        settings.pop(key, None)
    if name == "tokenized_vlm":
        for switch in ("use_depth", "use_dino", "use_history", "use_done_head", "freeze_text_layers"):
            settings.pop(switch)
        return Mu0TokenizedTraceBaseline(Mu0TokenizedTraceConfig(**settings, **overrides))
    return Mu0ForTracePrediction(Mu0Config(**{**settings, **BASELINE_OVERRIDES.get(name, {}), **overrides}))


MODEL_CLASSES = {"mu0": Mu0ForTracePrediction, "mu0_tokenized_trace": Mu0TokenizedTraceBaseline}


def load_trace_model(path: str, **loading_kwargs) -> PreTrainedModel:
    """A saved μ0 (any objective or parameterisation) or tokenized baseline, by the `model_type` of its config."""
    model_type = Mu0Config.get_config_dict(path, **loading_kwargs)[0].get("model_type")
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"{path} holds a {model_type!r} model; expected one of {sorted(MODEL_CLASSES)}.")
    return MODEL_CLASSES[model_type].from_pretrained(path, **loading_kwargs)


__all__ = [
    "BASELINES",
    "BASELINE_OVERRIDES",
    "Mu0TokenizedTraceBaseline",
    "Mu0TokenizedTraceConfig",
    "TraceTokenizer",
    "build_trace_model",
    "load_trace_model",
]
