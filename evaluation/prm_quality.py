"""Measure a learned PRM on held-out on-policy samples, scored through the real inference path.

    python -m lodestar.evaluation.prm_quality --prm models/arith-prm --policy models/arith-policy

The policy samples `--samples` solutions per VALIDATION-split problem (step by step, as the search
does); `evaluate_steps` labels every step. The PRM scores them through `RewardWorker` built by
`workers.factory.build_reward` (the directory's `lodestar_prm.json`, its chat rendering), so the
numbers are those of the model the service runs. Reported:

- step AUC and accuracy at 0.5 over all steps (label: the step is right and so is all before it);
- final AUC: the last step's reward against whether the solution's boxed answer is right, pooled
  and within each problem's samples (the ranking best-of-n and search rely on);
- best-of-n from these samples: the sample with the highest last-step reward per problem, next to
  the first sample's accuracy (one policy sample) and pass@n (an oracle's pick).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lodestar.tasks.arithmetic import Difficulty, evaluate_steps, generate_problems, is_correct
from lodestar.training.train_prm import sample_solutions
from lodestar.workers.factory import ModelConfig, build_reward
from lodestar.workers.messages import ScoreRequest
from lodestar.workers.policy import PolicyWorker


def auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count half); NaN with one class only."""
    pairs = sorted(zip(scores, labels, strict=True))
    pos = sum(labels)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        mid_rank = (i + 1 + j) / 2  # ranks i+1 .. j share their mean
        rank_sum += mid_rank * sum(y for _, y in pairs[i:j])
        i = j
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def within_group_auc(scores: Sequence[float], labels: Sequence[int], group: int) -> float:
    """Mean AUC inside consecutive groups of `group` (one problem's samples) that hold both
    classes; NaN when none does. What search needs is this ranking among one problem's
    candidates: a pooled AUC can be high from problem difficulty alone."""
    values = [
        auc(scores[lo : lo + group], labels[lo : lo + group])
        for lo in range(0, len(scores), group)
        if 0 < sum(labels[lo : lo + group]) < len(labels[lo : lo + group])
    ]
    return sum(values) / len(values) if values else float("nan")


def score_all(
    reward: object, samples: Sequence[tuple[str, tuple[str, ...]]], batch: int = 256
) -> list[tuple[float, ...]]:
    """Rewards per step of every sample, `batch` requests per worker call."""
    out: list[tuple[float, ...]] = []
    for lo in range(0, len(samples), batch):
        requests = [
            ScoreRequest(f"eval-{lo + i}", None, problem, steps)
            for i, (problem, steps) in enumerate(samples[lo : lo + batch])
        ]
        out += [s.rewards for s in reward.score(requests)]  # type: ignore[attr-defined]
    return out


def evaluate_prm(
    prm: Path,
    policy: Path,
    *,
    problems: int = 200,
    samples: int = 8,
    ops: int = Difficulty().ops,
    seed: int = 0,
    temperature: float = 0.8,
    max_steps: int = 10,
    max_step_tokens: int = 40,
    gen_batch: int = 512,
) -> dict:
    """The PRM's step AUC, accuracy at 0.5, final AUC and best-of-n on validation samples."""
    started = time.perf_counter()
    items = generate_problems("validation", problems, Difficulty(ops=ops), seed=seed)
    by_expr = {p.expression: p for p in items}
    worker = PolicyWorker.from_pretrained(policy, device="cpu", dtype="fp32")
    sampled = sample_solutions(
        worker,
        [p.expression for p in items],
        samples,
        temperature=temperature,
        seed=seed + 1_000_003,  # draws unrelated to training's
        max_steps=max_steps,
        max_step_tokens=max_step_tokens,
        batch=gen_batch,
    )
    sample_seconds = time.perf_counter() - started
    reward = build_reward(ModelConfig(reward=prm, device="cpu", dtype="fp32"))
    t0 = time.perf_counter()
    rewards = score_all(reward, sampled)
    score_seconds = time.perf_counter() - t0

    step_scores: list[float] = []
    step_labels: list[int] = []
    final_scores: list[float] = []
    final_labels: list[int] = []
    for (expr, steps), r in zip(sampled, rewards, strict=True):
        step_scores += r
        step_labels += [int(x) for x in evaluate_steps(by_expr[expr], steps)]
        final_scores.append(r[-1])
        final_labels.append(int(is_correct(by_expr[expr], "".join(steps))))
    acc = sum((s >= 0.5) == bool(y) for s, y in zip(step_scores, step_labels, strict=True))

    chosen, first, oracle = 0, 0, 0
    for p in range(problems):
        rows = range(p * samples, (p + 1) * samples)
        best = max(rows, key=lambda i: final_scores[i])
        chosen += final_labels[best]
        first += final_labels[rows[0]]
        oracle += max(final_labels[i] for i in rows)
    return {
        "prm": str(prm),
        "policy": str(policy),
        "problems": problems,
        "samples_per_problem": samples,
        "ops": ops,
        "steps_scored": len(step_labels),
        "step_positive_rate": round(sum(step_labels) / len(step_labels), 4),
        "step_auc": round(auc(step_scores, step_labels), 4),
        "step_accuracy_at_0.5": round(acc / len(step_labels), 4),
        "final_auc": round(auc(final_scores, final_labels), 4),
        "final_auc_within_problem": round(within_group_auc(final_scores, final_labels, samples), 4),
        "final_positive_rate": round(sum(final_labels) / len(final_labels), 4),
        "single_sample_accuracy": round(first / problems, 4),
        "best_of_n_accuracy": round(chosen / problems, 4),
        "pass_at_n": round(oracle / problems, 4),
        "sample_seconds": round(sample_seconds, 1),
        "score_seconds": round(score_seconds, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prm", type=Path, default=Path("models/arith-prm"))
    p.add_argument("--policy", type=Path, default=Path("models/arith-policy"))
    p.add_argument("--problems", type=int, default=200)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--ops", type=int, default=Difficulty().ops, help="as the search benchmark")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = evaluate_prm(
        args.prm,
        args.policy,
        problems=args.problems,
        samples=args.samples,
        ops=args.ops,
        seed=args.seed,
        temperature=args.temperature,
    )
    text = json.dumps(report, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
