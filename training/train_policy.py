"""Train the shipped arithmetic policy: a small Llama with a character tokenizer.

    python -m lodestar.training.train_policy --out models/arith-policy --minutes 6 --seed 0

Examples are generated training-split problems (`lodestar.tasks.arithmetic`), a mix of 1-4
operations, each solved leftmost-innermost-first; loss is on the solution and EOS only. The
learning rate warms up and then stays constant, so a run stopped after N steps (by `--minutes`)
is bit-identical to `--steps N` with the same seed: the run records N for exact reproduction,
and `--checkpoint-every` checkpoints are reproducible the same way.
"""

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

ALPHABET = "0123456789+-*()=. \n\\{}:" + "ABQabdeox"
"""Enough for problems, the prompt (`Q:`/`A:`) and `\\boxed{}`; anything else encodes as <unk>."""

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
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 688
    ops_weights: tuple[float, ...] = (0.1, 0.25, 0.4, 0.25)
    """Probability of 1, 2, 3, ... operations per training problem."""
    max_operand: int = 9
    bf16: bool = True
    threads: int = 2
    log_every: int = 50
    checkpoint_every: int | None = None
    save_dtype: str = "bf16"
    """Weights as saved; bf16 halves the files (loaders upcast on the CPU)."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    return build_char_tokenizer(ALPHABET, chat_template=CHAT_TEMPLATE)


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


def problem_stream(cfg: TrainConfig) -> Iterator[Problem]:
    """Training-split problems, the number of operations drawn per example from `ops_weights`."""
    rng = random.Random(f"train-policy|{cfg.seed}")
    streams = [
        iter_problems(
            "train", Difficulty(ops=k, max_operand=cfg.max_operand), seed=cfg.seed, unique=False
        )
        for k in range(1, len(cfg.ops_weights) + 1)
    ]
    while True:
        yield next(rng.choices(streams, weights=cfg.ops_weights)[0])


def encode_example(tokenizer: PreTrainedTokenizerFast, problem: Problem) -> tuple[list[int], int]:
    """Token ids of prompt + solution + EOS, and the prompt length (not trained on)."""
    prompt = BOS + PROMPT_FORMAT.format(expression=problem.expression)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(solution_text(problem), add_special_tokens=False)
    return [*prompt_ids, *answer_ids, tokenizer.eos_token_id], len(prompt_ids)


def make_batch(
    tokenizer: PreTrainedTokenizerFast, problems: list[Problem]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding)."""
    encoded = [encode_example(tokenizer, p) for p in problems]
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
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    model = build_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps))
    )
    stream = problem_stream(cfg)
    print(f"params {n_params:,}  vocab {len(tokenizer)}  config {asdict(cfg)}", flush=True)

    def record(step: int, seconds: float, loss: float) -> dict:
        return {
            "config": asdict(cfg),
            "params": n_params,
            "steps": step,
            "train_seconds": round(seconds, 1),
            "final_loss_ema": round(loss, 4),
            "reproduce": f"--seed {cfg.seed} --steps {step}",
        }

    model.train()
    start, step, ema = time.perf_counter(), 0, math.nan
    budget = None if cfg.minutes is None else cfg.minutes * 60
    while True:
        elapsed = time.perf_counter() - start
        if (cfg.steps is not None and step >= cfg.steps) or (
            cfg.steps is None and budget is not None and elapsed >= budget
        ):
            break
        ids, mask, labels = make_batch(tokenizer, [next(stream) for _ in range(cfg.batch_size)])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
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
    p.add_argument("--max-operand", type=int, default=d.max_operand)
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--save-dtype", choices=("bf16", "fp32"), default=d.save_dtype)
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
