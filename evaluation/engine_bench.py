"""Rows 7 and 8 of `lodestar bench` (`--engines`): the policy engines on particle filtering's
access pattern, each a ratio of two sides measured in the same rounds:

7. policy engine: the vLLM engine (A: `VLLMPolicy`) vs the HF engine (B: `PolicyWorker`, its KV
   reuse on); the issue's goal is A >= 1.5x B in tokens/s;
8. Lodestar over vLLM (A: `VLLMPolicy.extend`) vs raw vLLM (B: `vllm.LLM.generate` on a second
   `LLM` built from `VLLMPolicy.engine_kwargs`, on the same token ids); the goal is A within 10%
   of B.

Workload (`EngineWorkload`): P problems x 8 particles x 3 steps; before each step every particle
draws its parent at random from the previous step's particles of its problem (so prefixes are
shared and forked, as PF does), temperature 0.8, a step ends at "\\n" (kept), at most 48 tokens.
Every side is driven by the same seeded draws, so it gets the same request sequence (seq ids,
parent ids, prompts, seeds, sampling); a step's text is the side's own previous output, as in a
search (HF and vLLM sample differently under one seed, so their texts differ; the two vLLM
sides sample alike). The figure is generated tokens / wall time of the engine calls.

Each run uses problems no other run used, so no engine meets a prefix cached by an earlier round
(the chat's system prompt aside, which every request shares anyway). The three sides alternate
within each round (order reversed in odd rounds) and medians are reported. vLLM starts its engine
core with `spawn`: call this from a script with a main guard (the `lodestar` command has one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.markup import escape

from lodestar.evaluation.systems import BenchOptions, Row, median
from lodestar.tasks.arithmetic import Difficulty, generate_problems
from lodestar.workers.contract import PolicyEngine
from lodestar.workers.messages import ExtendRequest, SamplingParams, StepOutput
from lodestar.workers.vllm_policy import cpu_lists

HF, VLLM, RAW = "HF engine", "vLLM engine", "raw vLLM"
SIDES = (VLLM, HF, RAW)
PROMPT = "Solve step by step, one step per line: {expression}"
CUDA_MEMORY_SHARE = 0.3
"""On a GPU two vLLM engines and the HF model share it: each vLLM engine takes this share."""
PF_STEPS = SamplingParams(temperature=0.8, max_step_tokens=48, step_delimiter="\n")
SETTLE_S = 1.5
"""Idle before every timed run: a vLLM worker keeps polling about a second after its last
request (measured here), which would slow whichever side runs next on a 2-core machine."""


@dataclass(frozen=True)
class EngineWorkload:
    problems: tuple[int, ...] = (2, 8)
    """P of each measured setting (P x particles live rows)."""
    particles: int = 8
    steps: int = 3
    repeats: int = 3
    threads: int = 2
    """torch threads of the HF side, and vLLM's CPU threads (`VLLM_CPU_OMP_THREADS_BIND`)."""
    sampling: SamplingParams = PF_STEPS

    @classmethod
    def of(cls, options: BenchOptions) -> EngineWorkload:
        """The workload of a (sized) bench run: P = 1 and one round when quick."""
        if options.quick:
            return cls(problems=(1,), repeats=1)
        return cls(repeats=options.repeats)


@dataclass(frozen=True)
class Step:
    """What a side's call gave for one request."""

    text: str
    num_tokens: int
    prompt_tokens: int


@dataclass
class EngineRun:
    """One side's pass over one workload: the engine calls' wall time and what they produced."""

    wall_s: float = 0.0
    requests: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    idle_steps: int = 0
    """Requests that generated no token (must stay 0: every step here has room to grow)."""
    texts: list[str] = field(default_factory=list)

    @property
    def s_per_token(self) -> float:
        return self.wall_s / max(self.generated_tokens, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s


class Side(Protocol):
    """A policy behind the bench's phases: `prepare` (untimed), `call` (timed), `steps` (what
    the call gave, untimed), `release` (drop one run's caches, untimed)."""

    def prepare(self, requests: list[ExtendRequest]) -> Any: ...

    def call(self, prepared: Any) -> Any: ...

    def steps(self, prepared: Any, result: Any) -> list[Step]: ...

    def release(self, prefix: str) -> None: ...


class EngineSide:
    """A `PolicyEngine` as Lodestar calls it: `extend` on `ExtendRequest`s (tokenizing inside)."""

    def __init__(self, engine: PolicyEngine) -> None:
        self.engine = engine

    def prepare(self, requests: list[ExtendRequest]) -> list[ExtendRequest]:
        return requests

    def release(self, prefix: str) -> None:
        self.engine.release_prefix(prefix)

    def call(self, prepared: list[ExtendRequest]) -> list[Any]:
        return self.engine.extend(prepared)

    def steps(self, prepared: list[ExtendRequest], result: list[Any]) -> list[Step]:
        failed = [o for o in result if not isinstance(o, StepOutput)]
        if failed or len(result) != len(prepared):
            raise RuntimeError(f"engine answered {len(result)}/{len(prepared)}, failed: {failed}")
        return [Step(o.text, o.num_tokens, o.prompt_tokens) for o in result]


class RawVLLMSide:
    """Straight `LLM.generate` on the token ids Lodestar would send (built untimed, with the
    same `PolicyPrompts` code) and sampling parameters equivalent to `VLLMPolicy`'s."""

    def __init__(self, llm: Any, prompts: Any, context_tokens: int | None) -> None:
        self.llm, self.prompts, self.context_tokens = llm, prompts, context_tokens

    def prepare(self, requests: list[ExtendRequest]) -> list[tuple[ExtendRequest, list[int]]]:
        ids = self.prompts.tokenize([self.prompts.prefix(r) for r in requests])
        return list(zip(requests, ids, strict=True))

    def release(self, prefix: str) -> None:
        """Nothing to drop: vLLM's prefix blocks are evicted LRU."""

    def call(self, prepared: list[tuple[ExtendRequest, list[int]]]) -> list[Any]:
        from vllm import SamplingParams as VLLMSampling
        from vllm.inputs import TokensPrompt

        from lodestar.workers.policy import step_budget
        from lodestar.workers.vllm_policy import SEED_MASK

        prompts = [TokensPrompt(prompt_token_ids=ids) for _, ids in prepared]
        params = [
            VLLMSampling(
                temperature=r.sampling.temperature,
                top_p=r.sampling.top_p,
                seed=r.seed & SEED_MASK,
                max_tokens=step_budget(r, self.context_tokens, ids).tokens,
                stop=[r.sampling.step_delimiter],
                include_stop_str_in_output=True,
                logprobs=0,
            )
            for r, ids in prepared
        ]
        return self.llm.generate(prompts, params, use_tqdm=False)

    def steps(
        self, prepared: list[tuple[ExtendRequest, list[int]]], result: list[Any]
    ) -> list[Step]:
        if len(result) != len(prepared):
            raise RuntimeError(f"raw vLLM answered {len(result)}/{len(prepared)} requests")
        out = []
        for (_, ids), r in zip(prepared, result, strict=True):
            cached = min(r.num_cached_tokens or 0, len(ids))
            out.append(Step(r.outputs[0].text, len(r.outputs[0].token_ids), len(ids) - cached))
        return out


def run_particles(
    side: Side, prompts: Sequence[str], workload: EngineWorkload, tag: str
) -> EngineRun:
    """The PF-shaped workload on one side; `tag` seeds the parent draws and the sampling seeds
    (not the side), so every side with the same `tag` gets the same requests."""
    rng = random.Random(f"engine-bench|{tag}")
    k = workload.particles
    # Each problem's particles: (seq id, steps so far).
    particles: list[list[tuple[str | None, tuple[str, ...]]]] = [[(None, ())] * k for _ in prompts]
    run = EngineRun()
    for step in range(workload.steps):
        requests, slots = [], []
        for p, prompt in enumerate(prompts):
            parents = (
                particles[p] if step == 0 else [particles[p][rng.randrange(k)] for _ in range(k)]
            )
            for j, (parent_id, steps) in enumerate(parents):
                seq_id = f"{tag}/p{p}/s{step}/k{j}"
                seed = rng.getrandbits(62)
                requests.append(
                    ExtendRequest(seq_id, parent_id, prompt, steps, seed, workload.sampling)
                )
                slots.append((p, j))
        prepared = side.prepare(requests)
        started = time.perf_counter()
        result = side.call(prepared)
        run.wall_s += time.perf_counter() - started
        outs = side.steps(prepared, result)
        new = [list(ps) for ps in particles]
        for (p, j), r, out in zip(slots, requests, outs, strict=True):
            new[p][j] = (r.seq_id, (*r.steps, out.text))
            run.requests += 1
            run.generated_tokens += out.num_tokens
            run.prompt_tokens += out.prompt_tokens
            run.idle_steps += out.num_tokens == 0
            run.texts.append(out.text)
        particles = new
    return run


# -- building the engines -----------------------------------------------------------------------


@contextlib.contextmanager
def engine_threads(threads: int, cpu: bool) -> Iterator[None]:
    """`threads` torch threads here and, on a CPU, vLLM engine cores bound to as many CPUs
    (`VLLMPolicy` sets the bind only when unset, so an engine built earlier in this process
    may have left another); restored after."""
    before, bind = torch.get_num_threads(), os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    torch.set_num_threads(threads)
    if cpu:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_lists(threads, ranks=1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if cpu and bind is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        elif cpu and bind is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind


def engine_config(c: Any) -> dict[str, Any]:
    """The settings of a running engine's `VllmConfig` that decide its speed and its samples
    (the sync `LLM` and the async engine may fill defaults differently from the same args)."""
    return {
        "model": c.model_config.model,
        "dtype": str(c.model_config.dtype),
        "max_model_len": c.model_config.max_model_len,
        "enforce_eager": c.model_config.enforce_eager,
        "block_size": c.cache_config.block_size,
        "enable_prefix_caching": c.cache_config.enable_prefix_caching,
        "gpu_memory_utilization": c.cache_config.gpu_memory_utilization,
        "max_num_batched_tokens": c.scheduler_config.max_num_batched_tokens,
        "max_num_seqs": c.scheduler_config.max_num_seqs,
        "enable_chunked_prefill": c.scheduler_config.enable_chunked_prefill,
        "tensor_parallel_size": c.parallel_config.tensor_parallel_size,
    }


@dataclass
class Engines:
    sides: dict[str, Side]
    same_config: bool
    """Whether the raw `LLM` runs with the settings of `VLLMPolicy`'s own engine."""
    model: str
    dtype: str


@contextlib.contextmanager
def open_engines(policy: str | Path | None, threads: int) -> Iterator[Engines]:
    """The three sides on one model directory (None: SmolLM2-135M-Instruct); both vLLM engine
    cores stopped on exit."""
    from vllm import LLM

    from lodestar.workers.factory import ModelConfig, build_policy
    from lodestar.workers.loading import load_tokenizer
    from lodestar.workers.prompt_format import PolicyPrompts
    from lodestar.workers.smollm2 import smollm2_model_dir

    path = Path(policy) if policy is not None else smollm2_model_dir()
    cuda = torch.cuda.is_available()
    dtype = "bf16" if cuda else "fp32"
    memory = CUDA_MEMORY_SHARE if cuda else ModelConfig().gpu_memory_utilization
    if cuda:
        torch.cuda.empty_cache()  # what the bench's earlier rows left reserved
    models = ModelConfig(policy=path, dtype=dtype, gpu_memory_utilization=memory)
    with contextlib.ExitStack() as stack, engine_threads(threads, cpu=not cuda):
        hf = build_policy(models)
        engine: Any = build_policy(dataclasses.replace(models, engine="vllm"))
        stack.callback(engine.shutdown)
        # The same arguments, `max_num_seqs` included (the sync and async engines' defaults
        # differ): every setting `engine_config` compares is then the same.
        raw = LLM(**engine.engine_kwargs)
        stack.callback(raw.llm_engine.engine_core.shutdown)
        context = engine.context_tokens
        prompts = PolicyPrompts(load_tokenizer(path))
        sides = {
            HF: EngineSide(hf),
            VLLM: EngineSide(engine),
            RAW: RawVLLMSide(raw, prompts, context),
        }
        same = engine_config(engine.engine.vllm_config) == engine_config(raw.llm_engine.vllm_config)
        yield Engines(sides, same, path.name, dtype)


# -- the rows -----------------------------------------------------------------------------------


def workload_prompts(workload: EngineWorkload) -> Iterator[list[str]]:
    """Fresh problems for every run: the warm-up's, then each (round, P)'s."""
    sizes = [1] + [p for _ in range(workload.repeats) for p in workload.problems]
    pool = generate_problems("test", sum(sizes), Difficulty(ops=3), seed=11)
    at = 0
    for n in sizes:
        yield [PROMPT.format(expression=q.expression) for q in pool[at : at + n]]
        at += n


def measure(
    engines: Engines, workload: EngineWorkload, progress: Callable[[str], None]
) -> dict[int, dict[str, list[EngineRun]]]:
    """Every side on every (round, P) workload, sides alternating; runs[P][side] by round."""
    batches = workload_prompts(workload)
    warm = next(batches)
    progress("engine rows: warm-up")
    for name, side in engines.sides.items():  # first calls: allocator, kernels, engine loop
        run_particles(side, warm, EngineWorkload(steps=1), f"warm/{name}")
        side.release(f"warm/{name}/")
    runs: dict[int, dict[str, list[EngineRun]]] = {
        p: {s: [] for s in SIDES} for p in workload.problems
    }
    for r in range(workload.repeats):
        order = SIDES if r % 2 == 0 else SIDES[::-1]
        for p in workload.problems:
            prompts = next(batches)
            for name in order:
                progress(f"engine rows, {p} problems: round {r + 1}/{workload.repeats}: {name}")
                side, tag = engines.sides[name], f"r{r}/P{p}"
                time.sleep(SETTLE_S)
                runs[p][name].append(run_particles(side, prompts, workload, tag))
                side.release(f"{tag}/")
    return runs


def pair_row(
    section: int,
    name: str,
    setting: str,
    a: tuple[str, list[EngineRun]],
    b: tuple[str, list[EngineRun]],
    note: str,
    checks: dict[str, bool],
    extra: dict[str, float],
) -> Row:
    """Row `section` from the two sides' runs: times are seconds per generated token, so the
    ratio B / A is A's tokens/s over B's."""
    (a_name, a_runs), (b_name, b_runs) = a, b

    a_s, b_s = median(a_runs, lambda x: x.s_per_token), median(b_runs, lambda x: x.s_per_token)
    served = all(
        x.requests == y.requests and x.idle_steps == y.idle_steps == 0
        for x, y in zip(a_runs, b_runs, strict=True)
    )
    for key, runs in (("a", a_runs), ("b", b_runs)):
        extra[f"tokens_per_s_{key}"] = median(runs, lambda x: x.tokens_per_s)
        extra[f"prompt_tokens_encoded_{key}"] = median(runs, lambda x: x.prompt_tokens)
        extra[f"generated_tokens_{key}"] = median(runs, lambda x: x.generated_tokens)
        extra[f"wall_s_{key}"] = median(runs, lambda x: x.wall_s)
        extra[f"requests_{key}"] = median(runs, lambda x: x.requests)
    return Row(
        section=section,
        name=name,
        setting=setting,
        a=f"{a_name}, per token",
        a_s=a_s,
        b=f"{b_name}, per token",
        b_s=b_s,
        ratio=b_s / a_s,
        note=note,
        checks={"same requests, every step generated": served, **checks},
        extra=extra,
    )


def identical_share(a: list[EngineRun], b: list[EngineRun]) -> float:
    """Share of steps whose text is the same on both sides (round by round)."""
    pairs = [
        (s, t) for x, y in zip(a, b, strict=True) for s, t in zip(x.texts, y.texts, strict=True)
    ]
    return sum(s == t for s, t in pairs) / max(len(pairs), 1)


def engine_rows(
    options: BenchOptions, console: Console, progress: Callable[[str], None]
) -> list[Row]:
    """Rows 7 and 8 for each P of the (sized) options' workload; none, with the install hint
    printed, when vLLM is not installed."""
    from lodestar.workers.vllm_policy import INSTALL_HINT, vllm_available

    if not vllm_available():
        # escaped: rich would read "[vllm]" in the hint as markup and drop it
        console.print(f"[yellow]rows 7-8 (policy engines) skipped:[/yellow] {escape(INSTALL_HINT)}")
        return []
    workload = EngineWorkload.of(options)
    progress("engine rows: starting the engines (two vLLM engine cores)")
    with open_engines(options.policy, workload.threads) as engines:
        runs = measure(engines, workload, progress)
    s = workload.sampling
    rows = []
    for p, by_side in runs.items():
        setting = (
            f"{engines.model} {engines.dtype}, {p} problems x {workload.particles} particles x "
            f"{workload.steps} steps ({p * workload.particles} live rows), T={s.temperature}, "
            f"steps to '\\n' (<= {s.max_step_tokens} tokens), {workload.threads} threads"
        )
        rows.append(
            pair_row(
                7,
                "policy engine: vLLM vs HF",
                setting,
                (VLLM, by_side[VLLM]),
                (HF, by_side[HF]),
                (
                    "Generated tokens / wall time of the extend calls on PF's access pattern "
                    "(parents resampled each step), same requests and seeds: vLLM (paged KV, "
                    "prefix caching, continuous batching) vs the HF engine with its KV reuse. "
                    "B/A is vLLM's speed-up; the issue's goal is >= 1.5x. Their samples differ "
                    "(each engine's own sampler), so token counts differ too."
                ),
                {},
                {},
            )
        )
        rows.append(
            pair_row(
                8,
                "Lodestar over vLLM vs raw vLLM",
                setting,
                (f"Lodestar ({VLLM})", by_side[VLLM]),
                (RAW, by_side[RAW]),
                (
                    "The same requests through VLLMPolicy.extend (prompt rendering, tokenizing, "
                    "step cutting) vs straight LLM.generate on the same token ids with the same "
                    "SamplingParams, on a second LLM with VLLMPolicy's engine_kwargs. B/A is "
                    "Lodestar's share of raw throughput; the goal is >= 0.90."
                ),
                {"same engine config": engines.same_config},
                {"identical_steps_share": identical_share(by_side[VLLM], by_side[RAW])},
            )
        )
    return rows
