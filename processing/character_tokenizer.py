"""A self-contained character-level tokenizer for tiny and offline μ0 models.

Real checkpoints use their backbone's tokenizer (`AutoTokenizer.from_pretrained(config.backbone_checkpoint)`); this
one needs no download, so the embedded demo, tests and benchmarks can build a complete processor anywhere.
"""

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>")
CHARACTERS = string.ascii_letters + string.digits + string.punctuation + " \n"


def build_character_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (vocabulary of 98 entries, `<pad>` = 0)."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", padding_side="right")


__all__ = ["build_character_tokenizer"]
