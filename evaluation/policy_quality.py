"""Measure an arithmetic policy with plain Hugging Face generation: greedy accuracy and pass@k.

    python -m lodestar.evaluation.policy_quality --model models/arith-policy --n 200 --k 8

Problems are held-out (`--split test` by default) at one difficulty. Besides greedy accuracy it
reports, from k samples per problem at `--temperature`: pass@j for j = 1..k (unbiased estimator),
best-of-k with the exact verifier (some sample has every step correct), and majority vote@k.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lodestar.orchestrator.algorithms.answers import final_answer, majority_vote
from lodestar.tasks.arithmetic import (
    Difficulty,
    Problem,
    evaluate_steps,
    generate_problems,
    is_correct,
    split_steps,
)


@dataclass
class PolicyReport:
    n: int
    k: int
    temperature: float
    greedy_accuracy: float
    greedy_steps_valid: float
    """Greedy solutions whose every step the checker accepts."""
    pass_at: dict[int, float]
    verifier_best_of_k: float
    majority_at_k: float
    seconds: float


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@torch.inference_mode()
def generate_solutions(
    model: PreTrainedModel,
    tokenizer: AutoTokenizer,
    problems: list[Problem],
    *,
    samples: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 128,
    batch_size: int = 64,
) -> list[list[str]]:
    """`samples` completions per problem (greedy when temperature is 0), prompts via the chat
    template, left-padded batches."""
    tokenizer.padding_side = "left"
    out: list[list[str]] = []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p.expression}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for p in chunk
        ]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            num_return_sequences=samples,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **(sampling if temperature > 0 else dict(do_sample=False)),
        )
        texts = tokenizer.batch_decode(
            gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )
        out += [texts[j * samples : (j + 1) * samples] for j in range(len(chunk))]
    return out


def evaluate_policy(
    model: PreTrainedModel,
    tokenizer: AutoTokenizer,
    problems: list[Problem],
    *,
    k: int = 8,
    temperature: float = 0.8,
    seed: int = 0,
    batch_size: int = 64,
    max_new_tokens: int = 128,
) -> PolicyReport:
    start = time.perf_counter()
    greedy = [
        s[0]
        for s in generate_solutions(
            model, tokenizer, problems, batch_size=batch_size, max_new_tokens=max_new_tokens
        )
    ]
    greedy_ok = [is_correct(p, t) for p, t in zip(problems, greedy, strict=True)]
    steps_ok = [
        all(evaluate_steps(p, split_steps(t))) for p, t in zip(problems, greedy, strict=True)
    ]
    pass_at = {j: 0.0 for j in range(1, k + 1)}
    best = vote = 0
    if k > 0:
        torch.manual_seed(seed)
        sampled = generate_solutions(
            model,
            tokenizer,
            problems,
            samples=k,
            temperature=temperature,
            batch_size=max(1, batch_size // k),
            max_new_tokens=max_new_tokens,
        )
        for p, texts in zip(problems, sampled, strict=True):
            c = sum(is_correct(p, t) for t in texts)
            for j in pass_at:
                pass_at[j] += pass_at_k(k, c, j) / len(problems)
            best += any(all(evaluate_steps(p, split_steps(t))) and is_correct(p, t) for t in texts)
            winner = majority_vote([final_answer(t) for t in texts])
            vote += winner is not None and is_correct(p, texts[winner])
    n = len(problems)
    return PolicyReport(
        n=n,
        k=k,
        temperature=temperature,
        greedy_accuracy=sum(greedy_ok) / n,
        greedy_steps_valid=sum(steps_ok) / n,
        pass_at={j: round(v, 4) for j, v in pass_at.items()},
        verifier_best_of_k=best / n,
        majority_at_k=vote / n,
        seconds=round(time.perf_counter() - start, 1),
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--split", choices=("train", "validation", "test"), default="test")
    p.add_argument("--ops", type=int, default=Difficulty().ops)
    p.add_argument("--max-operand", type=int, default=Difficulty().max_operand)
    p.add_argument("--seed", type=int, default=0, help="problem selection and sampling seed")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, local_files_only=True
    ).eval()
    difficulty = Difficulty(ops=args.ops, max_operand=args.max_operand)
    problems = generate_problems(args.split, args.n, difficulty, seed=args.seed)
    report = evaluate_policy(
        model,
        tokenizer,
        problems,
        k=args.k,
        temperature=args.temperature,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    print(
        f"{args.model} on {args.n} {args.split} problems at {difficulty}:\n"
        f"  greedy accuracy {report.greedy_accuracy:.3f} "
        f"(all steps valid {report.greedy_steps_valid:.3f})\n"
        f"  T={args.temperature}: "
        + "  ".join(f"pass@{j} {v:.3f}" for j, v in report.pass_at.items())
        + f"\n  verifier best-of-{args.k} {report.verifier_best_of_k:.3f}  "
        f"majority@{args.k} {report.majority_at_k:.3f}  ({report.seconds}s)",
        flush=True,
    )
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")


if __name__ == "__main__":
    main()
