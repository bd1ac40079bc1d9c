"""its_hub 1.2.0's own algorithms over Lodestar's engines: the peer side of `lodestar bench` row 6.

its_hub (the PF authors' library) reaches its models through small abstract classes. `EngineLM`,
`EnginePRM` and `EngineORM` implement them over the same `PolicyEngine` / `RewardEngine` objects
and the same `RequestBatcher`s (`LocalWorkers`) that Lodestar's in-process searches use, so the
two sides differ in the search code and in how it calls the models, nothing else:

- `EngineLM.agenerate(batch)` (one step of every live particle or beam) is one `extend` call that
  stops at the step delimiter. Calls made together (best-of-N's `agenerate_single` per sample,
  concurrent searches) merge in the batcher, as a vLLM server's scheduler merges concurrent
  requests. Prefix caching stays on: its_hub sends text, not sequence ids, so each request names
  as parent the sequence held by the engine whose text is the longest step-aligned prefix of its
  own (what a server's content-addressed prefix cache finds).
- `EnginePRM.ascore(prompt, responses)` rescores every response's whole step list on every call
  (fresh ids, no parent: the reward engine's incremental cache cannot be used), as its_hub's
  `LocalVllmProcessRewardModel` does; `EngineORM` scores best-of-N's finished samples the same way.
- Seeded: request ids and sampling seeds follow each search's own call order, and its_hub's draws
  from the `random` module go, inside `solve_with_its_hub`, to that search's own generator, so a
  search gives the same answer alone or among concurrent ones.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from its_hub.api import (
    AbstractLanguageModel,
    AbstractOutcomeRewardModel,
    AbstractProcessRewardModel,
    AbstractScalingAlgorithm,
    ChatMessages,
)
from its_hub.api import ChatMessage as HubMessage
from its_hub.core.algorithms import particle_gibbs
from its_hub.core.algorithms.beam_search import BeamSearch
from its_hub.core.algorithms.bon import BestOfN
from its_hub.core.algorithms.particle_gibbs import ParticleFiltering
from its_hub.core.lms.step_generation import StepGeneration
from its_hub.core.orchestrator import LMOrchestrator

from lodestar.orchestrator.algorithms.answers import BOXED
from lodestar.orchestrator.algorithms.base import ScoredParams
from lodestar.orchestrator.algorithms.expansion import MAX_STEP_CALLS, aggregate, split_steps
from lodestar.orchestrator.algorithms.registry import parse_params
from lodestar.orchestrator.batching import SearchScope
from lodestar.orchestrator.inprocess import LocalWorkers
from lodestar.orchestrator.state_store import JobSpec
from lodestar.workers.messages import (
    ChatMessage,
    ExtendRequest,
    Prompt,
    SamplingParams,
    ScoreRequest,
)

ALGORITHMS = ("pf", "beam", "best_of_n")
"""Lodestar algorithm names with an its_hub counterpart here: ParticleFiltering, BeamSearch,
BestOfN."""

_SEED_DOMAIN = 0x175B


# -- its_hub's messages as Lodestar requests --------------------------------------------------


def split_conversation(messages: Sequence[HubMessage]) -> tuple[Prompt, str]:
    """(the prompt, the assistant text to continue) of one its_hub conversation: a trailing
    assistant message is the partial answer; one user message is a plain-text prompt, as
    Lodestar's jobs send it, so both sides render the same policy input."""
    continuation = ""
    if messages and messages[-1].role == "assistant":
        continuation = messages[-1].extract_text_content()
        messages = messages[:-1]
    if len(messages) == 1 and messages[0].role == "user":
        return messages[0].extract_text_content(), continuation
    if not messages:
        raise ValueError("an its_hub conversation without a prompt")
    prompt = tuple(ChatMessage(m.role, m.extract_text_content()) for m in messages)
    return prompt, continuation


def as_prompt(prompt_or_messages: str | list[HubMessage] | ChatMessages) -> Prompt:
    """The prompt its_hub hands a reward model (a string, messages or `ChatMessages`)."""
    if isinstance(prompt_or_messages, str):
        return prompt_or_messages
    messages = ChatMessages.from_prompt_or_messages(prompt_or_messages)
    return split_conversation(messages.to_chat_messages())[0]


def _steps_of(text: str) -> tuple[str, ...]:
    return (text,) if text else ()


# -- the language model -----------------------------------------------------------------------


@dataclass
class CallLog:
    """What one search's adapters sent: the size of each `agenerate`/`agenerate_single` and of
    each scoring call, and the tokens the engines reported."""

    generate_sizes: list[int] = field(default_factory=list)
    score_sizes: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prm_tokens: int = 0


class EngineLM(AbstractLanguageModel):
    """its_hub's language model over a policy engine (through a search's `SearchScope`).

    `sampling` holds what its_hub leaves unsaid (temperature when it passes none, top_p, the
    token cap of one step); a call without a stop string runs to EOS or `to_end_tokens`.
    """

    def __init__(
        self,
        scope: SearchScope,
        seed: int,
        sampling: SamplingParams,
        log: CallLog,
        to_end_tokens: int | None = None,
    ) -> None:
        self.scope = scope
        self.seed = seed
        self.sampling = sampling
        self.log = log
        self.to_end_tokens = to_end_tokens or MAX_STEP_CALLS * sampling.max_step_tokens
        self._requests = 0
        self._held: dict[tuple[Prompt, str], str] = {}
        """(prompt, continuation text) -> id of the engine sequence that ends there."""

    async def agenerate(
        self,
        messages: list[HubMessage] | list[list[HubMessage]],
        stop: str | None = None,
        **kwargs: Any,
    ) -> dict | list[dict]:
        single = bool(messages) and isinstance(messages[0], HubMessage)
        batch: list[list[HubMessage]] = [messages] if single else messages  # type: ignore[list-item]
        outs = await self._generate(batch, stop, **kwargs)
        return outs[0] if single else outs

    async def agenerate_single(
        self, messages: list[HubMessage], stop: str | None = None, **kwargs: Any
    ) -> dict:
        return (await self._generate([messages], stop, **kwargs))[0]

    async def _generate(
        self,
        batch: list[list[HubMessage]],
        stop: str | list[str] | None,
        max_completion_tokens: int | None = None,
        temperature: float | list[float | None] | None = None,
        include_stop_str_in_output: bool | None = None,
        usage_accumulator: Any = None,
        **_: Any,  # tools, tool_choice, response_format, loop: not used by these algorithms
    ) -> list[dict]:
        """One batcher submit (so one engine call unless merged with others) for `batch`."""
        if isinstance(stop, list):
            if len(stop) != 1:
                raise ValueError(f"one stop string per step, got {stop!r}")
            stop = stop[0]
        temps = temperature if isinstance(temperature, list) else [temperature] * len(batch)
        requests = []
        for conversation, temp in zip(batch, temps, strict=True):
            prompt, continuation = split_conversation(conversation)
            cap = max_completion_tokens or (
                self.sampling.max_step_tokens if stop else self.to_end_tokens
            )
            sampling = dataclasses.replace(
                self.sampling,
                temperature=self.sampling.temperature if temp is None else temp,
                max_step_tokens=cap,
                step_delimiter=stop or "",
            )
            self._requests += 1
            seq_id = f"g{self._requests}"
            requests.append(
                ExtendRequest(
                    seq_id=seq_id,
                    parent_id=self._longest_held(prompt, continuation, stop or ""),
                    prompt=prompt,
                    steps=_steps_of(continuation),
                    seed=self._request_seed(self._requests),
                    sampling=sampling,
                )
            )
        self.log.generate_sizes.append(len(requests))
        outs = await self.scope.extend(requests)
        responses = []
        for request, out in zip(requests, outs, strict=True):
            self._held[(request.prompt, "".join(request.steps) + out.text)] = request.seq_id
            self.log.prompt_tokens += out.prompt_tokens
            self.log.generated_tokens += out.num_tokens
            if usage_accumulator is not None:
                usage_accumulator.add(out.prompt_tokens, out.num_tokens)
            text = out.text
            if out.stop_reason == "delimiter" and not include_stop_str_in_output:
                text = text.removesuffix(request.sampling.step_delimiter)  # as a server cuts it
            responses.append({"role": "assistant", "content": text})
        return responses

    def _longest_held(self, prompt: Prompt, text: str, delimiter: str) -> str | None:
        """The held sequence ending at the longest prefix of `text` that ends at the end, or at
        either side of a delimiter (its_hub re-adds a delimiter the server cut, and a step that
        stopped on EOS ends before one)."""
        ends = [len(text)]
        at = text.rfind(delimiter) if delimiter else -1
        while at >= 0:
            ends += [at + len(delimiter), at]
            at = text.rfind(delimiter, 0, at)
        for end in ends:
            seq_id = self._held.get((prompt, text[:end]))
            if seq_id is not None:
                return seq_id
        return None

    def _request_seed(self, k: int) -> int:
        """The sampling seed of this search's k-th request: fixed by (search seed, k)."""
        words = np.random.SeedSequence([_SEED_DOMAIN, self.seed, k]).generate_state(2, np.uint32)
        return (int(words[0]) << 31) ^ int(words[1])


# -- the reward models --------------------------------------------------------------------------


class FullRescoring:
    """Scores whole answers through a reward engine, from scratch every call: each request a
    fresh id and no parent, so the engine re-encodes every step every time."""

    def __init__(self, scope: SearchScope, aggregation: str, delimiter: str, log: CallLog):
        self.scope = scope
        self.aggregation = aggregation
        self.delimiter = delimiter
        self.log = log
        self._requests = 0

    async def score_all(self, pairs: Sequence[tuple[Prompt, str]]) -> list[float]:
        """One score call for all (prompt, answer text) pairs; `model` aggregation scores the
        text as one step (as Lodestar's `model` does), the others split it into steps at the
        delimiter and aggregate their rewards (`expansion.aggregate`)."""
        requests = []
        for prompt, text in pairs:
            self._requests += 1
            steps = (text,) if self.aggregation == "model" else split_steps(text, self.delimiter)
            requests.append(ScoreRequest(f"r{self._requests}", None, prompt, tuple(steps)))
        self.log.score_sizes.append(len(requests))
        outs = await self.scope.score(requests)
        self.log.prm_tokens += sum(o.tokens for o in outs)
        return [aggregate(o.rewards, self.aggregation) for o in outs]


class EnginePRM(AbstractProcessRewardModel):
    """its_hub's process reward model: `ascore(prompt, responses)`, as PF and beam search call it
    (one response per particle; a single string gives a single float)."""

    def __init__(self, scorer: FullRescoring) -> None:
        self.scorer = scorer

    async def ascore(
        self, prompt_or_messages: str | list[HubMessage] | ChatMessages, steps: str | list[str]
    ) -> float | list[float]:
        prompt = as_prompt(prompt_or_messages)
        responses = [steps] if isinstance(steps, str) else list(steps)
        scores = await self.scorer.score_all([(prompt, r) for r in responses])
        return scores[0] if isinstance(steps, str) else scores

    def score(
        self, prompt_or_messages: str | list[HubMessage] | ChatMessages, steps: str | list[str]
    ) -> float | list[float]:
        """`ascore` outside an event loop, as its_hub's own PRM does it."""
        return asyncio.run(self.ascore(prompt_or_messages, steps))


class EngineORM(AbstractOutcomeRewardModel):
    """its_hub's outcome reward model for best-of-N: each conversation's final assistant message
    scored whole (the PRM over its steps, aggregated)."""

    def __init__(self, scorer: FullRescoring) -> None:
        self.scorer = scorer

    async def ascore(
        self,
        messages: list[HubMessage] | list[list[HubMessage]] | ChatMessages,
        orchestrator: Any = None,
        **kwargs: Any,
    ) -> list[float] | float:
        if isinstance(messages, ChatMessages):
            messages = messages.to_chat_messages()
        single = bool(messages) and isinstance(messages[0], HubMessage)
        batch: list[list[HubMessage]] = [messages] if single else messages  # type: ignore[list-item]
        scores = await self.scorer.score_all([split_conversation(c) for c in batch])
        return scores[0] if single else scores

    def score(
        self, messages: list[HubMessage] | list[list[HubMessage]] | ChatMessages, **kwargs: Any
    ) -> list[float] | float:
        """`ascore` outside an event loop."""
        return asyncio.run(self.ascore(messages))


# -- one search ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerResult:
    """What its_hub returned for one search (`the_one`'s text) and what its adapters sent."""

    text: str
    log: CallLog


def its_hub_search(
    algorithm: str, params: ScoredParams, prm: EnginePRM, orm: EngineORM
) -> tuple[AbstractScalingAlgorithm, int]:
    """its_hub's counterpart of a Lodestar search and its budget, configured from the Lodestar
    params: the same delimiter, temperature, steps cap and particle count, and its README's stop
    rule: StepGeneration("\\n\\n", 32, r"\\boxed") with Lodestar's max_steps for its 32.

    PF: ParticleFiltering, budget n (1.2.0 resamples multinomially whatever it is told). Beam:
    BeamSearch with beam_width n/m kept beams, budget n. Best-of-N: BestOfN over an unlimited
    LMOrchestrator (every sample submitted at once; its default 32-slot semaphore takes each slot
    in a thread-pool hop).
    """
    sg = StepGeneration(
        step_token=params.step_delimiter,
        max_steps=params.max_steps,
        stop_token=BOXED,
        temperature=params.temperature,
    )
    n = params.n  # type: ignore[attr-defined]
    if algorithm == "pf":
        return ParticleFiltering(sg, prm), n
    if algorithm == "beam":
        return BeamSearch(sg, prm, beam_width=n // params.m), n  # type: ignore[attr-defined]
    if algorithm == "best_of_n":
        return BestOfN(orm, orchestrator=LMOrchestrator(max_concurrency=-1)), n
    raise ValueError(f"no its_hub counterpart of {algorithm!r} here; one of {ALGORITHMS}")


async def solve_with_its_hub(workers: LocalWorkers, job: JobSpec) -> PeerResult:
    """Run `job` (problem, algorithm, params, seed) with its_hub's own algorithm over `workers`,
    under `job.search_id`'s id namespace (its caches released at the end, as Lodestar's are)."""
    params = parse_params(job.algorithm, job.params)
    if not isinstance(params, ScoredParams) or job.algorithm not in ALGORITHMS:
        raise ValueError(f"no its_hub counterpart of {job.algorithm!r} here; one of {ALGORITHMS}")
    if not isinstance(job.problem, str):
        raise ValueError("its_hub's PF and beam search take a plain-text problem")
    _install_search_random()
    log = CallLog()
    scope = workers.scope(job.search_id)
    lm = EngineLM(scope, job.seed, params.sampling(), log)
    scorer = FullRescoring(scope, params.aggregation, params.step_delimiter, log)
    search, budget = its_hub_search(job.algorithm, params, EnginePRM(scorer), EngineORM(scorer))
    token = _search_random.set(random.Random(job.seed))
    try:
        answer = await search.ainfer(lm, job.problem, budget)
    finally:
        _search_random.reset(token)
        await workers.release(job.search_id)
    return PeerResult(text=str(answer.get("content") or ""), log=log)


# -- its_hub's randomness, per search -----------------------------------------------------------

_search_random: contextvars.ContextVar[random.Random | None] = contextvars.ContextVar(
    "its_hub_search_random", default=None
)


class _SearchRandom:
    """Stands in for the `random` module in its_hub's particle_gibbs (resampling and final
    `sample` selection draw from it): inside `solve_with_its_hub` each asyncio task gets its own
    seeded generator, elsewhere the module itself as before. Concurrent searches would otherwise
    interleave draws from one process-wide stream."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_search_random.get() or random, name)


def _install_search_random() -> None:
    if not isinstance(particle_gibbs.random, _SearchRandom):
        particle_gibbs.random = _SearchRandom()  # type: ignore[assignment]
