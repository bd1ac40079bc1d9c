"""`lodestar bench`: what each part of the runtime costs and buys, as ratios measured side by side.

Every figure compares two sides measured in the same run on the same searches (same problems,
particles and seeds). The machine is noisy, so the sides alternate within each of `repeats`
rounds (forward order in even rounds, reversed in odd ones) and medians are reported; a ratio is
always B / A, with A the side Lodestar runs and B the side it is compared with:

1. orchestration overhead: search wall time (B) over the time spent inside worker calls (A);
2. policy KV reuse off (B) vs on (A), answers identical;
3. PRM scoring step by step as a search does: full rescoring (B) vs incremental (A);
4. the same searches through gRPC + orchestrator + Redis + Ray actors (B) vs in process (A);
5. concurrent searches per engine: 1 live (B) vs k live (A), i.e. the throughput gain;
6. its_hub 1.2.0's own PF, beam search and best-of-N (B, `its_hub_adapter`) vs Lodestar's (A) over
   the same engines, one search at a time and all at once, with each side's accuracy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.console import Console
from rich.table import Table

from lodestar.orchestrator.driver import OrchestratorConfig
from lodestar.orchestrator.state_store import JobSpec
from lodestar.orchestrator.worker_pool import PoolConfig
from lodestar.services.runtime import RuntimeConfig, open_runtime
from lodestar.tasks.arithmetic import Difficulty, Problem, generate_problems
from lodestar.workers.contract import PolicyEngine, RewardEngine
from lodestar.workers.factory import ModelConfig, build_policy, build_reward
from lodestar.workers.messages import ExtendRequest, ScoreRequest, StepOutput, StepScores

T = TypeVar("T")
S = TypeVar("S")

BUDGET = {"max_generated_tokens": 1_000_000, "max_prm_passes": 100_000}
"""The gRPC server's default caps, given to the in-process searches too so that both sides run
exactly the same search (the caps are far above what these searches spend)."""


@dataclass(frozen=True)
class BenchOptions:
    """Sizes and models of one bench run; `quick` replaces every size with a smoke-test one."""

    problems: int = 32
    """Searches per measured run (held-out arithmetic problems, seed i for the i-th)."""
    particles: int = 16
    """PF particles per search (row 6: also beam search's and best-of-N's samples); also the
    sequences scored at once in the PRM row."""
    steps: tuple[int, ...] = (5, 10, 20)
    """Solution lengths of the incremental-vs-full PRM row."""
    concurrency: tuple[int, ...] = (1, 8, 32)
    """Live searches per engine in the cross-search batching row."""
    repeats: int = 3
    threads: int = 1
    """torch threads of the in-process workers and of each Ray actor."""
    redis_url: str | None = None
    """redis://host:port/db for the gRPC row; None starts a private redis-server."""
    policy: str | Path | None = None
    """Policy model directory; None: the shipped arithmetic policy."""
    reward: str | Path = "prm"
    """"prm" (the shipped learned PRM), "verifier", or a PRM directory (as `ModelConfig`)."""
    prm_family: str | None = None
    ops: int = 3
    """Operations per problem: more operations, more steps per search."""
    quick: bool = False
    """Tiny sizes whatever the others say: 4 problems, 4 particles, steps (2, 8), concurrency
    (1, 4), one repeat (a smoke test: well under a minute)."""
    engines: bool = False
    """Also rows 7 and 8 (`engine_bench`: vLLM vs HF, Lodestar over vLLM vs raw vLLM); skipped
    with the install hint when vLLM is not installed."""

    def __post_init__(self) -> None:
        sizes = {"problems": self.problems, "particles": self.particles, "repeats": self.repeats}
        sizes |= {"threads": self.threads, "ops": self.ops}
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not self.steps or min(self.steps) < 1:
            raise ValueError(f"steps must be non-empty and >= 1, got {self.steps}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency must be non-empty and >= 1, got {self.concurrency}")

    def sized(self) -> BenchOptions:
        """The sizes a run uses: these, or the quick ones."""
        if not self.quick:
            return self
        return dataclasses.replace(
            self, problems=4, particles=4, steps=(2, 8), concurrency=(1, 4), repeats=1
        )

    def models(self, **overrides: Any) -> ModelConfig:
        config = ModelConfig(policy=self.policy, reward=self.reward, prm_family=self.prm_family)
        return dataclasses.replace(config, **overrides)


@dataclass(frozen=True)
class Row:
    """One line of the table; `dataclasses.asdict` gives its JSON form."""

    section: int
    """Which measurement (1-6, as in the module docstring; 7-8 in `engine_bench`)."""
    name: str
    setting: str
    a: str
    """What side A is."""
    a_s: float
    """Side A's median time in seconds (per step for the PRM row)."""
    b: str
    b_s: float
    ratio: float
    """b_s / a_s."""
    note: str
    """What the ratio means and how the sides were defined."""
    checks: dict[str, bool] = field(default_factory=dict)
    """Correctness checks of the run (e.g. "answers identical")."""
    extra: dict[str, float] = field(default_factory=dict)
    """Further figures of the row (searches/min, batch sizes, tokens encoded)."""


# -- worker faces: timed ------------------------------------------------------------------------


class CallClock:
    """The intervals during which worker calls ran, to tell model time from orchestration time."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []

    def run(self, call: Callable[[Any], T], arg: Any) -> T:
        started = time.perf_counter()
        try:
            return call(arg)
        finally:
            self.spans.append((started, time.perf_counter()))  # list.append is thread-safe

    def busy_s(self) -> float:
        """Time during which at least one call ran (overlapping policy and reward calls, which
        run in two threads, are counted once)."""
        total, end = 0.0, float("-inf")
        for s, e in sorted(self.spans):
            if e > end:
                total += e - max(s, end)
                end = e
        return total

    def sum_s(self) -> float:
        return sum(e - s for s, e in self.spans)


class _Facade:
    """An engine with one method changed; the rest (`release_prefix`, `stats`, `device`) is the
    engine's own."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    def __getattr__(self, name: str) -> Any:
        return getattr(self.worker, name)


class TimedPolicy(_Facade):
    def __init__(self, worker: PolicyEngine, clock: CallClock) -> None:
        super().__init__(worker)
        self.clock = clock

    def extend(self, requests: Sequence[ExtendRequest]) -> list[StepOutput]:
        return self.clock.run(self.worker.extend, requests)


class TimedReward(_Facade):
    def __init__(self, worker: RewardEngine, clock: CallClock) -> None:
        super().__init__(worker)
        self.clock = clock

    def score(self, requests: Sequence[ScoreRequest]) -> list[StepScores]:
        return self.clock.run(self.worker.score, requests)


# -- measuring -----------------------------------------------------------------------------------


@dataclass
class Sample:
    """One timed run of N searches."""

    wall_s: float
    answers: list[str]
    model_busy_s: float = 0.0
    model_sum_s: float = 0.0
    mean_policy_batch: float = 0.0
    prompt_tokens: int = 0
    prm_tokens: int = 0


Mode = Callable[[], Awaitable[Sample]]


async def alternate(
    modes: dict[str, Mode], repeats: int, progress: Callable[[str], None]
) -> dict[str, list[Sample]]:
    """Every mode once per round, in forward order in even rounds and reversed in odd ones, so
    drifting machine load hits all modes alike."""
    samples: dict[str, list[Sample]] = {m: [] for m in modes}
    for r in range(repeats):
        order = list(modes) if r % 2 == 0 else list(reversed(modes))
        for mode in order:
            progress(f"round {r + 1}/{repeats}: {mode}")
            samples[mode].append(await modes[mode]())
    return samples


async def run_engine(
    policy: PolicyEngine,
    reward: RewardEngine,
    jobs: list[JobSpec],
    concurrency: int,
    models: ModelConfig,
) -> Sample:
    """The searches through a fresh in-process runtime (memory store, the engines in threads of
    this process; fresh, so its batch sizes are this run's only): the path `lodestar solve` and
    `lodestar eval` take."""
    clock = CallClock()
    config = RuntimeConfig(
        PoolConfig(models), in_process=True, orchestrator=OrchestratorConfig(max_live=concurrency)
    )
    engines = TimedPolicy(policy, clock), TimedReward(reward, clock)
    async with open_runtime(config, engines) as runtime:
        await runtime.start()
        started = time.perf_counter()
        records = await asyncio.gather(*(runtime.orchestrator.solve(j) for j in jobs))
        wall = time.perf_counter() - started
        sizes = runtime.workers.policy_batcher.batch_sizes
    results = [json.loads(r.result or "null") for r in records]
    if any(r is None for r in results):
        raise RuntimeError(f"bench searches failed: {[r.error for r in records if r.error]}")
    return Sample(
        wall_s=wall,
        answers=[r["answer"] for r in results],
        model_busy_s=clock.busy_s(),
        model_sum_s=clock.sum_s(),
        mean_policy_batch=sum(sizes) / max(len(sizes), 1),
        prompt_tokens=sum(r["spend"]["prompt_tokens"] for r in results),
        prm_tokens=sum(r["spend"]["prm_tokens"] for r in results),
    )


async def run_one_at_a_time(
    policy: PolicyEngine, reward: RewardEngine, jobs: list[JobSpec], models: ModelConfig
) -> Sample:
    """Searches one after another, each alone on the workers."""
    parts = [await run_engine(policy, reward, [job], 1, models) for job in jobs]
    return Sample(
        wall_s=sum(p.wall_s for p in parts),
        answers=[a for p in parts for a in p.answers],
        model_busy_s=sum(p.model_busy_s for p in parts),
        model_sum_s=sum(p.model_sum_s for p in parts),
        mean_policy_batch=statistics.mean(p.mean_policy_batch for p in parts),
        prompt_tokens=sum(p.prompt_tokens for p in parts),
        prm_tokens=sum(p.prm_tokens for p in parts),
    )


async def run_its_hub(
    policy: PolicyEngine, reward: RewardEngine, jobs: list[JobSpec], live: int, models: ModelConfig
) -> Sample:
    """The searches with its_hub's own algorithms (`its_hub_adapter`), at most `live` at once
    (1: one after another), over the same engines and the same batchers as `run_engine`'s
    runtime (`LocalWorkers`, the in-process runtime's defaults): concurrent searches' calls
    merge as a server's scheduler would merge them."""
    from lodestar.evaluation.its_hub_adapter import solve_with_its_hub
    from lodestar.orchestrator.inprocess import LocalWorkers

    pool, clock = PoolConfig(models), CallClock()
    engines = TimedPolicy(policy, clock), TimedReward(reward, clock)
    workers = LocalWorkers(*engines, pool.max_batch, pool.max_wait_s, pool.max_call_chars)
    slots = asyncio.Semaphore(live)

    async def one(job: JobSpec) -> Any:
        async with slots:
            return await solve_with_its_hub(workers, job)

    try:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(j) for j in jobs))
        wall = time.perf_counter() - started
    finally:
        workers.shutdown()
    sizes = workers.policy_batcher.batch_sizes
    return Sample(
        wall_s=wall,
        answers=[r.text for r in results],
        model_busy_s=clock.busy_s(),
        model_sum_s=clock.sum_s(),
        mean_policy_batch=sum(sizes) / max(len(sizes), 1),
        prompt_tokens=sum(r.log.prompt_tokens for r in results),
        prm_tokens=sum(r.log.prm_tokens for r in results),
    )


def accuracy(samples: Sequence[Sample], problems: Sequence[Problem]) -> float:
    """Median share of searches whose answer's last `\\boxed{}` is the problem's value (graded
    the same way for both sides)."""
    from lodestar.orchestrator.algorithms.answers import extract_boxed, matches_reference

    def share(s: Sample) -> float:
        right = [
            matches_reference(extract_boxed(text), str(p.answer))
            for text, p in zip(s.answers, problems, strict=True)
        ]
        return sum(right) / len(right)

    return median(samples, share)


def median(samples: Sequence[S], key: Callable[[S], float]) -> float:
    """The median of one figure over a side's runs (any row's run type)."""
    return statistics.median(key(s) for s in samples)


def same_answers(*runs: Sequence[Sample]) -> bool:
    """Every sample of every run gave the same answers, search by search."""
    answers = [s.answers for run in runs for s in run]
    return all(a == answers[0] for a in answers)


# -- the gRPC stack ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def grpc_stack(options: BenchOptions, max_live: int) -> AsyncIterator[Any]:
    """A `SearchService` stub over loopback to `LodestarServer` → `Orchestrator` (Redis state)
    → `RayWorkerPool` actors (a private local Ray): the whole `lodestar serve` path."""
    import grpc

    from lodestar.services.local_redis import LocalRedis
    from lodestar.services.server import LodestarServer, ServerConfig
    from lodestar.v1 import search_pb2_grpc as pb_grpc

    async with contextlib.AsyncExitStack() as stack:
        url = options.redis_url
        if url is None:
            local_redis = stack.enter_context(LocalRedis())
            url = local_redis.url
        # On a GPU machine the two actors share it, as the in-process side's two models do.
        gpus = 0.5 if torch.cuda.is_available() else 0.0
        pool = PoolConfig(models=options.models(), threads=options.threads, num_gpus=gpus)
        orchestrator = OrchestratorConfig(max_live=max_live)
        config = RuntimeConfig(pool, store_url=url, orchestrator=orchestrator, ray_cpus=4)
        runtime = await stack.enter_async_context(open_runtime(config))
        await runtime.start()
        orchestrator = runtime.orchestrator
        server = LodestarServer(orchestrator, ServerConfig(address="127.0.0.1:0"))
        port = await server.start()
        stack.push_async_callback(server.stop)
        await server.set_serving()
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=server.config.channel_options
        )
        stack.push_async_callback(channel.close)
        yield pb_grpc.SearchServiceStub(channel)


async def run_grpc(stub: Any, jobs: list[JobSpec]) -> Sample:
    """The searches as concurrent unary `Search` calls."""
    from lodestar.services.client import search_request

    requests = [
        search_request(str(j.problem), j.algorithm, dict(j.params), j.seed, {}) for j in jobs
    ]
    started = time.perf_counter()
    results = await asyncio.gather(*(stub.Search(r) for r in requests))
    return Sample(
        wall_s=time.perf_counter() - started,
        answers=[r.answer for r in results],
        prompt_tokens=sum(r.spend.prompt_tokens for r in results),
        prm_tokens=sum(r.spend.prm_tokens for r in results),
    )


# -- the PRM row ----------------------------------------------------------------------------------


def synthetic_solution(rng: random.Random, steps: int) -> tuple[str, ...]:
    """`steps` arithmetic steps chained on their results ("3+4=7\\n\\n", "7*2=14\\n\\n", ...):
    only what the PRM reads matters here, not whether the steps solve anything."""
    value, out = rng.randint(1, 9), []
    for _ in range(steps):
        op, b = rng.choice("+-*"), rng.randint(1, 9)
        new = {"+": value + b, "-": value - b, "*": value * b}[op]
        new = new if 0 <= new <= 999 else rng.randint(1, 9)
        out.append(f"{value}{op}{b}={new}\n\n")
        value = new
    return tuple(out)


@dataclass
class ScoringRun:
    step_s: list[float]
    """Time of each step's `score` call (all sequences at once)."""
    tokens: int
    """Tokens the PRM encoded in all."""
    rewards: list[tuple[float, ...]]
    """Each sequence's rewards after the last step."""


def score_as_a_search(
    worker: Any, prompts: Sequence[str], solutions: Sequence[tuple[str, ...]]
) -> ScoringRun:
    """Score every sequence step by step, as a search does: at step k one call with each
    sequence's first k steps, naming its k-1 prefix as parent (a cache-off worker ignores it)."""
    worker.clear()
    times, tokens, outs = [], 0, []
    for k in range(1, len(solutions[0]) + 1):
        requests = [
            ScoreRequest(f"{i}/{k}", f"{i}/{k - 1}" if k > 1 else None, p, s[:k])
            for i, (p, s) in enumerate(zip(prompts, solutions, strict=True))
        ]
        started = time.perf_counter()
        outs = worker.score(requests)
        times.append(time.perf_counter() - started)
        tokens += sum(o.tokens for o in outs)
        worker.release([f"{i}/{k - 1}" for i in range(len(prompts))])  # as LRU would, untimed
    worker.clear()
    return ScoringRun(times, tokens, [o.rewards for o in outs])


def without_cache(reward: Any) -> Any:
    """The same PRM (shared weights) with its prefix cache off; a reward without a cache (the
    verifier) as it is."""
    from lodestar.workers.reward import RewardWorker

    if not isinstance(reward, RewardWorker):
        return reward
    config = dataclasses.replace(reward.config, cache_tokens=0)
    return RewardWorker(reward.model, reward.tokenizer, config)


def prm_workers(options: BenchOptions) -> tuple[Any, Any, str]:
    """The PRM with its prefix cache on and its cache-off twin; the shipped PRM when the bench's
    reward is the verifier (which has no model to cache)."""
    reward = options.reward if str(options.reward) != "verifier" else "prm"
    cached = build_reward(options.models(reward=reward))
    return cached, without_cache(cached), reward_name(reward)


def prm_rows(
    options: BenchOptions, problems: Sequence[Problem], progress: Callable[[str], None]
) -> list[Row]:
    cached, full, name = prm_workers(options)
    n = options.particles
    prompts = [problems[i % len(problems)].expression for i in range(n)]
    rows = []
    for steps in options.steps:
        solutions = [
            synthetic_solution(random.Random(f"bench|{steps}|{i}"), steps) for i in range(n)
        ]
        runs: dict[str, list[ScoringRun]] = {"on": [], "off": []}
        score_as_a_search(cached, prompts, solutions)  # warm-up: allocator, kernels
        for r in range(options.repeats):
            progress(f"PRM scoring, {steps} steps: round {r + 1}/{options.repeats}")
            for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
                worker = cached if mode == "on" else full
                runs[mode].append(score_as_a_search(worker, prompts, solutions))
        per_step = {m: statistics.median(sum(x.step_s) / steps for x in runs[m]) for m in runs}
        last = {m: statistics.median(x.step_s[-1] for x in runs[m]) for m in runs}
        first = {m: statistics.median(x.step_s[0] for x in runs[m]) for m in runs}
        match = all(
            abs(a - b) <= 1e-4
            for on, off in zip(runs["on"], runs["off"], strict=True)
            for ra, rb in zip(on.rewards, off.rewards, strict=True)
            for a, b in zip(ra, rb, strict=True)
        )
        rows.append(
            Row(
                section=3,
                name="incremental PRM scoring",
                setting=f"{name}, {n} sequences, {steps} steps",
                a="cached (per step)",
                a_s=per_step["on"],
                b="full rescoring (per step)",
                b_s=per_step["off"],
                ratio=per_step["off"] / per_step["on"],
                note=(
                    "Each step one score call for all sequences, each naming its previous prefix "
                    "as parent. Cached encodes only the new step, so a step costs about the same "
                    "at any depth; full rescoring re-encodes the prefix, so a step grows with "
                    "depth and a search's total grows quadratically."
                ),
                checks={"rewards equal (1e-4)": match},
                extra={
                    "first_step_cached_s": first["on"],
                    "last_step_cached_s": last["on"],
                    "first_step_full_s": first["off"],
                    "last_step_full_s": last["off"],
                    "tokens_cached": runs["on"][0].tokens,
                    "tokens_full": runs["off"][0].tokens,
                },
            )
        )
    return rows


# -- the search rows ------------------------------------------------------------------------------


async def search_rows(
    options: BenchOptions, problems: Sequence[Problem], progress: Callable[[str], None]
) -> list[Row]:
    from lodestar.workers.policy import PolicyWorker

    n, particles = options.problems, options.particles
    models = options.models()
    policy = build_policy(models)
    policy_off = PolicyWorker(policy.model, policy.tokenizer, cache_tokens=0)
    reward = build_reward(models)
    peers = peer_jobs(problems, particles)
    jobs = peers["pf"]
    levels = sorted({min(c, n) for c in options.concurrency})

    async with grpc_stack(options, max_live=n) as stub:
        modes: dict[str, Mode] = {
            "in-process": lambda: run_engine(policy, reward, jobs, n, models),
            "policy cache off": lambda: run_engine(policy_off, reward, jobs, n, models),
            "gRPC + Ray + Redis": lambda: run_grpc(stub, jobs),
            "one at a time": lambda: run_one_at_a_time(policy, reward, jobs, models),
        }
        for level in levels:
            if level != n:
                modes[f"{level} live"] = lambda k=level: run_engine(policy, reward, jobs, k, models)
        for alg, js in peers.items():  # row 6; Lodestar's PF is "one at a time" and "in-process"
            if alg != "pf":
                modes[f"{alg}, 1 live"] = lambda j=js: run_one_at_a_time(policy, reward, j, models)
                modes[f"{alg}, {n} live"] = lambda j=js: run_engine(policy, reward, j, n, models)
            modes[f"its_hub {alg}, 1 live"] = lambda j=js: run_its_hub(policy, reward, j, 1, models)
            modes[f"its_hub {alg}, {n} live"] = lambda j=js: run_its_hub(
                policy, reward, j, n, models
            )
        progress("warm-up")  # first calls: allocator, Ray actor code paths, Redis scripts
        await run_engine(policy, reward, jobs[:4], n, models)
        await run_grpc(stub, jobs[:4])
        await run_its_hub(policy, reward, jobs[:4], n, models)
        samples = await alternate(modes, options.repeats, progress)
    samples.setdefault(f"{n} live", samples["in-process"])
    samples.setdefault("pf, 1 live", samples["one at a time"])
    samples.setdefault(f"pf, {n} live", samples["in-process"])
    return build_search_rows(options, samples, levels, problems)


PEERS = {
    "pf": ("PF", "ParticleFiltering"),
    "beam": ("beam search", "BeamSearch"),
    "best_of_n": ("best-of-N", "BestOfN"),
}
"""Row 6's algorithms: Lodestar's name -> (what the table calls it, its_hub's class)."""


def peer_jobs(problems: Sequence[Problem], particles: int) -> dict[str, list[JobSpec]]:
    """Row 6's searches by algorithm, seed i for the i-th problem: PF as every other row runs it
    (its jobs are theirs), beam search with n samples a round from n/m kept beams (m = 4, or the
    largest of 2 and 1 that divides n) and best-of-N with n samples; each its default params."""
    m = next(k for k in (4, 2, 1) if particles % k == 0)
    params = {"pf": {"n": particles}, "beam": {"n": particles, "m": m}}
    params["best_of_n"] = {"n": particles}

    def job(alg: str, i: int, problem: Problem) -> JobSpec:
        search_id = f"bench-{i}" if alg == "pf" else f"bench-{alg}-{i}"
        return JobSpec(search_id, alg, dict(params[alg]), problem.expression, i, BUDGET)

    return {alg: [job(alg, i, p) for i, p in enumerate(problems)] for alg in params}


def build_search_rows(
    options: BenchOptions,
    samples: dict[str, list[Sample]],
    levels: Sequence[int],
    problems: Sequence[Problem],
) -> list[Row]:
    """Rows 1, 2, 4, 5 and 6 from the alternating rounds' samples."""
    n, particles = options.problems, options.particles
    searches = f"{n} PF-{particles} searches ({reward_name(options.reward)})"
    base, one = samples["in-process"], samples["one at a time"]
    wall, wall_one = median(base, _wall), median(one, _wall)
    rows = []

    overhead = (
        "A: time during which a policy extend or a reward score call was running (timed around "
        "each call: tokenize, forward, sample, cache bookkeeping; overlapping policy and reward "
        "calls counted once). B: wall time of the searches. B/A - 1 is the share of wall time "
        "with no model call running: batching windows, the step loop (checkpoint and event per "
        "step, to the memory store), thread hand-offs."
    )
    for live, run, run_wall in ((n, base, wall), (1, one, wall_one)):
        busy = median(run, lambda s: s.model_busy_s)
        rows.append(
            Row(
                section=1,
                name="orchestration overhead",
                setting=f"{searches}, {live} live, in process",
                a="time in worker calls",
                a_s=busy,
                b="search wall time",
                b_s=run_wall,
                ratio=run_wall / busy,
                note=overhead,
                extra={
                    "model_sum_s": median(run, lambda s: s.model_sum_s),
                    "mean_policy_batch": median(run, lambda s: s.mean_policy_batch),
                },
            )
        )

    off = samples["policy cache off"]
    wall_off = median(off, _wall)
    rows.append(
        Row(
            section=2,
            name="policy KV reuse",
            setting=f"{searches}, {n} live",
            a="cache on",
            a_s=wall,
            b="cache off",
            b_s=wall_off,
            ratio=wall_off / wall,
            note=(
                "The policy worker's prefix KV cache at its default budget vs cache_tokens=0 "
                "(each step re-encodes the prompt and every earlier step); same reward, seeds "
                "and batching. B/A is the speed-up reuse buys."
            ),
            checks={"answers identical": same_answers(base, off)},
            extra={
                "prompt_tokens_on": median(base, lambda s: s.prompt_tokens),
                "prompt_tokens_off": median(off, lambda s: s.prompt_tokens),
            },
        )
    )

    service = samples["gRPC + Ray + Redis"]
    wall_service = median(service, _wall)
    rows.append(
        Row(
            section=4,
            name="in-process vs service",
            setting=f"{searches}, {n} live, {options.threads} torch thread(s) per worker",
            a="in process",
            a_s=wall,
            b="gRPC + Ray + Redis",
            b_s=wall_service,
            ratio=wall_service / wall,
            note=(
                "B: the same searches as concurrent Search calls over loopback gRPC to a "
                "LodestarServer whose Orchestrator checkpoints every step to Redis and calls "
                "the models in Ray actors (policy and reward: one process each). A: in process "
                "(memory store), both models in this process (two threads sharing one GIL with the "
                "event loop)."
            ),
            checks={"answers identical": same_answers(base, service)},
        )
    )

    for level in levels:
        run = one if level == 1 else samples[f"{level} live"]
        wall_k = median(run, _wall)
        rows.append(
            Row(
                section=5,
                name="cross-search batching",
                setting=f"{searches}, in process",
                a=f"{level} live" + (" (the baseline)" if level == 1 else ""),
                a_s=wall_k,
                b="1 live",
                b_s=wall_one,
                ratio=wall_one / wall_k,
                note=(
                    "At most k searches live in one runtime; their model calls merge into shared "
                    "batches (mean policy batch). B/A is the throughput gain over one search at "
                    "a time."
                ),
                checks={"answers identical": same_answers(one, run)},
                extra={
                    "searches_per_min": n / wall_k * 60,
                    "mean_policy_batch": median(run, lambda s: s.mean_policy_batch),
                },
            )
        )

    rows += peer_rows(options, samples, problems)
    return rows


def peer_rows(
    options: BenchOptions, samples: dict[str, list[Sample]], problems: Sequence[Problem]
) -> list[Row]:
    """Row 6: for each algorithm, its_hub's own (B) vs Lodestar's (A), 1 and n live."""
    n, particles, rows = options.problems, options.particles, []
    note = (
        "B: its_hub 1.2.0's own algorithm (ParticleFiltering, BeamSearch, BestOfN) over the same "
        "engine objects and batchers (evaluation/its_hub_adapter.py): each agenerate is one "
        "extend call (prefix caching on: the parent found by text, as a server's prefix cache "
        "would), each PRM call rescores every answer's whole step list; n live = n its_hub "
        "searches as asyncio tasks whose calls merge in the batchers, as a server's scheduler "
        "merges concurrent requests. A: Lodestar's search of the same name, params and seeds. "
        "Accuracy: the answer's last \\boxed{} against the problem's value."
    )
    for alg, (label, hub_class) in PEERS.items():
        lone_a, many_a = samples[f"{alg}, 1 live"], samples[f"{alg}, {n} live"]
        lone_b, many_b = samples[f"its_hub {alg}, 1 live"], samples[f"its_hub {alg}, {n} live"]
        checks = {
            f"its_hub same answers 1 and {n} live": same_answers(lone_b, many_b),
            f"Lodestar same answers 1 and {n} live": same_answers(lone_a, many_a),
        }
        for live, run_a, run_b in ((1, lone_a, lone_b), (n, many_a, many_b)):
            wall_a, wall_b = median(run_a, _wall), median(run_b, _wall)
            rows.append(
                Row(
                    section=6,
                    name="its_hub 1.2.0 vs Lodestar",
                    setting=(
                        f"{n} {label} searches, n={particles} ({reward_name(options.reward)}), "
                        f"{live} live, in process"
                    ),
                    a=f"Lodestar {label}",
                    a_s=wall_a,
                    b=f"its_hub {hub_class}",
                    b_s=wall_b,
                    ratio=wall_b / wall_a,
                    note=note,
                    checks=checks,
                    extra={
                        "accuracy_a": accuracy(run_a, problems),
                        "accuracy_b": accuracy(run_b, problems),
                        "mean_policy_batch_a": median(run_a, lambda s: s.mean_policy_batch),
                        "mean_policy_batch_b": median(run_b, lambda s: s.mean_policy_batch),
                        "prompt_tokens_a": median(run_a, lambda s: s.prompt_tokens),
                        "prompt_tokens_b": median(run_b, lambda s: s.prompt_tokens),
                        "prm_tokens_a": median(run_a, lambda s: s.prm_tokens),
                        "prm_tokens_b": median(run_b, lambda s: s.prm_tokens),
                    },
                )
            )
    return rows


def _wall(sample: Sample) -> float:
    return sample.wall_s


def reward_name(reward: str | Path) -> str:
    return {"prm": "shipped PRM", "verifier": "verifier"}.get(str(reward), str(reward))


# -- the entry point ------------------------------------------------------------------------------


def run_bench(options: BenchOptions, console: Console) -> list[Row]:
    """Measure every row, print one table, return the rows (in table order)."""
    opts = options.sized()
    problems = generate_problems("test", opts.problems, Difficulty(ops=opts.ops), seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    try:
        with console.status("lodestar bench") as status:

            def progress(text: str) -> None:
                status.update(f"lodestar bench: {text}")

            rows = asyncio.run(search_rows(opts, problems, progress))
            rows += prm_rows(opts, problems, progress)
            if opts.engines:
                from lodestar.evaluation.engine_bench import engine_rows
                from lodestar.evaluation.prm_engine_bench import prm_engine_rows

                rows += engine_rows(opts, console, progress)
                rows += prm_engine_rows(opts, console, progress)
    finally:
        torch.set_num_threads(threads)
    rows.sort(key=lambda r: r.section)
    console.print(bench_table(rows, opts))
    return rows


def rows_json(rows: Sequence[Row]) -> str:
    """The rows as a JSON array (what `lodestar bench --json` writes)."""
    return json.dumps([dataclasses.asdict(r) for r in rows], indent=2)


def bench_table(rows: Sequence[Row], options: BenchOptions) -> Table:
    """One table; a section's note is printed on its first row only."""
    table = Table(
        title=(
            f"lodestar bench: medians of {options.repeats} alternating round(s), "
            f"{options.threads} torch thread(s) per worker; ratio = B / A"
        ),
        show_lines=True,
    )
    for column in ("#", "measurement", "setting", "A", "B", "B / A", "checks", "what it means"):
        table.add_column(column, overflow="fold")
    noted: set[int] = set()
    for r in rows:
        table.add_row(
            str(r.section),
            r.name,
            r.setting,
            f"{r.a}\n{_seconds(r.a_s)}",
            f"{r.b}\n{_seconds(r.b_s)}",
            f"{r.ratio:.2f}x",
            "\n".join(
                [*(f"{k}: {'yes' if ok else 'NO'}" for k, ok in r.checks.items()), *_figures(r)]
            ),
            "" if r.section in noted else r.note,
        )
        noted.add(r.section)
    return table


def _seconds(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else f"{s * 1000:.1f} ms"


def _figures(row: Row) -> list[str]:
    """The row's extra figures as short lines (cached / full, A / B)."""
    e, out = row.extra, []
    if "searches_per_min" in e:
        out.append(f"{e['searches_per_min']:.0f} searches/min")
    if "mean_policy_batch" in e:
        out.append(f"mean policy batch {e['mean_policy_batch']:.1f}")
    if "model_sum_s" in e:
        out.append(f"calls summed {_seconds(e['model_sum_s'])}")
    if "last_step_full_s" in e:
        out.append(
            f"step 1: {_seconds(e['first_step_cached_s'])} / {_seconds(e['first_step_full_s'])}"
        )
        out.append(
            f"last step: {_seconds(e['last_step_cached_s'])} / {_seconds(e['last_step_full_s'])}"
        )
        out.append(f"PRM tokens {e['tokens_cached']:.0f} / {e['tokens_full']:.0f}")
    if "prompt_tokens_off" in e:
        out.append(f"prompt tokens {e['prompt_tokens_on']:.0f} / {e['prompt_tokens_off']:.0f}")
    if "accuracy_b" in e:
        out.append(f"accuracy {e['accuracy_a']:.0%} / {e['accuracy_b']:.0%}")
        a, b = e["mean_policy_batch_a"], e["mean_policy_batch_b"]
        out.append(f"mean policy batch {a:.1f} / {b:.1f}")
    if "prompt_tokens_b" in e:
        out.append(f"prompt tokens {e['prompt_tokens_a']:.0f} / {e['prompt_tokens_b']:.0f}")
        if e["prm_tokens_b"]:  # the verifier encodes nothing
            out.append(f"PRM tokens {e['prm_tokens_a']:.0f} / {e['prm_tokens_b']:.0f}")
    if "tokens_per_s_b" in e:  # rows 7-8 (engine_bench)
        out.append(f"tokens/s {e['tokens_per_s_a']:.1f} / {e['tokens_per_s_b']:.1f}")
        a, b = e["prompt_tokens_encoded_a"], e["prompt_tokens_encoded_b"]
        out.append(f"prompt tokens encoded {a:.0f} / {b:.0f}")
    if "identical_steps_share" in e:
        out.append(f"identical steps {e['identical_steps_share']:.0%}")
    return out
