"""Small μ0 configurations that build in seconds on a CPU, for the embedded demo, tests and benchmarks.

Same classes as the full model (SmolVLM or PaliGemma backbone, DINOv2), only narrower and shallower; their weights
are random unless trained, so they need no download.
"""

from .configuration_mu0 import Mu0Config

CHARACTER_VOCAB_SIZE = 98  # mu0.processing.build_character_tokenizer


def _smolvlm_backbone(text_hidden: int, text_layers: int, vision_hidden: int, image_size: int) -> dict:
    return {
        "model_type": "smolvlm",
        "text_config": {
            "model_type": "llama",
            "hidden_size": text_hidden,
            "intermediate_size": 2 * text_hidden,
            "num_hidden_layers": text_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": text_hidden // 4,
            "vocab_size": CHARACTER_VOCAB_SIZE,
            "max_position_embeddings": 1024,
        },
        "vision_config": {
            "model_type": "smolvlm_vision",
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "patch_size": 8,
            "image_size": image_size,
        },
        "scale_factor": 2,
        "image_token_id": CHARACTER_VOCAB_SIZE - 1,
    }


def _paligemma_backbone(text_hidden: int, text_layers: int, vision_hidden: int, image_size: int) -> dict:
    return {
        "model_type": "paligemma",
        "text_config": {
            "model_type": "gemma",
            "hidden_size": text_hidden,
            "intermediate_size": 2 * text_hidden,
            "num_hidden_layers": text_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": text_hidden // 4,
            "vocab_size": CHARACTER_VOCAB_SIZE + 1,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "patch_size": 8,
            "image_size": image_size,
            "vision_use_head": False,
        },
        "projection_dim": text_hidden,
        "image_token_id": CHARACTER_VOCAB_SIZE,
    }


BACKBONES = {"smolvlm": _smolvlm_backbone, "paligemma": _paligemma_backbone}

SIZES = {
    # text width, text layers, vision width, image side, DINO width, DINO side
    "tiny": (64, 2, 32, 64, 32, 56),
    "small": (256, 4, 64, 128, 64, 112),
}


def preset_config(size: str = "tiny", backbone: str = "smolvlm", **overrides) -> Mu0Config:
    """A randomly initialisable μ0 config: `size` in {"tiny", "small"}, `backbone` in {"smolvlm", "paligemma"}."""
    if size not in SIZES:
        raise ValueError(f"Unknown preset size {size!r}; choose from {sorted(SIZES)}.")
    if backbone not in BACKBONES:
        raise ValueError(f"Unknown preset backbone {backbone!r}; choose from {sorted(BACKBONES)}.")
    text_hidden, text_layers, vision_hidden, image_size, dino_hidden, dino_size = SIZES[size]
    settings = {
        "vlm_config": BACKBONES[backbone](text_hidden, text_layers, vision_hidden, image_size),
        "dino_config": {
            "model_type": "dinov2",
            "hidden_size": dino_hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "patch_size": 14,
            "image_size": dino_size,
        },
        "backbone_checkpoint": None,
        "dino_checkpoint": None,
        "num_vlm_layers": text_layers,
        "image_size": image_size,
        "dino_image_size": dino_size,
        "max_prompt_length": 64,
        "max_queries": 64,
    }
    settings.update(overrides)
    return Mu0Config(**settings)


__all__ = ["preset_config"]
