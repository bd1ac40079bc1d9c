"""Particle Gibbs (Puri et al., 2025; its_hub's `ParticleGibbs`): PF iterated as conditional SMC.

    sweep 1: a PF run with n particles (exactly `pf` with the same seed)
    sweep s > 1: k = num_ref_particles references, drawn by weight from sweep s-1's final
        particles, stay in the pool at every step. n - k fresh particles start from the prompt;
        in round t a reference competes as the prefix of its first t steps, weighed on the score
        that prefix had (its stored step rewards: no policy or PRM work), w = carried + logit(r).
        n - k ancestors are drawn from all n (a copy of a reference continues from its prefix
        with fresh steps); the references are never resampled away (conditional SMC).
    answer: from the last sweep's final particles, references included (argmax, weighted vote,
        or a sample from the final weights)

Budget: each sweep holds n particles, so its_hub's budget is n x num_iterations; the generated
trajectories are n + (num_iterations - 1) * (n - k), since references cost nothing. The token and
PRM caps hold across all sweeps (one `Spend`). A search stopped inside sweep s > 1 answers from
sweep s - 1's final particles: PG's estimate is a whole sweep.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from lodestar.orchestrator.algorithms.expansion import aggregate, candidate, choose
from lodestar.orchestrator.algorithms.particle_filter import (
    ParticleFilter,
    ParticleFilterParams,
    ParticleFilterState,
    RoundRecord,
    _carried,
    _copy,
    _sparse,
    candidate_weights,
    particle_log_weights,
)
from lodestar.orchestrator.algorithms.state import SearchResult, Trajectory
from lodestar.orchestrator.algorithms.weights import (
    RESAMPLERS,
    effective_sample_size,
    normalized_entropy,
    softmax,
)
from lodestar.workers.contract import Policy, Reward


class ParticleGibbsParams(ParticleFilterParams):
    num_iterations: int = Field(2, ge=1, le=64)
    """Sweeps (conditional SMC runs of n particles each); 1 is PF. Default 2 (ours; its_hub 1)."""
    num_ref_particles: int = Field(1, ge=0, le=4095)
    """References carried from one sweep into the next; at most n - 1 (one fresh particle)."""

    @field_validator("num_ref_particles")
    @classmethod
    def _leaves_a_fresh_particle(cls, value: int, info: ValidationInfo) -> int:
        n = info.data.get("n")  # absent when n itself is invalid: that error is reported
        if n is not None and value > n - 1:
            raise ValueError(f"must be at most n - 1 = {n - 1}")
        return value


@dataclass(slots=True)
class ParticleGibbsState(ParticleFilterState):
    params: ParticleGibbsParams
    sweep: int = 0
    """Sweeps completed; the pool fields (particles, carried, absorbed) are the current one's."""
    sweep_start: int = 0
    """len(rounds) when the current sweep began: its round r weighs the references' r-step
    prefixes."""
    references: list[Trajectory] = field(default_factory=list)
    """The current sweep's reference trajectories (finished, from the previous sweep)."""
    reference_carried: list[float] = field(default_factory=list)
    """Per reference, the log-weight carried since the last resample (empty: all zero)."""
    last_sweep: list[Trajectory] = field(default_factory=list)
    """The previous sweep's final particles (absorbed, pool, references): its answer."""
    last_sweep_carried: list[float] = field(default_factory=list)
    reference_draws: list[list[int]] = field(default_factory=list)
    """Per completed sweep but the last, the indices into its final particles of the references
    drawn for the next sweep (its_hub's `ref_indices_lst`)."""


def reference_prefix(reference: Trajectory, depth: int, aggregation: str) -> Trajectory:
    """The reference as it stood after `depth` steps of its own sweep, scored as it was then (its
    step rewards so far); a reference of at most `depth` steps is itself (finished).

    A prefix's token count and log-probability are not stored: they are left 0 (only differences
    within one expansion are ever read)."""
    if depth >= len(reference.steps):
        return reference
    rewards = list(reference.rewards[:depth])
    return Trajectory(
        seq_id=reference.seq_id,
        parent_id=None,
        steps=list(reference.steps[:depth]),
        rewards=rewards,
        score=aggregate(rewards, aggregation),
    )


class ParticleGibbs(ParticleFilter):
    """PG: one advance is a sweep's initial step or one (conditional) PF round; the advance that
    ends a sweep draws the next sweep's references."""

    name = "pg"
    Params = ParticleGibbsParams
    State = ParticleGibbsState

    async def _step(self, state: ParticleFilterState, policy: Policy, reward: Reward) -> None:
        assert isinstance(state, ParticleGibbsState)
        params = state.params
        if not state.started:  # the sweep's first step: the fresh particles leave the prompt
            root = state.common.root()
            fresh = [root] * (params.n - len(state.references))
            state.particles = await self._expand(state, policy, reward, fresh)
            state.started = True
        else:
            await self._round(state, policy, reward)
        if params.finished == "absorbing":
            self._absorb(state)
        if not all(t.finished for t in state.particles):
            return
        if any(t.stop == "budget" for t in (*state.absorbed, *state.particles)):
            state.common.finish("budget")
        elif state.sweep + 1 >= params.num_iterations:
            state.common.finish("finished")
        else:
            self._next_sweep(state)

    @staticmethod
    def _final_pool(state: ParticleGibbsState) -> tuple[list[Trajectory], list[float]]:
        """The current sweep's particles, references included, and their carried log-weights."""
        pool = [*state.absorbed, *state.particles, *state.references]
        carried = [
            *_carried(state.absorbed_carried, len(state.absorbed)),
            *_carried(state.carried, len(state.particles)),
            *_carried(state.reference_carried, len(state.references)),
        ]
        return pool, carried

    def _next_sweep(self, state: ParticleGibbsState) -> None:
        """Keep the finished sweep as the answer so far, draw its references, empty the pool."""
        pool, carried = self._final_pool(state)
        weights = np.asarray(candidate_weights(pool, state.params.softmax_temperature, carried))
        k = state.params.num_ref_particles
        drawn: list[int] = []
        if k and weights.sum() > 0:  # its_hub: np.random.choice by the final weights
            choice = state.common.rng().choice(len(pool), size=k, p=weights / weights.sum())
            drawn = sorted(int(i) for i in choice)
        state.last_sweep, state.last_sweep_carried = pool, _sparse(carried)
        state.reference_draws.append(drawn)
        state.references = [_copy(pool[i]) for i in drawn]
        state.reference_carried = []
        state.particles, state.carried = [], []
        state.absorbed, state.absorbed_carried = [], []
        state.started = False
        state.sweep += 1
        state.sweep_start = len(state.rounds)

    async def _round(self, state: ParticleFilterState, policy: Policy, reward: Reward) -> None:
        """PF's round, conditioned on the references: they weigh in as their prefixes, n - k
        ancestors are drawn from all n, and the references stay. Without references: PF's."""
        assert isinstance(state, ParticleGibbsState)
        if not state.references:
            await super()._round(state, policy, reward)
            return
        params, pool, common = state.params, state.particles, state.common
        depth = len(state.rounds) - state.sweep_start + 1  # steps of the unfinished particles
        refs = [reference_prefix(r, depth, params.aggregation) for r in state.references]
        ref_carried = _carried(state.reference_carried, len(refs))
        # finished="absorbing": a reference that has finished has left the pool, as a particle does
        competing = [
            j for j, r in enumerate(refs) if not (params.finished == "absorbing" and r.finished)
        ]
        sources = [*pool, *(refs[j] for j in competing)]
        carried = [*_carried(state.carried, len(pool)), *(ref_carried[j] for j in competing)]
        w = particle_log_weights(sources, carried)
        live = np.isfinite(w)
        p = softmax(w[live], params.softmax_temperature)  # ESS and entropy: live particles only
        ess, entropy = effective_sample_size(p), normalized_entropy(p)
        t, dead = len(state.rounds) + 1, int(len(sources) - live.sum())
        tau, resample = self._temperature(state, ess / len(p), entropy, t)
        resample = resample or dead > 0
        if resample:  # n - k ancestors from all n: the references compete but are not replaced
            q = softmax(w, params.softmax_temperature * tau)
            drawn = RESAMPLERS[params.resampling](q, len(pool), common.rng())
            ancestors = [int(a) for a in drawn]
            pool_carried, ref_carried = [0.0] * len(pool), [0.0] * len(refs)
        else:  # sequential importance sampling, references included
            ancestors = list(range(len(pool)))
            pool_carried = [float(x) for x in w[: len(pool)]]
            for j, x in zip(competing, w[len(pool) :], strict=True):
                ref_carried[j] = float(x)

        forks: dict[int, Trajectory] = {}
        new: list[Trajectory] = []
        fresh: list[int] = []
        for a in ancestors:
            parent = sources[a]
            if parent.finished:
                new.append(_copy(parent))
                continue
            if a >= len(pool):  # a copy of a reference's prefix: a new sequence, nothing cached
                if a not in forks:
                    forks[a] = dataclasses.replace(parent, seq_id=common.new_id())
                parent = forks[a]
            fresh.append(len(new))
            new.append(parent)
        children = await self._expand(state, policy, reward, [new[i] for i in fresh])
        for i, child in zip(fresh, children, strict=True):
            new[i] = child

        state.particles, state.carried = new, _sparse(pool_carried)
        state.reference_carried = _sparse(ref_carried)
        record = RoundRecord(t, len(sources), ess, entropy, tau, resample, ancestors, dead)
        state.rounds.append(record)

    def result(self, state: ParticleFilterState) -> SearchResult:
        assert isinstance(state, ParticleGibbsState)
        if state.sweep > 0 and state.common.stop_reason != "finished":  # inside a later sweep
            pool = state.last_sweep
            carried = _carried(state.last_sweep_carried, len(pool))
        else:
            pool, carried = self._final_pool(state)
        weights = candidate_weights(pool, state.params.softmax_temperature, carried)
        candidates = tuple(candidate(t, w) for t, w in zip(pool, weights, strict=True))
        chosen = choose(candidates, state.params.selection, state.common.selection_rng())
        return SearchResult.of(self.name, state.common, candidates, chosen)
