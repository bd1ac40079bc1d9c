"""Pack per-sequence KV caches into one padded batch for a forward, and keep rows back after it.

Both workers run this layout (B rows, P = longest cached part, F = longest new part):

    cache  [B, kv_heads, P, head_dim]   row i: zeros, then its c_i cached positions (right-aligned)
    input  [B, F]                       row i: pad, then its f_i new tokens (right-aligned)
    mask   [B, P + F]                   0 0 1 1 1 | 0 0 0 1 1   (zeros may sit in the middle)
    pos    [B, F]                       cumsum(mask) - 1: each token's position in its own sequence

Rotary models (Llama, Qwen2) and absolute-position models (GPT-2) both take explicit positions, so
a row's outputs match an unpadded forward of that row alone (within float rounding). The cached
part is a copy: the parents' entries stay as they are, for their other children.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

from lodestar.workers.kv_cache import CachedSequence, KVCacheStore


def check_full_attention(config: PretrainedConfig) -> None:
    """ValueError unless every layer keeps a full cache (the layout above has no sliding window)."""
    if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=config).layers):
        raise ValueError("only full-attention models are supported (no sliding-window layers)")


def pack_batch(
    parents: Sequence[CachedSequence | None],
    cached: Sequence[int],
    feeds: Sequence[Sequence[int]],
    pad_id: int,
    config: PretrainedConfig,
    device: torch.device,
) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cache, input_ids [B, F], mask [B, P + F], pos [B, F]) for rows that reuse the first
    `cached[i]` positions of `parents[i]` (None: nothing cached) and feed `feeds[i]` on top."""
    B, P, F = len(feeds), max(cached), max(map(len, feeds))
    cache = DynamicCache(config=config)
    if P > 0:
        ref = next(e for e in parents if e is not None)
        past = []
        for layer in range(len(ref.keys)):
            H, _, D = ref.keys[layer].shape
            k = ref.keys[layer].new_zeros(B, H, P, D)  # [B, kv_heads, P, head_dim]
            v = ref.values[layer].new_zeros(B, H, P, D)
            for i, (e, c) in enumerate(zip(parents, cached, strict=True)):
                if e is not None and c > 0:
                    k[i, :, P - c :] = e.keys[layer][:, :c]
                    v[i, :, P - c :] = e.values[layer][:, :c]
            past.append((k, v))
        cache = DynamicCache(past, config=config)

    input_ids = torch.full((B, F), pad_id, dtype=torch.long)  # [B, F]
    mask = torch.zeros(B, P + F, dtype=torch.long)  # [B, P + F]
    for i, (c, feed) in enumerate(zip(cached, feeds, strict=True)):
        input_ids[i, F - len(feed) :] = torch.tensor(feed, dtype=torch.long)
        mask[i, P - c : P] = 1
        mask[i, P + F - len(feed) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, P:]  # [B, F]
    return cache, input_ids, mask, pos


def row_entry(
    token_ids: Sequence[int],
    cache: DynamicCache,
    mask: torch.Tensor,
    j: int,
    steps: Sequence[str] = (),
    scores: Sequence[float] = (),
) -> CachedSequence:
    """Batch row j's cache (its unpadded positions, copied) as an entry; `mask` is the batch's
    [b, S] attention mask, `steps`/`scores` go beside the tensors."""
    valid = mask[j].bool()  # [S]: this row's real positions in the batch cache
    keys = tuple(layer.keys[j][:, valid] for layer in cache.layers)  # [kv_heads, n, head_dim]
    values = tuple(layer.values[j][:, valid] for layer in cache.layers)
    return CachedSequence(tuple(token_ids), keys, values, tuple(steps), tuple(scores))


def save_row(
    store: KVCacheStore,
    seq_id: str,
    token_ids: Sequence[int],
    cache: DynamicCache,
    mask: torch.Tensor,
    j: int,
    steps: Sequence[str] = (),
    scores: Sequence[float] = (),
) -> None:
    """Hold batch row j's cache under `seq_id` in `store` (nothing when the store is off)."""
    if store.capacity_tokens == 0:
        return
    store.put(seq_id, row_entry(token_ids, cache, mask, j, steps, scores))
