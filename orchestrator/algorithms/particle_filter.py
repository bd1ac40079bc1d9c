"""Particle filtering (Puri et al., 2025) and entropic particle filtering (ePF, same group).

Decoding is inference in a state-space model: the policy is the proposal (transition), the PRM is
the emission model, so each round multiplies a particle's importance weight by the odds of its
newest score: in log space the increment is logit(score_t) (sequential importance sampling). Every
round that resamples resets the weights, so with resampling every round (the paper's and its_hub's
PF) a particle's log-weight is just logit(score).

    every particle samples its first step from the prompt; score it            (one expand)
    while any live particle is unfinished:                                     (one expand)
        w = carried + logit(score)        (carried: sum of the increments since the last resample)
        p = softmax(w / softmax_temperature) over the live particles; ESS, entropy from p
        draw ancestors from p (sorted, so copies of one parent sit together and share its seq_id:
            the next grow forks the parent's KV cache). finished="resample": finished particles
            are drawn too and copies stay finished; "absorbing": they have left the pool and only
            as many as remain in it are drawn. With ess_threshold, resample only if ESS/N < it
            (or some particle is dead); a round that does not resample carries w into the next.
        every unfinished particle samples its next step; score it
    answer: a finished, answered particle when one exists (highest score, or weighted vote)

Early rejection (see `early_rejection`) kills particles: a rejected particle is dead, not finished.
It keeps its slot in the pool with weight zero until the next resampling refills the slot from the
live particles (a round with dead particles always resamples); it is never absorbed, and ESS and
entropy are computed over the live particles only, N being their number.

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
from lodestar.orchestrator.algorithms.base import (
    Aggregation,
    ParticleSelection,
    ScoredParams,
    StepSearch,
)
from lodestar.orchestrator.algorithms.expansion import candidate, choose
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
from lodestar.workers.contract import Policy, Reward
from lodestar.workers.messages import Prompt

Resampling = Literal["multinomial", "systematic", "residual"]
FinishedHandling = Literal["resample", "absorbing"]


class _ParticleParams(ScoredParams):
    n: int = Field(8, ge=1, le=4096)
    """Particles: the budget (one step per particle per round)."""
    aggregation: Aggregation = "model"
    """`model` as the PF authors: their code and its_hub's benchmark score each partial answer
    with the PRM as one step (its_hub `aggregation_method="model"`), and the paper's ablation
    finds it scales best. The other searches keep search-and-learn's `last`."""
    softmax_temperature: float = Field(1.0, gt=0.0, le=100.0)
    resampling: Resampling = "multinomial"
    finished: FinishedHandling = "resample"
    """resample: finished particles are drawn too; absorbing: they leave the pool."""
    selection: ParticleSelection = "argmax"
    """argmax: highest score; weighted_vote: answer with the largest summed particle weight;
    sample: one particle drawn from the normalised final weights (seeded by the search)."""


class ParticleFilterParams(_ParticleParams):
    ess_threshold: float | None = Field(None, ge=0.0, le=1.0)
    """Resample only when ESS / N falls below this (N: live particles; a round with dead ones
    resamples anyway); None resamples every round. Rounds in between accumulate weights (SIS)."""


class EntropicParticleFilterParams(_ParticleParams):
    resampling: Resampling = "systematic"
    ess_threshold: float = Field(0.5, ge=0.0, le=1.0)
    """Anneal only when ESS / N (live particles) falls below this (ePF always resamples)."""
    early_phase: float = Field(0.5, ge=0.0, le=1.0)
    """Anneal only while progress t / max_steps is below this."""
    schedule: Schedule = "ess"
    lookahead: bool = False
    """Look-ahead Modulation: resample on a one-step look-ahead score (one extra expand/round)."""
    lam: float = Field(0.5, ge=0.0, le=1.0)
    """LaM mixing: w~ = logit(r) + lam * (logit(r^) - logit(r))."""


@dataclass(slots=True)
class RoundRecord:
    """Diagnostics of one round, on p = softmax(w / softmax_temperature) over the live particles
    before annealing (w the resampling log-weights: carried + logit(r), or LaM's w~)."""

    t: int
    """Round index, 1-based; ePF's progress is t / max_steps."""
    pool: int
    ess: float
    """Over the live particles: ESS / (pool - dead) is the rho the gates compare."""
    entropy: float
    """Normalised by log(pool - dead)."""
    tau: float
    resampled: bool
    ancestors: list[int]
    """Pool index each new particle descends from (identity when not resampled)."""
    dead: int = 0
    """Pool particles early rejection had killed: weight zero, refilled by this resampling."""


@dataclass(slots=True)
class ParticleFilterState:
    common: SearchCommon
    params: ParticleFilterParams
    particles: list[Trajectory] = field(default_factory=list)
    """The pool. With finished="absorbing" it holds only unfinished and dead (rejected) ones."""
    carried: list[float] = field(default_factory=list)
    """Per pool particle, the log-weight accumulated in rounds since the last resample (its
    log-weight is carried + logit(score)); empty means all zero, as after every resample."""
    absorbed: list[Trajectory] = field(default_factory=list)
    """Finished particles that left the pool (finished="absorbing"); never rejected ones."""
    absorbed_carried: list[float] = field(default_factory=list)
    """`carried` of each absorbed particle when it left (empty: all zero)."""
    lookahead: list[Trajectory] = field(default_factory=list)
    """ePF LaM: the look-ahead step x^ of each unfinished pool particle, in pool order, awaiting
    resampling (empty between rounds)."""
    rounds: list[RoundRecord] = field(default_factory=list)
    started: bool = False


@dataclass(slots=True)
class EntropicParticleFilterState(ParticleFilterState):
    params: EntropicParticleFilterParams


def particle_log_weights(pool: Sequence[Trajectory], carried: Sequence[float] = ()) -> np.ndarray:
    """Importance log-weights w = carried + logit(score); a dead (early-rejected) particle -inf.

    Sequential importance sampling with the PRM as the emission model, one observation per step
    (Puri et al., 2025; its_hub's `ParticleGibbs` appends logit(score) to a particle's
    `partial_log_weights` every step and, resampling every step, weighs by the newest): every
    round adds the increment logit(score_t) of the particle's score after that round, and a
    resample resets the sum. Rewards (0.9, 0.5) vs (0.1, 0.55) weigh 0.985 : 0.015. With
    `last` and `model` aggregation score_t is the newest step's reward (the paper's definition);
    with `min` and `prod` it is the aggregated prefix score (ours: resampling every round then
    gives the ungated PF for every aggregation). Finished particles in the pool are weighed again
    each round on their final score, as resampling every round does. (Not the telescoping
    increment logit(r_t) - logit(r_{t-1}): its sum is logit(r_t) whatever came before.)
    """
    w = logit([t.score if t.score is not None else 0.0 for t in pool])
    if len(carried):
        w = w + np.asarray(carried, dtype=np.float64)
    return np.where([t.pruned for t in pool], -np.inf, w)


def _carried(carried: Sequence[float], n: int) -> list[float]:
    """The dense form of a `carried` list (empty means n zeros)."""
    return list(carried) if carried else [0.0] * n


def _sparse(carried: Sequence[float]) -> list[float]:
    """The stored form: empty when nothing is carried (the default after every resample)."""
    return [float(x) for x in carried] if any(x != 0.0 for x in carried) else []


def lookahead_log_weights(
    scores: Sequence[float], lookahead_scores: Sequence[float], lam: float
) -> np.ndarray:
    """LaM's resampling log-weight: logit(r) + lam * (logit(r^) - logit(r))."""
    w, w_hat = logit(scores), logit(lookahead_scores)
    return w + lam * (w_hat - w)


def candidate_weights(
    pool: Sequence[Trajectory], softmax_temperature: float, carried: Sequence[float] = ()
) -> list[float]:
    """Normalised importance weights softmax(w / T), w = carried + logit(score): the eval's
    expected accuracy is sum(weight * correct); rejected particles get 0."""
    w = particle_log_weights(pool, carried)
    if not np.isfinite(w).any():
        return [0.0] * len(pool)
    return [float(x) for x in softmax(w, softmax_temperature)]


def _copy(t: Trajectory) -> Trajectory:
    """A resampled copy: same seq_id (so the worker forks its cache), own lists."""
    return dataclasses.replace(t, steps=list(t.steps), rewards=list(t.rewards))


class ParticleFilter(StepSearch[ParticleFilterParams, ParticleFilterState]):
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
            self._absorb(state)
        if all(t.finished for t in state.particles):  # no live particle left to extend
            cut = any(t.stop == "budget" for t in (*state.absorbed, *state.particles))
            state.common.finish("budget" if cut else "finished")

    @staticmethod
    def _absorb(state: ParticleFilterState) -> None:
        """finished="absorbing": finished particles leave the pool; dead ones keep their slot."""
        pool, carried = state.particles, _carried(state.carried, len(state.particles))
        gone = [i for i, t in enumerate(pool) if t.finished and not t.pruned]
        if not gone:
            return
        stay = [i for i, t in enumerate(pool) if not t.finished or t.pruned]
        absorbed_carried = _carried(state.absorbed_carried, len(state.absorbed))
        state.absorbed += [pool[i] for i in gone]
        state.absorbed_carried = _sparse(absorbed_carried + [carried[i] for i in gone])
        state.particles = [pool[i] for i in stay]
        state.carried = _sparse([carried[i] for i in stay])

    async def _round(self, state: ParticleFilterState, policy: Policy, reward: Reward) -> None:
        """Weigh, maybe resample, extend the unfinished. The state changes only on success."""
        params, pool = state.params, state.particles
        w = self._resampling_log_weights(state)
        live = np.isfinite(w)
        p = softmax(w[live], params.softmax_temperature)  # ESS and entropy: live particles only
        ess, entropy = effective_sample_size(p), normalized_entropy(p)
        t, dead = len(state.rounds) + 1, int(len(pool) - live.sum())
        tau, resample = self._temperature(state, ess / len(p), entropy, t)
        resample = resample or dead > 0  # a dead particle's slot is refilled by resampling
        if resample:
            q = softmax(w, params.softmax_temperature * tau)
            drawn = RESAMPLERS[params.resampling](q, len(pool), state.common.rng())
            ancestors = [int(a) for a in drawn]
            carried = [0.0] * len(pool)
        else:  # sequential importance sampling: the weights so far carry into the next round
            ancestors = list(range(len(pool)))
            carried = [float(x) for x in particle_log_weights(pool, state.carried)]

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

        state.particles, state.lookahead, state.carried = new, [], _sparse(carried)
        record = RoundRecord(t, len(pool), ess, entropy, tau, resample, ancestors, dead)
        state.rounds.append(record)

    def _looks_ahead(self, state: ParticleFilterState) -> bool:
        return False

    def _resampling_log_weights(self, state: ParticleFilterState) -> np.ndarray:
        return particle_log_weights(state.particles, state.carried)

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
        carried = [
            *_carried(state.absorbed_carried, len(state.absorbed)),
            *_carried(state.carried, len(live)),
        ]
        weights = candidate_weights(pool, state.params.softmax_temperature, carried)
        candidates = tuple(candidate(t, w) for t, w in zip(pool, weights, strict=True))
        chosen = choose(candidates, state.params.selection, state.common.selection_rng())
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
        w = particle_log_weights(state.particles, state.carried)
        if not state.lookahead:
            return w
        idx = [i for i, t in enumerate(state.particles) if not t.finished]  # dead ones stay -inf
        r = [state.particles[i].score for i in idx]
        r_hat = [t.score for t in state.lookahead]
        carried = np.asarray(_carried(state.carried, len(state.particles)))[idx]
        w[idx] = carried + lookahead_log_weights(r, r_hat, state.params.lam)
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
