"""Particle filtering (pf) and entropic particle filtering (epf) on the scripted world."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence

import numpy as np
import pytest
from pydantic import ValidationError

from lodestar.orchestrator.algorithms.annealing import ess_temperature
from lodestar.orchestrator.algorithms.base import run_search
from lodestar.orchestrator.algorithms.expansion import answered, grow
from lodestar.orchestrator.algorithms.particle_filter import (
    EntropicParticleFilter,
    EntropicParticleFilterParams,
    EntropicParticleFilterState,
    ParticleFilter,
    ParticleFilterParams,
    RoundRecord,
    candidate_weights,
    lookahead_log_weights,
)
from lodestar.orchestrator.algorithms.state import Budget, EarlyRejection, SearchCommon, Trajectory
from lodestar.orchestrator.algorithms.weights import (
    logit,
    multinomial_resample,
    residual_resample,
    softmax,
    systematic_resample,
)
from lodestar.workers.messages import ExtendRequest, SamplingParams, StepOutput, StepScores
from tests.scripted import DELIM, ScriptedWorld, is_correct, problems, true_answer

PF, EPF = ParticleFilter(), EntropicParticleFilter()
# chi-square critical values at p = 0.001 (no scipy here): dof -> value
CHI2_999 = {4: 18.467, 7: 24.322}
SCORES_8 = [0.1, 0.3, 0.45, 0.5, 0.6, 0.8, 0.9, 0.95]


class RecordingWorld(ScriptedWorld):
    """The scripted world, remembering every extend request."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.requests: list[list[ExtendRequest]] = []

    async def extend(self, requests):
        self.requests.append(list(requests))
        return await super().extend(requests)


class RaggedWorld(RecordingWorld):
    """Solutions of different lengths: after the first step a sample answers early w.p. 0.3,
    so particles finish in different rounds."""

    def _full_step(self, req: ExtendRequest) -> list[str]:
        if req.steps and not req.partial_step and req.seed % 10 < 3:
            wrong = any(" bad" in s for s in req.steps)
            answer = "999" if wrong else true_answer(req.prompt)
            return ["so", f" \\boxed{{{answer}}}", DELIM]
        return super()._full_step(req)


def _run(algorithm, params, problem="task-1", seed=0, world=None, budget=None):
    world = world or ScriptedWorld()
    state = algorithm.init(problem, params, seed, budget)
    return asyncio.run(run_search(algorithm, state, world, world))


def _advance(algorithm, state, world):
    return asyncio.run(algorithm.advance(state, world, world))


def _seeded(algorithm, params, scores: Sequence[float], seed: int, finished=()):
    """A state after the initial step, with one-step particles of the given scores."""
    state = algorithm.init("task-1", params, seed)
    state.particles = [
        Trajectory(
            seq_id=str(i + 1),
            parent_id=None,
            steps=["so \\boxed{1}\n\n" if i in finished else "s0 ok w w w w\n\n"],
            rewards=[s],
            score=s,
            finished=i in finished,
            stop="answer" if i in finished else "",
        )
        for i, s in enumerate(scores)
    ]
    state.common.next_id = len(scores)
    state.started = True
    return state


def _chi_square(counts: np.ndarray, p: np.ndarray) -> float:
    expected = counts.sum() * p
    return float(np.sum((counts - expected) ** 2 / expected))


def _offspring(ancestors: Sequence[int], k: int) -> np.ndarray:
    return np.bincount(np.asarray(ancestors, dtype=np.int64), minlength=k)


# -- resampling ------------------------------------------------------------------------------


@pytest.mark.parametrize("resample", [multinomial_resample, systematic_resample, residual_resample])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_resampling_frequencies_match_softmax_of_logit_scores(resample, temperature):
    scores = [0.2, 0.5, 0.7, 0.9, 0.95]
    p = softmax(logit(scores), temperature)
    counts = np.zeros(len(p))
    for seed in range(500):
        counts += _offspring(resample(p, 8, np.random.default_rng(seed)), len(p))
    assert _chi_square(counts, p) < CHI2_999[4]


@pytest.mark.parametrize("resampling", ["multinomial", "systematic", "residual"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_one_pf_round_draws_ancestors_from_softmax_of_logit_scores(resampling, temperature):
    params = ParticleFilterParams(resampling=resampling, softmax_temperature=temperature)
    p = softmax(logit(SCORES_8), temperature)
    counts = np.zeros(8)
    world = ScriptedWorld()
    for seed in range(250):
        state = _advance(PF, _seeded(PF, params, SCORES_8, seed), world)
        (record,) = state.rounds
        assert record.resampled and record.ancestors == sorted(record.ancestors)
        counts += _offspring(record.ancestors, 8)
        # every copy continues from its ancestor's cache: the child's parent is the ancestor
        assert [t.parent_id for t in state.particles] == [str(a + 1) for a in record.ancestors]
    assert _chi_square(counts, p) < CHI2_999[7]


def test_systematic_offspring_counts_vary_less_than_multinomial():
    p = softmax(logit(SCORES_8))
    var = {}
    for resample in (multinomial_resample, systematic_resample):
        rng = np.random.default_rng(7)
        counts = np.array([_offspring(resample(p, 8, rng), 8) for _ in range(3000)])
        var[resample] = counts.var(axis=0)
    # systematic: frac(Np)(1 - frac(Np)) <= 1/4 per particle; multinomial: Np(1 - p)
    assert np.all(var[systematic_resample] <= 0.25 + 0.02)
    heavy = 8 * p > 0.5
    assert np.all(var[systematic_resample][heavy] < 0.5 * var[multinomial_resample][heavy])
    assert var[systematic_resample].sum() < 0.5 * var[multinomial_resample].sum()


def test_systematic_pf_rounds_vary_less_than_multinomial_pf_rounds():
    world = ScriptedWorld()
    var = {}
    for resampling in ("multinomial", "systematic"):
        params = ParticleFilterParams(resampling=resampling)
        counts = [
            _offspring(_advance(PF, _seeded(PF, params, SCORES_8, s), world).rounds[0].ancestors, 8)
            for s in range(150)
        ]
        var[resampling] = np.var(counts, axis=0).sum()
    assert var["systematic"] < 0.5 * var["multinomial"]


def test_residual_gives_at_least_floor_np_copies():
    p = softmax(logit(SCORES_8))
    floor = np.floor(8 * p).astype(int)
    assert floor.sum() >= 4  # the test means something: most copies are deterministic
    rng = np.random.default_rng(3)
    for _ in range(500):
        assert np.all(_offspring(residual_resample(p, 8, rng), 8) >= floor)
    world = ScriptedWorld()
    params = ParticleFilterParams(resampling="residual")
    for seed in range(100):
        state = _advance(PF, _seeded(PF, params, SCORES_8, seed), world)
        assert np.all(_offspring(state.rounds[0].ancestors, 8) >= floor)


def test_softmax_temperature_changes_concentration():
    world = ScriptedWorld()
    ess, top_share = [], []
    for temperature in (0.25, 1.0, 4.0):
        params = ParticleFilterParams(softmax_temperature=temperature)
        rounds = [
            _advance(PF, _seeded(PF, params, SCORES_8, s), world).rounds[0] for s in range(100)
        ]
        ess.append(rounds[0].ess)
        top_share.append(np.mean([r.ancestors.count(7) for r in rounds]) / 8)
    assert ess[0] < ess[1] < ess[2]
    assert top_share[0] > top_share[1] > top_share[2]


# -- finished particles ----------------------------------------------------------------------

FINISHED_CONFIGS = [
    (PF, ParticleFilterParams(n=8, max_steps=6)),
    (PF, ParticleFilterParams(n=8, max_steps=6, finished="absorbing")),
    (PF, ParticleFilterParams(n=8, finished="absorbing", ess_threshold=0.7)),
    (EPF, EntropicParticleFilterParams(n=8, max_steps=6)),
    (EPF, EntropicParticleFilterParams(n=8, lookahead=True)),
    (EPF, EntropicParticleFilterParams(n=8, lookahead=True, finished="absorbing")),
]


@pytest.mark.parametrize(("algorithm", "params"), FINISHED_CONFIGS)
def test_a_finished_particle_is_never_extended_again(algorithm, params):
    finished_drawn = 0
    for seed in range(8):
        world = RaggedWorld()
        state = algorithm.init(f"task-{seed}", params, seed)
        finished: set[str] = set()
        texts: set[str] = set()
        while not algorithm.is_done(state):
            seen, pool, rounds = len(world.requests), list(state.particles), len(state.rounds)
            state = _advance(algorithm, state, world)
            for request in (r for batch in world.requests[seen:] for r in batch):
                assert request.parent_id not in finished
                assert "".join(request.steps) not in texts
            if len(state.rounds) > rounds:
                finished_drawn += sum(pool[a].finished for a in state.rounds[-1].ancestors)
            done = [t for t in (*state.particles, *state.absorbed) if t.finished]
            finished |= {t.seq_id for t in done}
            texts |= {t.text for t in done}
        assert all(t.finished for t in (*state.particles, *state.absorbed))
    # "resample" draws finished particles (and never extends the copies); "absorbing" cannot
    assert (finished_drawn > 0) == (params.finished == "resample")


def test_resample_mode_copies_finished_particles_and_they_stay_finished():
    params = ParticleFilterParams(n=8, finished="resample")
    state = _seeded(PF, params, [0.99, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2], 0, finished={0})
    state = _advance(PF, state, ScriptedWorld())
    copies = [t for t in state.particles if t.seq_id == "1"]
    assert len(copies) == state.rounds[0].ancestors.count(0) >= 2
    assert all(t.finished and t.steps == ["so \\boxed{1}\n\n"] for t in copies)
    assert len(state.particles) == 8 and not state.absorbed


@pytest.mark.parametrize("algorithm", [PF, EPF])
def test_absorbing_shrinks_the_pool_and_resamples_only_the_unfinished(algorithm):
    shrank = 0
    for seed in range(10):
        world = RaggedWorld()
        params = algorithm.Params(n=8, finished="absorbing")
        state = algorithm.init(f"task-{seed}", params, seed)
        sizes = []
        while not algorithm.is_done(state):
            seen = len(world.requests)
            state = _advance(algorithm, state, world)
            assert len(state.particles) + len(state.absorbed) == 8
            assert all(not t.finished for t in state.particles)
            assert all(t.finished for t in state.absorbed)
            sizes.append(len(state.particles))
            if len(state.rounds) and seen:
                record = state.rounds[-1]
                assert len(record.ancestors) == record.pool == sum(world.extend_batches[-1:])
        assert sizes == sorted(sizes, reverse=True) and sizes[-1] == 0
        shrank += len(set(sizes)) > 2
    assert shrank >= 3


# -- early rejection: a rejected particle is dead ---------------------------------------------


def _with_rejection(algorithm, params, problem, seed, keep=0.25):
    """(the algorithm with early rejection on, its initial state)."""
    rejecting = type(algorithm)(EarlyRejection(tau=2, keep=keep))
    return rejecting, rejecting.init(problem, params, seed)


@pytest.mark.parametrize("algorithm", [PF, EPF])
def test_rejected_particles_are_never_absorbed_and_resampling_refills_their_slots(algorithm):
    rejected = 0
    for seed in range(6):
        world = ScriptedWorld(p_err=0.3)
        params = algorithm.Params(n=16, finished="absorbing")
        algorithm, state = _with_rejection(algorithm, params, f"task-{seed}", seed)
        while not algorithm.is_done(state):
            pool, absorbed, calls = list(state.particles), len(state.absorbed), world.extend_batches
            seen, rounds = len(calls), len(state.rounds)
            state = _advance(algorithm, state, world)
            assert not any(t.pruned for t in state.absorbed)  # only finished particles leave
            assert all(t.pruned or not t.finished for t in state.particles)
            assert len(state.particles) + len(state.absorbed) == 16
            rejected += sum(t.pruned for t in state.particles)
            if len(state.rounds) > rounds:  # every slot drawn from a live particle, then extended
                record = state.rounds[-1]
                assert record.pool == 16 - absorbed == calls[seen]
                assert record.dead == sum(t.pruned for t in pool)
                assert not any(pool[a].pruned for a in record.ancestors)
    assert rejected > 50


@pytest.mark.parametrize("algorithm", [PF, EPF])
def test_absorbing_with_early_rejection_is_as_accurate_as_resampling_finished(algorithm):
    names = problems(60)
    accuracy = {}
    for finished in ("resample", "absorbing"):
        params = algorithm.Params(n=16, finished=finished)
        world = ScriptedWorld(p_err=0.3)
        solved = 0
        for i, p in enumerate(names):
            rejecting, state = _with_rejection(algorithm, params, p, i)
            solved += is_correct(p, asyncio.run(run_search(rejecting, state, world, world)).answer)
        accuracy[finished] = solved / len(names)
    assert accuracy["absorbing"] >= accuracy["resample"] - 0.05 > 0.85, accuracy


def _dead(state, indices):
    for i in indices:
        state.particles[i].finished, state.particles[i].stop = True, "rejected"
    return state


@pytest.mark.parametrize("algorithm", [PF, EPF])
def test_ess_and_entropy_are_over_live_particles_only(algorithm):
    """Two live particles of even weight and six dead ones: the live weights are healthy (ESS 2
    of 2, entropy 1), so ePF does not anneal; the dead slots are refilled from the live two."""
    world = ScriptedWorld()
    params = algorithm.Params(n=8, max_steps=10, ess_threshold=0.5)
    state = _advance(algorithm, _dead(_seeded(algorithm, params, [0.6] * 8, 0), range(2, 8)), world)
    (record,) = state.rounds
    assert record.dead == 6 and record.ess == pytest.approx(2.0)
    assert record.entropy == pytest.approx(1.0) and record.tau == 1.0
    assert record.resampled and set(record.ancestors) <= {0, 1}  # dead slots refilled
    assert not any(t.pruned for t in state.particles)


def test_epf_with_early_rejection_anneals_no_more_often_than_without():
    annealed = {}
    for keep in (None, 0.25):
        early = []
        for seed in range(30):
            world = ScriptedWorld(p_err=0.3)
            params = EntropicParticleFilterParams(n=16, max_steps=10)
            epf = EntropicParticleFilter(None if keep is None else EarlyRejection(tau=2, keep=keep))
            state = epf.init(f"task-{seed}", params, seed)
            while not epf.is_done(state):
                state = _advance(epf, state, world)
            early += [r.tau > 1.0 for r in state.rounds if r.t / 10 < 0.5]
        annealed[keep] = np.mean(early)
    assert annealed[0.25] <= annealed[None] + 0.1, annealed


# -- ESS gate, selection ---------------------------------------------------------------------


def test_ess_triggered_resampling_skips_resampling_when_weights_are_even():
    world = ScriptedWorld()
    gated = ParticleFilterParams(ess_threshold=0.5)
    state = _advance(PF, _seeded(PF, gated, [0.6] * 8, 0), world)
    (record,) = state.rounds
    assert not record.resampled and record.ess == pytest.approx(8.0)
    assert record.ancestors == list(range(8)) and state.common.draws == 0
    assert [t.parent_id for t in state.particles] == [str(i + 1) for i in range(8)]

    collapsed = [0.999] + [0.05] * 7
    state = _advance(PF, _seeded(PF, gated, collapsed, 0), world)
    assert state.rounds[0].resampled and state.rounds[0].ess / 8 < 0.5

    always = ParticleFilterParams()
    state = _advance(PF, _seeded(PF, always, [0.6] * 8, 0), world)
    assert state.rounds[0].resampled and state.common.draws == 1


TWO_LINES = {"A": (0.90, 0.50, 0.50), "B": (0.10, 0.55, 0.50)}


class TwoLineWorld:
    """Two particles with scripted step rewards: the first sampled from the prompt (seq_id 2)
    runs line A, the second line B, with the step rewards of `TWO_LINES`."""

    async def extend(self, requests: Sequence[ExtendRequest]) -> list[StepOutput]:
        outs = []
        for r in requests:
            line = r.steps[0][0] if r.steps else "AB"[int(r.seq_id) % 2]
            text = f"{line}{len(r.steps)} w\n\n"
            outs.append(StepOutput(r.seq_id, text, (1, 2, 3), -1.0, 3, 1, "delimiter"))
        return outs

    async def score(self, requests) -> list[StepScores]:
        """Per step; a whole answer as one step (`model` aggregation) gets its newest reward."""
        out = []
        for r in requests:
            rewards = TWO_LINES[r.steps[0][0]][: "".join(r.steps).count("\n\n")]
            out.append(StepScores(r.seq_id, rewards[-len(r.steps) :], 3))
        return out


def _weights(state) -> list[float]:
    return [c.weight for c in PF.result(state).candidates]


def test_rounds_that_skip_resampling_accumulate_importance_weights():
    """SIS: with N = 2, rho = ESS / N >= 0.5, so ess_threshold 0.5 never resamples and each round
    adds logit(r_t): rewards (0.90, 0.50) vs (0.10, 0.55) weigh 0.985 : 0.015, not the newest
    score's 0.45 : 0.55."""
    world = TwoLineWorld()
    state = PF.init("task-1", ParticleFilterParams(n=2, ess_threshold=0.5, max_steps=3), 0)
    state = _advance(PF, state, world)
    assert [t.steps[0][0] for t in state.particles] == ["A", "B"]
    assert _weights(state) == pytest.approx([0.98780, 0.01220], abs=1e-5)
    history = [_weights(state)]
    while not PF.is_done(state):
        state = _advance(PF, state, world)
        history.append(_weights(state))
    assert not any(r.resampled for r in state.rounds) and state.common.draws == 0
    expected = [logit([0.9, 0.1]), logit([0.9, 0.1]) + logit([0.5, 0.55])]
    expected.append(expected[-1] + logit([0.5, 0.5]))
    assert history == [pytest.approx(list(softmax(w))) for w in expected]
    assert history[1] == pytest.approx([0.985, 0.015], abs=5e-4)
    # each round's ESS and the resampling decision use the accumulated weights
    for record, w in zip(state.rounds, expected, strict=False):
        assert record.ess == pytest.approx(1.0 / np.sum(softmax(w) ** 2))


def test_a_resample_resets_the_importance_weights():
    world = TwoLineWorld()
    state = PF.init("task-1", ParticleFilterParams(n=2, ess_threshold=0.6, max_steps=3), 0)
    state = _advance(PF, _advance(PF, state, world), world)  # rho 0.512 < 0.6: resampled
    assert state.rounds[0].resampled and state.carried == []
    assert _weights(state) == pytest.approx(
        list(softmax(logit([t.score for t in state.particles])))
    )


def _finished_state(algorithm, params, answers_scores):
    state = algorithm.init("task-1", params, 0)
    state.particles = [
        Trajectory(
            seq_id=str(i + 1),
            parent_id=None,
            steps=[f"so \\boxed{{{a}}}\n\n"],
            rewards=[s],
            score=s,
            finished=True,
            stop="answer",
        )
        for i, (a, s) in enumerate(answers_scores)
    ]
    state.started = True
    state.common.finish("finished")
    return state


@pytest.mark.parametrize("algorithm", [PF, EPF])
def test_weighted_vote_picks_the_heaviest_answer(algorithm):
    # five particles say 7 at 0.7 (exp(logit) 2.33 each, 11.7 in all); one says 9 at 0.9 (9.0)
    particles = [("7", 0.7)] * 5 + [("9", 0.9)] + [("8", 0.3)] * 2
    vote = algorithm.result(
        _finished_state(algorithm, algorithm.Params(selection="weighted_vote"), particles)
    )
    argmax = algorithm.result(_finished_state(algorithm, algorithm.Params(), particles))
    assert vote.final_answer == "7" and argmax.final_answer == "9"
    weights = [c.weight for c in vote.candidates]
    assert sum(weights) == pytest.approx(1.0)
    assert weights == pytest.approx(list(softmax(logit([s for _, s in particles]))))
    # the eval's expected accuracy: sum of weight x correctness
    assert sum(c.weight for c in vote.candidates if c.final_answer == "7") == pytest.approx(
        5 * 7 / 3 / (5 * 7 / 3 + 9 + 2 * 3 / 7)
    )


def test_candidate_weights_give_rejected_particles_nothing():
    pool = [
        Trajectory(seq_id="1", parent_id=None, steps=["a"], score=0.9, finished=True),
        Trajectory(seq_id="2", parent_id=None, steps=["b"], score=0.99, stop="rejected"),
        Trajectory(seq_id="3", parent_id=None, steps=["c"], score=0.5),
    ]
    w = candidate_weights(pool, 1.0)
    assert w[1] == 0.0 and sum(w) == pytest.approx(1.0) and w[0] == pytest.approx(0.9)


# -- ePF: entropic annealing -----------------------------------------------------------------


def test_epf_anneals_when_ess_collapses_early_and_not_late():
    world = ScriptedWorld()
    params = EntropicParticleFilterParams(max_steps=10)
    collapsed = [0.999] + [0.05] * 7

    early = _advance(EPF, _seeded(EPF, params, collapsed, 0), world).rounds[0]
    rho = early.ess / 8
    assert rho < 0.5 and early.t == 1
    assert early.tau == ess_temperature(rho, 0.1) > 1.0

    late = _seeded(EPF, params, collapsed, 0)
    late.rounds = [RoundRecord(t, 8, 8.0, 1.0, 1.0, True, list(range(8))) for t in range(1, 6)]
    assert _advance(EPF, late, world).rounds[-1].t == 6
    assert late.rounds[-1].tau == 1.0  # progress 0.6 >= early_phase

    healthy = _advance(EPF, _seeded(EPF, params, [0.6] * 8, 0), world).rounds[0]
    assert healthy.tau == 1.0


@pytest.mark.parametrize("schedule", ["ess", "entropy", "base"])
def test_annealing_keeps_more_distinct_ancestors_than_no_annealing(schedule):
    world = ScriptedWorld()
    collapsed = [0.99, 0.9] + [0.2] * 6
    distinct = {}
    for early_phase in (0.5, 0.0):  # 0.0 switches annealing off
        params = EntropicParticleFilterParams(schedule=schedule, early_phase=early_phase)
        rounds = [
            _advance(EPF, _seeded(EPF, params, collapsed, s), world).rounds[0] for s in range(100)
        ]
        assert all((r.tau > 1.0) == (early_phase > 0) for r in rounds)
        distinct[early_phase] = np.mean([len(set(r.ancestors)) for r in rounds])
    assert distinct[0.5] > distinct[0.0] + 0.5


def test_epf_answers_with_the_highest_untempered_weight():
    for seed in range(10):
        result = _run(EPF, EntropicParticleFilterParams(), f"task-{seed}", seed, RaggedWorld())
        scores = [c.score for c in result.candidates]
        assert result.candidates[result.chosen].score == max(scores)
        assert [c.weight for c in result.candidates] == pytest.approx(list(softmax(logit(scores))))


# -- ePF: look-ahead modulation --------------------------------------------------------------


def test_lookahead_weights_interpolate_between_current_and_lookahead_scores():
    r, r_hat = [0.2, 0.6, 0.9], [0.7, 0.3, 0.95]
    assert np.array_equal(lookahead_log_weights(r, r_hat, 0.0), logit(r))
    assert np.allclose(lookahead_log_weights(r, r_hat, 1.0), logit(r_hat))
    assert np.allclose(lookahead_log_weights(r, r_hat, 0.5), (logit(r) + logit(r_hat)) / 2)


def test_lookahead_step_becomes_the_first_copy_next_step_without_extra_calls():
    params = EntropicParticleFilterParams(n=8, lookahead=True)
    checked = 0
    for seed in range(10):
        world = RecordingWorld()
        state = EPF.init(f"task-{seed}", params, seed)
        state = _advance(EPF, state, world)  # the first step of every particle
        while not EPF.is_done(state):
            pool = list(state.particles)
            state = _advance(EPF, state, world)  # look-ahead: one expand for the unfinished
            hats = list(state.lookahead)
            unfinished = [i for i, t in enumerate(pool) if not t.finished]
            assert len(hats) == len(unfinished) == len(world.requests[-1])
            assert [h.parent_id for h in hats] == [pool[i].seq_id for i in unfinished]
            hat_of = dict(zip(unfinished, hats, strict=True))

            calls, passes = state.common.spend.policy_calls, state.common.spend.prm_passes
            state = _advance(EPF, state, world)  # resample; only extra copies are extended
            ancestors = state.rounds[-1].ancestors
            first = {a: ancestors.index(a) for a in set(ancestors) if not pool[a].finished}
            for a, i in first.items():
                assert state.particles[i].seq_id == hat_of[a].seq_id
                assert state.particles[i].steps == hat_of[a].steps
                assert state.particles[i].score == hat_of[a].score
            extra = [i for i, a in enumerate(ancestors) if not pool[a].finished]
            fresh = len(extra) - len(first)
            assert state.common.spend.prm_passes - passes == fresh
            assert state.common.spend.policy_calls - calls == (1 if fresh else 0)
            if fresh:
                fresh_parents = [r.parent_id for r in world.requests[-1]]
                assert len(fresh_parents) == fresh
                assert set(fresh_parents) <= {pool[a].seq_id for a in first}
            checked += len(first)
    assert checked > 20


@pytest.mark.parametrize("seed", range(6))
def test_lam_zero_resamples_on_logit_r(seed):
    """With lam = 0 the look-ahead changes nothing in the first round's weights or draws."""
    world = ScriptedWorld()
    plain = EPF.init(f"task-{seed}", EntropicParticleFilterParams(), seed)
    looking = EPF.init(f"task-{seed}", EntropicParticleFilterParams(lookahead=True, lam=0.0), seed)
    for _ in range(2):
        plain = _advance(EPF, plain, world)
    for _ in range(3):
        looking = _advance(EPF, looking, world)
    assert looking.rounds == plain.rounds


def test_lam_one_resamples_on_the_lookahead_score():
    world = ScriptedWorld()
    state = EPF.init("task-2", EntropicParticleFilterParams(lookahead=True, lam=1.0), 5)
    state = _advance(EPF, _advance(EPF, state, world), world)
    p_hat = softmax(logit([h.score for h in state.lookahead]))
    state = _advance(EPF, state, world)
    assert state.rounds[0].ess == pytest.approx(1 / np.sum(p_hat**2))


# -- budgets, batching, resume, accuracy -----------------------------------------------------

CONFIGS = {
    "pf": (PF, ParticleFilterParams()),
    "pf_absorbing_ess_systematic": (
        PF,
        ParticleFilterParams(finished="absorbing", ess_threshold=0.5, resampling="systematic"),
    ),
    "pf_residual_vote": (
        PF,
        ParticleFilterParams(resampling="residual", selection="weighted_vote"),
    ),
    "epf": (EPF, EntropicParticleFilterParams()),
    "epf_entropy_absorbing": (
        EPF,
        EntropicParticleFilterParams(schedule="entropy", finished="absorbing"),
    ),
    "epf_lookahead": (EPF, EntropicParticleFilterParams(lookahead=True)),
    "epf_lookahead_absorbing": (
        EPF,
        EntropicParticleFilterParams(lookahead=True, finished="absorbing", lam=0.8),
    ),
}


@pytest.mark.parametrize("key", list(CONFIGS))
@pytest.mark.parametrize(
    "budget",
    [{"max_generated_tokens": 37}, {"max_generated_tokens": 150}, {"max_prm_passes": 5},
     {"max_prm_passes": 13}, {"max_prm_passes": 21, "max_generated_tokens": 200},
     {"max_prm_passes": 8}],
)  # fmt: skip
def test_budgets_are_never_exceeded(key, budget):
    algorithm, params = CONFIGS[key]
    for seed in range(3):
        world = RaggedWorld()
        result = _run(algorithm, params, f"task-{seed}", seed, world, Budget(**budget))
        assert result.spend.generated_tokens <= budget.get("max_generated_tokens", 10**9)
        assert result.spend.prm_passes <= budget.get("max_prm_passes", 10**9)
        assert result.stop_reason in ("budget", "finished")
        if result.candidates:  # stopped early: the best answered particle, else the best live one
            assert result.chosen is not None
            live = [c for c in result.candidates if c.stop != "rejected"]
            best = max(c.score for c in [c for c in live if answered(c)] or live)
            if params.selection == "argmax":
                assert result.candidates[result.chosen].score == best
            assert sum(c.weight for c in result.candidates) == pytest.approx(1.0)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_one_batched_policy_call_per_advance(key):
    algorithm, params = CONFIGS[key]
    world = RaggedWorld()
    state = algorithm.init("task-4", params, 4)
    while not algorithm.is_done(state):
        calls = state.common.spend.policy_calls
        state = _advance(algorithm, state, world)
        assert state.common.spend.policy_calls - calls <= 1
    assert max(world.extend_batches) == 8 and len(world.extend_batches) >= 3


@pytest.mark.parametrize("key", list(CONFIGS))
def test_resume_after_every_step_is_bit_identical(key):
    algorithm, params = CONFIGS[key]
    for seed, problem in ((1, "task-3"), (22, "task-8")):
        world = RaggedWorld()
        state = algorithm.init(problem, params, seed)
        checkpoints = [algorithm.dumps(state)]
        while not algorithm.is_done(state):
            state = _advance(algorithm, state, world)
            checkpoints.append(algorithm.dumps(state))
        expected = algorithm.result(state)
        assert len(checkpoints) >= 4
        for data in checkpoints:
            resumed = algorithm.loads(data)
            assert type(resumed.params) is type(params)
            assert algorithm.dumps(resumed) == data
            result = asyncio.run(run_search(algorithm, resumed, world, world))
            assert result == expected


def test_epf_checkpoint_keeps_its_types():
    data = EPF.dumps(EPF.init("task-1", EntropicParticleFilterParams(lookahead=True), 3))
    state = EPF.loads(data)
    assert isinstance(state, EntropicParticleFilterState)
    assert isinstance(state.params, EntropicParticleFilterParams) and state.params.lookahead


@functools.cache
def _greedy_accuracy(names: tuple[str, ...]) -> float:
    try:
        from lodestar.orchestrator.algorithms.baselines import Greedy
    except ImportError:
        Greedy = None
    if Greedy is not None:
        results = [_run(Greedy(), Greedy.Params(), p, 0) for p in names]
        return sum(is_correct(p, r.answer) for p, r in zip(names, results, strict=True)) / len(
            names
        )

    async def greedy(problem: str) -> str:  # the scripted policy at temperature 0
        world, common = ScriptedWorld(), SearchCommon(problem=problem, seed=0)
        t = common.root()
        while not t.finished:
            (t,) = await grow(common, world, [t], SamplingParams(temperature=0.0), 40)
        return t.text

    return sum(is_correct(p, asyncio.run(greedy(p))) for p in names) / len(names)


@pytest.mark.parametrize("key", ["pf", "epf", "epf_lookahead", "pf_absorbing_ess_systematic"])
def test_eight_particles_beat_greedy_by_a_clear_margin(key):
    algorithm, params = CONFIGS[key]
    names = tuple(problems(120))
    greedy = _greedy_accuracy(names)
    world = ScriptedWorld()
    search = sum(
        is_correct(p, _run(algorithm, params, p, i, world).answer) for i, p in enumerate(names)
    ) / len(names)
    assert greedy < 0.6  # the scripted task is hard for greedy decoding
    assert search >= greedy + 0.3, (search, greedy)


# -- parameters ------------------------------------------------------------------------------


def test_defaults_follow_the_papers():
    pf, epf = ParticleFilterParams(), EntropicParticleFilterParams()
    assert (pf.n, pf.softmax_temperature, pf.resampling, pf.finished) == (
        8,
        1.0,
        "multinomial",
        "resample",
    )
    assert pf.ess_threshold is None and pf.aggregation == "model" and pf.selection == "argmax"
    assert epf.aggregation == "model"  # the PF authors' code and its_hub score the whole answer
    assert (epf.resampling, epf.ess_threshold, epf.early_phase, epf.schedule) == (
        "systematic",
        0.5,
        0.5,
        "ess",
    )
    assert (epf.lookahead, epf.lam) == (False, 0.5)


@pytest.mark.parametrize(
    ("model", "field", "value"),
    [
        (ParticleFilterParams, "n", 0),
        (ParticleFilterParams, "n", 4097),
        (ParticleFilterParams, "softmax_temperature", 0.0),
        (ParticleFilterParams, "resampling", "stratified"),
        (ParticleFilterParams, "finished", "drop"),
        (ParticleFilterParams, "ess_threshold", 1.5),
        (ParticleFilterParams, "selection", "random"),
        (ParticleFilterParams, "lookahead", True),
        (EntropicParticleFilterParams, "lam", 1.5),
        (EntropicParticleFilterParams, "early_phase", -0.1),
        (EntropicParticleFilterParams, "schedule", "cosine"),
    ],
)
def test_bad_parameters_raise_errors_naming_the_field(model, field, value):
    with pytest.raises(ValidationError) as err:
        model(**{field: value})
    assert err.value.errors()[0]["loc"][0] == field
