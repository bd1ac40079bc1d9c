"""Particle Gibbs (pg) on the scripted world, through the wire, and in `lodestar eval`."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
import pytest

from lodestar.evaluation.matrix import WEIGHTED, Matrix, Variant
from lodestar.orchestrator.algorithms.base import run_search
from lodestar.orchestrator.algorithms.expansion import choose
from lodestar.orchestrator.algorithms.particle_filter import ParticleFilter, ParticleFilterParams
from lodestar.orchestrator.algorithms.particle_gibbs import (
    ParticleGibbs,
    ParticleGibbsParams,
    ParticleGibbsState,
    reference_prefix,
)
from lodestar.orchestrator.algorithms.registry import ParamError, parse_params
from lodestar.orchestrator.algorithms.state import Budget, Candidate, Trajectory
from lodestar.orchestrator.algorithms.weights import logit
from lodestar.services.client import params_to_wire
from lodestar.services.convert import params_from_wire
from lodestar.v1 import search_pb2 as pb
from tests.scripted import ScriptedWorld, is_correct, problems
from tests.test_eval import lodestar_eval, rows_of
from tests.test_grpc_service import models, serve  # noqa: F401  (models: the fixture)
from tests.test_particle_filter import CHI2_999, RaggedWorld

PF, PG = ParticleFilter(), ParticleGibbs()


def _run(algorithm, params, problem="task-1", seed=0, world=None, budget=None):
    world = world or ScriptedWorld()
    state = algorithm.init(problem, params, seed, budget)
    return asyncio.run(run_search(algorithm, state, world, world))


def _advance(state, world):
    return asyncio.run(PG.advance(state, world, world))


# -- parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"num_iterations": 0}, "params.num_iterations"),
        ({"num_iterations": 65}, "params.num_iterations"),
        ({"num_ref_particles": -1}, "params.num_ref_particles"),
        ({"n": 4, "num_ref_particles": 4}, "params.num_ref_particles"),
        ({"n": 1, "num_ref_particles": 1}, "params.num_ref_particles"),
        ({"n": 0}, "params.n"),
        ({"selection": "random"}, "params.selection"),
        ({"ess_threshold": 2.0}, "params.ess_threshold"),
        ({"lookahead": True}, "params.lookahead"),
    ],
)
def test_bad_parameters_raise_errors_naming_the_field(params, field):
    with pytest.raises(ParamError) as err:
        parse_params("pg", params)
    assert err.value.field == field


def test_defaults_and_the_largest_reference_count():
    p = ParticleGibbsParams()
    assert (p.n, p.num_iterations, p.num_ref_particles, p.selection) == (8, 2, 1, "argmax")
    assert ParticleGibbsParams(n=4, num_ref_particles=3).num_ref_particles == 3
    assert parse_params("pf", {"selection": "sample"}).selection == "sample"


def test_params_round_trip_through_the_wire():
    params = {"n": 4, "num_iterations": 3, "num_ref_particles": 2, "selection": "sample"}
    message = params_to_wire("pg", params)
    assert message.WhichOneof("algorithm") == "pg" and message.pg.num_iterations == 3
    assert params_from_wire(message) == ("pg", params)


# -- the algorithm ---------------------------------------------------------------------------

PF_LIKE = [
    ParticleFilterParams(n=4),
    ParticleFilterParams(n=5, finished="absorbing", ess_threshold=0.5, resampling="systematic"),
    ParticleFilterParams(n=6, resampling="residual", selection="weighted_vote"),
    ParticleFilterParams(n=4, selection="sample"),
]


@pytest.mark.parametrize("pf_params", PF_LIKE, ids=range(len(PF_LIKE)))
def test_one_iteration_without_references_is_pf_exactly(pf_params):
    pg_params = ParticleGibbsParams(**pf_params.model_dump(), num_iterations=1, num_ref_particles=0)
    for seed in range(6):
        world = RaggedWorld()
        pf = _run(PF, pf_params, f"task-{seed}", seed, world)
        pg = _run(PG, pg_params, f"task-{seed}", seed, world)
        assert dataclasses.replace(pg, algorithm="pf") == pf


def _sweeps(params, problem, seed, world):
    """Run to the end, yielding (state before, state after) of every advance as checkpoints."""
    state = PG.init(problem, params, seed)
    while not PG.is_done(state):
        before = PG.loads(PG.dumps(state))
        state = _advance(state, world)
        yield before, PG.loads(PG.dumps(state))


@pytest.mark.parametrize(
    "params",
    [
        ParticleGibbsParams(n=4, num_iterations=3, num_ref_particles=1),
        ParticleGibbsParams(n=6, num_iterations=3, num_ref_particles=2, resampling="systematic"),
        ParticleGibbsParams(n=5, num_iterations=2, num_ref_particles=2, finished="absorbing"),
    ],
    ids=["k1", "k2-systematic", "k2-absorbing"],
)
def test_the_references_survive_every_step_of_the_next_sweep(params):
    copied_from_reference = 0
    for seed in range(8):
        world = RaggedWorld()
        last: ParticleGibbsState | None = None
        for before, after in _sweeps(params, f"task-{seed}", seed, world):
            last = after
            if after.sweep > before.sweep:  # a sweep ended: its references are drawn from it
                refs = [r.text for r in after.references]
                drawn = after.reference_draws[-1]
                assert len(refs) == params.num_ref_particles == len(drawn)
                assert refs == [after.last_sweep[i].text for i in drawn]
                assert all(r.finished for r in after.references)
                assert after.particles == [] and not after.started
                continue
            # inside a sweep: the references are untouched by every step
            assert after.references == before.references
            if before.references and after.rounds[len(before.rounds) :]:
                (record,) = after.rounds[len(before.rounds) :]
                competing = [
                    r
                    for r in before.references
                    if params.finished == "resample"
                    or not reference_prefix(
                        r, len(before.rounds) - before.sweep_start + 1, "model"
                    ).finished
                ]
                assert record.pool == len(before.particles) + len(competing)
                assert len(record.ancestors) == len(before.particles)  # n - k (less absorbed)
                copied_from_reference += any(a >= len(before.particles) for a in record.ancestors)
        assert last is not None and last.sweep == params.num_iterations - 1
        # the final sweep's answer pool holds its references as they were
        texts = [c.text for c in PG.result(last).candidates]
        assert all(r.text in texts for r in last.references)
        assert len(texts) == params.n
    assert copied_from_reference > 0  # the references do compete in resampling


def _reference(rewards: list[float]) -> Trajectory:
    steps = [f"s{i} ok w w w w\n\n" for i in range(len(rewards) - 1)] + ["so \\boxed{1}\n\n"]
    return Trajectory("ref", None, steps, rewards, score=rewards[-1], finished=True, stop="answer")


@pytest.mark.parametrize(("depth", "from_reference"), [(1, True), (2, False)])
def test_a_reference_competes_with_the_score_its_prefix_had_at_that_step(depth, from_reference):
    """Three fresh particles at 0.5 against a reference whose prefix scored 0.9999 at step 1 and
    0.0001 at step 2: a round at depth 1 copies the reference's prefix, at depth 2 never."""
    params = ParticleGibbsParams(n=4, num_iterations=2, num_ref_particles=1)
    ref = _reference([0.9999, 0.0001, 0.5, 0.5, 0.5])
    assert reference_prefix(ref, 1, "model").score == 0.9999
    assert reference_prefix(ref, 2, "last").steps == ref.steps[:2]
    assert reference_prefix(ref, 9, "model") is ref
    for seed in range(5):
        state = PG.init("task-1", params, seed)
        state.sweep, state.references, state.started = 1, [ref], True
        state.sweep_start = -(depth - 1)  # the round about to run is this sweep's `depth`-th
        state.particles = [
            Trajectory(str(900 + i), None, ["x\n\n"] * depth, [0.5] * depth, 0.5) for i in range(3)
        ]
        state.common.next_id = 1000
        state = _advance(state, ScriptedWorld())
        (record,) = state.rounds
        assert record.pool == 4 and state.references == [ref]
        assert all(a == 3 for a in record.ancestors) == from_reference
        assert any(a == 3 for a in record.ancestors) == from_reference
        if from_reference:  # the copies continue from the prefix, with a step of their own
            assert all(p.steps[:1] == ref.steps[:1] and len(p.steps) == 2 for p in state.particles)
    assert logit([0.9999])[0] > 9


PG_CONFIGS = {
    "default": ParticleGibbsParams(n=4),
    "k2_absorbing_ess_systematic": ParticleGibbsParams(
        n=5,
        num_iterations=3,
        num_ref_particles=2,
        finished="absorbing",
        ess_threshold=0.5,
        resampling="systematic",
    ),
    "k0_sample": ParticleGibbsParams(
        n=4, num_iterations=2, num_ref_particles=0, selection="sample"
    ),
    "k3_vote_last": ParticleGibbsParams(
        n=4, num_iterations=3, num_ref_particles=3, selection="weighted_vote", aggregation="last"
    ),
}


@pytest.mark.parametrize("key", list(PG_CONFIGS))
@pytest.mark.parametrize(
    "budget",
    [{"max_generated_tokens": 37}, {"max_generated_tokens": 150}, {"max_prm_passes": 5},
     {"max_prm_passes": 13}, {"max_prm_passes": 21, "max_generated_tokens": 200}],
)  # fmt: skip
def test_budgets_are_never_exceeded(key, budget):
    params = PG_CONFIGS[key]
    for seed in range(3):
        result = _run(PG, params, f"task-{seed}", seed, RaggedWorld(), Budget(**budget))
        assert result.spend.generated_tokens <= budget.get("max_generated_tokens", 10**9)
        assert result.spend.prm_passes <= budget.get("max_prm_passes", 10**9)
        assert result.stop_reason in ("budget", "finished")
        if result.candidates:
            assert result.chosen is not None
            assert sum(c.weight for c in result.candidates) == pytest.approx(1.0)


def test_the_budget_counts_every_sweep_and_references_cost_nothing():
    """Without caps a sweep of n particles with k references generates n - k trajectories."""
    n, k, sweeps = 4, 1, 3
    world = ScriptedWorld()
    pg = _run(PG, ParticleGibbsParams(n=n, num_iterations=sweeps, num_ref_particles=k), world=world)
    pf = _run(PF, ParticleFilterParams(n=n), world=ScriptedWorld())
    assert world.extend_batches.count(n - k) >= sweeps - 1  # every later round: n - k fresh
    assert pf.spend.generated_tokens < pg.spend.generated_tokens
    # the scripted steps are fixed-length: every trajectory costs the same tokens
    assert pg.spend.generated_tokens == pf.spend.generated_tokens * (n + (sweeps - 1) * (n - k)) / n


@pytest.mark.parametrize("key", list(PG_CONFIGS))
def test_resume_after_every_step_is_bit_identical(key):
    params = PG_CONFIGS[key]
    for seed, problem in ((1, "task-3"), (22, "task-8")):
        world = RaggedWorld()
        state = PG.init(problem, params, seed)
        checkpoints = [PG.dumps(state)]
        while not PG.is_done(state):
            state = _advance(state, world)
            checkpoints.append(PG.dumps(state))
        expected = PG.result(state)
        assert state.sweep == params.num_iterations - 1 and len(checkpoints) >= 6
        for data in checkpoints:
            resumed = PG.loads(data)
            assert type(resumed) is ParticleGibbsState
            assert type(resumed.params) is ParticleGibbsParams
            assert PG.dumps(resumed) == data
            assert asyncio.run(run_search(PG, resumed, world, world)) == expected


def test_a_stop_inside_a_later_sweep_answers_from_the_last_complete_sweep():
    params = ParticleGibbsParams(n=4, num_iterations=3, num_ref_particles=1)
    world = ScriptedWorld()
    state = PG.init("task-2", params, 5)
    while state.sweep == 0:
        state = _advance(state, world)
    between = PG.result(state)
    state = _advance(state, world)  # the second sweep's first step
    assert PG.result(state) == between and between.candidates
    assert [c.text for c in between.candidates] == [t.text for t in state.last_sweep]


# -- accuracy --------------------------------------------------------------------------------


def test_pg_with_two_or_three_sweeps_is_at_least_as_accurate_as_pf_with_a_noisy_reward():
    """Measured (200 problems, noise 0.35, n = 4 per sweep): PF 0.925, PG 2 sweeps 0.95, PG 3
    sweeps 0.96; and at n = 2: PF 0.805, PG 0.865 and 0.92."""
    names = problems(200)
    world = ScriptedWorld(noise=0.35)

    def accuracy(algorithm, params) -> float:
        right = [
            is_correct(p, _run(algorithm, params, p, i, world).answer) for i, p in enumerate(names)
        ]
        return sum(right) / len(right)

    for n in (2, 4):
        pf = accuracy(PF, ParticleFilterParams(n=n))
        pg2 = accuracy(PG, ParticleGibbsParams(n=n, num_iterations=2, num_ref_particles=1))
        pg3 = accuracy(PG, ParticleGibbsParams(n=n, num_iterations=3, num_ref_particles=1))
        assert pg2 >= pf and pg3 >= pf, (n, pf, pg2, pg3)
        assert pg3 >= pf + 0.03, (n, pf, pg3)


# -- sample selection ------------------------------------------------------------------------


def _answered(weight: float, score: float, answer: str) -> Candidate:
    text = f"so \\boxed{{{answer}}}"
    return Candidate(text, (text,), answer, score, weight, True, "answer")


def test_sample_selection_draws_in_proportion_to_the_weights():
    weights = [0.05, 0.1, 0.15, 0.3, 0.4]
    cands = [_answered(w, 1.0 - w, str(i)) for i, w in enumerate(weights)]
    partial = Candidate("s0 ok", ("s0 ok",), None, 0.99, 0.5, False, "")
    draws = 5000
    counts = np.bincount(
        [choose([*cands, partial], "sample", np.random.default_rng([7, i])) for i in range(draws)],
        minlength=6,
    )
    assert counts[5] == 0  # an unanswered partial is never drawn while an answer exists
    expected = draws * np.asarray(weights) / sum(weights)
    chi2 = float(((counts[:5] - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[4], (counts, expected)
    with pytest.raises(ValueError, match="generator"):
        choose(cands, "sample")


@pytest.mark.parametrize(
    "algorithm, params",
    [
        (PF, ParticleFilterParams(n=8, selection="sample")),
        (PG, ParticleGibbsParams(n=4, selection="sample")),
    ],
)
def test_sample_selection_is_deterministic_given_the_seed(algorithm, params):
    world = ScriptedWorld(noise=0.35)
    runs = [_run(algorithm, params, "task-7", seed, world) for seed in range(20)]
    again = [_run(algorithm, params, "task-7", seed, world) for seed in range(20)]
    assert runs == again
    for result in runs:  # the chosen candidate is one of the answered ones, drawn by weight
        chosen = result.candidates[result.chosen]
        assert chosen.finished and chosen.final_answer is not None and chosen.weight > 0
    # a draw, not a maximum: it sometimes picks another particle than argmax would
    assert any(r.chosen != choose(r.candidates, "argmax") for r in runs)


# -- through the service and the evaluation ---------------------------------------------------


def test_a_pg_search_through_a_real_server_returns_a_result(models):  # noqa: F811
    request = pb.SearchRequest(
        problem=pb.Problem(text="(7+5)*3-4"),
        params=pb.AlgorithmParams(
            pg=pb.ParticleGibbsParams(n=3, num_iterations=2, num_ref_particles=1)
        ),
        seed=4,
        search_id="pg-1",
    )

    async def client(stub, channel, server) -> pb.SearchResult:
        return await stub.Search(request)

    result = serve(models, client)
    assert result.search_id == "pg-1" and result.algorithm == "pg"
    assert len(result.candidates) == 3 and 0 <= result.chosen < 3
    assert result.candidates[result.chosen].text == result.answer
    assert result.spend.generated_tokens > 0 and result.spend.prm_passes > 0


def test_eval_runs_pg_at_budget_b_as_b_over_sweeps_particles_per_sweep():
    m = Matrix((Variant.parse("pg"), Variant.parse("pg3=pg:num_iterations=3")), (1, 4, 8))
    m.validate()
    assert [m.params(v, b) for v, b in m.cells()] == [
        {"n": 1, "num_iterations": 1, "num_ref_particles": 0},  # budget 1: PF with one particle
        {"n": 2, "num_ref_particles": 1},
        {"n": 4, "num_ref_particles": 1},
        {"n": 1, "num_iterations": 3, "num_ref_particles": 0},
        {"n": 1, "num_iterations": 3, "num_ref_particles": 0},
        {"n": 2, "num_iterations": 3, "num_ref_particles": 1},
    ]
    assert "pg" in WEIGHTED


@pytest.mark.integration
def test_lodestar_eval_runs_pg(tmp_path):
    out = tmp_path / "results"
    done = lodestar_eval(out, "--algorithms", "pg", "--budgets", "4", "--problems", "3")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = rows_of(out / "runs.jsonl")
    assert len(rows) == 12 and all(r["status"] == "succeeded" for r in rows)  # 4 ops x 3 problems
    assert all(r["algorithm"] == "pg" and 0 <= r["expected_accuracy"] <= 1 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert [(c["label"], c["budget"]) for c in summary] == [("pg", 4)]
