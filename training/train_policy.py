"""Train the shipped arithmetic policy: a small Llama with a character tokenizer.

    python -m lodestar.training.train_policy --out results/policy --minutes 15 --seed 0

Examples are generated training-split problems (`lodestar.tasks.arithmetic`), a mix of 1-4
operations (one count per batch, so little padding), each solved leftmost-innermost-first in the
scratchpad step format (`--step-format bare` for the plain one); loss is on the solution and EOS.

The learning rate warms up, stays constant, and decays linearly to zero over the last
`decay_frac` of the steps. With `--minutes` the total T is fixed once the stable phase has used
its share of the time budget (the smallest T whose stable phase covers the steps taken), so the
schedule is a function of the step and T alone: `--steps T` with the same seed and `--threads`
reproduces the run bit for bit, and the run records T in `training.json`.

fp32 by default: bf16 autocast is 15x slower on AVX2-only CPUs such as the project's. Under CPU
contention `--threads 1` beats 2 (two OpenMP threads stall on a shared core)."""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lodestar.tasks.arithmetic import (
    PROMPT_FORMAT,
    Difficulty,
    Problem,
    iter_problems,
    solution_text,
)
from lodestar.training.char_tokenizer import BOS, build_char_tokenizer

ALPHABET = "0123456789+-*()=.,; \n\\{}:" + "ABQabdeosx"
"""Enough for problems, the prompt (`Q:`/`A:`), `, so` and `\\boxed{}`; others encode as <unk>."""
BARE_ALPHABET = "0123456789+-*()=. \n\\{}:" + "ABQabdeox"
"""The alphabet of the `bare` step format (kept so that format's runs reproduce exactly)."""
STEP_FORMATS = ("restate", "bare")
"""`restate`: `7+5=12, so 12*3-4` (the scratchpad); `bare`: `7+5=12` (the first shipped policy)."""

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}Q: {{ m['content'] | trim }}\n"
    "{% elif m['role'] == 'assistant' %}A:\n{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}A:\n{% endif %}"
)
"""User turn `Q: <expr>`, assistant turn `A:` then the steps; system messages are dropped."""


@dataclass
class TrainConfig:
    out: Path
    minutes: float | None = 6.0
    steps: int | None = None
    """Exact number of optimizer steps; overrides `minutes` (use it to reproduce a run)."""
    seed: int = 0
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    decay_frac: float = 0.3
    weight_decay: float = 0.1
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 688
    ops_weights: tuple[float, ...] = (0.15, 0.3, 0.3, 0.25)
    """Probability of 1, 2, 3, ... operations per training problem."""
    min_operand: int = Difficulty().min_operand
    max_operand: int = Difficulty().max_operand
    min_value: int = Difficulty().min_value
    max_value: int = Difficulty().max_value
    """Operand and value ranges: the task's domain by default (`Difficulty`)."""
    step_format: str = "restate"
    """One of STEP_FORMATS; `bare` with `--steps 896 --threads 1` and the 1.6M shape reproduces
    the first shipped policy (results/policy-run3)."""
    bf16: bool = False
    """bf16 autocast: faster only where the CPU has avx512_bf16 (15x slower on AVX2-only ones)."""
    threads: int = 2
    log_every: int = 50
    checkpoint_every: int | None = None
    save_dtype: str = "bf16"
    """Weights as saved; bf16 halves the files (loaders upcast on the CPU)."""


def build_tokenizer(step_format: str = "restate") -> PreTrainedTokenizerFast:
    alphabet = {"restate": ALPHABET, "bare": BARE_ALPHABET}[step_format]
    return build_char_tokenizer(alphabet, chat_template=CHAT_TEMPLATE)


def build_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def difficulty(cfg: TrainConfig, ops: int) -> Difficulty:
    return Difficulty(
        ops=ops,
        min_operand=cfg.min_operand,
        max_operand=cfg.max_operand,
        min_value=cfg.min_value,
        max_value=cfg.max_value,
    )


def batch_stream(cfg: TrainConfig) -> Iterator[list[Problem]]:
    """Batches of training-split problems; each batch's number of operations is drawn from
    `ops_weights`, so its sequences have similar lengths."""
    rng = random.Random(f"train-policy|{cfg.seed}")
    streams = [
        iter_problems("train", difficulty(cfg, k), seed=cfg.seed, unique=False)
        for k in range(1, len(cfg.ops_weights) + 1)
    ]
    while True:
        stream = rng.choices(streams, weights=cfg.ops_weights)[0]
        yield [next(stream) for _ in range(cfg.batch_size)]


def _stable_end(total: int, decay_frac: float) -> int:
    return math.floor(total * (1 - decay_frac) + 1e-9)


def total_for_stable(stable_steps: int, decay_frac: float) -> int:
    """The smallest total whose stable phase covers `stable_steps` (steps already taken at the
    constant rate), so fixing it mid-run changes no step already taken."""
    total = max(stable_steps, math.floor(stable_steps / (1 - decay_frac)) - 1)
    while _stable_end(total, decay_frac) < stable_steps:
        total += 1
    return total


def lr_factor(step: int, total: int | None, cfg: TrainConfig) -> float:
    """Warmup-stable-decay: linear warmup, constant, then linear decay over the last
    `decay_frac` of `total` steps (constant while `total` is not known yet)."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if total is None:
        return warm
    stable_end = _stable_end(total, cfg.decay_frac)
    if step < stable_end:
        return warm
    return warm * max(0.0, (total - step) / max(1, total - stable_end))


def encode_example(
    tokenizer: PreTrainedTokenizerFast, problem: Problem, *, restate: bool = True
) -> tuple[list[int], int]:
    """Token ids of prompt + solution + EOS, and the prompt length (not trained on)."""
    prompt = BOS + PROMPT_FORMAT.format(expression=problem.expression)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer = solution_text(problem, restate=restate)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)
    return [*prompt_ids, *answer_ids, tokenizer.eos_token_id], len(prompt_ids)


def make_batch(
    tokenizer: PreTrainedTokenizerFast, problems: list[Problem], *, restate: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding)."""
    encoded = [encode_example(tokenizer, p, restate=restate) for p in problems]
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (seq, n_prompt) in enumerate(encoded):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
        mask[i, : len(seq)] = 1
    return ids, mask, labels


def save(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path, meta: dict
) -> None:
    """An ordinary HF directory (config, safetensors, tokenizer) plus `training.json`."""
    path.mkdir(parents=True, exist_ok=True)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[meta["config"]["save_dtype"]]
    copy = LlamaForCausalLM(model.config).to(dtype)
    copy.load_state_dict(model.state_dict())
    copy.generation_config = model.generation_config
    copy.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "training.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")


def train(cfg: TrainConfig) -> dict:
    """Train and save to `cfg.out`; returns the run's record (steps, seconds, losses)."""
    if cfg.steps is None and cfg.minutes is None:
        raise ValueError("give --steps or --minutes")
    if not 0.0 <= cfg.decay_frac < 1.0:
        raise ValueError(f"decay_frac must be in [0, 1), got {cfg.decay_frac}")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.step_format not in STEP_FORMATS:
        raise ValueError(f"step_format must be one of {STEP_FORMATS}, got {cfg.step_format!r}")
    tokenizer = build_tokenizer(cfg.step_format)
    restate = cfg.step_format == "restate"
    model = build_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay
    )
    batches = batch_stream(cfg)
    print(f"params {n_params:,}  vocab {len(tokenizer)}  config {asdict(cfg)}", flush=True)

    def record(step: int, seconds: float, loss: float) -> dict:
        return {
            "config": asdict(cfg),
            "params": n_params,
            "steps": step,
            "train_seconds": round(seconds, 1),
            "final_loss_ema": round(loss, 4),
            "reproduce": f"--seed {cfg.seed} --steps {step}",
            "steps_per_second": round(step / max(seconds, 1e-9), 3),
        }

    model.train()
    start, step, ema = time.perf_counter(), 0, math.nan
    total = cfg.steps
    while total is None or step < total:
        stable_time = None if cfg.minutes is None else cfg.minutes * 60 * (1 - cfg.decay_frac)
        if total is None and stable_time is not None and time.perf_counter() - start >= stable_time:
            total = total_for_stable(step, cfg.decay_frac)
            print(f"stable phase done after {step} steps; training {total} in all", flush=True)
            continue
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, total, cfg)
        ids, mask, labels = make_batch(tokenizer, next(batches), restate=restate)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if math.isnan(ema) else 0.98 * ema + 0.02 * loss.item()
        if step % cfg.log_every == 0:
            print(f"step {step}  loss {ema:.4f}  {time.perf_counter() - start:.0f}s", flush=True)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            meta = record(step, time.perf_counter() - start, ema)
            save(model, tokenizer, cfg.out / f"checkpoint-{step}", meta)
    meta = record(step, time.perf_counter() - start, ema)
    save(model, tokenizer, cfg.out, meta)
    print(f"saved {cfg.out}: {step} steps in {meta['train_seconds']}s, loss {ema:.4f}", flush=True)
    return meta


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    d = TrainConfig(out=Path())
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=d.minutes, help="wall-time budget")
    p.add_argument("--steps", type=int, default=None, help="exact step count (overrides minutes)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--decay-frac", type=float, default=d.decay_frac)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kv-heads", type=int, default=d.kv_heads)
    p.add_argument("--intermediate", type=int, default=d.intermediate)
    p.add_argument(
        "--ops-weights",
        type=lambda s: tuple(float(x) for x in s.split(",")),
        default=d.ops_weights,
        help="comma-separated probabilities of 1, 2, ... operations",
    )
    p.add_argument("--min-operand", type=int, default=d.min_operand)
    p.add_argument("--max-operand", type=int, default=d.max_operand)
    p.add_argument("--min-value", type=int, default=d.min_value)
    p.add_argument("--max-value", type=int, default=d.max_value)
    p.add_argument("--step-format", choices=STEP_FORMATS, default=d.step_format)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CPUs with avx512_bf16)")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--save-dtype", choices=("bf16", "fp32"), default=d.save_dtype)
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
