"""Build the engines a deployment asks for: one place shared by the Ray actors and the in-process
runtime, so every entry point loads models the same way. `ModelConfig.engine` names the
implementation of the worker contract (`workers.contract`); "hf" (transformers) is the one today."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lodestar.models import POLICY, PRM, shipped_model_dir
from lodestar.workers.contract import PolicyEngine, RewardEngine
from lodestar.workers.intake import ProblemIntake, ProblemLimits, context_of

PRM_CONFIG_FILE = "lodestar_prm.json"
"""Optional file in a PRM directory naming its family and tokens (fields of `PRMConfig`)."""


@dataclass(frozen=True)
class ModelConfig:
    policy: str | Path | None = None
    """Policy model directory; None: the shipped arithmetic policy."""
    reward: str | Path = "verifier"
    """"verifier" (exact step checks), "prm" (the shipped learned PRM) or a PRM directory."""
    prm_family: str | None = None
    """PRM family of a directory without a lodestar_prm.json: qwen_prm, math_shepherd, outcome."""
    device: str | None = None
    dtype: str | None = None
    cache_tokens: int = 32_768
    engine: str = "hf"
    """Which implementation serves the models: one of `ENGINES`, or "auto" (`engine_for`)."""
    max_model_len: int | None = None
    """vLLM: the longest sequence it reserves KV cache for (None: the model's context)."""
    gpu_memory_utilization: float = 0.85
    """vLLM: the share of a GPU its engine may take (weights + KV cache)."""
    tensor_parallel_size: int = 1
    """vLLM: GPUs one policy is split across (on Ray: a placement group of that many bundles,
    `worker_pool.tensor_parallel_bundles`). The HF engine runs on one device: > 1 needs "vllm"
    or "auto"."""

    def __post_init__(self) -> None:
        if self.engine != "auto" and self.engine not in ENGINES:
            known = ", ".join([*ENGINES, "auto"])
            raise ValueError(f"unknown engine {self.engine!r} (known: {known})")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1 or None, got {self.max_model_len}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.engine == "hf":
            raise ValueError(
                f"tensor_parallel_size {self.tensor_parallel_size} needs the vllm engine "
                "(the hf engine runs on one device)"
            )


def policy_dir(config: ModelConfig) -> Path:
    return Path(config.policy) if config.policy is not None else shipped_model_dir(POLICY)


def engine_for(config: ModelConfig) -> str:
    """The engine a config gets where the models load: "auto" is vLLM when it is installed and
    a real policy (not the tiny shipped one, whose steps vLLM's per-step overhead would
    dominate) runs on CUDA; the HF engine otherwise."""
    if config.engine != "auto":
        return config.engine
    from lodestar.workers.loading import choose_device
    from lodestar.workers.vllm_policy import vllm_available

    on_cuda = choose_device(config.device).type == "cuda"
    return "vllm" if config.policy is not None and on_cuda and vllm_available() else "hf"


def build_policy(config: ModelConfig) -> PolicyEngine:
    return ENGINES[engine_for(config)][0](config)


def build_reward(config: ModelConfig) -> RewardEngine:
    if str(config.reward) == "verifier":  # exact step checks: no model, the same on any engine
        from lodestar.workers.verifier import VerifierReward

        return VerifierReward()
    return ENGINES[engine_for(config)][1](config)


def hf_policy(config: ModelConfig) -> PolicyEngine:
    from lodestar.workers.policy import PolicyWorker

    path = policy_dir(config)
    return PolicyWorker.from_pretrained(
        path, device=config.device, dtype=config.dtype, cache_tokens=config.cache_tokens
    )


def build_intake(config: ModelConfig, limits: ProblemLimits | None = None) -> ProblemIntake:
    """The submit-time check for these models: the policy's tokenizer (no weights) measures a
    problem, and the shipped arithmetic parts refuse what they cannot take.

    Where the shipped policy serves (`policy` None), a problem is read as a user types it and
    must be in its domain (`tasks.arithmetic.SHIPPED_DOMAIN`); where the verifier is the reward,
    it must be arithmetic the verifier scores. Either way the search runs on the canonical
    expression, the only spelling the char-level policy was trained on (`2 + 3 * 4` would read
    as nonsense) and the one the verifier checks steps against. A real policy with a PRM gets
    the client's text untouched: it reads spacing and prose, and may be asked anything."""
    from lodestar.workers.loading import load_tokenizer
    from lodestar.workers.prompt_format import PolicyPrompts
    from lodestar.workers.verifier import accepts_prompt, canonical_prompt

    path = policy_dir(config)
    shipped_policy, verifier = config.policy is None, str(config.reward) == "verifier"
    accepts = canonical = None
    if shipped_policy or verifier:
        accepts = functools.partial(accepts_prompt, bounded=shipped_policy)
        canonical = canonical_prompt
    prompts = PolicyPrompts(load_tokenizer(path))
    return ProblemIntake(limits, prompts, context_of(path), accepts, canonical)


def prm_settings(path: Path, family: str | None) -> dict[str, Any]:
    """PRM config fields from the directory's lodestar_prm.json; an explicit family wins."""
    settings: dict[str, Any] = {}
    file = path / PRM_CONFIG_FILE
    if file.is_file():
        settings = json.loads(file.read_text())
    if family is not None:
        settings["family"] = family
    if "family" not in settings:
        raise ValueError(
            f"{path}: no {PRM_CONFIG_FILE}; say which PRM family it is "
            "(qwen_prm, math_shepherd or outcome)"
        )
    return settings


def hf_reward(config: ModelConfig) -> RewardEngine:
    from lodestar.workers.reward import PRMConfig, RewardWorker

    path = shipped_model_dir(PRM) if str(config.reward) == "prm" else Path(config.reward)
    known = {f.name for f in fields(PRMConfig)}
    settings = {k: v for k, v in prm_settings(path, config.prm_family).items() if k in known}
    settings.setdefault("device", config.device)
    settings.setdefault("dtype", config.dtype)
    for key in ("label_tokens",):
        if key in settings:
            settings[key] = tuple(settings[key])
    return RewardWorker.from_pretrained(path, PRMConfig(**settings))


def vllm_policy(config: ModelConfig) -> PolicyEngine:
    from lodestar.workers.vllm_policy import VLLMPolicy

    dtypes = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    return VLLMPolicy(
        policy_dir(config),
        device=config.device,
        dtype=dtypes.get(config.dtype or "", config.dtype),
        max_model_len=config.max_model_len,
        gpu_memory_utilization=config.gpu_memory_utilization,
        tensor_parallel_size=config.tensor_parallel_size,
    )


Builders = tuple[Callable[[ModelConfig], PolicyEngine], Callable[[ModelConfig], RewardEngine]]
ENGINES: dict[str, Builders] = {"hf": (hf_policy, hf_reward), "vllm": (vllm_policy, hf_reward)}
"""Engine name -> (policy builder, PRM builder). PRMs stay on the HF engine's incremental
scoring under vLLM too (its pooling runner is not measured faster here yet)."""
