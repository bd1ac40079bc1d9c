"""A scripted task for algorithm tests: deterministic policy and reward, no model.

A problem is a name; its true answer is a hash of it. A solution is `length` reasoning steps and a
final step with `\\boxed{answer}`. Each step goes wrong with probability `p_err` (once wrong, always
wrong, and a wrong solution boxes one of three wrong answers). The reward is informative but noisy:
about 0.75 for a step of a still-correct solution, about 0.25 after an error. Greedy decoding
(temperature 0) makes each problem's error decisions from the problem alone, so its accuracy over
many problems is about (1 - p_err) ** (length + 1).

Steps are made of whitespace pieces, one "token" each, so token caps and partial steps
(early rejection) behave as with a real tokenizer. An empty step delimiter (a final round) runs
on step after step to the boxed answer and then EOS (one more token), or to the cap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lodestar.orchestrator.algorithms.answers import final_answer
from lodestar.workers.messages import (
    ExtendRequest,
    Prompt,
    ScoreRequest,
    StepOutput,
    StepScores,
)

FILLER = 4
DELIM = "\n\n"


def _h(*parts: object) -> int:
    """A 32-bit hash whose values for nearby inputs are independent (CRC32's are not)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def _unit(*parts: object) -> float:
    return _h(*parts) / 2**32


def true_answer(problem: Prompt) -> str:
    return str(_h("answer", problem) % 100)


def is_correct(problem: Prompt, text: str) -> bool:
    return final_answer(text) == true_answer(problem)


def _pieces(text: str) -> list[str]:
    """Split text into its scripted tokens: words with their leading space, and the delimiter."""
    out: list[str] = []
    for k, body in enumerate(text.split(DELIM)):
        if k:
            out.append(DELIM)
        for i, w in enumerate(body.split(" ")):
            if w:
                out.append(w if i == 0 else " " + w)
    return out


@dataclass
class ScriptedWorld:
    p_err: float = 0.2
    length: int = 3
    noise: float = 0.2
    extend_batches: list[int] = field(default_factory=list)
    score_batches: list[int] = field(default_factory=list)

    # -- policy -------------------------------------------------------------------------
    def _full_step(self, req: ExtendRequest) -> list[str]:
        i = len(req.steps)
        wrong_before = any(" bad" in s for s in req.steps)
        if req.sampling.temperature == 0:
            u = _unit("greedy", req.prompt, i)
        else:
            u = float(np.random.default_rng(req.seed).random())
        # A continued partial step keeps the verdict its first tokens already show.
        errs = " bad" in req.partial_step if req.partial_step else wrong_before or u < self.p_err
        if i >= self.length:
            if errs:
                wrong = (int(true_answer(req.prompt)) + 1 + int(u * 1000) % 3) % 100
                return ["so", f" \\boxed{{{wrong}}}", DELIM]
            return ["so", f" \\boxed{{{true_answer(req.prompt)}}}", DELIM]
        return [f"s{i}", " bad" if errs else " ok", *([" w"] * FILLER), DELIM]

    def _to_end(self, req: ExtendRequest, cap: int) -> list[str]:
        """The pieces still to come without a step stop: the open step, then the next ones (each
        seeded from the request's seed) through the boxed answer, or more than `cap` of them."""
        *closed, open_step = req.partial_step.split(DELIM)
        steps = [*req.steps, *(s + DELIM for s in closed)]
        cur = dataclasses.replace(req, steps=tuple(steps), partial_step=open_step)
        rest: list[str] = []
        while len(rest) <= cap:
            full = self._full_step(cur)
            rest += full[len(_pieces(cur.partial_step)) :]
            if final_answer("".join(full)) is not None:
                return rest
            steps.append("".join(full))
            seed = _h("to_end", req.seed, len(steps))
            cur = dataclasses.replace(req, steps=tuple(steps), partial_step="", seed=seed)
        return rest

    def _extend_one(self, req: ExtendRequest) -> StepOutput:
        cap = req.sampling.max_step_tokens
        if req.max_new_tokens is not None:
            cap = min(cap, req.max_new_tokens)
        if req.sampling.step_delimiter:
            full = self._full_step(req)
            rest = full[len(_pieces(req.partial_step)) :]
            out = rest[:cap]
            stop = "delimiter" if len(out) == len(rest) else "length"
        else:  # no step stop: to the answer, then EOS when the cap leaves room for it
            rest = self._to_end(req, cap)
            out = rest[:cap]
            stop = "eos" if len(rest) < cap else "length"
        prefix = sum(len(_pieces(s)) for s in req.steps) + 1
        logprob = -0.1 * len(out) + (math.log(self.p_err) if " bad" in "".join(out) else 0.0)
        return StepOutput(
            seq_id=req.seq_id,
            text="".join(out),
            token_ids=tuple(_h(p) % 1000 for p in out),
            logprob=logprob,
            num_tokens=len(out) + (stop == "eos"),
            prompt_tokens=prefix,
            stop_reason=stop,
        )

    async def extend(self, requests: Sequence[ExtendRequest]) -> list[StepOutput]:
        self.extend_batches.append(len(requests))
        return [self._extend_one(r) for r in requests]

    # -- reward -------------------------------------------------------------------------
    def step_rewards(self, prompt: Prompt, steps: Sequence[str]) -> list[float]:
        rewards = []
        wrong = False
        for j, s in enumerate(steps):
            boxed = final_answer(s)
            wrong = wrong or " bad" in s or (boxed is not None and boxed != true_answer(prompt))
            base = 0.25 if wrong else 0.75
            jitter = (_unit("noise", prompt, j, s) - 0.5) * 2 * self.noise
            rewards.append(min(0.99, max(0.01, base + jitter)))
        return rewards

    async def score(self, requests: Sequence[ScoreRequest]) -> list[StepScores]:
        self.score_batches.append(len(requests))
        return [
            StepScores(
                seq_id=r.seq_id,
                rewards=tuple(self.step_rewards(r.prompt, r.steps)),
                tokens=sum(len(_pieces(s)) for s in r.steps),
            )
            for r in requests
        ]


def problems(n: int, prefix: str = "task") -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


@dataclass
class NoisyRewardWorld(ScriptedWorld):
    """The scripted task with a reward that is right on average but misleads one read in four:
    a step's reward is 0.75 or 0.25 (still correct or not) plus uniform noise of +-0.45, so a
    wrong step outscores a right one often. Six reasoning steps at p_err 0.25 leave greedy about
    0.12 and most single samples wrong; picking one finished sample by its noisy score
    (best-of-N) finds a right one about 0.6 of the time, while resampling on every step's noisy
    read (PF) compounds the evidence to about 0.8; resampling uniformly falls to about 0.35."""

    p_err: float = 0.25
    length: int = 6
    noise: float = 0.45
