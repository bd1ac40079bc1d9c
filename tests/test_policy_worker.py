"""The policy worker on tiny real models (Llama, Qwen2, GPT-2): sampling, stops, KV-cache reuse.

The oracle for every cached computation is one plain, unpadded forward over the whole sequence:
a step's log-probability from the worker (cache hits, forks, mixed batches) must match it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from lodestar.workers.batch_cache import pack_batch, save_row
from lodestar.workers.kv_cache import CachedSequence, KVCacheStore
from lodestar.workers.loading import ModelLoadError, choose_device, choose_dtype, load_model
from lodestar.workers.messages import ChatMessage, ExtendRequest, SamplingParams, StepOutput
from lodestar.workers.policy import PolicyWorker, find_step_end, sample_tokens
from tests.model_factory import save_tiny_model

NEVER = "NEVER"  # a delimiter the char models cannot produce (capitals are not in their alphabet)
SAMPLED = SamplingParams(temperature=1.0, max_step_tokens=12, step_delimiter="\n")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": save_tiny_model(root / "llama", "llama"),
        "qwen2": save_tiny_model(root / "qwen2", "qwen2", chat=True),
        "gpt2": save_tiny_model(root / "gpt2", "gpt2"),
    }


def worker(dirs: dict[str, Path], arch: str, cache_tokens: int = 4096) -> PolicyWorker:
    return PolicyWorker.from_pretrained(dirs[arch], cache_tokens=cache_tokens)


def req(
    seq_id: str,
    parent_id: str | None = None,
    steps: tuple[str, ...] = (),
    seed: int = 0,
    prompt: str = "12+3=",
    sampling: SamplingParams = SAMPLED,
    **kw: object,
) -> ExtendRequest:
    return ExtendRequest(seq_id, parent_id, prompt, steps, seed, sampling, **kw)  # type: ignore[arg-type]


def prefix_len(w: PolicyWorker, request: ExtendRequest) -> int:
    """Tokens of the request's whole prefix: what a worker encodes when nothing is cached."""
    return len(w.tokenize([w.prefix_text(request)])[0])


def child(parent: ExtendRequest, out: StepOutput, seq_id: str, seed: int) -> ExtendRequest:
    """The next step of `parent`'s sequence: its steps plus the step it just produced."""
    return req(seq_id, out.seq_id, (*parent.steps, out.text), seed, str(parent.prompt))


@torch.inference_mode()
def recomputed_logprob(w: PolicyWorker, request: ExtendRequest, out: StepOutput) -> float:
    """The step's log-probability from one unpadded forward over prefix + step (+ EOS)."""
    prefix = w.tokenize([w.prefix_text(request)])[0]
    seq = prefix + list(out.token_ids) + ([w.tokenizer.eos_token_id] if out.eos else [])
    logits = w.model(torch.tensor([seq])).logits[0].double()
    logp = torch.log_softmax(logits[len(prefix) - 1 : -1], -1)
    return logp.gather(1, torch.tensor(seq[len(prefix) :])[:, None]).sum().item()


def assert_matches_recompute(w: PolicyWorker, requests, outs) -> None:
    for r, o in zip(requests, outs, strict=True):
        assert o.logprob == pytest.approx(recomputed_logprob(w, r, o), abs=1e-4), r.seq_id


# -- KV-cache reuse is exact ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_cached_forks_and_mixed_batches_match_full_recompute(model_dirs, arch):
    w, fresh = worker(model_dirs, arch), worker(model_dirs, arch, cache_tokens=0)
    roots = [req("a", seed=1), req("b", seed=2, prompt="7*(8-1)="), req("c", seed=3, prompt="9")]
    first = w.extend(roots)
    assert_matches_recompute(w, roots, first)
    assert [o.prompt_tokens for o in first] == [prefix_len(w, r) for r in roots]

    # One batch: two children forked from "a", one from "b", one whose parent was never held,
    # one naming "c" with different steps (held, but not a prefix: a mismatch).
    kids = [
        child(roots[0], first[0], "a1", seed=10),
        child(roots[0], first[0], "a2", seed=11),
        child(roots[1], first[1], "b1", seed=12),
        req("ghost1", "ghost", ("1\n",), seed=13),
        req("c1", "c", ("not c's step\n",), seed=14, prompt="9"),
    ]
    outs = w.extend(kids)
    assert_matches_recompute(w, kids, outs)
    assert [o.prompt_tokens for o in outs][:3] == [0, 0, 0]
    assert all(o.prompt_tokens > 0 for o in outs[3:])
    stats = w.stats()
    assert (stats["hits"], stats["misses"], stats["mismatches"]) == (3, 2, 1)

    # The recompute path samples the very same tokens for the same seeds.
    fresh.extend(roots)
    for o, f in zip(outs, fresh.extend(kids), strict=True):
        assert (o.token_ids, o.text, o.stop_reason) == (f.token_ids, f.text, f.stop_reason)
        assert o.logprob == pytest.approx(f.logprob, abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_particles_of_one_prompt_encode_it_once_and_stay_exact(model_dirs, arch):
    """Four particles of one prompt (plus a different prompt and a cached child in the same
    batch): the shared prefix is encoded once, and every row samples what it samples alone."""
    w, fresh = worker(model_dirs, arch), worker(model_dirs, arch, cache_tokens=0)
    (root_out,) = w.extend([req("root", seed=1, prompt="9")])
    fresh.extend([req("root", seed=1, prompt="9")])
    batch = [req(f"p{i}", seed=40 + i, prompt="(1+2)*(3+4)=") for i in range(4)]
    batch += [req("other", seed=7, prompt="5-3="), child(req("root", prompt="9"), root_out, "k", 8)]
    passes = (w.stats()["forward_passes"], fresh.stats()["forward_passes"])
    encoded = fresh.stats()["prompt_tokens"]
    outs = w.extend(batch)
    assert_matches_recompute(w, batch, outs)
    for o, f in zip(outs, fresh.extend(batch), strict=True):
        assert (o.token_ids, o.text, o.stop_reason) == (f.token_ids, f.text, f.stop_reason)
        assert o.logprob == pytest.approx(f.logprob, abs=1e-4)
    length, other = prefix_len(w, batch[0]), prefix_len(w, batch[4])
    assert [o.prompt_tokens for o in outs] == [length, 1, 1, 1, other, 0]
    assert fresh.stats()["prompt_tokens"] - encoded == 4 * length + other + prefix_len(
        fresh, batch[5]
    )
    # One extra forward (the shared prefix) on top of the same sampling loop.
    w_passes = w.stats()["forward_passes"] - passes[0]
    assert w_passes == fresh.stats()["forward_passes"] - passes[1] + 1


def test_grandchildren_of_a_fork_stay_exact(model_dirs):
    """Caches written by a hit (right-aligned behind padding) are themselves exact parents."""
    w = worker(model_dirs, "llama")
    root = req("r", seed=5, prompt="1")
    (r_out,) = w.extend([root])
    gen1 = [child(root, r_out, f"k{i}", seed=20 + i) for i in range(3)]
    gen1.append(req("long", prompt="(1+2)*(3+4)-5*6=", seed=9))  # a long miss pads the hits
    outs1 = w.extend(gen1)
    gen2 = [child(gen1[i % 3], outs1[i % 3], f"g{i}", seed=30 + i) for i in range(4)]
    outs2 = w.extend(gen2)
    assert_matches_recompute(w, gen2, outs2)
    assert all(o.prompt_tokens == 0 for o in outs2)


# -- sampling ------------------------------------------------------------------------------------


def test_same_seed_gives_same_step_alone_or_in_any_batch(model_dirs):
    w = worker(model_dirs, "qwen2", cache_tokens=0)
    target = req("t", seed=42)
    (alone,) = w.extend([target])
    others = [req(f"o{i}", seed=i, prompt="3" * (i + 1)) for i in range(5)]
    for batch in ([*others[:2], target, *others[2:]], [target, others[4]]):
        together = next(o for o in w.extend(batch) if o.seq_id == "t")
        assert (together.token_ids, together.text) == (alone.token_ids, alone.text)
        assert together.logprob == pytest.approx(alone.logprob, abs=1e-4)
    steps = {w.extend([req("t", seed=s)])[0].token_ids for s in range(6)}
    assert len(steps) > 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_temperature_zero_is_argmax(model_dirs, arch):
    w = worker(model_dirs, arch)
    greedy = SamplingParams(temperature=0.0, max_step_tokens=8, step_delimiter=NEVER)
    a, b = w.extend([req("a", seed=1, sampling=greedy), req("b", seed=2, sampling=greedy)])
    assert a.token_ids == b.token_ids
    ids = w.tokenize([w.prefix_text(req("x"))])[0]
    with torch.inference_mode():
        for tok in a.token_ids:
            assert w.model(torch.tensor([ids])).logits[0, -1].argmax().item() == tok
            ids.append(tok)


def test_sample_tokens_inverse_cdf_and_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]] * 4))
    one, u = torch.ones(4), torch.tensor([0.1, 0.6, 0.9, 0.99])
    assert sample_tokens(logits, one, one, u).tolist() == [0, 1, 2, 2]
    # nucleus {0.5, 0.3} renormalised: token 0 below u = 0.625
    assert sample_tokens(logits, one, torch.full((4,), 0.7), u).tolist() == [0, 0, 1, 1]
    assert sample_tokens(logits, one, torch.full((4,), 0.1), u).tolist() == [0, 0, 0, 0]
    assert sample_tokens(logits, torch.zeros(4), one, u).tolist() == [0, 0, 0, 0]


# -- stopping ------------------------------------------------------------------------------------


def test_steps_stop_at_delimiter_eos_or_length_and_finished_rows_leave_the_batch(model_dirs):
    w = worker(model_dirs, "llama")
    batch_sizes: list[int] = []
    hook = w.model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _o: batch_sizes.append(args[0].shape[0])
    )
    outs = w.extend([req(f"s{i}", seed=i) for i in range(24)])
    hook.remove()
    assert {o.stop_reason for o in outs} == {"delimiter", "eos", "length"}
    for o in outs:
        if o.stop_reason == "delimiter":
            assert o.text.endswith("\n") and o.text.count("\n") == 1
            assert o.num_tokens == len(o.token_ids) <= 12
        elif o.stop_reason == "eos":
            assert w.tokenizer.eos_token_id not in o.token_ids
            assert o.num_tokens == len(o.token_ids) + 1
            assert o.text == w.tokenizer.decode(list(o.token_ids))
        else:
            assert o.num_tokens == len(o.token_ids) == 12 and "\n" not in o.text
    shared, *loop = batch_sizes  # the 24 rows' common prompt is encoded once, then sampling
    assert shared == 1 and loop[0] == 24 and loop == sorted(loop, reverse=True)
    assert loop[-1] < 24

    capped = w.extend([req(f"m{i}", seed=i, max_new_tokens=3) for i in range(8)])
    assert all(o.num_tokens <= 3 for o in capped)
    assert any(o.stop_reason == "length" and o.num_tokens == 3 for o in capped)
    (none,) = w.extend([req("z", seed=0, max_new_tokens=0)])
    assert (none.text, none.num_tokens, none.stop_reason) == ("", 0, "length")


def test_an_empty_delimiter_runs_the_step_to_eos_or_the_cap(model_dirs):
    """The final round of beam and DVTS: no step stop, the same draws continue past the
    delimiter, so each step to the end begins with the delimited step of the same seed."""
    w = worker(model_dirs, "llama")
    to_end = SamplingParams(temperature=1.0, max_step_tokens=12, step_delimiter="")
    delimited = w.extend([req(f"d{i}", seed=i) for i in range(24)])
    outs = w.extend([req(f"e{i}", seed=i, sampling=to_end) for i in range(24)])
    assert {o.stop_reason for o in outs} <= {"eos", "length"}
    for d, o in zip(delimited, outs, strict=True):
        assert o.text.startswith(d.text)
        if d.stop_reason == "delimiter" and d.num_tokens < 12:
            assert o.num_tokens > d.num_tokens  # went on past the delimiter (EOS counts)
    assert any(d.stop_reason == "delimiter" and d.num_tokens < 12 for d in delimited)
    assert find_step_end("a\n\nb", start=0, delimiter="") is None


def test_delimiter_may_straddle_the_partial_step():
    assert find_step_end("ab\n" + "\nc", start=3, delimiter="\n\n") == 4
    assert find_step_end("a\n\nb" + "c", start=4, delimiter="\n\n") is None
    assert find_step_end("ab" + "c\n\nd", start=2, delimiter="\n\n") == 5


def test_partial_step_continues_the_partial_text(model_dirs):
    w = worker(model_dirs, "llama")
    greedy = SamplingParams(temperature=0.0, max_step_tokens=10, step_delimiter=NEVER)
    (full,) = w.extend([req("full", sampling=greedy)])
    (head,) = w.extend([req("head", sampling=greedy, max_new_tokens=4)])
    cont_req = req("cont", "head", sampling=greedy, partial_step=head.text, max_new_tokens=6)
    (cont,) = w.extend([cont_req])
    assert head.text + cont.text == full.text
    assert cont.prompt_tokens == 0
    assert head.logprob + cont.logprob == pytest.approx(full.logprob, abs=1e-4)

    sampled = req("cont2", "head", seed=3, partial_step=head.text)
    (out,) = w.extend([sampled])
    assert_matches_recompute(w, [sampled], [out])


# -- the cache over a search ---------------------------------------------------------------------


def particle_filter_texts(w: PolicyWorker, n: int = 6, steps: int = 4) -> list[list[StepOutput]]:
    """Grow n particles for a few steps, resampling ancestors (repeats fork one parent's cache)."""
    rng = np.random.default_rng(0)
    particles = [req(f"p0.{i}", seed=i, prompt="(2+3)*4=") for i in range(n)]
    history = []
    for t in range(1, steps + 1):
        outs = w.extend(particles)
        history.append(outs)
        w.release({p.parent_id for p in particles if p.parent_id})  # children hold it all now
        ancestors = np.sort(rng.choice(n, size=n))
        particles = [
            child(particles[a], outs[a], f"p{t}.{i}", seed=1000 * t + i)
            for i, a in enumerate(ancestors)
        ]
        w.release({o.seq_id for o in outs} - {p.parent_id for p in particles})  # not resampled
    return history


def test_particle_filter_steps_are_the_same_with_and_without_the_cache(model_dirs):
    on, off = worker(model_dirs, "qwen2"), worker(model_dirs, "qwen2", cache_tokens=0)
    with_cache, without = particle_filter_texts(on), particle_filter_texts(off)
    for a_step, b_step in zip(with_cache, without, strict=True):
        for a, b in zip(a_step, b_step, strict=True):
            assert (a.text, a.token_ids, a.stop_reason) == (b.text, b.token_ids, b.stop_reason)
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    assert on.stats()["hits"] == 18 and on.stats()["misses"] == 0
    assert off.stats()["hits"] == 0 and off.stats()["sequences"] == 0
    assert 0 < on.stats()["sequences"] <= 6  # what was released is gone
    assert on.stats()["prompt_tokens"] < off.stats()["prompt_tokens"]


def test_store_evicts_least_recently_used_by_token_budget():
    def entry(n: int) -> CachedSequence:
        kv = (torch.zeros(2, n, 4),)
        return CachedSequence(tuple(range(n + 1)), kv, kv)

    store = KVCacheStore(capacity_tokens=10)
    store.put("a", entry(4))
    store.put("b", entry(4))
    assert store.fork("a", range(8)) is not None  # a is now the most recently used
    store.put("c", entry(4))
    assert "b" not in store and "a" in store and "c" in store
    assert store.cached_tokens == 8 and store.stats().evictions == 1
    store.put("huge", entry(11))
    assert "huge" not in store and len(store) == 2
    assert store.fork("a", [9, 9, 9, 9, 9, 9]) is None  # held, but not a prefix
    assert store.fork("b", range(8)) is None
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.mismatches) == (1, 2, 1)
    store.release(["a", "unknown"])
    assert store.cached_tokens == 4
    store.clear()
    assert len(store) == 0 and store.cached_tokens == 0
    with pytest.raises(ValueError):
        KVCacheStore(-1)


def test_store_hits_need_steps_to_be_a_prefix_when_the_owner_asks():
    kv = (torch.zeros(2, 3, 4),)
    store = KVCacheStore(capacity_tokens=10)
    store.put("a", CachedSequence((1, 2, 3), kv, kv, steps=("x", "y"), scores=(0.5, 0.25)))
    hit = store.fork("a", [1, 2, 3, 4], steps=("x", "y", "z"))
    assert hit is not None and hit.scores == (0.5, 0.25)
    assert store.fork("a", [1, 2, 3, 4], steps=("xy", "z")) is None  # same tokens, other steps
    assert store.fork("a", [1, 2, 3, 4]) is not None  # steps unchecked when not given
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.mismatches) == (2, 1, 1)


def test_pack_batch_right_aligns_cached_parts_and_save_row_takes_a_row_back():
    config = LlamaConfig(
        hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
    )
    H, D = 1, config.hidden_size // 2

    def entry(n: int, fill: float) -> CachedSequence:
        kv = tuple(torch.full((H, n, D), fill + layer) for layer in range(2))
        return CachedSequence(tuple(range(n)), kv, kv)

    parents = [entry(3, 1.0), None, entry(2, 5.0)]
    cached, feeds = [3, 0, 1], [[7], [7, 8, 9], [7, 8]]  # row 2 reuses 1 of its parent's 2 tokens
    cache, ids, mask, pos = pack_batch(parents, cached, feeds, 0, config, torch.device("cpu"))
    assert ids.tolist() == [[0, 0, 7], [7, 8, 9], [0, 7, 8]]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 1], [0, 0, 0, 1, 1, 1], [0, 0, 1, 0, 1, 1]]
    assert pos.tolist() == [[2, 2, 3], [0, 1, 2], [0, 1, 2]]
    k1 = cache.layers[1].keys  # [B, kv_heads, P, head_dim]: layer 1's fill is 1 + the parent's
    assert k1.shape == (3, H, 3, D) and k1[:, 0, :, 0].tolist() == [[2, 2, 2], [0, 0, 0], [0, 0, 6]]

    store = KVCacheStore(capacity_tokens=100)
    save_row(store, "r0", range(3), cache, mask[:, :3], 0, steps=("s",), scores=(0.5,))
    saved = store.fork("r0", range(4))
    assert saved is not None and saved.cached == 3
    assert (saved.steps, saved.scores) == (("s",), (0.5,))
    assert all(torch.equal(a, b) for a, b in zip(saved.keys, parents[0].keys, strict=True))
    save_row(store, "r2", range(1), cache, mask[:, :3], 2)
    kept = store.fork("r2", [0])
    assert kept is not None and kept.cached == 1 and kept.keys[1][0, 0, 0] == 6
    off = KVCacheStore(0)
    save_row(off, "r1", range(3), cache, mask, 1)
    assert len(off) == 0  # caching off: nothing kept


def test_evicted_or_released_parent_recomputes_the_same_step(model_dirs):
    w = worker(model_dirs, "llama", cache_tokens=24)
    roots = [req(f"r{i}", seed=i, prompt="1+1=") for i in range(4)]
    outs = w.extend(roots)
    assert w.cache.cached_tokens <= 24 and w.stats()["evictions"] > 0
    kids = [
        child(r, o, f"k{i}", seed=50 + i) for i, (r, o) in enumerate(zip(roots, outs, strict=True))
    ]
    kid_outs = w.extend(kids)
    assert_matches_recompute(w, kids, kid_outs)
    assert w.stats()["misses"] > 0

    w.release(["k0"])
    grandkid = child(kids[0], kid_outs[0], "gk", seed=7)
    (miss,) = w.extend([grandkid])
    assert miss.prompt_tokens == prefix_len(w, grandkid)
    big = PolicyWorker(w.model, w.tokenizer)
    big.extend([roots[0]])
    big.extend([kids[0]])
    (hit,) = big.extend([grandkid])
    assert hit.prompt_tokens == 0 and hit.token_ids == miss.token_ids


# -- formatting and loading ----------------------------------------------------------------------


def test_chat_template_path_and_plain_path(model_dirs):
    chat, plain = worker(model_dirs, "qwen2"), worker(model_dirs, "llama")
    r = req("x", steps=("1\n", "2\n"), partial_step="3")
    assert chat.prefix_text(r) == "<|user|>12+3=\n<|assistant|>1\n2\n3"
    assert plain.prefix_text(r) == "12+3=1\n2\n3"
    messages = (ChatMessage("system", "be brief"), ChatMessage("user", "1+1"))
    as_chat = ExtendRequest("y", None, messages, (), 0)
    assert chat.prefix_text(as_chat) == "<|system|>be brief\n<|user|>1+1\n<|assistant|>"
    ids = chat.tokenize([chat.prefix_text(r)])[0]
    assert ids[0] == chat.tokenizer.convert_tokens_to_ids("<|user|>")
    (out,) = chat.extend([r])
    assert out.prompt_tokens == len(ids)
    assert_matches_recompute(chat, [r], [out])


def test_loading_errors_name_the_path(tmp_path, model_dirs):
    with pytest.raises(ModelLoadError, match=str(tmp_path / "absent")):
        load_model(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=str(empty)):
        load_model(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match=str(broken)):
        load_model(broken)
    _, model = load_model(model_dirs["llama"])
    assert model.device == choose_device() and model.dtype == choose_dtype(choose_device())
    assert choose_dtype(torch.device("cuda")) == torch.bfloat16
    assert choose_dtype(torch.device("cpu")) == torch.float32
    assert choose_dtype(torch.device("cpu"), "bf16") == torch.bfloat16


def test_a_step_stops_at_the_end_of_the_context_and_a_full_prefix_gets_an_empty_step(model_dirs):
    """Never past the model's context (positions it was not built for), never a failure: the
    step ends `context`, and the search sees a trajectory that cannot grow; a request with an
    empty prefix fails alone."""
    from lodestar.workers.messages import ErrorKind, RequestFailed

    w = worker(model_dirs, "llama")
    w.context_tokens = 40  # as if the config said so: the tiny model allows 512
    greedy = SamplingParams(temperature=0.0, max_step_tokens=64, step_delimiter="\x00")
    near = req("near", steps=("1" * 30,), sampling=greedy)
    full = req("full", steps=("1" * 60,), sampling=greedy)
    free = req("free", sampling=SamplingParams(temperature=0.0, max_step_tokens=5))
    empty = req("empty", prompt="", sampling=greedy)
    a, b, c, d = w.extend([near, full, free, empty])
    room = 40 - prefix_len(w, near)
    assert 0 < room < 64
    assert a.stop_reason in ("context", "eos") and a.num_tokens <= room
    assert a.stop_reason == "eos" or a.num_tokens == room
    assert (b.stop_reason, b.num_tokens, b.text) == ("context", 0, "")
    assert c.stop_reason != "context" and c.num_tokens <= 5
    assert isinstance(d, RequestFailed) and d.kind is ErrorKind.INVALID_INPUT
