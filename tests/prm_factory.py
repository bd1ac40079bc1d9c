"""Tiny randomly initialised process reward models of each family, saved as Hugging Face dirs.

The reward worker loads them through the same `from_pretrained(dir)` path as a real PRM, so tests
exercise tokenizing, chat templates, separator bookkeeping and the KV cache on real architectures.
A character tokenizer keeps every forward pass small. `init_std` is large so rewards spread over
(0, 1) and differ from step to step: an exactness test on rewards that all sit near 0.5 would pass
whatever the cache did.

| kind            | model class                                | stands for                 |
|-----------------|--------------------------------------------|----------------------------|
| qwen_prm_llama  | LlamaForTokenClassification, 2 labels      | a Qwen2.5-Math-PRM head    |
| qwen_prm_qwen2  | Qwen2ForTokenClassification, 2 labels      | the same on Qwen2          |
| qwen_prm_custom | custom code (`auto_map`), Qwen2 + MLP head | Qwen2.5-Math-PRM-7B itself |
| math_shepherd   | LlamaForCausalLM, vocab has "ки", "+", "-" | Math-Shepherd              |
| outcome_1       | LlamaForSequenceClassification, 1 label    | a scalar outcome RM        |
| outcome_2       | Qwen2ForSequenceClassification, 2 labels   | a good/bad outcome RM      |
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForSequenceClassification,
    Qwen2ForTokenClassification,
)

from lodestar.evaluation.prm_engine_bench import QWEN_PRM_MODELING
from lodestar.training.char_tokenizer import DEFAULT_ALPHABET, build_char_tokenizer

# ChatML, as Qwen's tokenizers render it: the assistant turn ends with "<|im_end|>\n", which the
# worker must never need (it sits after the last separator).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
QWEN_SEPARATOR = "<extra_0>"
SHEPHERD_TAG = "ки"
"""Math-Shepherd's step tag is " ки"; the word "ки" is one token of its (Mistral) vocabulary."""

KINDS = {
    "qwen_prm_llama": "qwen_prm",
    "qwen_prm_qwen2": "qwen_prm",
    "qwen_prm_custom": "qwen_prm",
    "math_shepherd": "math_shepherd",
    "outcome_1": "outcome",
    "outcome_2": "outcome",
}
"""Factory kind -> the `PRMConfig.family` that scores it."""

# Custom modeling code in the shape of Qwen2.5-Math-PRM-7B's `modeling_qwen2_rm.py` (a Qwen2
# backbone, a two-layer MLP `score` head, loaded through `auto_map` with trust_remote_code): the
# bench's, whose tensor names vLLM's qwen2_rm.py loads too. It returns a plain tuple, so the
# worker's "first output" path is exercised.
CUSTOM_MODELING = QWEN_PRM_MODELING


def save_tiny_prm(
    path: str | Path,
    kind: str,
    *,
    chat: bool = False,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    init_std: float = 0.2,
) -> Path:
    """Save a random PRM of factory `kind` (see the module table) and its char tokenizer.

    `chat` adds a ChatML template and its marker tokens (ignored for math_shepherd, whose input is
    plain text).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown PRM kind {kind!r}; expected one of {sorted(KINDS)}")
    path = Path(path)
    family = KINDS[kind]
    extra: tuple[str, ...] = {
        "qwen_prm": (QWEN_SEPARATOR,),
        "math_shepherd": (SHEPHERD_TAG,),
        "outcome": (),
    }[family]
    chat = chat and family != "math_shepherd"
    tokenizer = build_char_tokenizer(
        DEFAULT_ALPHABET,
        extra_special_tokens=extra + (CHAT_TOKENS if chat else ()),
        chat_template=CHAT_TEMPLATE if chat else None,
    )
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model: PreTrainedModel
    if kind == "qwen_prm_llama":
        model = LlamaForTokenClassification(LlamaConfig(num_labels=2, **common))
    elif kind == "qwen_prm_qwen2":
        model = Qwen2ForTokenClassification(Qwen2Config(num_labels=2, **common))
    elif kind == "qwen_prm_custom":
        model = _custom_prm(Qwen2Config(**common), path)
    elif kind == "math_shepherd":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "outcome_1":
        model = LlamaForSequenceClassification(LlamaConfig(num_labels=1, **common))
    else:
        model = Qwen2ForSequenceClassification(Qwen2Config(num_labels=2, **common))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if kind == "qwen_prm_custom":
        _declare_custom_code(path)
    return path


def _custom_prm(config: Qwen2Config, path: Path) -> PreTrainedModel:
    """Instantiate the custom class from its source, as transformers will when loading it."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "modeling_tiny_prm.py").write_text(CUSTOM_MODELING)
    scope: dict[str, object] = {}
    exec(compile(CUSTOM_MODELING, str(path / "modeling_tiny_prm.py"), "exec"), scope)
    return scope["QwenProcessRewardModel"](config)  # type: ignore[operator]


def _declare_custom_code(path: Path) -> None:
    """Point `auto_map` at the modeling file, as Qwen2.5-Math-PRM-7B's config.json does."""
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["architectures"] = ["QwenProcessRewardModel"]
    config["auto_map"] = {"AutoModel": "modeling_tiny_prm.QwenProcessRewardModel"}
    config_file.write_text(json.dumps(config, indent=2))
