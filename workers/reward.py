"""The reward worker: process-reward scores for every step of many partial solutions at once.

Three PRM families (ALGORITHMS.md, "PRM families"); each turns a request into one text with one
*scoring token* per step, and reads the step's reward off the model's output at that token. What
differs between them (layout, model head, reward read-out) is one `PRMFamily` subclass each, with
its recipe in its docstring, registered in `FAMILIES`; `RewardWorker` is the shared rest.

Separator text inside the problem or a step is removed before rendering (it is the PRM's "score
here" marker); text that still tokenizes to the separator token is refused with a ValueError that
names the request, so rewards can never shift onto the wrong steps.

Incremental scoring: under causal attention a scoring token's output depends only on the tokens
before it, so the worker encodes each text only up to its last scoring token (a chat template's
end-of-turn suffix is never encoded) and keeps, per `seq_id`, that token prefix, its KV cache and
its rewards. A request whose held parent has a prefix of its steps (and of its tokens) encodes
only the new tokens and reuses the parent's rewards; anything else is rescored in full, which is
always correct, only slower. A parent must come from an earlier call.

The one forward per call uses `batch_cache.pack_batch`'s layout, as the policy worker does; the
prefix store is the policy's `KVCacheStore`, with each entry's steps and rewards beside its tensors.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lodestar.workers.batch_cache import check_full_attention, pack_batch, save_row
from lodestar.workers.kv_cache import CachedSequence, KVCacheStore
from lodestar.workers.loading import DTYPES, load_model
from lodestar.workers.messages import ErrorKind, Prompt, RequestFailed, ScoreRequest, StepScores

FamilyName = Literal["qwen_prm", "math_shepherd", "outcome"]
DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
_STEPS_PLACEHOLDER = "\ue000LODESTAR-STEPS\ue000"
"""Assistant content rendered through the chat template, then cut: what precedes it is the head."""


@dataclass(frozen=True, slots=True)
class PRMConfig:
    """How to turn a partial solution into PRM input and read rewards back; validated once here.

    `separator` is the text put after each step (qwen_prm: a special token; math_shepherd: the tag,
    whose last token is the scoring token); None takes the family's default, outcome has none.
    `system_prompt` is used on the chat path only (qwen_prm and outcome when the tokenizer has a
    template and `use_chat_template`); math_shepherd input is always plain text.
    `label_tokens` are math_shepherd's (good, bad) label strings; `positive_label` is the index of
    "good" in a 2-label head (qwen_prm, 2-label outcome).
    """

    family: FamilyName
    separator: str | None = None
    label_tokens: tuple[str, str] = ("+", "-")
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    positive_label: int = 1
    use_chat_template: bool = True
    cache_tokens: int = 65_536
    """Token budget of the prefix store (LRU); 0 disables it (every request is scored in full)."""
    device: str | None = None
    """None: the first CUDA device when available, else the CPU."""
    dtype: str | None = None
    """"bf16" / "fp16" / "fp32"; None: bf16 on CUDA, fp32 on the CPU. Rewards are fp32 anyway."""
    trust_remote_code: bool = False
    """Run a directory's own modeling code (`auto_map`), as Qwen2.5-Math-PRM-7B needs."""

    def __post_init__(self) -> None:
        family = FAMILIES.get(self.family) if isinstance(self.family, str) else None
        if family is None:
            raise ValueError(
                f"unknown PRM family {self.family!r}; expected one of {tuple(FAMILIES)}"
            )
        if self.separator is None:
            object.__setattr__(self, "separator", family.default_separator)
        elif family.default_separator is None:
            raise ValueError(f"the {self.family} family scores prefixes and takes no separator")
        if self.separator is not None and not self.separator.strip():
            raise ValueError(f"separator {self.separator!r} is blank")
        if self.positive_label not in (0, 1):
            raise ValueError(f"positive_label must be 0 or 1, got {self.positive_label}")
        if self.cache_tokens < 0:
            raise ValueError(f"cache_tokens must be >= 0, got {self.cache_tokens}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {sorted(DTYPES)}")


# -- the families ----------------------------------------------------------------------------


@dataclass(eq=False)
class PRMFamily:
    """One PRM family's side of the reward contract: the step layout around each scoring token
    (`default_separator`, `chat`, plain-path `joiner`, `piece`) and how the model's outputs there
    become rewards in [0, 1] (`rewards`); the rest is the worker's, shared by all families."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    config: PRMConfig
    auto_class: ClassVar[type]
    """The transformers Auto class `load_prm` loads a checkpoint of this family with."""
    default_separator: ClassVar[str | None] = None
    """None: each step's own last token is scored, and `PRMConfig` refuses a separator."""
    chat: ClassVar[bool] = True
    joiner: ClassVar[str] = "\n"

    def __post_init__(self) -> None:
        """Refuse a model or tokenizer the family cannot score with."""

    def piece(self, step: str) -> tuple[str, int]:
        """A cleaned step's text in the input and the offset in it just past its scoring text:
        the step without trailing whitespace, then the separator."""
        sep = self.config.separator or ""
        body = step.rstrip()
        return body + sep, len(body) + len(sep)

    def rewards(self, inputs: dict[str, Any], rows: Tensor, cols: Tensor) -> Tensor:
        """One forward of `inputs` (the packed batch on its parents' cache); the fp32 reward [n]
        at each scoring token (rows[k], cols[k]) of `input_ids`."""
        raise NotImplementedError

    def _hidden(self, inputs: dict[str, Any], rows: Tensor, cols: Tensor) -> Tensor:
        """The backbone's last hidden states at the scoring tokens only, [n, hidden]: an LM head
        over every position would be [B, F, vocab], and a sequence classifier pools one token."""
        backbone = getattr(self.model, self.model.base_model_prefix)
        return backbone(**inputs).last_hidden_state[rows, cols]


class QwenPRM(PRMFamily):
    """Qwen2.5-Math-PRM: [chat: system + user = problem + assistant turn opened] or [problem +
    "\\n"], then step_1.rstrip() <extra_0> step_2.rstrip() <extra_0> ...; reward =
    softmax(2-label token head)[positive_label] at each <extra_0>. Whitespace is stripped as the
    recipe does (split on "\\n\\n", join with <extra_0>): it never saw any before a separator."""

    auto_class = AutoModelForTokenClassification
    default_separator = "<extra_0>"

    def __post_init__(self) -> None:
        sep = self.config.separator
        if len(self.tokenizer(sep or "", add_special_tokens=False)["input_ids"]) != 1:
            raise ValueError(f"separator {sep!r} is not one token of this tokenizer")

    def rewards(self, inputs: dict[str, Any], rows: Tensor, cols: Tensor) -> Tensor:
        out = self.model(**inputs)
        logits = out.logits if hasattr(out, "logits") else out[0]  # [B, F, 2]
        if logits.shape[-1] != 2:
            raise ValueError(f"qwen_prm head gives {logits.shape[-1]} labels per token, not 2")
        picked = logits[rows, cols].float()  # [n, 2]
        return picked.softmax(-1)[:, self.config.positive_label]  # [n]


class MathShepherd(PRMFamily):
    """Math-Shepherd, plain text only: problem + " " + step_1.rstrip() + " ки" + step_1's trailing
    whitespace + ...; reward = softmax(logits of "+", "-")[0] at each "ки" (the position whose
    next-token prediction is the label). Its training data is "Step 1: ... ки\\nStep 2: ... ки":
    the tag goes right after the text and the step's own newlines follow it."""

    auto_class = AutoModelForCausalLM
    default_separator = " ки"
    chat = False
    joiner = " "

    def __post_init__(self) -> None:
        labels = [_last_token(self.tokenizer, t) for t in self.config.label_tokens]  # good, bad
        self.label_ids = torch.tensor(labels, dtype=torch.long, device=self.model.device)
        if self.model.get_output_embeddings() is None:
            raise ValueError("math_shepherd needs a causal LM with an output embedding (LM head)")

    def piece(self, step: str) -> tuple[str, int]:
        piece, end = super().piece(step)
        return piece + step[len(step.rstrip()) :], end

    def rewards(self, inputs: dict[str, Any], rows: Tensor, cols: Tensor) -> Tensor:
        logits = self.model.get_output_embeddings()(self._hidden(inputs, rows, cols))  # [n, vocab]
        good_bad = logits[:, self.label_ids].float()  # [n, 2]
        return good_bad.softmax(-1)[:, 0]  # [n]


class Outcome(PRMFamily):
    """An outcome RM (sequence classifier) read as a PRM: [chat or plain head as for qwen_prm] +
    step_1 + step_2 + ... (verbatim); reward of step i = the classifier's score of the answer
    through step i, read at step i's last token: sigmoid (1 label) or softmax[positive_label].

    Why every prefix: a causal classifier pools the last token, so the hidden state at step i's
    last token *is* its view of the answer so far (`model(prefix_i).logits`, with no end-of-turn
    marker, as for the other families). One forward scores all prefixes, they extend like a PRM's,
    and the newest step's reward is the partial answer's score (`last` aggregation works as an ORM
    should; `min`/`prod` become meaningful too). Caveat: an ORM trained to be read at an
    end-of-turn token sees unfinished answers without one; their scores are its extrapolation."""

    auto_class = AutoModelForSequenceClassification

    def __post_init__(self) -> None:
        self.num_labels = self.model.config.num_labels
        if not isinstance(getattr(self.model, "score", None), torch.nn.Module):
            raise ValueError("outcome needs a *ForSequenceClassification model (a `score` head)")
        if self.num_labels not in (1, 2):
            raise ValueError(f"outcome classifier has {self.num_labels} labels; need 1 or 2")

    def piece(self, step: str) -> tuple[str, int]:
        return step, len(step)

    def rewards(self, inputs: dict[str, Any], rows: Tensor, cols: Tensor) -> Tensor:
        logits = self.model.score(self._hidden(inputs, rows, cols)).float()  # [n, num_labels]
        if self.num_labels == 1:
            return logits[:, 0].sigmoid()  # [n]
        return logits.softmax(-1)[:, self.config.positive_label]  # [n]


FAMILIES: dict[str, type[PRMFamily]] = {
    "qwen_prm": QwenPRM,
    "math_shepherd": MathShepherd,
    "outcome": Outcome,
}


def _last_token(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{text!r} encodes to no tokens")
    return ids[-1]


def load_prm(
    path: str | Path, config: PRMConfig
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The tokenizer and the family's model (eval mode, on the chosen device) from directory `path`;
    `loading.load_model` refuses a checkpoint that lacks the family's head weights."""
    return load_model(
        path,
        FAMILIES[config.family].auto_class,
        device=config.device,
        dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
        what=f"{config.family} PRM",
    )


# -- the worker -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Plan:
    """One request on its way through `score`: its tokens, scoring positions and cache hit."""

    request: ScoreRequest
    token_ids: list[int]
    """Through the last scoring token; nothing after it is ever encoded."""
    positions: list[int]
    """Index in `token_ids` of each step's scoring token."""
    parent: CachedSequence | None
    """The parent's entry: tokens cached through its last scoring token; `scores`: its rewards."""
    rewards: list[float] = field(default_factory=list)

    @property
    def cached(self) -> int:
        return 0 if self.parent is None else self.parent.cached

    @property
    def feed(self) -> list[int]:
        return self.token_ids[self.cached :]


class RewardWorker:
    """Scores every step of many partial solutions in one padded forward per call.

    `score` returns, per request and in order, one reward in [0, 1] per step and the number of
    tokens it encoded for that request (0 for a request whose steps its parent already covered).
    """

    concurrent = False

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: PRMConfig
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.device = model.device
        self.store = KVCacheStore(config.cache_tokens)
        if not tokenizer.is_fast:
            raise ValueError("the PRM tokenizer must be a fast tokenizer (offsets locate steps)")
        check_full_attention(model.config)
        family = FAMILIES[config.family]
        self.chat = family.chat and config.use_chat_template and tokenizer.chat_template is not None
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.context_tokens: int | None = getattr(model.config, "max_position_embeddings", None)
        sep = config.separator
        # The scoring token of a separator is the token its last character lands in, e.g. "ки"
        # for Math-Shepherd's " ки" (a word token after a space in its vocab, as in "x ки").
        self.separator_id = None if sep is None else _last_token(tokenizer, "x" + sep)
        self.marker = None if sep is None else sep.strip()
        self.family = family(model, tokenizer, config)
        self._heads: dict[Prompt, str] = {}
        self.calls = self.requests = self.forward_passes = self.encoded_tokens = 0

    @classmethod
    def from_pretrained(cls, path: str | Path, config: PRMConfig) -> RewardWorker:
        tokenizer, model = load_prm(path, config)
        return cls(model, tokenizer, config)

    # -- formatting ---------------------------------------------------------------------------
    def render(self, prompt: Prompt, steps: Sequence[str]) -> tuple[str, list[int]]:
        """The PRM input text and, per step, the character offset just past its scoring text.

        Separator text inside the problem or a step is removed first: it is the PRM's marker of
        "score here", and a stray one would put an unlabelled scoring point inside a step.
        """
        head = self._head(prompt)
        pieces, ends, n = [head], [], len(head)
        for raw in steps:
            piece, end = self.family.piece(self._clean(raw))
            ends.append(n + end)
            pieces.append(piece)
            n += len(piece)
        return "".join(pieces), ends

    def _head(self, prompt: Prompt) -> str:
        """Everything before the first step: the chat up to the assistant content, or the plain
        problem and its joiner ("\\n"; Math-Shepherd: " ")."""
        if prompt in self._heads:
            return self._heads[prompt]
        if not self.chat:
            text = prompt if isinstance(prompt, str) else "\n".join(m.content for m in prompt)
            head = self._clean(text) + self.family.joiner
        else:
            if isinstance(prompt, str):
                messages = [{"role": "user", "content": self._clean(prompt)}]
            else:
                messages = [{"role": m.role, "content": self._clean(m.content)} for m in prompt]
            if self.config.system_prompt is not None and all(
                m["role"] != "system" for m in messages
            ):
                messages.insert(0, {"role": "system", "content": self.config.system_prompt})
            messages.append({"role": "assistant", "content": _STEPS_PLACEHOLDER})
            rendered = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=False
            )
            if _STEPS_PLACEHOLDER not in rendered:
                raise ValueError("the chat template does not render the assistant's content")
            head = rendered[: rendered.index(_STEPS_PLACEHOLDER)]
        if len(self._heads) >= 1024:
            self._heads.clear()
        self._heads[prompt] = head
        return head

    def _clean(self, text: str) -> str:
        while self.marker and self.marker in text:
            text = text.replace(self.marker, "")
        return text

    def _plan(self, requests: Sequence[ScoreRequest]) -> list[_Plan | RequestFailed]:
        """Tokenize every request in one call, locate its scoring tokens, look up its parent; a
        request whose text cannot be scored gets a `RequestFailed` instead of a plan."""
        rendered = [self.render(r.prompt, r.steps) for r in requests]
        enc = self.tokenizer(
            [text for text, _ in rendered],
            add_special_tokens=not self.chat,
            return_offsets_mapping=True,
        )
        plans = []
        for r, (_, ends), ids, offsets in zip(
            requests, rendered, enc["input_ids"], enc["offset_mapping"], strict=True
        ):
            positions = _scoring_positions(offsets, ends)
            ids = list(ids[: positions[-1] + 1]) if positions else []
            try:
                if self.separator_id is not None:
                    self._check_separators(r, ids, positions)
            except ValueError as e:
                plans.append(RequestFailed(r.seq_id, ErrorKind.INVALID_INPUT, str(e)))
                continue
            if self.context_tokens is not None and len(ids) > self.context_tokens:
                message = (
                    f"{len(ids)} tokens to score, the reward model's context {self.context_tokens}"
                )
                plans.append(RequestFailed(r.seq_id, ErrorKind.RESOURCE_EXHAUSTED, message))
                continue
            parent = None
            if r.parent_id is not None and self.store.capacity_tokens > 0:
                parent = self.store.fork(r.parent_id, ids, r.steps)
            plans.append(_Plan(r, ids, positions, parent))
        return plans

    def _check_separators(self, r: ScoreRequest, ids: list[int], positions: list[int]) -> None:
        """Every step's scoring token is the separator token, and no other token is."""
        if any(ids[p] != self.separator_id for p in positions):
            raise ValueError(
                f"separator {self.config.separator!r} merged with the text around it when "
                "tokenized; choose a separator the tokenizer keeps whole"
            )
        if ids.count(self.separator_id) != len(positions):
            raise ValueError(
                f"text other than the step separators tokenizes to the reward model's separator "
                f"{self.config.separator!r}"
            )

    # -- the public API ---------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, requests: Sequence[ScoreRequest]) -> list[StepScores | RequestFailed]:
        """Rewards for every step of each request, in order; one forward for the whole call.
        A request that cannot be scored gets its own `RequestFailed`; the others are scored."""
        self.calls += 1
        self.requests += len(requests)
        outcomes = self._plan(requests)
        plans = [p for p in outcomes if isinstance(p, _Plan)]
        for p in plans:
            if p.parent is not None:
                p.rewards = list(p.parent.scores)
        todo = [p for p in plans if p.feed]
        if todo:
            self._forward(todo)
        outputs: list[StepScores | RequestFailed] = []
        for p in outcomes:
            if isinstance(p, RequestFailed):
                outputs.append(p)
                continue
            # An outcome step with no text of its own shares the previous step's scoring token.
            while len(p.rewards) < len(p.positions):
                p.rewards.append(p.rewards[-1])
            tokens = len(p.feed)
            self.encoded_tokens += tokens
            if p.positions and not tokens and p.parent is not None:  # the parent's cache as is
                steps, rewards = p.request.steps, tuple(p.rewards)
                self.store.put(p.request.seq_id, replace(p.parent, steps=steps, scores=rewards))
            outputs.append(StepScores(p.request.seq_id, tuple(p.rewards), tokens))
        return outputs

    def release(self, seq_ids: Sequence[str]) -> None:
        """Forget these sequences (their search moved on or ended)."""
        self.store.release(seq_ids)

    def release_prefix(self, prefix: str) -> int:
        """Drop every cache of one search (ids under its prefix); returns how many."""
        return self.store.release_prefix(prefix)

    def clear(self) -> None:
        self.store.clear()

    def stats(self) -> dict[str, int]:
        """Work done and cache counters, for monitoring and spend accounting (plain ints)."""
        return {
            **asdict(self.store.stats()),
            "calls": self.calls,
            "requests": self.requests,
            "forward_passes": self.forward_passes,
            "encoded_tokens": self.encoded_tokens,
        }

    # -- the forward ------------------------------------------------------------------------
    def _forward(self, plans: list[_Plan]) -> None:
        """Encode each plan's new tokens on top of its parent's cache, score its new steps, and
        hold the result under its `seq_id`."""
        dev = self.device
        # cache [B, kv_heads, P, head_dim], input_ids [B, F], mask [B, P + F], position_ids [B, F]
        cache, input_ids, mask, position_ids = pack_batch(
            [p.parent for p in plans],
            [p.cached for p in plans],
            [p.feed for p in plans],
            self.pad_id,
            self.model.config,
            dev,
        )
        F = input_ids.shape[1]
        rows, cols = [], []  # where each new scoring token sits in `input_ids`
        for i, p in enumerate(plans):
            for pos in _new_positions(p):
                if pos is not None:
                    rows.append(i)
                    cols.append(F - len(p.feed) + pos - p.cached)
        rows_t, cols_t = torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)  # [n]

        self.forward_passes += 1
        inputs = dict(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        new = iter(self.family.rewards(inputs, rows_t, cols_t).tolist())
        for i, p in enumerate(plans):
            for pos in _new_positions(p):
                p.rewards.append(next(new) if pos is not None else p.rewards[-1])
            seq_id, steps = p.request.seq_id, p.request.steps
            save_row(self.store, seq_id, p.token_ids, cache, mask, i, steps, p.rewards)


PRMWorker = RewardWorker


def _new_positions(plan: _Plan) -> list[int | None]:
    """The scoring positions of a plan's unscored steps; None for an empty outcome step, which
    shares the previous step's token and so copies its reward exactly (scored twice, a batched
    head can round the two rows differently)."""
    out: list[int | None] = []
    done = len(plan.rewards)
    for k, pos in enumerate(plan.positions[done:], start=done):
        shared = pos < plan.cached or (k > 0 and plan.positions[k - 1] == pos)
        out.append(None if shared else pos)
    return out


def _scoring_positions(offsets: Sequence[tuple[int, int]], ends: Sequence[int]) -> list[int]:
    """Per character offset in `ends`, the index of the token holding the character before it:
    the last token that starts before it (so a character split into several byte tokens maps
    to its final one). Tokens without text (BOS, EOS added by the tokenizer) are skipped."""
    starts, index = [], []
    for i, (s, e) in enumerate(offsets):
        if e > s:
            starts.append(s)
            index.append(i)
    out = []
    for end in ends:
        k = bisect_left(starts, end) - 1
        if k < 0:
            raise ValueError("a step's scoring text lies before the first token")
        out.append(index[k])
    return out
