"""Growing and scoring trajectories: the one place that talks to the policy and the reward model.

Every algorithm extends and scores through these functions, so spend accounting, budget caps,
finish rules, cache-friendly ids and early rejection are written once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from lodestar.orchestrator.algorithms.answers import (
    extract_boxed,
    final_answer,
    has_final_answer,
    winning_group,
)
from lodestar.orchestrator.algorithms.state import (
    BudgetExhausted,
    Candidate,
    EarlyRejection,
    SearchCommon,
    Trajectory,
)
from lodestar.workers.contract import Policy, Reward
from lodestar.workers.messages import ExtendRequest, SamplingParams, ScoreRequest, StepOutput


def aggregate(rewards: Sequence[float], how: str) -> float:
    if not rewards:
        raise ValueError("no rewards to aggregate")
    if how in ("last", "model"):
        return float(rewards[-1])
    if how == "min":
        return float(min(rewards))
    if how == "prod":
        return float(math.prod(rewards))
    raise ValueError(f"unknown aggregation {how!r}")


def require_prm_passes(common: SearchCommon, n: int) -> None:
    cap = common.budget.max_prm_passes
    if cap is not None and common.spend.prm_passes + n > cap:
        raise BudgetExhausted("prm_passes")


def _token_allowance(common: SearchCommon, n: int, sampling: SamplingParams) -> int:
    """Tokens each of n new steps may use so that the generated-token cap cannot be exceeded."""
    cap = common.budget.max_generated_tokens
    if cap is None:
        return sampling.max_step_tokens
    per = (cap - common.spend.generated_tokens) // n
    if per <= 0:
        raise BudgetExhausted("generated_tokens")
    return min(per, sampling.max_step_tokens)


def _child(parent: Trajectory, seq_id: str, out: StepOutput) -> Trajectory:
    return Trajectory(
        seq_id=seq_id,
        parent_id=parent.seq_id,
        steps=[*parent.steps, out.text],
        rewards=list(parent.rewards),
        logprob=parent.logprob + out.logprob,
        num_tokens=parent.num_tokens + out.num_tokens,
        scored_id=parent.seq_id if parent.rewards else parent.scored_id,
    )


def _mark_finished(t: Trajectory, out: StepOutput, max_steps: int, budget_cut: bool) -> None:
    if out.eos:
        t.finished, t.stop = True, "eos"
    elif has_final_answer(t.steps[-1]):
        t.finished, t.stop = True, "answer"
    elif out.stop_reason == "context":  # the policy's context is full: it cannot go on
        t.finished, t.stop = True, "context"
    elif budget_cut:
        t.finished, t.stop = True, "budget"
    elif len(t.steps) >= max_steps:
        t.finished, t.stop = True, "max_steps"


def _request(
    common: SearchCommon,
    parent_id: str,
    steps: Sequence[str],
    sampling: SamplingParams,
    max_new_tokens: int | None,
    partial_step: str = "",
) -> ExtendRequest:
    """A request for one new sequence: a fresh id and the sampling seed that id fixes."""
    sid = common.new_id()
    return ExtendRequest(
        seq_id=sid,
        parent_id=parent_id,
        prompt=common.problem,
        steps=tuple(steps),
        seed=common.request_seed(sid),
        sampling=sampling,
        partial_step=partial_step,
        max_new_tokens=max_new_tokens,
    )


async def _extend(
    common: SearchCommon,
    policy: Policy,
    requests: list[ExtendRequest],
) -> list[StepOutput]:
    outs = await policy.extend(requests)
    if [o.seq_id for o in outs] != [r.seq_id for r in requests]:
        raise RuntimeError("policy returned steps out of order or incomplete")
    common.spend.policy_calls += 1
    common.spend.generated_tokens += sum(o.num_tokens for o in outs)
    common.spend.prompt_tokens += sum(o.prompt_tokens for o in outs)
    return outs


async def grow(
    common: SearchCommon,
    policy: Policy,
    parents: Sequence[Trajectory],
    sampling: SamplingParams,
    max_steps: int,
    continue_steps: bool = True,
    to_end: bool = False,
) -> list[Trajectory]:
    """One new step for each parent (a parent listed k times forks k children).

    A step cut at `max_step_tokens` (not by a budget) has not ended: with `continue_steps` it is
    continued as a partial step (one batched call for all such steps, up to `MAX_STEP_CALLS`
    calls in all), so the PRM scores it as the one step it is, never a cut piece as a step.
    With `to_end` the worker gets no delimiter (`to_end_sampling`): the text runs to EOS or the
    cap of those calls and is then split into steps at the delimiter (`split_steps`).
    """
    if not parents:
        return []
    delimiter = sampling.step_delimiter
    if to_end:
        sampling = to_end_sampling(sampling)
    allowance = _token_allowance(common, len(parents), sampling)
    cap = allowance if allowance < sampling.max_step_tokens else None
    requests = [_request(common, p.seq_id, p.steps, sampling, cap) for p in parents]
    outs = await _extend(common, policy, requests)
    children = [_child(p, r.seq_id, o) for p, r, o in zip(parents, requests, outs, strict=True)]
    caps = [cap] * len(parents)
    cut = [i for i, o in enumerate(outs) if o.stop_reason == "length" and cap is None]
    for _ in range(MAX_STEP_CALLS - 1 if continue_steps else 0):
        if not cut:
            break
        try:
            more = _token_allowance(common, len(cut), sampling)
        except BudgetExhausted:  # the budget ends these steps: they are budget cuts
            for i in cut:
                caps[i] = 0
            break
        more_cap = more if more < sampling.max_step_tokens else None
        reqs = [
            _request(
                common,
                children[i].seq_id,
                parents[i].steps,
                sampling,
                more_cap,
                partial_step=children[i].steps[-1],
            )
            for i in cut
        ]
        for i, req, out in zip(cut, reqs, await _extend(common, policy, reqs), strict=True):
            c = children[i]
            children[i] = dataclasses.replace(
                _child(parents[i], req.seq_id, out),
                parent_id=c.seq_id,
                steps=[*parents[i].steps, c.steps[-1] + out.text],
                logprob=c.logprob + out.logprob,
                num_tokens=c.num_tokens + out.num_tokens,
            )
            outs[i], caps[i] = out, more_cap
        cut = [i for i in cut if outs[i].stop_reason == "length" and more_cap is None]
    for parent, child, out, c in zip(parents, children, outs, caps, strict=True):
        budget_cut = c is not None and out.stop_reason == "length" and out.num_tokens >= c
        _mark_finished(child, out, max_steps, budget_cut)  # an answer anywhere in it counts
        if to_end:
            child.steps = [*parent.steps, *split_steps(child.steps[-1], delimiter)]
    return children


MAX_STEP_CALLS = 8
"""Calls one step may take at `max_step_tokens` each (ours): a step still open after them is
scored as it stands, one step, and the next round starts a new one. A final round's text to the
end gets as many (8 x 256 tokens by default: search-and-learn's `max_tokens` of 2048)."""


def to_end_sampling(sampling: SamplingParams) -> SamplingParams:
    """The same sampling without a step stop: the worker contract's empty `step_delimiter`
    means "generate to EOS or the token cap" (search-and-learn's final round)."""
    return dataclasses.replace(sampling, step_delimiter="")


def split_steps(text: str, delimiter: str) -> list[str]:
    """`text` cut after each `delimiter` (kept, as a step keeps it); one step at least."""
    pieces = text.split(delimiter)
    steps = [piece + delimiter for piece in pieces[:-1]]
    if pieces[-1] or not steps:
        steps.append(pieces[-1])
    return steps


async def score(
    common: SearchCommon,
    reward: Reward,
    trajectories: Sequence[Trajectory],
    aggregation: str,
) -> None:
    """Score each trajectory's steps and set its rewards and aggregated score.

    With `model` aggregation the reward model sees the whole partial answer as one step (no
    incremental reuse is possible); otherwise it scores every step, reusing a scored parent.
    """
    if not trajectories:
        return
    require_prm_passes(common, len(trajectories))
    whole = aggregation == "model"
    requests = [
        ScoreRequest(
            seq_id=t.seq_id,
            parent_id=None if whole else t.scored_id,
            prompt=common.problem,
            steps=(t.text,) if whole else tuple(t.steps),
        )
        for t in trajectories
    ]
    outs = await reward.score(requests)
    if [o.seq_id for o in outs] != [r.seq_id for r in requests]:
        raise RuntimeError("reward returned scores out of order or incomplete")
    common.spend.reward_calls += 1
    common.spend.prm_passes += len(requests)
    common.spend.prm_tokens += sum(o.tokens for o in outs)
    for t, req, out in zip(trajectories, requests, outs, strict=True):
        if len(out.rewards) != len(req.steps):
            raise RuntimeError(f"reward gave {len(out.rewards)} rewards for {len(req.steps)} steps")
        if whole:
            t.rewards = [*t.rewards[: len(t.steps) - 1], float(out.rewards[-1])]
        else:
            t.rewards = [float(r) for r in out.rewards]
            t.scored_id = t.seq_id
        t.score = aggregate(t.rewards, aggregation)


async def expand(
    common: SearchCommon,
    policy: Policy,
    reward: Reward,
    parents: Sequence[Trajectory],
    sampling: SamplingParams,
    max_steps: int,
    aggregation: str,
    groups: Sequence[int] | None = None,
    to_end: bool = False,
    early_rejection: EarlyRejection | None = None,
) -> list[Trajectory]:
    """Grow one step from each parent and score the children: the step-level unit of work.

    Both budgets are checked before anything is spent. With `early_rejection` (the search's
    setting, from the `early_rejection` wrapper), every candidate first generates `tau` tokens
    and is scored on that (maybe partial) step; within each group (default: one group) only the
    best `keep` share survives, steps that ended within tau competing too (the author code's
    top num_beams // beam_width); partial survivors are finished, keeping their head score
    unless `rescore`; the rest are returned finished with stop "rejected", never to be selected.

    With `to_end` (a final round: beam's and DVTS's, from search-and-learn) each child runs on
    past the step delimiter to EOS or the cap (`grow`) and the PRM scores each of its steps;
    early rejection does not apply to it (ours: it is the completion, not a step to choose).
    """
    if not parents:
        return []
    n = len(parents)
    if (
        to_end
        or early_rejection is None
        or early_rejection.tau >= _token_allowance(common, n, sampling)
    ):
        require_prm_passes(common, n)
        _token_allowance(common, n, sampling)
        children = await grow(common, policy, parents, sampling, max_steps, to_end=to_end)
        await score(common, reward, children, aggregation)
        return children
    return await _expand_with_early_rejection(
        common, policy, reward, parents, sampling, max_steps, aggregation, early_rejection, groups
    )


async def _expand_with_early_rejection(
    common: SearchCommon,
    policy: Policy,
    reward: Reward,
    parents: Sequence[Trajectory],
    sampling: SamplingParams,
    max_steps: int,
    aggregation: str,
    er: EarlyRejection,
    groups: Sequence[int] | None,
) -> list[Trajectory]:
    n = len(parents)
    groups = list(groups) if groups is not None else [0] * n
    require_prm_passes(common, n + (survivor_bound(groups, er.keep) if er.rescore else 0))
    allowance = _token_allowance(common, n, sampling)

    heads = await grow(
        common,
        policy,
        parents,
        SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_step_tokens=er.tau,
            step_delimiter=sampling.step_delimiter,
        ),
        max_steps,
        continue_steps=False,  # the tau cut is the point: it is scored as a partial step
    )
    # A head that used all tau tokens without ending its step (delimiter, EOS) is partial: it is
    # continued or rejected, never finished by the tau cut itself (an answer in a cut step does not
    # end it either, as a one-phase step would have run on to its delimiter).
    partial = []
    for p, h in zip(parents, heads, strict=True):
        cut = h.num_tokens - p.num_tokens >= er.tau and h.stop != "eos"
        cut = cut and not h.steps[-1].endswith(sampling.step_delimiter)
        if cut:
            h.finished, h.stop = False, ""
        partial.append(cut)
    await score(common, reward, heads, aggregation)

    # The author rule: every candidate of a group competes on its head score, the partial ones and
    # those whose step ended within tau alike; the best `keep` share survives.
    survivors: set[int] = set()
    for g in sorted(set(groups)):
        members = [i for i in range(n) if groups[i] == g]
        keep = _kept(len(members), er.keep)
        ranked = sorted(members, key=lambda i: (-(heads[i].score or 0.0), i))
        survivors.update(ranked[:keep])

    finishing = [i for i in range(n) if partial[i] and i in survivors]
    requests = [
        _request(
            common,
            heads[i].seq_id,
            parents[i].steps,
            sampling,
            allowance - (heads[i].num_tokens - parents[i].num_tokens),
            partial_step=heads[i].steps[-1],
        )
        for i in finishing
    ]
    outs = await _extend(common, policy, requests) if requests else []
    results = list(heads)
    kept_scores = []
    for i, req, out in zip(finishing, requests, outs, strict=True):
        head, parent = heads[i], parents[i]
        child = Trajectory(
            seq_id=req.seq_id,
            parent_id=head.seq_id,
            steps=[*parent.steps, head.steps[-1] + out.text],
            rewards=list(parent.rewards),
            logprob=head.logprob + out.logprob,
            num_tokens=head.num_tokens + out.num_tokens,
            scored_id=parent.seq_id if parent.rewards else parent.scored_id,
        )
        used = child.num_tokens - parent.num_tokens
        budget_cut = allowance < sampling.max_step_tokens and used >= allowance
        _mark_finished(child, out, max_steps, budget_cut and out.stop_reason == "length")
        results[i] = child
        kept_scores.append(child)
    if er.rescore:
        await score(common, reward, kept_scores, aggregation)
    else:  # the author code: a survivor keeps its head's score (no second PRM pass)
        for i, child in zip(finishing, kept_scores, strict=True):
            child.rewards, child.score = list(heads[i].rewards), heads[i].score
    for i in range(n):
        if i not in survivors:
            results[i].finished, results[i].stop = True, "rejected"
    return results


def _kept(count: int, share: float) -> int:
    """ceil(share * count), at least one: with share 1/m and count n, n // m (the author rule)."""
    return 0 if count == 0 else max(1, math.ceil(share * count - 1e-9))


def survivor_bound(groups: Sequence[int], share: float) -> int:
    sizes: dict[int, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    return sum(_kept(s, share) for s in sizes.values())


def vote_answer(c: Candidate) -> str | None:
    """What a candidate votes with: its `\\boxed{}` content as written (math-verify reads the LaTeX
    that canonicalising strips, e.g. `\\text{ cm}^2`); None when it has no final answer."""
    return None if c.final_answer is None else extract_boxed(c.text) or c.final_answer


def candidate(t: Trajectory, weight: float) -> Candidate:
    return Candidate(
        text=t.text,
        steps=tuple(t.steps),
        final_answer=final_answer(t.text),
        score=t.score,
        weight=float(weight),
        finished=t.finished,
        stop=t.stop,
        rewards=tuple(t.rewards),
    )


def answered(c: Candidate) -> bool:
    """A finished solution with a final answer (not cut by the budget, not rejected)."""
    return c.finished and c.stop not in ("budget", "rejected") and c.final_answer is not None


def choose(
    candidates: Sequence[Candidate], selection: str, rng: np.random.Generator | None = None
) -> int | None:
    """Index of the chosen candidate: highest score, the best member of the heaviest answer, or
    (`sample`, its_hub's SelectionMethod.SAMPLE) one drawn with `rng` in proportion to weight.

    A*'s rule for every search: the choice is among the finished, answered candidates when one
    exists; an unfinished partial (a budget stop) is chosen only when none does. Rejected
    candidates are never chosen.
    """
    live = [i for i, c in enumerate(candidates) if c.stop != "rejected"]
    live = [i for i in live if answered(candidates[i])] or live
    if not live:
        return None
    if selection == "sample":
        if rng is None:
            raise ValueError("sample selection needs the search's generator")
        weights = np.array([candidates[i].weight for i in live], dtype=np.float64)
        if weights.sum() > 0:  # all weightless (cannot happen for PF's pool): argmax below
            return live[int(rng.choice(len(live), p=weights / weights.sum()))]
    if selection == "weighted_vote":
        members = winning_group(  # equivalent answers vote together (math-verify)
            [vote_answer(candidates[i]) for i in live], [candidates[i].weight for i in live]
        )
        if members:
            group = [live[k] for k in members]
            return max(group, key=lambda i: (_score(candidates[i]), -i))
    return max(live, key=lambda i: (_score(candidates[i]), -i))


def _score(c: Candidate) -> float:
    return -math.inf if c.score is None else c.score
