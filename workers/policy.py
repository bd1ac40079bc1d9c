"""The policy worker: sample the next reasoning step for a batch of partial solutions.

One `extend` call is one padded forward loop over all its requests. A request whose parent's KV
cache is held (and whose tokens extend the parent's) starts from a copy of that cache and encodes
only what the cache lacks; the rest encode their whole prefix. Rows that stop (delimiter, EOS,
token cap) leave the batch, and their caches are kept under their `seq_id` for their children.

The first forward's batch is `batch_cache.pack_batch`'s layout: cached parts right-aligned in a
[B, kv_heads, P, head_dim] cache, uncached tokens right-aligned after them, explicit positions, so
a row's logits match an unpadded forward of that row alone (within float rounding).

Tokens: a held sequence keeps the exact token ids it was computed from, and a hit needs them to be
a prefix of the request's freshly tokenized prefix text. With a BPE tokenizer a sampled token
sequence can decode to text that re-tokenizes differently; such a child misses and recomputes from
the text, so a hit and a miss always see the same tokens and cache on/off give the same outputs.
The `mismatches` counter shows how often that happens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from lodestar.workers.batch_cache import check_full_attention, pack_batch, row_entry, save_row
from lodestar.workers.kv_cache import CachedSequence, KVCacheStore
from lodestar.workers.loading import load_model
from lodestar.workers.messages import (
    ErrorKind,
    ExtendRequest,
    RequestFailed,
    StepOutput,
    StopReason,
)
from lodestar.workers.prompt_format import PolicyPrompts


def sample_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """One token per row by inverse CDF: the row's own uniform `u` picks from its nucleus.

    logits [b, V]; temperature, top_p, u [b]. Temperature 0 is argmax. Because each row's choice
    depends only on its logits and its uniform, a row samples the same token whatever else shares
    the batch (up to float rounding of the logits).
    """
    probs = torch.softmax(logits / temperature.clamp(min=1e-6)[:, None], dim=-1)  # [b, V]
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # [b, V]
    nucleus = (sorted_p.cumsum(-1) - sorted_p) < top_p[:, None]  # keeps at least the top token
    cdf = (sorted_p * nucleus).cumsum(-1)  # [b, V], flat after the nucleus
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)  # [b, 1]
    idx = torch.minimum(idx, nucleus.sum(-1, keepdim=True) - 1)
    sampled = order.gather(-1, idx)[:, 0]  # [b]
    return torch.where(temperature == 0, logits.argmax(-1), sampled)


def find_step_end(text: str, start: int, delimiter: str) -> int | None:
    """End index of the first `delimiter` in `text` that ends after `start`, or None (always
    None for the empty delimiter: no step stop, generate to EOS or the cap)."""
    if not delimiter:
        return None
    at = text.find(delimiter, max(0, start - len(delimiter) + 1))
    return None if at < 0 else at + len(delimiter)


class PolicyWorker:
    """Samples next steps for many partial solutions at once, keeping a KV cache per sequence.

    `logprob` of a step is the sum of its sampled tokens' log-probabilities under the model's own
    next-token distribution (log_softmax of the raw logits: no temperature, no top-p), EOS
    included when sampled. `token_ids` and `text` exclude EOS; `num_tokens` counts it (it was
    generated and paid for).
    """

    concurrent = False  # one forward loop at a time (workers.contract)

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        cache_tokens: int = 32_768,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.device
        self.cache = KVCacheStore(cache_tokens)
        check_full_attention(model.config)
        self.prompts = PolicyPrompts(tokenizer)
        self.chat = self.prompts.chat
        self.context_tokens: int | None = getattr(model.config, "max_position_embeddings", None)
        """The longest sequence the model was built for (None: the config does not say)."""
        eos = {tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)}
        self.eos_ids = sorted(e for e in eos if e is not None)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_ids or [0])[0]
        self.calls = self.requests = self.generated_tokens = self.prompt_tokens = 0
        self.forward_passes = 0

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        cache_tokens: int = 32_768,
    ) -> PolicyWorker:
        tokenizer, model = load_model(path, device=device, dtype=dtype)
        return cls(model, tokenizer, cache_tokens=cache_tokens)

    # -- formatting -------------------------------------------------------------------------
    def prefix_text(self, request: ExtendRequest) -> str:
        return self.prompts.prefix(request)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.prompts.tokenize(texts)

    # -- the public API -------------------------------------------------------------------
    @torch.inference_mode()
    def extend(self, requests: Sequence[ExtendRequest]) -> list[StepOutput | RequestFailed]:
        """Sample one step for each request, in order; see the module docstring for the batch.
        A step that reaches the end of the model's context stops there (`context`; a prefix
        that already fills it gets an empty `context` step), and a request with nothing to
        condition on gets a `RequestFailed` of its own; the others are sampled as if neither
        were there."""
        self.calls += 1
        self.requests += len(requests)
        prefixes = self.tokenize([self.prefix_text(r) for r in requests])
        budgets = [
            step_budget(r, self.context_tokens, ids)
            for r, ids in zip(requests, prefixes, strict=True)
        ]
        outputs: list[StepOutput | RequestFailed] = [
            StepOutput(r.seq_id, "", (), 0.0, 0, 0, b.at_limit)
            for r, b in zip(requests, budgets, strict=True)
        ]
        caps = [b.tokens for b in budgets]
        for i, (r, ids) in enumerate(zip(requests, prefixes, strict=True)):
            if not ids:
                message = "problem: empty prompt, nothing to continue"
                outputs[i] = RequestFailed(r.seq_id, ErrorKind.INVALID_INPUT, message)
                caps[i] = 0
        live = [i for i, cap in enumerate(caps) if cap > 0]
        if live:
            steps = self._generate(
                [requests[i] for i in live], [prefixes[i] for i in live], [caps[i] for i in live]
            )
            for i, out in zip(live, steps, strict=True):
                if out.stop_reason == "length":  # the cap, or the context's end if it came first
                    out = replace(out, stop_reason=budgets[i].at_limit)
                outputs[i] = out
        return outputs

    def release(self, seq_ids: Sequence[str]) -> None:
        """Drop these sequences' caches (their search moved on or ended)."""
        self.cache.release(seq_ids)

    def release_prefix(self, prefix: str) -> int:
        """Drop every cache of one search (ids under its prefix); returns how many."""
        return self.cache.release_prefix(prefix)

    def clear(self) -> None:
        self.cache.clear()

    def stats(self) -> dict[str, int]:
        """Cache counters plus work done, for monitoring and benchmarks (plain ints)."""
        return {
            **asdict(self.cache.stats()),
            "calls": self.calls,
            "requests": self.requests,
            "generated_tokens": self.generated_tokens,
            "prompt_tokens": self.prompt_tokens,
            "forward_passes": self.forward_passes,
        }

    # -- the forward loop -----------------------------------------------------------------
    def _generate(
        self, requests: list[ExtendRequest], prefixes: list[list[int]], caps: list[int]
    ) -> list[StepOutput]:
        dev, B = self.device, len(requests)
        # How much of each prefix a held parent covers. At least one token is fed so the row has
        # next-token logits: a parent's newest sampled token was never fed, and an exact-length
        # hit (a parent that stopped on EOS) re-feeds its last token.
        parents: list[CachedSequence | None] = []
        cached, feeds, prompt_tokens = [], [], []
        for r, ids in zip(requests, prefixes, strict=True):
            entry = None if r.parent_id is None else self.cache.fork(r.parent_id, ids)
            c = 0 if entry is None else min(entry.cached, len(ids) - 1)
            parents.append(entry)
            cached.append(c)
            feeds.append(ids[c:])
            # New prefix text only: re-feeding the parent's own sampled token is generation work.
            prompt_tokens.append(len(ids) - (0 if entry is None else len(entry.token_ids)))
        self._share_prefixes(prefixes, parents, cached, feeds, prompt_tokens)
        self.prompt_tokens += sum(prompt_tokens)
        # cache [B, kv_heads, P, head_dim], input_ids [B, F], mask [B, P + F], pos [B, F]
        cache, input_ids, mask, pos = pack_batch(
            parents, cached, feeds, self.pad_id, self.model.config, dev
        )

        # Row i's t-th token uses the t-th uniform of Generator(seed_i), drawn on the CPU so a
        # seed means the same draws on any device and in any batch.
        T = max(caps)
        uniforms = torch.zeros(B, T, dtype=torch.float64)
        for i, r in enumerate(requests):
            gen = torch.Generator().manual_seed(r.seed & 0xFFFF_FFFF_FFFF_FFFF)
            uniforms[i, : caps[i]] = torch.rand(caps[i], generator=gen, dtype=torch.float64)
        uniforms = uniforms.to(dev, torch.float32)  # [B, T]
        temperature = torch.tensor([r.sampling.temperature for r in requests], device=dev)  # [B]
        top_p = torch.tensor([r.sampling.top_p for r in requests], device=dev)  # [B]
        logprob = torch.zeros(B, dtype=torch.float64, device=dev)  # [B]

        generated: list[list[int]] = [[] for _ in range(B)]  # sampled ids, EOS left out
        stops: list[StopReason] = ["length"] * B
        texts = [""] * B
        rows = list(range(B))  # active row j -> request index rows[j]
        rows_t = torch.arange(B, device=dev)  # the same, on the device
        last_pos = pos[:, -1]  # [b]
        logits = self._forward(input_ids, mask, pos, cache)  # [B, V]
        for t in range(T):
            tok = sample_tokens(logits, temperature[rows_t], top_p[rows_t], uniforms[rows_t, t])
            logprob[rows_t] += torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0].double()
            done = []  # active rows that stop on this token
            for j, (i, token) in enumerate(zip(rows, tok.tolist(), strict=True)):
                stop, texts[i] = self._advance(requests[i], generated[i], token, caps[i])
                if stop is not None:
                    stops[i] = stop
                    tokens = prefixes[i] + generated[i]
                    save_row(self.cache, requests[i].seq_id, tokens, cache, mask, j)
                    done.append(j)
            if len(done) == len(rows):
                break
            if done:
                keep = [j for j in range(len(rows)) if j not in done]
                keep_t = torch.tensor(keep, device=dev)
                cache.batch_select_indices(keep_t)
                mask, last_pos = mask[keep_t], last_pos[keep_t]
                tok, rows_t = tok[keep_t], rows_t[keep_t]
                rows = [rows[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)  # [b, S + 1]
            last_pos = last_pos + 1  # [b]
            logits = self._forward(tok[:, None], mask, last_pos[:, None], cache)  # [b, V]

        outputs = []
        for i, lp in enumerate(logprob.tolist()):
            num_tokens = len(generated[i]) + (stops[i] == "eos")
            self.generated_tokens += num_tokens
            outputs.append(
                StepOutput(
                    seq_id=requests[i].seq_id,
                    text=texts[i],
                    token_ids=tuple(generated[i]),
                    logprob=lp,
                    num_tokens=num_tokens,
                    prompt_tokens=prompt_tokens[i],
                    stop_reason=stops[i],
                )
            )
        return outputs

    def _share_prefixes(
        self,
        prefixes: list[list[int]],
        parents: list[CachedSequence | None],
        cached: list[int],
        feeds: list[list[int]],
        prompt_tokens: list[int],
    ) -> None:
        """Rows with nothing cached that would encode the same whole prefix (the n particles of
        one prompt at their first step, siblings whose parent was evicted) encode it once: one
        forward over each such prefix but its last token, then every row of the group starts
        from that cache and feeds the last token. The first row is charged the shared tokens.
        Off with the cache (`cache_tokens=0` means never reuse)."""
        if self.cache.capacity_tokens == 0:
            return
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (entry, ids) in enumerate(zip(parents, prefixes, strict=True)):
            if entry is None and len(ids) > 1:
                groups.setdefault(tuple(ids), []).append(i)
        shared = [(key, rows) for key, rows in groups.items() if len(rows) > 1]
        if not shared:
            return
        heads = [list(key[:-1]) for key, _ in shared]
        none: list[CachedSequence | None] = [None] * len(heads)
        config, dev = self.model.config, self.device
        cache, input_ids, mask, pos = pack_batch(
            none, [0] * len(heads), heads, self.pad_id, config, dev
        )
        self._forward(input_ids, mask, pos, cache)
        for u, (key, rows) in enumerate(shared):
            entry = row_entry(key[:-1], cache, mask, u)
            for n, i in enumerate(rows):
                parents[i], cached[i], feeds[i] = entry, len(key) - 1, [key[-1]]
                prompt_tokens[i] = len(key) if n == 0 else 1

    def _advance(
        self, request: ExtendRequest, generated: list[int], token: int, cap: int
    ) -> tuple[StopReason | None, str]:
        """Take one sampled token into a row's step: (stop reason or None, the step's new text).

        A delimiter ends the step where it ends (also one that began in the partial step); the
        text is cut right after it (a token running past it stays in `token_ids` only).
        """
        if token in self.eos_ids:
            return "eos", self.tokenizer.decode(generated)
        generated.append(token)
        partial = request.partial_step
        step = partial + self.tokenizer.decode(generated)
        end = find_step_end(step, len(partial), request.sampling.step_delimiter)
        if end is not None:
            return "delimiter", step[len(partial) : end]
        return ("length" if len(generated) >= cap else None), step[len(partial) :]

    def _forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """Next-token logits [b, V] (fp32) for the last position of each row; grows `cache`."""
        self.forward_passes += 1
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()


def room_left(context_tokens: int | None, prefix: list[int]) -> int:
    """Tokens the model's context leaves after `prefix` (unbounded when the config names none)."""
    return 2**31 if context_tokens is None else max(0, context_tokens - len(prefix))


def token_cap(request: ExtendRequest) -> int:
    cap = request.sampling.max_step_tokens
    return cap if request.max_new_tokens is None else min(cap, request.max_new_tokens)


@dataclass(frozen=True, slots=True)
class StepBudget:
    """How many tokens one step may sample, and what a stop at that bound is called: its cap
    ("length") or, when the model's context ends first, "context". Both engines use it."""

    tokens: int
    at_limit: StopReason


def step_budget(
    request: ExtendRequest, context_tokens: int | None, prefix: list[int]
) -> StepBudget:
    cap, room = token_cap(request), room_left(context_tokens, prefix)
    return StepBudget(min(cap, room), "length" if cap <= room else "context")


def _as_list(x: int | list[int] | None) -> list[int]:
    if x is None:
        return []
    return [x] if isinstance(x, int) else list(x)
