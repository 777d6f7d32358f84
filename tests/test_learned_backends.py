"""Learned TraceExtract backends with tiny random (or hand-set) models: DINOv2 entity keypoints and VLM captions."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BitImageProcessorPil,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import BaseModelOutput

from mu0.dataset_builders.captions import STYLES
from mu0.dataset_builders.learned_backends import bipartite_merge, dino_keypoints, merge_centroids, vlm_captions
from mu0.dataset_builders.procedural import generate_episode
from mu0.processing.character_tokenizer import CHARACTERS, SPECIAL_TOKENS

IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
EVENTS = [(0, 6), (6, 10), (10, 17), (17, 20), (20, 24)]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %} Answer: {% endif %}"
)


# ---------------------------------------------------------------------------------------------------------- DINOv2


@pytest.fixture(scope="module")
def episode_frames():
    return generate_episode(seed=3, num_frames=24, image_size=64).frames


@pytest.fixture(scope="module")
def tiny_dino():
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=112
    )
    processor = BitImageProcessorPil(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}, **IMAGENET)
    return Dinov2Model(config).eval(), processor


class MeanColourDino(torch.nn.Module):
    """A DINOv2 stand-in whose patch feature is the patch's mean normalised colour (after a CLS token), so entities
    are colour regions and the patch-to-pixel geometry can be checked exactly."""

    def __init__(self, patch_size: int = 14, image_size: int = 56):
        super().__init__()
        self.config = Dinov2Config(patch_size=patch_size, image_size=image_size)
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, pixel_values):
        patches = torch.nn.functional.avg_pool2d(pixel_values, self.config.patch_size).flatten(2).transpose(1, 2)
        return BaseModelOutput(last_hidden_state=torch.cat([torch.zeros_like(patches[:, :1]), patches], dim=1))


def test_dino_keypoints_structure_and_determinism(episode_frames, tiny_dino):
    model, processor = tiny_dino
    kwargs = dict(count_per_entity=8, model=model, image_processor=processor, frame_stride=6)
    points, cluster_ids = dino_keypoints(episode_frames, rng=np.random.default_rng(7), **kwargs)
    height, width = episode_frames.shape[1:3]
    assert points.dtype == np.float32 and cluster_ids.dtype == np.int64
    assert points.shape == (len(cluster_ids), 2) and len(cluster_ids) >= 8
    assert (points >= 0).all() and (points[:, 0] <= width - 1).all() and (points[:, 1] <= height - 1).all()
    labels, counts = np.unique(cluster_ids, return_counts=True)
    np.testing.assert_array_equal(labels, np.arange(len(labels)))
    assert (counts == 8).all()
    for label in labels:  # k-means representatives are distinct pixels of a large entity
        assert len(np.unique(points[cluster_ids == label], axis=0)) == 8
    again_points, again_ids = dino_keypoints(episode_frames, rng=np.random.default_rng(7), **kwargs)
    np.testing.assert_array_equal(points, again_points)
    np.testing.assert_array_equal(cluster_ids, again_ids)


def test_dino_keypoints_lie_on_their_entity():
    """Left 36 px red, right 48 px blue on a 48x84 frame (a 4x7 grid of 12 px patches): exactly two entities, each
    with its points on its own colour."""
    frame = np.zeros((48, 84, 3), dtype=np.uint8)
    frame[:, :36] = (220, 30, 30)
    frame[:, 36:] = (30, 30, 220)
    frames = np.repeat(frame[None], 3, axis=0)
    processor = BitImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, **IMAGENET)
    points, cluster_ids = dino_keypoints(
        frames, count_per_entity=16, model=MeanColourDino(), image_processor=processor, frame_stride=1,
        rng=np.random.default_rng(0),
    )
    np.testing.assert_array_equal(cluster_ids, np.repeat([0, 1], 16))
    assert (points[:16, 0] < 36).all() and (points[16:, 0] >= 36).all()
    colours = frame[points[:, 1].astype(int), points[:, 0].astype(int)]
    np.testing.assert_array_equal(colours[:16], np.tile([220, 30, 30], (16, 1)))
    assert points[:16, 0].max() - points[:16, 0].min() > 20  # spread over the entity, not clumped
    np.testing.assert_array_equal(points, np.round(points))  # representatives are pixel centres


def test_bipartite_merge_two_groups():
    """A left and a right half of identical vectors: raster-order alternation would stall after one round (all
    remaining left parts in set A); feature-ordered alternation must end with exactly the two groups."""
    rng = np.random.default_rng(0)
    group = np.tile(np.arange(4) >= 2, 4).astype(int)  # 4x4 grid, columns 0-1 vs 2-3
    vectors = rng.normal(size=(2, 16))
    labels = bipartite_merge(vectors[group], threshold=0.2)
    np.testing.assert_array_equal(labels, group)
    noisy = vectors[group] + 0.01 * rng.normal(size=(16, 16))
    np.testing.assert_array_equal(bipartite_merge(noisy, threshold=0.2), group)
    np.testing.assert_array_equal(bipartite_merge(noisy, threshold=0.0), np.arange(16))  # nothing within distance 0


def test_merge_centroids_joins_close_entities_across_frames():
    base = np.eye(4)
    sums = np.stack([base[0], base[1], base[0] * 3 + 0.05 * base[2], base[2] + base[3]])
    labels = merge_centroids(sums, np.array([1, 1, 3, 2]), threshold=0.2)
    np.testing.assert_array_equal(labels, [0, 1, 0, 2])
    np.testing.assert_array_equal(merge_centroids(sums, np.ones(4), threshold=1.1), [0, 0, 0, 0])


# ------------------------------------------------------------------------------------------------------------ VLM


def build_llava(seed: int = 0, chat_template: str | None = CHAT_TEMPLATE):
    """A tiny random LLaVA (CLIP vision tower, Llama text model) and its processor, built offline with a
    character-level tokenizer plus the `<image>` special token."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", extra_special_tokens={"image_token": "<image>"}
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=chat_template,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
            patch_size=14, projection_dim=16,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None, eos_token_id=None,  # Llama's defaults (1, 2) are "<unk>" and "a" here
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval(), processor


def force_cycle(model, tokenizer, cycle: str):
    """Make greedy decoding repeat `cycle` (e.g. "a " -> "a a a ..."): the layers' outputs are zeroed, so the last
    hidden state is the last token's embedding, and the head maps each token of the cycle to its successor."""
    language_model = model.model.language_model
    ids = tokenizer.convert_tokens_to_ids(list(cycle))
    with torch.no_grad():
        for layer in language_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = language_model.embed_tokens.weight
        embeddings.zero_()
        embeddings[:, 0] = 1.0  # any other last token: predict the cycle's first
        model.lm_head.weight.zero_()
        model.lm_head.weight[ids[0], 0] = 1.0
        for position, token in enumerate(ids):
            embeddings[token] = 0.0
            embeddings[token, position + 1] = 1.0
            model.lm_head.weight[ids[(position + 1) % len(ids)], position + 1] = 10.0
    return model


def expected_counts(num_chunks: int) -> dict[str, int]:
    return {
        "chunk": 3 * num_chunks,
        "pair": 3 * max(num_chunks - 1, 0),
        "triple": 3 * max(num_chunks - 2, 0),
        "segment": 3 if num_chunks > 3 else 0,
    }


@pytest.mark.parametrize("chat_template", [CHAT_TEMPLATE, None], ids=["chat-template", "image-token-prompt"])
def test_vlm_captions_structure(episode_frames, chat_template):
    model, processor = build_llava(chat_template=chat_template)
    captions = vlm_captions(EVENTS, episode_frames, model=model, processor=processor, max_new_tokens=4)
    levels = [caption.level for caption in captions]
    assert {level: levels.count(level) for level in expected_counts(5)} == expected_counts(5)
    chunk_captions = captions[:15]
    for index, (start, end) in enumerate(EVENTS):
        triple = chunk_captions[3 * index : 3 * index + 3]
        assert [caption.style for caption in triple] == list(STYLES)
        assert all((caption.level, caption.start, caption.end) == ("chunk", start, end) for caption in triple)
        assert all(caption.text and caption.text == " ".join(caption.text.split()) for caption in triple)
    ranges = {(caption.level, caption.start, caption.end) for caption in captions}
    assert ("pair", 0, 10) in ranges and ("triple", 6, 20) in ranges and ("segment", 0, 24) in ranges
    for caption in captions[15:]:
        assert caption.start in {start for start, _ in EVENTS} and caption.end in {end for _, end in EVENTS}


def test_vlm_captions_word_limits(episode_frames):
    """A model forced to write "a a a ..." (32 words in 64 tokens): imperative cut to 30, casual to 20 words."""
    model, processor = build_llava()
    force_cycle(model, processor.tokenizer, "a ")
    captions = vlm_captions(EVENTS[:1], episode_frames, model=model, processor=processor, max_new_tokens=64)
    words = {caption.style: len(caption.text.split()) for caption in captions if caption.level == "chunk"}
    assert words == {"descriptive": 32, "imperative": 30, "casual": 20}
    assert [caption.level for caption in captions] == ["chunk"] * 3


def test_vlm_captions_rejects_textless_output(episode_frames):
    model, processor = build_llava()
    force_cycle(model, processor.tokenizer, ".")
    with pytest.raises(ValueError, match="no usable descriptive caption for chunk \\(0, 6\\)"):
        vlm_captions(EVENTS, episode_frames, model=model, processor=processor, max_new_tokens=5)


# --------------------------------------------------------------------------------------------------------- errors


def test_missing_checkpoints_are_named(episode_frames, tiny_dino):
    with pytest.raises(OSError, match="mu0-tests/no-such-dinov2"):
        dino_keypoints(episode_frames, model_name_or_path="mu0-tests/no-such-dinov2")
    with pytest.raises(OSError, match="mu0-tests/no-such-dinov2"):  # a given model still needs its image processor
        dino_keypoints(episode_frames, model=tiny_dino[0], model_name_or_path="mu0-tests/no-such-dinov2")
    with pytest.raises(OSError, match="mu0-tests/no-such-vlm"):
        vlm_captions(EVENTS, episode_frames, model_name_or_path="mu0-tests/no-such-vlm")
    with pytest.raises(ValueError, match="model_name_or_path"):
        vlm_captions(EVENTS, episode_frames, model=build_llava()[0])


def test_invalid_inputs_raise(episode_frames, tiny_dino):
    model, processor = tiny_dino
    empty = np.zeros((0, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="empty"):
        dino_keypoints(empty, model=model, image_processor=processor)
    with pytest.raises(ValueError, match="empty"):
        vlm_captions([], empty, *build_llava())
    with pytest.raises(ValueError, match="uint8"):
        dino_keypoints(episode_frames.astype(np.float32), model=model, image_processor=processor)
    with pytest.raises(ValueError, match="count_per_entity"):
        dino_keypoints(episode_frames, count_per_entity=0, model=model, image_processor=processor)
    with pytest.raises(ValueError, match="merge_threshold"):
        dino_keypoints(episode_frames, merge_threshold=-0.1, model=model, image_processor=processor)
    with pytest.raises(ValueError, match=r"\(20, 30\)"):
        vlm_captions([(0, 10), (20, 30)], episode_frames, *build_llava())
    with pytest.raises(ValueError, match="non-empty"):
        bipartite_merge(np.zeros((0, 4)))


def test_vlm_captions_run_inside_extraction_from_a_saved_checkpoint(tmp_path):
    from mu0.dataset_builders.extraction import ExtractionSettings, extract_episode
    from mu0.dataset_builders.sources import load_procedural, procedural_refs

    model, processor = build_llava()
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    raw = load_procedural(procedural_refs(1)[0], num_frames=20, image_size=64)
    episode = extract_episode(raw, ExtractionSettings(captions="vlm", caption_model=str(tmp_path / "vlm")))
    assert episode.metadata["backends"]["captions"] == "vlm"
    chunk_captions = [c for c in episode.captions if c["level"] == "chunk"]
    assert len(chunk_captions) == 3 * len(episode.events)
    assert {c["style"] for c in chunk_captions} == {"descriptive", "imperative", "casual"}
    with pytest.raises(ValueError, match="caption_model"):
        ExtractionSettings(captions="vlm")
    with pytest.raises(OSError, match="no-such-vlm"):
        extract_episode(raw, ExtractionSettings(captions="vlm", caption_model=str(tmp_path / "no-such-vlm")))


def test_missing_learned_checkpoints_fail_before_the_build_starts(tmp_path):
    """A build whose depth checkpoint is neither a folder nor cached (offline) raises when the builder is made,
    naming the setting and the fix, before any episode is touched; a saved local folder passes the check."""
    from mu0.dataset_builders.checkpoints import require_checkpoints
    from mu0.dataset_builders.extraction import ExtractionSettings
    from mu0.dataset_builders.trace_extract import TraceExtract

    settings = {"depth": "depth_anything", "camera": "static", "keypoints": "grid", "tracker": "lk",
                "depth_model": "nobody/no-such-depth-model"}
    with pytest.raises(OSError, match=r"depth_model='nobody/no-such-depth-model'.*hf download"):
        TraceExtract(config_name="samples", cache_dir=str(tmp_path / "cache"), work_dir=str(tmp_path / "work"),
                     source="procedural", num_episodes=1, settings=settings)
    assert not (tmp_path / "work").exists()
    with pytest.raises(OSError, match=r"dino_model=.*caption_model="):
        require_checkpoints(ExtractionSettings(keypoints="dino", captions="vlm", tracker="lk",
                                               dino_model=str(tmp_path / "no-dino"), caption_model=str(tmp_path / "no-vlm")))
    model, processor = build_llava()
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    require_checkpoints(ExtractionSettings(captions="vlm", caption_model=str(tmp_path / "vlm")))


def test_missing_cotracker_files_fail_before_the_build_starts(tmp_path):
    from mu0.dataset_builders.checkpoints import require_checkpoints
    from mu0.dataset_builders.extraction import ExtractionSettings

    (tmp_path / "co-tracker").mkdir()
    (tmp_path / "co-tracker" / "hubconf.py").write_text("dependencies = []\n")
    settings = dict(keypoints="grid", tracker="cotracker", cotracker_repo=str(tmp_path / "co-tracker"))
    with pytest.raises(FileNotFoundError, match="scaled_offline.pth"):
        require_checkpoints(ExtractionSettings(**settings, cotracker_checkpoint=str(tmp_path / "missing.pth")))
    with pytest.raises(FileNotFoundError, match="git clone"):
        require_checkpoints(ExtractionSettings(**{**settings, "cotracker_repo": str(tmp_path / "elsewhere")},
                                               cotracker_checkpoint=str(tmp_path / "missing.pth")))
