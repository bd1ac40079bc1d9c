"""Load a tokenizer and a causal LM from a local Hugging Face directory, on the best device here.

Nothing is fetched at run time (`local_files_only=True`): a model is a directory that was put on
the machine beforehand. CUDA when available, else CPU; bf16 on the GPU and fp32 on the CPU unless
told otherwise (fp32 keeps CPU tests exact; bf16 halves GPU memory and KV-cache size).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_GENERIC_TOKENIZERS = {"TokenizersBackend", "PreTrainedTokenizerFast"}


class ModelLoadError(RuntimeError):
    """A model directory is missing or is not a loadable tokenizer + causal LM; names the path."""


def choose_device(device: str | torch.device | None = None) -> torch.device:
    """`device` when given, else the first CUDA device when one is available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def choose_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """`dtype` when given (torch dtype or "bf16"/"fp16"/"fp32"); else bf16 on CUDA, fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_causal_lm(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The tokenizer and the causal LM (eval mode, on `device`) saved in directory `path`."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"not a Hugging Face model directory (no config.json): {path}")
    dev = choose_device(device)
    try:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=choose_dtype(dev, dtype), local_files_only=True
        )
    except Exception as e:  # whatever a broken directory makes transformers raise
        raise ModelLoadError(f"cannot load a tokenizer and causal LM from {path}: {e}") from e
    return tokenizer, model.to(dev).eval()


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The directory's tokenizer, taking a generic `tokenizer.json` as written when it says so.

    transformers 5.23's AutoTokenizer swaps in the model family's tokenizer class for some model
    types (qwen2 among them) even when `tokenizer_config.json` names the generic class, and that
    class rebuilds the pre-tokenizer: a char tokenizer saved beside a Qwen2 model would silently
    become a byte-level BPE front end. A directory that declares the generic class gets it.
    """
    config_file = path / "tokenizer_config.json"
    declared = (
        json.loads(config_file.read_text()).get("tokenizer_class")
        if config_file.is_file()
        else None
    )
    if declared in _GENERIC_TOKENIZERS and (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
