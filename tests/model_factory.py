"""Tiny randomly initialised causal LMs saved as ordinary Hugging Face directories.

The policy worker loads them through the same `from_pretrained(dir)` path as a real model, so tests
exercise loading, tokenizing, chat templates and the KV cache on real architectures in well under a
second each. A character tokenizer keeps the vocabulary (and so every forward pass) small.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lodestar.training.char_tokenizer import build_char_tokenizer

# A ChatML-style template: enough structure (roles, special-looking markers, a generation prompt)
# to show that the worker renders it and continues the assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

SMALL_ALPHABET = "0123456789+-*=() \nabcxyz"
"""Few symbols, so a random model stops on EOS or a delimiter within a few dozen tokens."""

ARCHITECTURES = ("llama", "qwen2", "gpt2")


def save_tiny_model(
    path: str | Path,
    arch: str = "llama",
    *,
    chat: bool = False,
    alphabet: str = SMALL_ALPHABET,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    init_std: float = 0.2,
) -> Path:
    """Save a random `arch` causal LM and its char tokenizer (with or without a chat template).

    `init_std` is larger than the usual 0.02 so next-token distributions are peaked rather than
    uniform, as a trained model's are: greedy decoding then has clear winners.
    """
    path = Path(path)
    tokenizer = build_char_tokenizer(
        alphabet,
        extra_special_tokens=("<|user|>", "<|assistant|>", "<|system|>") if chat else (),
        chat_template=CHAT_TEMPLATE if chat else None,
    )
    vocab = len(tokenizer)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model: PreTrainedModel
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            initializer_range=init_std,
            **ids,
        )
        model = LlamaForCausalLM(config)
    elif arch == "qwen2":
        config = Qwen2Config(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            initializer_range=init_std,
            tie_word_embeddings=True,
            **ids,
        )
        model = Qwen2ForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=512,
            initializer_range=init_std,
            **ids,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
