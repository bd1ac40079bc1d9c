"""Train the shipped learned PRM (Qwen2.5-Math-PRM family) from the shipped policy.

    python -m lodestar.training.train_prm --policy models/arith-policy --out models/arith-prm \\
        --minutes 15 --seed 0

Why it starts from the policy: the PRM has to check the same arithmetic the policy does, and a
PRM trained from scratch for a few CPU-minutes was too weak to beat greedy decoding. The policy's
Llama backbone becomes a `LlamaForTokenClassification` (2 labels: 0 wrong, 1 right); the char
tokenizer gains the `<extra_0>` separator (appended, so every other id keeps its embedding) and
keeps the policy's chat template, so `RewardWorker` renders `<s>Q: <expr>\\nA:\\n` followed by
`step<extra_0>step<extra_0>...`. Training examples are encoded with the worker's own `render`,
so what the model trains on is token for token what it scores at inference.

Data (on-policy, so the PRM learns the mistakes search will actually meet):
- the policy samples whole solutions step by step through `PolicyWorker.extend` (the search's own
  sampler, temperature 0.8) on TRAINING-split problems; every step is labelled by the task's exact
  checker `evaluate_steps` (after the first wrong step every step is wrong, the Qwen PRM rule);
- hard negatives: a correct solution with one step made a near miss in the right format
  (`NEGATIVE_KINDS`: off by a little, an operand misread or copied from elsewhere, an illegal
  reduction order, a dropped operation, ...), the wrong value carried on, cut after that step;
- correct reference solutions (`--references`), so the final step has right answers to learn;
- exact duplicates are dropped and the pointwise loss is class-weighted (both labels weigh the
  same).

Loss: cross-entropy at the separator positions plus a within-problem pairwise ranking loss
(`ranking_loss`: every right prefix of a problem against every wrong one at the same depth);
batches hold whole problems so those pairs exist. The learning rate warms up and decays
linearly to 0 over the run; with `--minutes` the step count is fixed after timing the first
steps and recorded, so `--steps N` with the same seed and policy reproduces the run exactly.
The generated data is cached (`--data`) so a rerun with other training settings skips sampling.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    LlamaForCausalLM,
    LlamaForTokenClassification,
    PreTrainedTokenizerBase,
)

from lodestar.orchestrator.algorithms.answers import has_final_answer
from lodestar.tasks.arithmetic import (
    OPS,
    STEP_DELIMITER,
    Difficulty,
    Problem,
    Split,
    Tree,
    apply_op,
    evaluate_steps,
    format_expression,
    generate_problems,
    operands,
    parse_rest,
    reductions,
    solution_steps,
)
from lodestar.workers.factory import PRM_CONFIG_FILE
from lodestar.workers.loading import load_tokenizer
from lodestar.workers.messages import ExtendRequest, SamplingParams
from lodestar.workers.policy import PolicyWorker
from lodestar.workers.reward import PRMConfig, RewardWorker

SEPARATOR = "<extra_0>"
LABELS = {0: "wrong", 1: "correct"}


@dataclass(frozen=True)
class Example:
    """One solution (possibly partial) with one label per step."""

    problem: str
    steps: tuple[str, ...]
    labels: tuple[int, ...]
    source: str
    """"policy" (on-policy sample) or "perturbed" (hard negative)."""


@dataclass
class PRMTrainConfig:
    policy: Path
    out: Path
    minutes: float | None = 15.0
    steps: int | None = None
    """Exact number of optimizer steps; overrides `minutes` (use it to reproduce a run)."""
    seed: int = 0
    problems: int = 4000
    """Training-split problems sampled on-policy."""
    ops_weights: tuple[float, ...] = (0.15, 0.3, 0.3, 0.25)
    """Share of problems with 1, 2, 3, ... operations (the policy's training mix)."""
    samples: int = 4
    """Policy samples per problem."""
    temperature: float = 0.8
    max_steps: int = 10
    max_step_tokens: int = 40
    hard_negatives: float = 2.0
    """Perturbed solutions per problem (fractional: a probability for the last one)."""
    references: float = 1.0
    """Correct reference solutions per problem, every step labelled right: on-policy data from a
    weak policy holds few complete correct answers for the final step to learn from."""
    init: Path | None = None
    """Start from this PRM directory instead of the policy (continued training)."""
    gen_batch: int = 512
    data: Path | None = None
    """Cache of the generated examples (JSON lines); written when missing, read when present."""
    batch_size: int = 64
    """Sequences per step, whole problems at a time (the ranking loss compares within one)."""
    rank_weight: float = 1.0
    """Weight of the within-problem pairwise ranking loss next to the pointwise one."""
    lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.01
    threads: int = 2
    log_every: int = 25
    save_dtype: str = "bf16"
    """Weights as saved; bf16 halves the files (loaders upcast on the CPU)."""


# -- model and tokenizer -------------------------------------------------------------------------


def build_prm(
    policy_dir: Path,
) -> tuple[PreTrainedTokenizerBase, LlamaForTokenClassification]:
    """The policy's tokenizer plus `<extra_0>` and a 2-label token classifier on its backbone.

    The separator's embedding starts as the newline's, the character that ends a step for the
    policy, so the backbone reads it as "a step ended here" from the first update.
    """
    tokenizer = load_tokenizer(policy_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [SEPARATOR]})
    sep_id = tokenizer.convert_tokens_to_ids(SEPARATOR)
    newline_id = tokenizer.convert_tokens_to_ids("\n")
    policy = LlamaForCausalLM.from_pretrained(
        policy_dir, dtype=torch.float32, local_files_only=True
    )
    config = policy.config
    config.num_labels = 2
    config.id2label = dict(LABELS)
    config.label2id = {v: k for k, v in LABELS.items()}
    config.classifier_dropout = 0.0
    config.architectures = ["LlamaForTokenClassification"]
    model = LlamaForTokenClassification(config)
    model.model.load_state_dict(policy.model.state_dict())
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[sep_id] = emb[newline_id]
        model.score.weight.normal_(0.0, 0.02)
        model.score.bias.zero_()
    return tokenizer, model


def renderer(
    model: LlamaForTokenClassification, tokenizer: PreTrainedTokenizerBase
) -> RewardWorker:
    """A reward worker over the model being trained: its `render` defines the training input."""
    return RewardWorker(model, tokenizer, PRMConfig(family="qwen_prm", cache_tokens=0))


def encode(worker: RewardWorker, problem: str, steps: Sequence[str]) -> tuple[list[int], list[int]]:
    """Token ids exactly as `RewardWorker` scores them (through the last separator) and the
    positions of the separators, one per step."""
    text, _ = worker.render(problem, steps)
    ids = worker.tokenizer(text, add_special_tokens=not worker.chat)["input_ids"]
    positions = [i for i, t in enumerate(ids) if t == worker.separator_id]
    if len(positions) != len(steps):
        raise ValueError(f"{problem!r}: {len(positions)} separators for {len(steps)} steps")
    return list(ids[: positions[-1] + 1]), positions


# -- data ----------------------------------------------------------------------------------------


def mixed_problems(split: Split, n: int, ops_weights: Sequence[float], seed: int) -> list[Problem]:
    """`n` distinct problems of `split`, the number of operations split by `ops_weights`."""
    counts = [round(n * w / sum(ops_weights)) for w in ops_weights]
    out: list[Problem] = []
    for ops, count in enumerate(counts, start=1):
        if count:
            out += generate_problems(split, count, Difficulty(ops=ops), seed=seed)
    random.Random(f"prm-problems|{split}|{seed}").shuffle(out)
    return out


def sample_solutions(
    worker: PolicyWorker,
    problems: Sequence[str],
    samples: int,
    *,
    temperature: float = 0.8,
    seed: int = 0,
    max_steps: int = 10,
    max_step_tokens: int = 40,
    batch: int = 512,
    log: bool = False,
) -> list[tuple[str, tuple[str, ...]]]:
    """`samples` solutions per problem, sampled step by step as the search does (same worker,
    same stopping rules: EOS, a completed `\\boxed{}`, `max_steps`); each step extends its own
    KV cache. Per-request seeds make the result independent of batching."""
    sampling = SamplingParams(temperature=temperature, max_step_tokens=max_step_tokens)
    trajs = [(p, j) for p in range(len(problems)) for j in range(samples)]
    steps: list[list[str]] = [[] for _ in trajs]
    live = list(range(len(trajs)))
    started = time.perf_counter()
    for depth in range(max_steps):
        still: list[int] = []
        for lo in range(0, len(live), batch):
            chunk = live[lo : lo + batch]
            requests = [
                ExtendRequest(
                    seq_id=f"{t}/{depth}",
                    parent_id=f"{t}/{depth - 1}" if depth else None,
                    prompt=problems[trajs[t][0]],
                    steps=tuple(steps[t]),
                    seed=hash_seed(seed, t, depth),
                    sampling=sampling,
                )
                for t in chunk
            ]
            outputs = worker.extend(requests)
            worker.release([r.parent_id for r in requests if r.parent_id is not None])
            for t, out in zip(chunk, outputs, strict=True):
                steps[t].append(out.text)
                if not (out.eos or has_final_answer(out.text) or out.stop_reason == "length"):
                    still.append(t)
        kept = set(still)
        worker.release([f"{t}/{depth}" for t in live if t not in kept])
        live = still
        if log:
            print(
                f"  depth {depth + 1}: {len(live)} live, {time.perf_counter() - started:.0f}s",
                flush=True,
            )
        if not live:
            break
    worker.clear()
    return [(problems[p], tuple(s)) for (p, _), s in zip(trajs, steps, strict=True)]


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes (unlike `hash` of a str)."""
    h = 1469598103934665603
    for x in parts:
        h = ((h ^ (x & 0xFFFFFFFF)) * 1099511628211) & 0x7FFF_FFFF_FFFF_FFFF
    return h


NEGATIVE_KINDS = ("off", "operand", "copied", "order", "dropped", "op", "swap", "boxed")
"""Near misses a policy makes: a result off by a little, an operand misread or copied from
elsewhere in the expression, an operation done before its turn (illegal order), an operation
dropped from the restatement, another operation's result, two digits swapped, a wrong boxed
answer. A wrong value is carried into the restatement, as the policy would carry it."""


def _step_text(a: int, op: str, b: int, c: int, after: Tree) -> str:
    head = f"{a}{op}{b}={c}"
    if isinstance(after, int):
        return f"{head} \\boxed{{{after}}}"
    return f"{head}, so {format_expression(after)}{STEP_DELIMITER}"


def _replace_first(tree: Tree, old: Tree, new: Tree) -> Tree:
    """`tree` with its first subtree equal to `old` (leftmost, outermost) replaced by `new`."""
    done = False

    def walk(t: Tree) -> Tree:
        nonlocal done
        if done:
            return t
        if t == old:
            done = True
            return new
        if isinstance(t, int):
            return t
        op, left, right = t
        return (op, walk(left), walk(right))

    return walk(tree)


def _drop_leaf(tree: Tree, rng: random.Random) -> Tree | None:
    """`tree` with one operation and its leaf operand removed (`a op leaf` -> `a`)."""
    spots: list[tuple[Tree, Tree]] = []

    def walk(t: Tree) -> None:
        if isinstance(t, int):
            return
        _, left, right = t
        if isinstance(right, int):
            spots.append((t, left))
        elif isinstance(left, int):
            spots.append((t, right))
        walk(left)
        walk(right)

    walk(tree)
    if not spots:
        return None
    node, keep = rng.choice(spots)
    return _replace_first(tree, node, keep)


def _illegal_order(tree: Tree, rng: random.Random) -> tuple[str, int, int, Tree] | None:
    """An adjacent `a op b` of the written expression that is not an innermost operation (`2+3`
    in `2+3*4`), computed anyway, with what the text reads as after it."""
    text = format_expression(tree)
    legal = {r for r, _ in reductions(tree)}
    spots = [  # overlapping: in `8-3-2*5` both `8-3` and `3-2` are adjacent pairs
        (m.start(), m.start() + len(m.group(1)), m.group(2), m.group(3), m.group(4))
        for m in re.finditer(r"(?<![\d)])(?=((\d+)([-+*])(\d+))(?![\d(]))", text)
    ]
    spots = [s for s in spots if (s[3], int(s[2]), int(s[4])) not in legal]
    if not spots:
        return None
    start, end, a_text, op, b_text = rng.choice(spots)
    a, b = int(a_text), int(b_text)
    c = apply_op(op, a, b)
    rest = text[:start] + str(c) + text[end:]
    after = parse_rest(rest)
    return None if after is None else (op, a, b, after)


def perturb(problem: Problem, rng: random.Random) -> tuple[str, ...] | None:
    """A correct solution (random legal order or leftmost-first) with one step made a near miss
    in the right format, cut after that step: the first of the `NEGATIVE_KINDS` (in a random
    order) that applies there and is actually wrong; None when none is."""
    legal_rng = rng if rng.random() < 0.5 else None
    tree: Tree = problem.tree
    steps: list[str] = []
    for _ in range(rng.randrange(len(operands(tree)) - 1)):
        options = reductions(tree)
        (op, a, b), tree = options[0] if legal_rng is None else legal_rng.choice(options)
        steps.append(_step_text(a, op, b, apply_op(op, a, b), tree))
    options = reductions(tree)
    reduction, after = options[0] if legal_rng is None else legal_rng.choice(options)
    for kind in rng.sample(NEGATIVE_KINDS, len(NEGATIVE_KINDS)):
        step = near_miss(kind, tree, reduction, after, rng)
        if step is not None and not evaluate_steps(problem, (*steps, step))[-1]:
            return (*steps, step)
    return None


def near_miss(
    kind: str, tree: Tree, reduction: tuple[str, int, int], after: Tree, rng: random.Random
) -> str | None:
    """Step `reduction` of `tree` (leaving `after`) made wrong the way `kind` says; None where
    that kind does not apply (no other operand to copy, nothing to drop, ...)."""
    op, a, b = reduction
    c = apply_op(op, a, b)
    node = (op, a, b)
    if kind == "off":
        wrong = c + rng.choice((-1, 1)) * rng.choice((1, 1, 2, 3, 10, rng.randint(1, 30)))
        step = _step_text(a, op, b, wrong, _replace_first(tree, node, wrong))
    elif kind in ("operand", "copied"):
        if kind == "operand":
            new = (a if rng.random() < 0.5 else b) + rng.choice((-2, -1, 1, 2, 10, -10))
        else:
            others = [v for v in operands(tree) if v not in (a, b)]
            if not others:
                return None
            new = rng.choice(others)
        a2, b2 = (new, b) if rng.random() < 0.5 else (a, new)
        if (a2, b2) == (a, b):
            return None
        wrong = apply_op(op, a2, b2)
        step = _step_text(a2, op, b2, wrong, _replace_first(tree, node, wrong))
    elif kind == "order":
        found = _illegal_order(tree, rng)
        if found is None:
            return None
        op2, a2, b2, rest = found
        step = _step_text(a2, op2, b2, apply_op(op2, a2, b2), rest)
    elif kind == "dropped":
        if isinstance(after, int):
            return None
        shorter = _drop_leaf(after, rng)
        if shorter is None:
            return None
        step = _step_text(a, op, b, c, shorter)
    elif kind == "op":
        wrong = rng.choice([apply_op(o, a, b) for o in OPS if o != op])
        step = _step_text(a, op, b, wrong, _replace_first(tree, node, wrong))
    elif kind == "swap":
        digits = list(str(abs(c)))
        if len(digits) < 2:
            return None
        i = rng.randrange(len(digits) - 1)
        digits[i], digits[i + 1] = digits[i + 1], digits[i]
        wrong = int("".join(digits)) * (1 if c >= 0 else -1)
        step = _step_text(a, op, b, wrong, _replace_first(tree, node, wrong))
    else:  # "boxed": the last step, right value, wrong boxed answer
        if not isinstance(after, int):
            return None
        step = f"{a}{op}{b}={c} \\boxed{{{c + rng.choice((-1, 1)) * rng.randint(1, 10)}}}"
    return step


def build_examples(cfg: PRMTrainConfig, worker: PolicyWorker, log: bool = True) -> list[Example]:
    """On-policy samples on training problems plus hard negatives, labelled, deduplicated."""
    problems = mixed_problems("train", cfg.problems, cfg.ops_weights, cfg.seed)
    started = time.perf_counter()
    sampled = sample_solutions(
        worker,
        [p.expression for p in problems],
        cfg.samples,
        temperature=cfg.temperature,
        seed=cfg.seed,
        max_steps=cfg.max_steps,
        max_step_tokens=cfg.max_step_tokens,
        batch=cfg.gen_batch,
        log=log,
    )
    if log:
        print(f"sampled {len(sampled)} solutions in {time.perf_counter() - started:.0f}s")
    examples = [
        Example(p, s, tuple(int(x) for x in evaluate_steps(p, s)), "policy") for p, s in sampled
    ]
    rng = random.Random(f"prm-negatives|{cfg.seed}")
    for problem in problems:
        n = int(cfg.hard_negatives) + (rng.random() < cfg.hard_negatives % 1)
        for _ in range(n):
            steps = None
            for _ in range(4):  # a few draws until one is actually wrong
                steps = perturb(problem, rng)
                if steps is not None:
                    break
            if steps is not None:
                labels = tuple(int(x) for x in evaluate_steps(problem, steps))
                examples.append(Example(problem.expression, steps, labels, "perturbed"))
    seen: set[tuple[str, tuple[str, ...]]] = set()
    unique = []
    for e in examples:
        if (e.problem, e.steps) not in seen:
            seen.add((e.problem, e.steps))
            unique.append(e)
    return unique


def load_or_build_examples(cfg: PRMTrainConfig, log: bool = True) -> list[Example]:
    if cfg.data is not None and cfg.data.is_file():
        rows = [json.loads(line) for line in cfg.data.read_text().splitlines() if line]
        return [
            Example(r["problem"], tuple(r["steps"]), tuple(r["labels"]), r["source"]) for r in rows
        ]
    worker = PolicyWorker.from_pretrained(cfg.policy, device="cpu", dtype="fp32")
    examples = build_examples(cfg, worker, log)
    if cfg.data is not None:
        cfg.data.parent.mkdir(parents=True, exist_ok=True)
        cfg.data.write_text("".join(json.dumps(asdict(e)) + "\n" for e in examples))
    return examples


def reference_examples(cfg: PRMTrainConfig) -> list[Example]:
    """Correct solutions of the training problems (leftmost-first or a random legal order)."""
    problems = mixed_problems("train", cfg.problems, cfg.ops_weights, cfg.seed)
    rng = random.Random(f"prm-references|{cfg.seed}")
    out = []
    for problem in problems:
        n = int(cfg.references) + (rng.random() < cfg.references % 1)
        for _ in range(n):
            steps = tuple(solution_steps(problem, rng if rng.random() < 0.5 else None))
            out.append(Example(problem.expression, steps, (1,) * len(steps), "reference"))
    return out


def data_stats(examples: Sequence[Example]) -> dict[str, int]:
    labels = [y for e in examples for y in e.labels]
    return {
        "examples": len(examples),
        "policy_examples": sum(e.source == "policy" for e in examples),
        "perturbed_examples": sum(e.source == "perturbed" for e in examples),
        "reference_examples": sum(e.source == "reference" for e in examples),
        "step_labels": len(labels),
        "positive_steps": sum(labels),
        "negative_steps": len(labels) - sum(labels),
        "policy_negative_steps": sum(
            1 - y for e in examples if e.source == "policy" for y in e.labels
        ),
    }


# -- training ------------------------------------------------------------------------------------


def make_batch(
    encoded: Sequence[tuple[list[int], list[int], Sequence[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, S], attention mask [B, S], labels [B, S] (-100 off the separators)."""
    width = max(len(ids) for ids, _, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for i, (seq, positions, ys) in enumerate(encoded):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, positions] = torch.tensor(list(ys))
    return ids, mask, labels


def batches(problems: Sequence[str], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless shuffled epochs of example indices, whole problems at a time (at least
    `batch_size` examples per batch), so every batch holds each of its problems' candidates."""
    groups: dict[str, list[int]] = {}
    for i, problem in enumerate(problems):
        groups.setdefault(problem, []).append(i)
    order = list(groups.values())
    rng = random.Random(f"prm-batches|{seed}")
    while True:
        rng.shuffle(order)
        batch: list[int] = []
        for group in order:
            batch += group
            if len(batch) >= batch_size:
                yield batch
                batch = []


def ranking_loss(
    margins: torch.Tensor, keys: Sequence[tuple[str, int]], labels: Sequence[int]
) -> torch.Tensor:
    """Mean pairwise logistic loss `softplus(m_wrong - m_right)` over the pairs of one problem at
    one step depth with different labels: what particle weights and best-of-n compare is one
    problem's candidates against each other, which a pointwise loss does not train."""
    by_key: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
    for i, (key, y) in enumerate(zip(keys, labels, strict=True)):
        by_key.setdefault(key, ([], []))[y].append(i)
    terms = [
        torch.nn.functional.softplus(margins[wrong][None, :] - margins[right][:, None]).mean()
        for wrong, right in by_key.values()
        if wrong and right
    ]
    return torch.stack(terms).mean() if terms else margins.sum() * 0.0


def save(
    model: LlamaForTokenClassification,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    meta: dict,
    save_dtype: str = "bf16",
) -> None:
    """An ordinary HF directory, `lodestar_prm.json` (the family) and `training.json`."""
    path.mkdir(parents=True, exist_ok=True)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[save_dtype]
    copy = LlamaForTokenClassification(model.config).to(dtype)
    copy.load_state_dict(model.state_dict())
    copy.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / PRM_CONFIG_FILE).write_text(json.dumps({"family": "qwen_prm"}) + "\n")
    (path / "training.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")


def train(cfg: PRMTrainConfig, log: bool = True) -> dict:
    """Generate (or load) the data, train, save to `cfg.out`; returns the run's record."""
    if cfg.steps is None and cfg.minutes is None:
        raise ValueError("give --steps or --minutes")
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    examples = load_or_build_examples(cfg, log)
    if cfg.references:
        seen = {(e.problem, e.steps) for e in examples}
        examples += [e for e in reference_examples(cfg) if (e.problem, e.steps) not in seen]
    data_seconds = time.perf_counter() - t0
    stats = data_stats(examples)
    if log:
        print(f"data {stats} ({data_seconds:.0f}s)", flush=True)

    torch.manual_seed(cfg.seed)
    if cfg.init is None:
        tokenizer, model = build_prm(cfg.policy)
    else:
        tokenizer = load_tokenizer(cfg.init)
        model = LlamaForTokenClassification.from_pretrained(
            cfg.init, dtype=torch.float32, local_files_only=True
        )
    worker = renderer(model, tokenizer)
    encoded = [(*encode(worker, e.problem, e.steps), e.labels) for e in examples]
    pos = stats["positive_steps"]
    neg = stats["negative_steps"]
    # Class weights so both labels carry half the loss (on-policy data is mostly correct steps).
    weight = torch.tensor([(pos + neg) / (2 * max(neg, 1)), (pos + neg) / (2 * max(pos, 1))])
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=-100)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay
    )
    total = cfg.steps  # fixed after timing the first steps when running by minutes

    def lr_at(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        if total is None:
            return warm
        return warm * max(0.0, 1.0 - step / total)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    order = batches([e.problem for e in examples], cfg.batch_size, cfg.seed)
    if log:
        print(f"params {n_params:,}  vocab {len(tokenizer)}  config {asdict(cfg)}", flush=True)
    model.train()
    start, step, ema = time.perf_counter(), 0, math.nan
    probe = 10
    while total is None or step < total:
        chosen = next(order)
        ids, mask, labels = make_batch([encoded[i] for i in chosen], tokenizer.pad_token_id)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()  # [B, S, 2]
        loss = loss_fn(logits.view(-1, 2), labels.view(-1))
        if cfg.rank_weight:
            at = labels != -100  # the separators, row by row, in step order
            margins = (logits[..., 1] - logits[..., 0])[at]
            keys = [(examples[i].problem, k) for i in chosen for k in range(len(encoded[i][1]))]
            loss = loss + cfg.rank_weight * ranking_loss(margins, keys, labels[at].tolist())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        sched.step()
        ema = loss.item() if math.isnan(ema) else 0.98 * ema + 0.02 * loss.item()
        if total is None and step == probe:
            # The decay needs a known length: plan it from the first steps' speed, then record
            # it so `--steps total` reproduces this run exactly.
            per_step = (time.perf_counter() - start) / probe
            total = max(probe + 1, int(cfg.minutes * 60 / per_step))  # type: ignore[operator]
            if log:
                print(f"planned {total} steps ({per_step:.2f}s/step)", flush=True)
        if log and step % cfg.log_every == 0:
            print(f"step {step}  loss {ema:.4f}  {time.perf_counter() - start:.0f}s", flush=True)
    seconds = time.perf_counter() - start
    meta = {
        "config": asdict(cfg),
        "params": n_params,
        "steps": step,
        "train_seconds": round(seconds, 1),
        "data_seconds": round(data_seconds, 1),
        "final_loss_ema": round(ema, 4),
        "class_weights": [round(w, 4) for w in weight.tolist()],
        "data": stats,
        "reproduce": f"--seed {cfg.seed} --steps {step}",
    }
    model.eval()
    save(model, tokenizer, cfg.out, meta, cfg.save_dtype)
    if log:
        print(f"saved {cfg.out}: {step} steps in {seconds:.0f}s, loss {ema:.4f}", flush=True)
    return meta


def parse_args(argv: list[str] | None = None) -> PRMTrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    d = PRMTrainConfig(policy=Path(), out=Path())
    p.add_argument("--policy", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=d.minutes, help="training wall-time budget")
    p.add_argument("--steps", type=int, default=None, help="exact step count (overrides minutes)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--problems", type=int, default=d.problems)
    p.add_argument(
        "--ops-weights",
        type=lambda s: tuple(float(x) for x in s.split(",")),
        default=d.ops_weights,
        help="comma-separated shares of problems with 1, 2, ... operations",
    )
    p.add_argument("--samples", type=int, default=d.samples)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--max-step-tokens", type=int, default=d.max_step_tokens)
    p.add_argument("--hard-negatives", type=float, default=d.hard_negatives)
    p.add_argument("--references", type=float, default=d.references)
    p.add_argument("--init", type=Path, default=None, help="continue from this PRM directory")
    p.add_argument("--gen-batch", type=int, default=d.gen_batch)
    p.add_argument("--data", type=Path, default=None, help="JSONL cache of the generated data")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--rank-weight", type=float, default=d.rank_weight)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--save-dtype", choices=("bf16", "fp32"), default=d.save_dtype)
    return PRMTrainConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
