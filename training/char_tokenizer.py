"""A character-level tokenizer saved as an ordinary `tokenizer.json`.

The shipped models and the tests' tiny models use it. Workers load it through the same
`workers.loading.load_tokenizer` as a real model's tokenizer (which reads `tokenizer.json` as
written: transformers would swap in its own class for some model types, e.g. qwen2).
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
DEFAULT_ALPHABET = (
    string.digits + "+-*/()=., \n\\{}[]:?" + string.ascii_letters + "_^<>|;!'\"#%&@~`$"
)


def build_char_tokenizer(
    alphabet: str = DEFAULT_ALPHABET,
    extra_special_tokens: tuple[str, ...] = (),
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """One token per character of `alphabet`, plus pad/bos/eos/unk and any extra special tokens.

    Extra special tokens (a PRM's step separator, say) are matched whole before the split into
    characters.
    """
    specials = [PAD, BOS, EOS, UNK, *extra_special_tokens]
    chars = list(dict.fromkeys(alphabet))
    vocab = {tok: i for i, tok in enumerate([*specials, *chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(extra_special_tokens) or None,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
