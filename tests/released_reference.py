"""An independent re-implementation of the authors' released μ0 trace model, for conversion parity tests.

It works directly on a state dict in the released layout (`SmolVLAPolicy.state_dict()`: keys prefixed `model.`,
peft-wrapped SigLIP, `lm_expert` Llama layers, `trace_*` modules) and a batch in the released data layout. The frozen
encoders are transformers modules (SmolVLM vision tower + connector wrapped by peft for the depth LoRA, DINOv2);
everything the authors wrote themselves is written out here from their code: the prefix text-layer loop, `apply_rope`
(wavelength 10 000), eager fp32 attention over `make_att_2d_masks`, the expert layers with adaLN-Zero, the suffix
embedding, the heads, the summed flow-matching loss, the per-cluster rigidity loop, the done BCE, the dataset's
control-point fit and `sample_traces` (Euler, dt = -1/num_steps from t = 1). It shares no code with `mu0`.
"""

import copy
import math

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import Dinov2Config, Dinov2Model, LlamaModel, SmolVLMConfig, SmolVLMForConditionalGeneration
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector, SmolVLMVisionTransformer

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
VLM = "model.vlm_with_expert.vlm.model."
EXPERT = "model.vlm_with_expert.lm_expert."
NEW_TO_OLD_DINO = {"attention.q_proj.": "attention.attention.query.", "attention.k_proj.": "attention.attention.key.",
                   "attention.v_proj.": "attention.attention.value.", "attention.o_proj.": "attention.output.dense."}


def expert_intermediate_size(hidden: int, multiplier: int = 4, multiple_of: int = 256) -> int:
    hidden = int(multiplier * int(2 * hidden / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def expert_hidden_size(cfg: dict, vlm_config: SmolVLMConfig) -> int:
    return int(vlm_config.text_config.hidden_size * cfg["expert_width_multiplier"])


# ------------------------------------------------------------------------------------------ released checkpoint
def released_state_dict(cfg: dict, vlm_config: SmolVLMConfig, dino_config: Dinov2Config, seed: int = 0,
                        old_dino_names: bool = True) -> dict[str, torch.Tensor]:
    """Random tensors under the released key names and shapes, built the way the released policy builds them."""
    torch.manual_seed(seed)
    vlm = SmolVLMForConditionalGeneration(vlm_config)
    vlm.model.text_model.layers = vlm.model.text_model.layers[: cfg["num_vlm_layers"]]
    stem = copy.deepcopy(vlm.model.vision_model.embeddings.patch_embedding)
    lora = LoraConfig(r=cfg["depth_lora_rank"], lora_alpha=cfg["depth_lora_alpha"], target_modules=LORA_TARGETS, bias="none")
    vlm.model.vision_model = get_peft_model(vlm.model.vision_model, lora)
    text = vlm_config.text_config
    expert_config = copy.deepcopy(text)
    expert_config.hidden_size = expert_hidden_size(cfg, vlm_config)
    expert_config.intermediate_size = expert_intermediate_size(expert_config.hidden_size)
    expert_config.num_hidden_layers = cfg["num_vlm_layers"]
    expert = LlamaModel(expert_config)
    kv = text.num_key_value_heads * text.head_dim
    for index, layer in enumerate(expert.layers):
        if index % cfg["self_attn_every_n_layers"]:
            layer.self_attn.k_proj = nn.Linear(kv, kv, bias=False)
            layer.self_attn.v_proj = nn.Linear(kv, kv, bias=False)
    expert.embed_tokens = None
    dino = Dinov2Model(dino_config)
    hidden, h, H, D = expert_config.hidden_size, cfg["history_len"], cfg["future_len"], cfg["trace_bspline_n_ctrl"]
    shapes = {
        "trace_time_embedding.weight": (h + H, hidden), "trace_seg_embedding.weight": (2, hidden),
        "trace_uv_pos_mlp.0.weight": (hidden, 4 * cfg["trace_uv_num_freqs"]), "trace_uv_pos_mlp.0.bias": (hidden,),
        "trace_uv_pos_mlp.2.weight": (hidden, hidden), "trace_uv_pos_mlp.2.bias": (hidden,),
        "trace_in_proj_history.weight": (hidden, 3 * h), "trace_in_proj_history.bias": (hidden,),
        "trace_in_proj_future.weight": (hidden, 3 * D), "trace_in_proj_future.bias": (hidden,),
        "trace_out_proj_future.weight": (3 * D, hidden), "trace_out_proj_future.bias": (3 * D,),
        "trace_done_proj_bsp.weight": (H, hidden), "trace_done_proj_bsp.bias": (H,),
        "trace_timestep_embedder.mlp.0.weight": (hidden, cfg["trace_adaln_freq_embed_size"]),
        "trace_timestep_embedder.mlp.0.bias": (hidden,),
        "trace_timestep_embedder.mlp.2.weight": (hidden, hidden), "trace_timestep_embedder.mlp.2.bias": (hidden,),
        "action_time_mlp_in.weight": (hidden, 2 * hidden), "action_time_mlp_in.bias": (hidden,),
        "action_time_mlp_out.weight": (hidden, hidden), "action_time_mlp_out.bias": (hidden,),
        "trace_dino_fuse_in.weight": (hidden, hidden + dino_config.hidden_size), "trace_dino_fuse_in.bias": (hidden,),
        "trace_dino_fuse_out.weight": (hidden, hidden), "trace_dino_fuse_out.bias": (hidden,),
    }
    for index in range(cfg["num_vlm_layers"]):
        shapes[f"trace_adaln_modulation.{index}.1.weight"] = (6 * hidden, hidden)
        shapes[f"trace_adaln_modulation.{index}.1.bias"] = (6 * hidden,)
    layout = {f"model.{name}": torch.empty(shape) for name, shape in shapes.items()}
    layout.update({f"model.vlm_with_expert.vlm.{k}": v for k, v in vlm.state_dict().items()})
    layout.update({f"{EXPERT}{k}": v for k, v in expert.state_dict().items()})
    layout.update({f"model.vlm_with_expert._depth_patch_embedding.{k}": v for k, v in stem.state_dict().items()})
    for key, value in dino.state_dict().items():
        if old_dino_names:
            for new, old in NEW_TO_OLD_DINO.items():
                key = key.replace(new, old)
        layout[f"model.dino.{key}"] = value
    state = {}
    for key, value in layout.items():
        if value.ndim >= 2:
            tensor = torch.randn(value.shape) / math.sqrt(value[0].numel())
        elif any(word in key for word in ("norm", "lambda1")):
            tensor = 1 + 0.1 * torch.randn(value.shape)
        else:
            tensor = 0.1 * torch.randn(value.shape)
        frozen = key.startswith(("model.vlm_with_expert.vlm.", "model.dino.", "model.vlm_with_expert._depth"))
        state[key] = tensor.to(torch.bfloat16 if frozen and "lora_" not in key else torch.float32)
    return state


# --------------------------------------------------------------------------------------------------- B-spline
def bspline_basis(num_ctrl: int, times: torch.Tensor) -> torch.Tensor:
    """Cox-de Boor cubic basis (len(times), num_ctrl) on the released clamped knots (interior multiplicity 3)."""
    interior = {4: [], 7: [0.5] * 3, 10: [1 / 3] * 3 + [2 / 3] * 3}[num_ctrl]
    knots = [0.0] * 4 + interior + [1.0] * 4
    degree = 3

    def basis(i: int, p: int, t: float) -> float:
        if p == 0:
            if i == num_ctrl - 1:
                return 1.0 if knots[i] <= t <= knots[i + 1] else 0.0
            return 1.0 if knots[i] <= t < knots[i + 1] else 0.0
        value = 0.0
        if knots[i + p] - knots[i] > 0:
            value += (t - knots[i]) / (knots[i + p] - knots[i]) * basis(i, p - 1, t)
        if i + 1 < num_ctrl and knots[i + p + 1] - knots[i + 1] > 0:
            value += (knots[i + p + 1] - t) / (knots[i + p + 1] - knots[i + 1]) * basis(i + 1, p - 1, t)
        return value

    return torch.tensor([[basis(i, degree, float(t)) for i in range(num_ctrl)] for t in times], dtype=torch.float32)


def dataset_control_points(traj_future: torch.Tensor, valid_future: torch.Tensor, num_ctrl: int, lam: float = 0.2,
                           clip: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The released dataset's fit per sample: anchor row + masked rows + stacked λΓ rows, lstsq, clip, valid_kp."""
    horizon = traj_future.shape[-2]
    basis = bspline_basis(num_ctrl, torch.arange(horizon + 1) / horizon)
    gamma = torch.zeros(num_ctrl - 1, num_ctrl)
    for row in range(num_ctrl - 1):
        gamma[row, row], gamma[row, row + 1] = -1.0, 1.0
    ctrl, valid_kp = [], []
    for target, valid in zip(traj_future.float(), valid_future.bool()):
        n = target.shape[0]
        target = torch.cat([torch.zeros(n, 1, 3), torch.where(valid[..., None], target, 0.0)], dim=1)
        mask = torch.cat([torch.ones(n, 1), valid.float()], dim=1)
        a = torch.cat([basis[None].expand(n, -1, -1) * mask[..., None], (lam * gamma)[None].expand(n, -1, -1)], dim=1)
        b = torch.cat([target * mask[..., None], torch.zeros(n, num_ctrl - 1, 3)], dim=1)
        points = torch.linalg.lstsq(a, b).solution.clamp(-clip, clip)
        ok = valid.sum(-1) >= num_ctrl
        ctrl.append(torch.where(ok[:, None, None], points, 0.0))
        valid_kp.append(ok)
    return torch.stack(ctrl), torch.stack(valid_kp)


# ---------------------------------------------------------------------------------------------------- model
def apply_rope(x: torch.Tensor, positions: torch.Tensor, max_wavelength: float = 10_000) -> torch.Tensor:
    """x (B, L, H, D) rotated by positions (B, L), half split, in fp32."""
    d_half = x.shape[-1] // 2
    dtype = x.dtype
    x = x.float()
    timescale = max_wavelength ** ((2.0 / x.shape[-1]) * torch.arange(d_half, dtype=torch.float32))
    radians = (positions[..., None].float() / timescale[None, None, :])[..., None, :]
    x1, x2 = x.split(d_half, dim=-1)
    return torch.cat([x1 * radians.cos() - x2 * radians.sin(), x2 * radians.cos() + x1 * radians.sin()], -1).to(dtype)


def make_att_2d_masks(pad_masks: torch.Tensor, att_masks: torch.Tensor) -> torch.Tensor:
    cumsum = torch.cumsum(att_masks, dim=1)
    return (cumsum[:, None, :] <= cumsum[:, :, None]) & (pad_masks[:, None, :] & pad_masks[:, :, None])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def sinusoid(time: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64)
    period = min_period * (max_period / min_period) ** fraction
    angles = (1.0 / period * 2 * math.pi)[None, :] * time[:, None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ReleasedTraceModel:
    """The released forward on a released-layout state dict (computed in fp32 when the state dict is fp32)."""

    def __init__(self, state: dict, cfg: dict, vlm_config: SmolVLMConfig, dino_config: Dinov2Config):
        self.s, self.cfg, self.text = state, cfg, vlm_config.text_config
        self.num_layers = cfg["num_vlm_layers"]
        vision = SmolVLMVisionTransformer(vlm_config.vision_config)
        lora = LoraConfig(r=cfg["depth_lora_rank"], lora_alpha=cfg["depth_lora_alpha"], target_modules=LORA_TARGETS, bias="none")
        self.vision = get_peft_model(vision, lora)
        self.vision.load_state_dict(self._sub(VLM + "vision_model."), strict=True)
        self.stem = copy.deepcopy(vision.embeddings.patch_embedding)
        self.stem.load_state_dict(self._sub("model.vlm_with_expert._depth_patch_embedding."))
        self.connector = SmolVLMConnector(vlm_config)
        self.connector.load_state_dict(self._sub(VLM + "connector."))
        self.dino = Dinov2Model(dino_config)
        dino_state = {}
        for key, value in self._sub("model.dino.").items():
            for new, old in NEW_TO_OLD_DINO.items():
                key = key.replace(old, new)
            dino_state[key] = value
        self.dino.load_state_dict(dino_state)
        dtype = state[VLM + "text_model.embed_tokens.weight"].dtype
        for module in (self.vision, self.stem, self.connector, self.dino):
            module.to(dtype).eval()
        for name, parameter in self.vision.named_parameters():
            if "lora_" in name:
                parameter.data = state[VLM + "vision_model." + name]  # the LoRA keeps its own dtype

    def _sub(self, prefix: str) -> dict:
        return {key[len(prefix):]: value for key, value in self.s.items() if key.startswith(prefix)}

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        weight = self.s[name + ".weight"]
        return F.linear(x.to(weight.dtype), weight, self.s.get(name + ".bias"))

    # ------------------------------------------------------------------------------------------------ prefix
    def embed_image(self, image: torch.Tensor, depth: bool) -> torch.Tensor:
        base = self.vision.base_model.model
        original = base.embeddings.patch_embedding
        if depth:
            base.embeddings.patch_embedding = self.stem
        try:
            pixels = image.to(self.stem.weight.dtype)
            if depth:
                hidden = self.vision(pixel_values=pixels, patch_attention_mask=None).last_hidden_state
            else:
                with self.vision.disable_adapter():
                    hidden = self.vision(pixel_values=pixels, patch_attention_mask=None).last_hidden_state
        finally:
            base.embeddings.patch_embedding = original
        return self.connector(hidden)

    def embed_prefix(self, batch: dict):
        images = [(batch["observation.images.cam_front"] * 2 - 1, None, False)]
        if self.cfg["use_depth"] and "observation.images.cam_front_depth" in batch:
            images.append((batch["observation.images.cam_front_depth"] * 2 - 1,
                           batch.get("observation.images.cam_front_depth_padding_mask"), True))
        embs, pads = [], []
        for image, mask, depth in images:
            emb = self.embed_image(image, depth)
            emb = emb * torch.tensor(emb.shape[-1] ** 0.5, dtype=emb.dtype)
            mask = torch.ones(image.shape[0], dtype=torch.bool) if mask is None else mask.bool()
            embs.append(emb)
            pads.append(mask[:, None].expand(-1, emb.shape[1]))
        lang = self.s[VLM + "text_model.embed_tokens.weight"][batch["observation.language.tokens"]]
        embs.append(lang * math.sqrt(lang.shape[-1]))
        pads.append(batch["observation.language.attention_mask"].bool())
        pad = torch.cat(pads, dim=1)
        return torch.cat(embs, dim=1), pad, torch.zeros_like(pad)

    # ------------------------------------------------------------------------------------------------ suffix
    def dino_features(self, batch: dict) -> torch.Tensor:
        rgb = batch["observation.images.cam_front"] * 2 - 1
        x = (rgb + 1.0) * 0.5
        x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        size = self.cfg["dino_input_size"]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        with torch.no_grad():
            out = self.dino(pixel_values=x.to(self.dino.dtype)).last_hidden_state[:, self.cfg["dino_num_prefix_tokens"]:]
        grid = size // self.dino.config.patch_size
        fmap = out.transpose(1, 2).reshape(x.shape[0], -1, grid, grid)
        uv = batch["current_kp"][..., :2]
        sampled = F.grid_sample(fmap, uv.view(x.shape[0], 1, -1, 2).to(fmap.dtype), mode="bilinear", align_corners=False)
        return sampled.squeeze(-2).transpose(1, 2) * batch["key_pad_mask"].to(sampled.dtype)[..., None]

    def embed_suffix(self, history, x_future, uv, key_pad, dino, mask_all_history):
        b, n = history.shape[:2]
        x = torch.cat([self._linear("model.trace_in_proj_history", history.reshape(b, n, 1, -1)),
                       self._linear("model.trace_in_proj_future", x_future.reshape(b, n, 1, -1))], dim=2)
        x = x + self.s["model.trace_time_embedding.weight"][torch.arange(2)]
        x = x + self.s["model.trace_seg_embedding.weight"][torch.tensor([0, 1])]
        freqs = 2.0 ** torch.arange(self.cfg["trace_uv_num_freqs"], dtype=uv.dtype) * math.pi
        proj = uv[..., None] * freqs
        features = torch.cat([proj.sin(), proj.cos()], dim=-1).flatten(-2)
        pos = self._linear("model.trace_uv_pos_mlp.2", F.silu(self._linear("model.trace_uv_pos_mlp.0", features)))
        x = x + (pos * key_pad.to(pos.dtype)[..., None])[:, :, None, :]
        if dino is not None:
            fused = torch.cat([x, dino[:, :, None, :].expand(-1, -1, 2, -1).to(x.dtype)], dim=-1)
            x = self._linear("model.trace_dino_fuse_out", F.silu(self._linear("model.trace_dino_fuse_in", fused)))
        x = x.reshape(b, 2 * n, -1)
        pad = key_pad[:, :, None].expand(b, n, 2).reshape(b, 2 * n)
        if mask_all_history:
            pad = pad & ~torch.tensor([True, False]).repeat(n)[None]
        att = torch.zeros(2 * n, dtype=x.dtype)
        att[0] = 1
        return x, pad, att[None].expand(b, -1)

    @staticmethod
    def causal_groups(mask: torch.Tensor, n: int) -> torch.Tensor:
        group = torch.arange(2 * n) % 2  # 0 = history, 1 = future (after all history)
        return mask & (group[None, :] <= group[:, None])[None]

    def adaln(self, time: torch.Tensor) -> torch.Tensor:
        emb = sinusoid(time, self.cfg["trace_adaln_freq_embed_size"], self.cfg["min_period"], self.cfg["max_period"])
        emb = emb.to(self.s["model.trace_timestep_embedder.mlp.0.weight"].dtype)
        cond = self._linear("model.trace_timestep_embedder.mlp.2", F.silu(self._linear("model.trace_timestep_embedder.mlp.0", emb)))
        per_layer = torch.stack([self._linear(f"model.trace_adaln_modulation.{i}.1", F.silu(cond))
                                 for i in range(self.num_layers)], dim=1)
        return per_layer.reshape(per_layer.shape[0], self.num_layers, 6, -1)

    # ---------------------------------------------------------------------------------------------- layers
    def attention(self, mask, q, k, v):
        heads, kv_heads, head_dim = self.text.num_attention_heads, self.text.num_key_value_heads, self.text.head_dim
        groups = heads // kv_heads
        b, length = k.shape[:2]
        k = k[:, :, :, None, :].expand(b, length, kv_heads, groups, head_dim).reshape(b, length, heads, head_dim)
        v = v[:, :, :, None, :].expand(b, length, kv_heads, groups, head_dim).reshape(b, length, heads, head_dim)
        weights = torch.matmul(q.float().transpose(1, 2), k.float().transpose(1, 2).transpose(2, 3)) * head_dim**-0.5
        weights = torch.where(mask[:, None], weights.float(), torch.finfo(torch.float32).min)
        probs = F.softmax(weights, dim=-1).to(v.dtype)
        return torch.matmul(probs, v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3).reshape(b, -1, heads * head_dim)

    def _names(self, stream: int, layer: int) -> str:
        return f"{VLM}text_model.layers.{layer}." if stream == 0 else f"{EXPERT}layers.{layer}."

    def _qkv(self, stream, layer, x, mod):
        name = self._names(stream, layer)
        h = rms_norm(x, self.s[name + "input_layernorm.weight"], self.text.rms_norm_eps)
        if mod is not None:
            h = h * (1 + mod[:, 1:2]) + mod[:, 0:1]
        shape = (*h.shape[:-1], -1, self.text.head_dim)
        return (self._linear(name + "self_attn.q_proj", h).view(shape), self._linear(name + "self_attn.k_proj", h).view(shape),
                self._linear(name + "self_attn.v_proj", h).view(shape))

    def _finish(self, stream, layer, x, attended, mod):
        name = self._names(stream, layer)
        out = self._linear(name + "self_attn.o_proj", attended)
        if mod is not None:
            out = mod[:, 2:3] * out
        out = out + x
        residual = out
        out = rms_norm(out, self.s[name + "post_attention_layernorm.weight"], self.text.rms_norm_eps)
        if mod is not None:
            out = out * (1 + mod[:, 4:5]) + mod[:, 3:4]
        out = self._linear(name + "mlp.down_proj", F.silu(self._linear(name + "mlp.gate_proj", out)) * self._linear(name + "mlp.up_proj", out))
        if mod is not None:
            out = mod[:, 5:6] * out
        return out + residual

    def run_layers(self, embeds, mask, positions, cache=None, fill=False, modulation=None):
        """The joint VLM + expert stack; `embeds` = [prefix or None, suffix or None] as in the released forward."""
        cache = {} if cache is None else cache
        for layer in range(self.num_layers):
            mod = None if modulation is None else modulation[:, layer]
            joint = fill or layer % self.cfg["self_attn_every_n_layers"] == 0
            if joint:
                qs, ks, vs = [], [], []
                for stream, x in enumerate(embeds):
                    if x is not None:
                        q, k, v = self._qkv(stream, layer, x, mod if stream == 1 else None)
                        qs.append(q), ks.append(k), vs.append(v)
                q, k, v = torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1)
                q, k = apply_rope(q, positions[:, : q.shape[1]]), apply_rope(k, positions[:, : q.shape[1]])
                if fill:
                    cache[layer] = (k, v)
                elif embeds[0] is None:
                    k, v = torch.cat([cache[layer][0], k], 1), torch.cat([cache[layer][1], v], 1)
                attended = self.attention(mask[:, : q.shape[1]] if fill else mask, q, k, v)
                outputs, start = [], 0
                for stream, x in enumerate(embeds):
                    if x is None:
                        outputs.append(None)
                        continue
                    outputs.append(self._finish(stream, layer, x, attended[:, start:start + x.shape[1]], mod if stream == 1 else None))
                    start += x.shape[1]
            else:
                prefix, suffix = embeds
                if prefix is not None:
                    length = prefix.shape[1]
                    q, k, v = self._qkv(0, layer, prefix, None)
                    k = apply_rope(k, positions[:, :length])
                    prefix = self._finish(0, layer, prefix, self.attention(mask[:, :length, :length], apply_rope(q, positions[:, :length]), k, v), None)
                    expert_positions = positions[:, length:]
                else:
                    k, v = cache[layer]
                    expert_positions = positions
                name = self._names(1, layer)
                h = rms_norm(suffix, self.s[name + "input_layernorm.weight"], self.text.rms_norm_eps)
                h = h * (1 + mod[:, 1:2]) + mod[:, 0:1]
                q = self._linear(name + "self_attn.q_proj", h).view(*h.shape[:-1], -1, self.text.head_dim)
                ek = self._linear(name + "self_attn.k_proj", k.reshape(*k.shape[:2], -1)).view(*k.shape[:2], -1, self.text.head_dim)
                ev = self._linear(name + "self_attn.v_proj", v.reshape(*v.shape[:2], -1)).view(*v.shape[:2], -1, self.text.head_dim)
                expert_positions = expert_positions - expert_positions.min(dim=1, keepdim=True).values
                attended = self.attention(mask[:, -suffix.shape[1]:, : ek.shape[1]], apply_rope(q, expert_positions), ek, ev)
                outputs = [prefix, self._finish(1, layer, suffix, attended, mod)]
            embeds = outputs
        suffix = embeds[1]
        return (None if suffix is None else rms_norm(suffix, self.s[EXPERT + "norm.weight"], self.text.rms_norm_eps)), cache

    def heads(self, suffix_out: torch.Tensor, n: int):
        future = suffix_out[:, -2 * n:].float().reshape(suffix_out.shape[0], n, 2, -1)[:, :, -1:]
        velocity = self._linear("model.trace_out_proj_future", future).reshape(suffix_out.shape[0], n, -1, 3)
        return velocity, self._linear("model.trace_done_proj_bsp", future.mean(dim=2))

    # -------------------------------------------------------------------------------------------- entry points
    @torch.no_grad()
    def sample_traces(self, batch: dict, noise: torch.Tensor, num_steps: int = 4, mask_all_history: bool = False) -> dict:
        history, key_pad, uv = batch["traj_history"], batch["key_pad_mask"].bool(), batch["current_kp"][..., :2]
        prefix, prefix_pad, prefix_att = self.embed_prefix(batch)
        _, cache = self.run_layers([prefix, None], make_att_2d_masks(prefix_pad, prefix_att),
                                   torch.cumsum(prefix_pad, dim=1) - 1, fill=True)
        dino = self.dino_features(batch) if self.cfg["use_dino"] else None
        dt, x, done = -1.0 / num_steps, noise, None
        n = history.shape[1]
        for step in range(num_steps):
            time = torch.tensor(1.0 + step * dt, dtype=torch.float32).expand(history.shape[0])
            suffix, pad, att = self.embed_suffix(history, x, uv, key_pad, dino, mask_all_history)
            suffix_mask = self.causal_groups(make_att_2d_masks(pad, att), n)
            mask = torch.cat([prefix_pad[:, None, :].expand(-1, suffix.shape[1], -1), suffix_mask], dim=2)
            positions = prefix_pad.sum(-1, keepdim=True).expand(-1, suffix.shape[1])
            out, _ = self.run_layers([None, suffix], mask, positions, cache=copy.deepcopy(cache), modulation=self.adaln(time))
            velocity, done = self.heads(out, n)
            x = x + dt * velocity
        basis = bspline_basis(self.cfg["trace_bspline_n_ctrl"], (torch.arange(self.cfg["future_len"]) + 1) / self.cfg["future_len"])
        return {"traces": torch.einsum("hd,bndc->bnhc", basis, x), "done_prob": torch.sigmoid(done)}

    @torch.no_grad()
    def loss(self, batch: dict, noise: torch.Tensor, time: torch.Tensor) -> dict:
        history, key_pad, uv = batch["traj_history"], batch["key_pad_mask"].bool(), batch["current_kp"][..., :2]
        target, valid_kp = batch["ctrl_pts_future"], batch["valid_kp"]
        t = time[:, None, None, None]
        x_t = t * noise + (1 - t) * target
        u_t = noise - target
        prefix, prefix_pad, prefix_att = self.embed_prefix(batch)
        dino = self.dino_features(batch) if self.cfg["use_dino"] else None
        suffix, pad, att = self.embed_suffix(history, x_t, uv, key_pad, dino, False)
        n, length = history.shape[1], prefix.shape[1]
        mask = make_att_2d_masks(torch.cat([prefix_pad, pad], 1), torch.cat([prefix_att, att], 1)).clone()
        mask[:, length:, length:] = self.causal_groups(mask[:, length:, length:], n)
        positions = torch.cat([torch.cumsum(prefix_pad, 1) - 1, prefix_pad.sum(1, keepdim=True).expand(-1, 2 * n)], 1)
        out, _ = self.run_layers([prefix, suffix], mask, positions, modulation=self.adaln(time))
        velocity, done_logits = self.heads(out, n)
        loss_mask = (valid_kp[:, :, None, None] & key_pad[:, :, None, None]).float()
        fm = ((u_t - velocity) ** 2 * loss_mask).sum() / loss_mask.sum().clamp_min(1.0)
        clean = x_t - t * velocity
        rigid = []
        for b in range(clean.shape[0]):
            m = valid_kp[b] & key_pad[b]
            ids, points = batch["cluster_ids"][b][m], clean[b][m]
            points, ids = points[ids >= 0], ids[ids >= 0]
            for cluster in torch.unique(ids):
                chosen = points[ids == cluster]
                if chosen.shape[0] < 2:
                    continue
                iu, ju = torch.triu_indices(chosen.shape[0], chosen.shape[0], offset=1)
                rigid.append((chosen[iu] - chosen[ju]).norm(dim=-1).var(dim=-1, unbiased=False).mean())
        rigidity = torch.stack(rigid).mean() if rigid else clean.new_zeros(())
        done_mask = key_pad[:, :, None].expand_as(done_logits).float()
        bce = F.binary_cross_entropy_with_logits(done_logits, batch["valid_future"].float(), reduction="none")
        done = (bce * done_mask).sum() / done_mask.sum().clamp_min(1.0)
        total = fm + self.cfg["rigidity_loss_weight"] * rigidity + self.cfg["done_loss_weight"] * done
        return {"loss": total, "fm": fm, "rigidity": rigidity, "done": done, "velocity": velocity, "done_logits": done_logits}
