"""Growing and scoring trajectories: the one place that talks to the policy and the reward model.

Every algorithm extends and scores through these functions, so spend accounting, budget caps,
finish rules, cache-friendly ids and early rejection are written once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lodestar.orchestrator.algorithms.answers import final_answer, has_final_answer, majority_vote
from lodestar.orchestrator.algorithms.protocols import Policy, Reward
from lodestar.orchestrator.algorithms.state import (
    BudgetExhausted,
    Candidate,
    EarlyRejection,
    SearchCommon,
    Trajectory,
)
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
) -> list[Trajectory]:
    """One new step for each parent (a parent listed k times forks k children)."""
    if not parents:
        return []
    allowance = _token_allowance(common, len(parents), sampling)
    cap = allowance if allowance < sampling.max_step_tokens else None
    requests = [_request(common, p.seq_id, p.steps, sampling, cap) for p in parents]
    outs = await _extend(common, policy, requests)
    children = []
    for p, req, out in zip(parents, requests, outs, strict=True):
        child = _child(p, req.seq_id, out)
        budget_cut = cap is not None and out.stop_reason == "length" and out.num_tokens >= cap
        _mark_finished(child, out, max_steps, budget_cut)
        children.append(child)
    return children


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
) -> list[Trajectory]:
    """Grow one step from each parent and score the children: the step-level unit of work.

    Both budgets are checked before anything is spent. With early rejection (set on the search's
    common state by the `early_rejection` wrapper), every candidate
    first generates `tau` tokens; the unfinished ones are scored on that partial step and, within
    each group (default: one group), only the best `keep` share is finished and rescored; the
    rest are returned finished with stop "rejected" and must not be selected.
    """
    if not parents:
        return []
    n = len(parents)
    early_rejection = common.early_rejection
    if early_rejection is None or early_rejection.tau >= _token_allowance(common, n, sampling):
        require_prm_passes(common, n)
        _token_allowance(common, n, sampling)
        children = await grow(common, policy, parents, sampling, max_steps)
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
    require_prm_passes(common, n + survivor_bound(groups, er.keep))
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

    survivors: set[int] = set()
    for g in sorted(set(groups)):
        members = [i for i in range(n) if groups[i] == g and partial[i]]
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
    to_rescore = []
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
        to_rescore.append(child)
    await score(common, reward, to_rescore, aggregation)
    for i in range(n):
        if partial[i] and i not in survivors:
            results[i].finished, results[i].stop = True, "rejected"
    return results


def _kept(count: int, share: float) -> int:
    return 0 if count == 0 else max(1, math.ceil(share * count))


def survivor_bound(groups: Sequence[int], share: float) -> int:
    sizes: dict[int, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    return sum(_kept(s, share) for s in sizes.values())


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


def choose(candidates: Sequence[Candidate], selection: str) -> int | None:
    """Index of the chosen candidate: highest score, or the best member of the heaviest answer."""
    live = [i for i, c in enumerate(candidates) if c.stop != "rejected"]
    if not live:
        return None
    if selection == "weighted_vote":
        winner = majority_vote(
            [candidates[i].final_answer for i in live], [candidates[i].weight for i in live]
        )
        if winner is not None:
            answer = candidates[live[winner]].final_answer
            group = [i for i in live if candidates[i].final_answer == answer]
            return max(group, key=lambda i: (_score(candidates[i]), -i))
    return max(live, key=lambda i: (_score(candidates[i]), -i))


def _score(c: Candidate) -> float:
    return -math.inf if c.score is None else c.score
