"""Load a tokenizer and a model from a local Hugging Face directory, on the best device here.

Nothing is fetched at run time (`local_files_only=True`): a model is a directory that was put on
the machine beforehand. CUDA when available, else CPU; bf16 on the GPU and fp32 on the CPU unless
told otherwise (fp32 keeps CPU tests exact; bf16 halves GPU memory and KV-cache size). One loader
serves the policy (a causal LM) and every PRM family (token / sequence classifiers, custom code).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

# Workers log through the service; per-load progress bars only clutter server and CLI output.
hf_logging.disable_progress_bar()

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_GENERIC_TOKENIZERS = {"TokenizersBackend", "PreTrainedTokenizerFast"}


class ModelLoadError(RuntimeError):
    """A model directory is missing, unloadable, or lacks the asked model's weights; names it."""


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
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(
    path: str | Path,
    auto_class: type = AutoModelForCausalLM,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    what: str = "causal LM",
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The tokenizer and the `auto_class` model (eval mode, on `device`) saved in directory `path`.

    `auto_class` is a transformers Auto class (AutoModelForCausalLM, ...ForTokenClassification,
    ...ForSequenceClassification, AutoModel); `what` names the model in errors. A directory that
    declares custom code (`auto_map`) loads through it when `trust_remote_code` is set, via
    AutoModel when it maps no class of its own. Any weight missing from the checkpoint is an
    error: transformers would initialise it randomly and every output would be noise (a causal LM
    loaded as a token classifier, say).
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory not found (no config.json): {path}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"not a Hugging Face model directory (no config.json): {path}")
    dev = choose_device(device)
    auto_map = json.loads((path / "config.json").read_text()).get("auto_map", {})
    if trust_remote_code and auto_map and auto_class.__name__ not in auto_map:
        auto_class = AutoModel
    try:
        tokenizer = load_tokenizer(path, trust_remote_code)
        model, info = auto_class.from_pretrained(
            path,
            dtype=choose_dtype(dev, dtype),
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    except Exception as e:  # whatever a broken directory makes transformers raise
        raise ModelLoadError(f"cannot load a tokenizer and {what} from {path}: {e}") from e
    if info["missing_keys"]:
        hint = (
            f"; it declares custom code ({auto_map}): pass trust_remote_code=True"
            if auto_map and not trust_remote_code
            else ""
        )
        raise ModelLoadError(
            f"{path} is not a {what} for {auto_class.__name__}: weights "
            f"{sorted(info['missing_keys'])} are missing from the checkpoint{hint}"
        )
    return tokenizer, model.to(dev).eval()


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
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
    return AutoTokenizer.from_pretrained(
        path, local_files_only=True, trust_remote_code=trust_remote_code
    )
