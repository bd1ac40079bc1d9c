"""Particle filtering (Puri et al., 2025) and entropic particle filtering (ePF, same group).

Decoding is inference in a state-space model: the policy is the proposal, the PRM score of a
prefix is the likelihood, so a particle's log-weight is w = logit(score). The score already judges
the whole prefix, so weights are not accumulated: after resampling the prefix score is the weight.

    every particle samples its first step from the prompt; score it            (one expand)
    while any particle is unfinished:                                          (one expand)
        p = softmax(w / softmax_temperature)
        draw ancestors from p (sorted, so copies of one parent sit together and share its seq_id:
            the next grow forks the parent's KV cache). finished="resample": finished particles
            are drawn too and copies stay finished; "absorbing": they have left the pool and only
            as many as remain unfinished are drawn. With ess_threshold, resample only if ESS/N < it.
        every unfinished particle samples its next step; score it
    answer: the highest score (or the heaviest answer by weighted vote)

ePF adds Entropic Annealing (resample from softmax(w / tau), tau from `annealing`, while the
weights have collapsed early) and, optionally, Look-ahead Modulation (see `EntropicParticleFilter`).
Every round records ESS, entropy and tau in `state.rounds` for the evaluation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field

from lodestar.orchestrator.algorithms.annealing import Schedule, annealing_temperature
from lodestar.orchestrator.algorithms.base import ScoredParams, SearchAlgorithm, Selection
from lodestar.orchestrator.algorithms.expansion import candidate, choose, expand
from lodestar.orchestrator.algorithms.protocols import Policy, Reward
from lodestar.orchestrator.algorithms.state import (
    Budget,
    SearchCommon,
    SearchResult,
    Trajectory,
)
from lodestar.orchestrator.algorithms.weights import (
    RESAMPLERS,
    effective_sample_size,
    logit,
    normalized_entropy,
    softmax,
)
from lodestar.workers.messages import Prompt

Resampling = Literal["multinomial", "systematic", "residual"]
FinishedHandling = Literal["resample", "absorbing"]


class _ParticleParams(ScoredParams):
    n: int = Field(8, ge=1, le=4096)
    """Particles: the budget (one step per particle per round)."""
    softmax_temperature: float = Field(1.0, gt=0.0, le=100.0)
    resampling: Resampling = "multinomial"
    finished: FinishedHandling = "resample"
    """resample: finished particles are drawn too; absorbing: they leave the pool."""
    selection: Selection = "argmax"
    """argmax: highest score; weighted_vote: answer with the largest summed particle weight."""


class ParticleFilterParams(_ParticleParams):
    ess_threshold: float | None = Field(None, ge=0.0, le=1.0)
    """Resample only when ESS / N falls below this; None resamples every round."""


class EntropicParticleFilterParams(_ParticleParams):
    resampling: Resampling = "systematic"
    ess_threshold: float = Field(0.5, ge=0.0, le=1.0)
    """Anneal only when ESS / N falls below this (ePF always resamples)."""
    early_phase: float = Field(0.5, ge=0.0, le=1.0)
    """Anneal only while progress t / max_steps is below this."""
    schedule: Schedule = "ess"
    lookahead: bool = False
    """Look-ahead Modulation: resample on a one-step look-ahead score (one extra expand/round)."""
    lam: float = Field(0.5, ge=0.0, le=1.0)
    """LaM mixing: w~ = logit(r) + lam * (logit(r^) - logit(r))."""


@dataclass(slots=True)
class RoundRecord:
    """Diagnostics of one round, on p = softmax(w / softmax_temperature) before annealing
    (w the resampling log-weights: logit(r), or LaM's w~)."""

    t: int
    """Round index, 1-based; ePF's progress is t / max_steps."""
    pool: int
    ess: float
    entropy: float
    tau: float
    resampled: bool
    ancestors: list[int]
    """Pool index each new particle descends from (identity when not resampled)."""


@dataclass(slots=True)
class ParticleFilterState:
    common: SearchCommon
    params: ParticleFilterParams
    particles: list[Trajectory] = field(default_factory=list)
    """The pool. With finished="absorbing" it holds only unfinished particles."""
    absorbed: list[Trajectory] = field(default_factory=list)
    """Finished particles that left the pool (finished="absorbing")."""
    lookahead: list[Trajectory] = field(default_factory=list)
    """ePF LaM: the look-ahead step x^ of each unfinished pool particle, in pool order, awaiting
    resampling (empty between rounds)."""
    rounds: list[RoundRecord] = field(default_factory=list)
    started: bool = False


@dataclass(slots=True)
class EntropicParticleFilterState(ParticleFilterState):
    params: EntropicParticleFilterParams


def particle_log_weights(pool: Sequence[Trajectory]) -> np.ndarray:
    """w = logit(score); a rejected particle (early rejection) has weight 0, so -inf."""
    w = logit([t.score if t.score is not None else 0.0 for t in pool])
    return np.where([t.pruned for t in pool], -np.inf, w)


def lookahead_log_weights(
    scores: Sequence[float], lookahead_scores: Sequence[float], lam: float
) -> np.ndarray:
    """LaM's resampling log-weight: logit(r) + lam * (logit(r^) - logit(r))."""
    w, w_hat = logit(scores), logit(lookahead_scores)
    return w + lam * (w_hat - w)


def candidate_weights(pool: Sequence[Trajectory], softmax_temperature: float) -> list[float]:
    """Normalised particle weights softmax(w / T): the eval's expected accuracy is
    sum(weight * correct); rejected particles get 0."""
    w = particle_log_weights(pool)
    if not np.isfinite(w).any():
        return [0.0] * len(pool)
    return [float(x) for x in softmax(w, softmax_temperature)]


def _copy(t: Trajectory) -> Trajectory:
    """A resampled copy: same seq_id (so the worker forks its cache), own lists."""
    return dataclasses.replace(t, steps=list(t.steps), rewards=list(t.rewards))


class ParticleFilter(SearchAlgorithm[ParticleFilterParams, ParticleFilterState]):
    """PF: one advance is the initial step or one round (resample + one batched expand)."""

    name = "pf"
    Params = ParticleFilterParams
    State = ParticleFilterState

    def init(
        self, problem: Prompt, params: ParticleFilterParams, seed: int, budget: Budget | None = None
    ) -> ParticleFilterState:
        return self.State(common=self.new_common(problem, seed, budget), params=params)

    async def _step(self, state: ParticleFilterState, policy: Policy, reward: Reward) -> None:
        if not state.started:
            root = state.common.root()
            state.particles = await self._expand(state, policy, reward, [root] * state.params.n)
            state.started = True
        elif self._looks_ahead(state) and not state.lookahead:
            unfinished = [t for t in state.particles if not t.finished]
            state.lookahead = await self._expand(state, policy, reward, unfinished)
            return
        else:
            await self._round(state, policy, reward)
        if state.params.finished == "absorbing":
            state.absorbed += [t for t in state.particles if t.finished]
            state.particles = [t for t in state.particles if not t.finished]
        if all(t.finished for t in state.particles):
            cut = any(t.stop == "budget" for t in (*state.absorbed, *state.particles))
            state.common.finish("budget" if cut else "finished")

    async def _round(self, state: ParticleFilterState, policy: Policy, reward: Reward) -> None:
        """Weigh, maybe resample, extend the unfinished. The state changes only on success."""
        params, pool = state.params, state.particles
        w = self._resampling_log_weights(state)
        p = softmax(w, params.softmax_temperature)
        ess, entropy = effective_sample_size(p), normalized_entropy(p)
        t = len(state.rounds) + 1
        tau, resample = self._temperature(state, ess / len(pool), entropy, t)
        if resample:
            q = softmax(w, params.softmax_temperature * tau)
            drawn = RESAMPLERS[params.resampling](q, len(pool), state.common.rng())
            ancestors = [int(a) for a in drawn]
        else:
            ancestors = list(range(len(pool)))

        unfinished = [i for i, x in enumerate(pool) if not x.finished]
        looked = dict(zip(unfinished, state.lookahead, strict=True)) if state.lookahead else {}
        new: list[Trajectory] = []
        fresh: list[int] = []
        for a in ancestors:
            parent = pool[a]
            hat = looked.pop(a, None)
            if parent.finished:
                new.append(_copy(parent))
            elif hat is not None and not hat.pruned:
                new.append(hat)  # LaM: the first copy keeps its already-scored look-ahead step
            else:
                fresh.append(len(new))
                new.append(parent)
        children = await self._expand(state, policy, reward, [new[i] for i in fresh])
        for i, child in zip(fresh, children, strict=True):
            new[i] = child

        state.particles, state.lookahead = new, []
        state.rounds.append(RoundRecord(t, len(pool), ess, entropy, tau, resample, ancestors))

    async def _expand(
        self, state: ParticleFilterState, policy: Policy, reward: Reward, parents: list[Trajectory]
    ) -> list[Trajectory]:
        p = state.params
        return await expand(
            state.common, policy, reward, parents, p.sampling(), p.max_steps, p.aggregation
        )

    def _looks_ahead(self, state: ParticleFilterState) -> bool:
        return False

    def _resampling_log_weights(self, state: ParticleFilterState) -> np.ndarray:
        return particle_log_weights(state.particles)

    def _temperature(
        self, state: ParticleFilterState, rho: float, entropy: float, t: int
    ) -> tuple[float, bool]:
        """(tau, whether to resample) for round t given the untempered weights' health."""
        threshold = state.params.ess_threshold
        return 1.0, threshold is None or rho < threshold

    def result(self, state: ParticleFilterState) -> SearchResult:
        live = state.particles
        if state.lookahead:  # stopped between look-ahead and resampling: x^ is the newest step
            hats = iter(state.lookahead)
            live = [t if t.finished else next(hats) for t in live]
        pool = [*state.absorbed, *live]
        weights = candidate_weights(pool, state.params.softmax_temperature)
        candidates = tuple(candidate(t, w) for t, w in zip(pool, weights, strict=True))
        chosen = choose(candidates, state.params.selection)
        return SearchResult.of(self.name, state.common, candidates, chosen)


class EntropicParticleFilter(ParticleFilter):
    """ePF: PF resampling from softmax(w / tau) with tau annealed while the weights collapse early
    (systematic resampling by default; the answer uses the untempered weights).

    Look-ahead Modulation (lookahead=True), an auxiliary-particle-filter style round in two
    advances: (1) every unfinished particle samples a look-ahead step x^, scored r^ (one expand);
    (2) resample on w~ = logit(r) + lam * (logit(r^) - logit(r)); the FIRST copy of each ancestor
    takes x^ as its next step (already scored: no extra policy or PRM work), and any further
    copies sample fresh next steps (one expand for those only). Fresh samples for the extra
    copies keep the copies of a strong ancestor diverse instead of duplicating x^.
    """

    name = "epf"
    Params = EntropicParticleFilterParams
    State = EntropicParticleFilterState

    def _looks_ahead(self, state: ParticleFilterState) -> bool:
        return bool(state.params.lookahead)

    def _resampling_log_weights(self, state: ParticleFilterState) -> np.ndarray:
        w = particle_log_weights(state.particles)
        if not state.lookahead:
            return w
        idx = [i for i, t in enumerate(state.particles) if not t.finished]
        r = [state.particles[i].score for i in idx]
        r_hat = [t.score for t in state.lookahead]
        w[idx] = lookahead_log_weights(r, r_hat, state.params.lam)
        return w

    def _temperature(
        self, state: ParticleFilterState, rho: float, entropy: float, t: int
    ) -> tuple[float, bool]:
        p = state.params
        progress = t / p.max_steps
        tau = annealing_temperature(
            p.schedule, rho, entropy, progress, p.ess_threshold, p.early_phase
        )
        return tau, True
