"""The reward worker on tiny real PRMs of every family: recipes, incremental scoring, batching.

The oracle is each family's published recipe, written out here independently of the worker: one
plain, unpadded forward over the whole text (chat end-of-turn suffix included), rewards read where
the recipe reads them. Cached, batched and forked scoring must match it within 1e-4 (fp32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lodestar.workers.loading import ModelLoadError
from lodestar.workers.messages import (
    ChatMessage,
    ErrorKind,
    RequestFailed,
    ScoreRequest,
    StepScores,
)
from lodestar.workers.reward import (
    DEFAULT_SYSTEM_PROMPT,
    FAMILIES,
    PRMConfig,
    QwenPRM,
    RewardWorker,
    load_prm,
)
from tests.prm_factory import KINDS, QWEN_SEPARATOR, SHEPHERD_TAG, save_tiny_prm

CHAT = {
    "qwen_prm_llama": True,
    "qwen_prm_qwen2": False,
    "qwen_prm_custom": True,
    "math_shepherd": False,
    "outcome_1": False,
    "outcome_2": True,
}
PROBLEM = "If x = 3, what is 2x + 1?"
STEPS = (
    "We have x = 3.\n\n",
    "So 2x = 2 * 3 = 6.\n\n",
    "Then 2x + 1 = 7.\n\n",
    "The answer is \\boxed{7}.",
    "Check: 7 - 1 = 6 = 2 * 3.\n\n",
)
ALT = ("So 2x = 5.\n\n", "Then 2x + 1 = 6.\n\n", "The answer is \\boxed{6}.")

Make = Callable[..., RewardWorker]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on shared cores OpenMP's waiting makes
    a 64-wide linear layer about 100 times slower (8 ms against 0.06 ms measured here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prms")
    return {kind: save_tiny_prm(root / kind, kind, chat=CHAT[kind]) for kind in KINDS}


@pytest.fixture(scope="module")
def prm(prm_dirs: dict[str, Path]) -> Make:
    """`prm(kind, **config)`: a fresh worker (empty store) over a model loaded once per kind."""
    loaded: dict[str, tuple[PreTrainedTokenizerBase, PreTrainedModel]] = {}

    def make(kind: str, **overrides: object) -> RewardWorker:
        custom = kind == "qwen_prm_custom"
        # fp32 on any device (a CUDA machine included), so 1e-4 comparisons are meaningful
        config = PRMConfig(KINDS[kind], dtype="fp32", trust_remote_code=custom, **overrides)  # type: ignore[arg-type]
        if kind not in loaded:
            loaded[kind] = load_prm(prm_dirs[kind], config)
        tokenizer, model = loaded[kind]
        return RewardWorker(model, tokenizer, config)

    return make


def req(seq_id: str, parent_id: str | None, steps: tuple[str, ...], prompt=PROBLEM) -> ScoreRequest:
    return ScoreRequest(seq_id, parent_id, prompt, steps)


@torch.inference_mode()
def reference_rewards(w: RewardWorker, prompt: str, steps: tuple[str, ...]) -> list[float]:
    """The family's recipe on the whole text, unpadded, uncached: the model cards' code, short."""
    tok, model, family = w.tokenizer, w.model, w.config.family
    chat = w.chat
    system_user = [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": prompt},
    ]

    def ids_of(text: str) -> torch.Tensor:
        ids = tok(text, add_special_tokens=not chat, return_tensors="pt")["input_ids"]
        return ids.to(model.device)

    if family == "qwen_prm":
        answer = QWEN_SEPARATOR.join(s.rstrip() for s in steps) + QWEN_SEPARATOR
        messages = [*system_user, {"role": "assistant", "content": answer}]
        text = tok.apply_chat_template(messages, tokenize=False) if chat else f"{prompt}\n{answer}"
        ids = ids_of(text)
        out = model(ids)
        logits = (out.logits if hasattr(out, "logits") else out[0])[0].float()  # [S, 2]
        at_sep = ids[0] == tok.convert_tokens_to_ids(QWEN_SEPARATOR)
        return logits.softmax(-1)[at_sep, 1].tolist()
    if family == "math_shepherd":
        answer = "".join(s.rstrip() + " " + SHEPHERD_TAG + s[len(s.rstrip()) :] for s in steps)
        ids = ids_of(f"{prompt} {answer}")
        candidates = tok.convert_tokens_to_ids(["+", "-"])
        logits = model(ids).logits[0][:, candidates].float()  # [S, 2]
        at_tag = ids[0] == tok.convert_tokens_to_ids(SHEPHERD_TAG)
        return logits.softmax(-1)[at_tag, 0].tolist()
    # outcome: the classifier's own pooled output on each prefix of the answer
    head = (
        tok.apply_chat_template(system_user, tokenize=False, add_generation_prompt=True)
        if chat
        else prompt + "\n"
    )
    rewards = []
    for i in range(len(steps)):
        logits = model(ids_of(head + "".join(steps[: i + 1]))).logits[0].float()  # [labels]
        rewards.append((logits[0].sigmoid() if len(logits) == 1 else logits.softmax(-1)[1]).item())
    return rewards


# -- every family scores as its recipe says -------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_each_family_gives_one_reward_per_step_matching_its_recipe(prm, kind):
    w = prm(kind)
    assert w.chat == CHAT[kind]
    (out,) = w.score([req("s", None, STEPS)])
    assert out.seq_id == "s" and len(out.rewards) == len(STEPS)
    assert all(0.0 <= r <= 1.0 for r in out.rewards)
    want = reference_rewards(w, PROBLEM, STEPS)
    assert out.rewards == pytest.approx(want, abs=1e-4)
    assert max(want) - min(want) > 1e-3  # the rewards differ, so matching them means something
    text, ends = w.render(PROBLEM, STEPS)
    encoded = w.tokenizer(text[: ends[-1]], add_special_tokens=not w.chat)["input_ids"]
    assert out.tokens == len(encoded)  # through the last scoring token, nothing after it


# -- incremental scoring is exact ----------------------------------------------------------------

ROUNDS = [
    [req("a", None, STEPS[:1])],
    [req("b", "a", STEPS[:2])],
    # a fork (two children of b) beside a request that names no parent
    [req("c1", "b", STEPS[:3]), req("c2", "b", (*STEPS[:2], ALT[1])), req("z", None, STEPS[:2])],
    # grandchildren: c2 forks again, c1 grows two steps at once
    [
        req("d1", "c1", STEPS[:5]),
        req("d2", "c2", (*STEPS[:2], *ALT[1:])),
        req("d3", "c2", (*STEPS[:2], ALT[1], STEPS[3])),
    ],
]


@pytest.mark.parametrize("kind", KINDS)
def test_incremental_chains_and_forks_match_full_rescoring(prm, kind):
    inc, full = prm(kind), prm(kind, cache_tokens=0)
    got_by_id: dict[str, StepScores] = {}
    full_tokens: dict[str, int] = {}
    for requests in ROUNDS:
        got, want = inc.score(requests), full.score(requests)
        for r, g, f in zip(requests, got, want, strict=True):
            assert g.rewards == pytest.approx(f.rewards, abs=1e-4), r.seq_id
            assert f.rewards == pytest.approx(reference_rewards(inc, PROBLEM, r.steps), abs=1e-4)
            full_tokens[r.seq_id] = f.tokens
            if r.parent_id is None:
                assert g.tokens == f.tokens
            else:  # only the new steps were encoded, and the parent's rewards were reused as is
                parent = got_by_id[r.parent_id]
                assert g.tokens == f.tokens - full_tokens[r.parent_id] < f.tokens
                assert g.rewards[: len(parent.rewards)] == parent.rewards
            got_by_id[r.seq_id] = g
    stats = inc.stats()
    assert (stats["hits"], stats["misses"], stats["forward_passes"]) == (6, 0, 4)
    assert stats["encoded_tokens"] < full.stats()["encoded_tokens"]
    assert full.stats()["sequences"] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_scores_each_request_as_if_it_were_alone(prm, kind):
    setup = [req("p", None, STEPS[:1]), req("q", None, ("2\n\n",), prompt="1+1?")]
    batch = [
        req("x", "p", STEPS[:4]),
        req("y", None, ("56",), prompt="7*8?"),
        req("u", "q", ("2\n\n", "ok")),
        req("v", None, STEPS),
        req("w", "p", (*STEPS[:1], *ALT)),
    ]
    together, alone = prm(kind), prm(kind)
    together.score(setup)
    for r in setup:
        alone.score([r])
    batched = together.score(batch)
    single = [alone.score([r])[0] for r in batch]
    for b, s in zip(batched, single, strict=True):
        assert b.rewards == pytest.approx(s.rewards, abs=1e-4) and b.tokens == s.tokens
    assert together.stats()["forward_passes"] == 2


def test_missing_mismatched_or_evicted_parent_falls_back_to_full_scoring(prm):
    w, full = prm("qwen_prm_llama"), prm("qwen_prm_llama", cache_tokens=0)
    w.score([req("a", None, STEPS[:2])])
    fallbacks = [
        req("missing", "nobody", STEPS[:3]),
        req("other-steps", "a", (ALT[0], *STEPS[1:3])),  # a's steps are not a prefix
        req("other-prompt", "a", STEPS[:3], prompt="If x = 4, what is 2x + 1?"),
    ]
    for r, g, f in zip(fallbacks, w.score(fallbacks), full.score(fallbacks), strict=True):
        assert g.tokens == f.tokens, r.seq_id
        assert g.rewards == pytest.approx(f.rewards, abs=1e-4)
    assert w.stats()["misses"] == 3 and w.stats()["hits"] == 0
    assert w.stats()["mismatches"] == 2  # "a" was held for both; steps, then tokens, differ

    (a,) = full.score([req("a", None, STEPS[:2])])
    small = prm("qwen_prm_llama", cache_tokens=a.tokens)  # room for one short sequence only
    small.score([req("a", None, STEPS[:2])])
    small.score([req("b", None, STEPS[:3])])  # too big to hold; a stays
    assert "a" in small.store and "b" not in small.store
    small.score([req("a2", None, ALT[:2])])  # replaces a
    (g,) = small.score([req("c", "a", STEPS[:3])])
    (f,) = full.score([req("c", None, STEPS[:3])])
    assert g.tokens == f.tokens and g.rewards == pytest.approx(f.rewards, abs=1e-4)
    assert small.stats()["evictions"] == 1 and small.stats()["cached_tokens"] <= a.tokens


def test_prefix_store_holds_the_most_recent_sequences_within_its_token_budget(prm):
    w = prm("outcome_1", cache_tokens=10_000)
    outs = [w.score([req(f"r{i}", None, STEPS[: i + 1])])[0] for i in range(4)]
    budget = outs[3].tokens + outs[2].tokens
    lru = prm("outcome_1", cache_tokens=budget)
    for i in range(4):
        lru.score([req(f"r{i}", None, STEPS[: i + 1])])
    assert [f"r{i}" in lru.store for i in range(4)] == [False, False, True, True]
    assert lru.stats()["cached_tokens"] == budget and lru.stats()["evictions"] == 2
    lru.score([req("hit", "r2", STEPS[:4])])  # r2 is now the most recent, r3 the oldest
    assert "r3" not in lru.store and "r2" in lru.store
    lru.release(["r2", "unknown"])
    assert "r2" not in lru.store
    lru.clear()
    assert len(lru.store) == 0 and lru.stats()["cached_tokens"] == 0


# -- formatting ----------------------------------------------------------------------------------


def test_chat_template_and_plain_paths(prm):
    chat, plain = prm("qwen_prm_llama"), prm("qwen_prm_llama", use_chat_template=False)
    steps = ("2\n\n", "ok")
    assert chat.render("1+1?", steps)[0] == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
        "<|im_start|>assistant\n2<extra_0>ok<extra_0>"
    )
    assert plain.render("1+1?", steps)[0] == "1+1?\n2<extra_0>ok<extra_0>"
    own_system = (ChatMessage("system", "be brief"), ChatMessage("user", "1+1?"))
    assert chat.render(own_system, steps)[0].startswith("<|im_start|>system\nbe brief<|im_end|>")
    no_system = prm("qwen_prm_llama", system_prompt=None)
    assert no_system.render("1+1?", steps)[0].startswith("<|im_start|>user\n1+1?")

    (c,), (p,) = chat.score([req("c", None, STEPS)]), plain.score([req("p", None, STEPS)])
    assert c.rewards == pytest.approx(reference_rewards(chat, PROBLEM, STEPS), abs=1e-4)
    assert p.rewards == pytest.approx(reference_rewards(plain, PROBLEM, STEPS), abs=1e-4)
    assert c.rewards != pytest.approx(p.rewards, abs=1e-3)

    assert prm("math_shepherd").render("q", ("a\n\n", "b"))[0] == "q a ки\n\nb ки"
    assert prm("outcome_1").render("q", ("a\n\n", "b"))[0] == "q\na\n\nb"


def test_trailing_whitespace_before_a_separator_does_not_change_rewards(prm):
    w = prm("qwen_prm_llama")
    a, b = w.score([req("a", None, STEPS), req("b", None, tuple(s.rstrip() for s in STEPS))])
    assert a.rewards == pytest.approx(b.rewards, abs=1e-6) and a.tokens == b.tokens


@pytest.mark.parametrize(
    ("kind", "marker"), [("qwen_prm_llama", QWEN_SEPARATOR), ("math_shepherd", SHEPHERD_TAG)]
)
def test_separator_text_inside_a_step_or_problem_is_removed_before_scoring(prm, kind, marker):
    w = prm(kind)
    dirty = (f"We have{marker} x = 3.\n\n", f"So 2x = {marker}6.{marker}\n\n")
    clean = tuple(s.replace(marker, "") for s in dirty)
    text, _ = w.render(f"2x{marker}?", dirty)
    assert text == w.render("2x?", clean)[0]
    assert text.count(marker) == len(dirty)
    a, b = w.score([req("a", None, dirty, prompt=f"2x{marker}?"), req("b", None, clean, "2x?")])
    assert len(a.rewards) == 2 and a.rewards == pytest.approx(b.rewards, abs=1e-6)
    w.marker = None  # without the clean-up, the count check still refuses to misalign rewards
    refused, scored = w.score([req("a", None, dirty), req("b", None, clean, "2x?")])
    assert isinstance(refused, RequestFailed) and refused.seq_id == "a"
    assert refused.kind is ErrorKind.INVALID_INPUT
    assert "tokenizes to the reward model's separator" in refused.message
    assert scored.rewards == pytest.approx(b.rewards, abs=1e-6)  # its neighbour is scored


def test_a_separator_the_tokenizer_splits_is_rejected(prm):
    w = prm("qwen_prm_llama")
    with pytest.raises(ValueError, match="not one token"):
        RewardWorker(w.model, w.tokenizer, PRMConfig("qwen_prm", separator="<step>"))


def test_an_empty_outcome_step_repeats_the_previous_reward(prm):
    w, full = prm("outcome_1"), prm("outcome_1", cache_tokens=0)
    steps = ("We have x = 3.\n\n", "", "So 2x = 6.")
    (f,) = full.score([req("f", None, steps)])
    assert f.rewards[1] == f.rewards[0] != f.rewards[2]
    w.score([req("a", None, steps[:1])])
    (b,) = w.score([req("b", "a", steps[:2])])
    assert b.tokens == 0 and b.rewards == pytest.approx(f.rewards[:2], abs=1e-4)
    (c,) = w.score([req("c", "b", steps)])
    assert c.tokens > 0 and c.rewards == pytest.approx(f.rewards, abs=1e-4)


def test_a_request_without_steps_scores_nothing(prm):
    (out,) = prm("qwen_prm_qwen2").score([req("e", None, ())])
    assert out == StepScores("e", (), 0)


# -- configuration and loading -------------------------------------------------------------------


def test_config_is_validated_once_at_the_edge():
    assert PRMConfig("qwen_prm").separator == "<extra_0>"
    assert PRMConfig("math_shepherd").separator == " ки"
    assert PRMConfig("outcome").separator is None
    for bad in (
        dict(family="nope"),
        dict(family="outcome", separator="<extra_0>"),
        dict(family="qwen_prm", separator="  "),
        dict(family="qwen_prm", positive_label=2),
        dict(family="qwen_prm", cache_tokens=-1),
        dict(family="qwen_prm", dtype="fp8"),
    ):
        with pytest.raises(ValueError):
            PRMConfig(**bad)  # type: ignore[arg-type]


def test_a_family_is_one_registered_class_and_the_worker_has_no_branches(prm, monkeypatch):
    """A new family needs only a `PRMFamily` subclass in `FAMILIES` (here qwen_prm's layout read
    out the other way round); unknown names are refused with the registry's list."""
    assert set(FAMILIES) == set(KINDS.values())  # every registered family has a tiny model here
    with pytest.raises(ValueError, match=r"one of \('qwen_prm', 'math_shepherd', 'outcome'\)$"):
        PRMConfig("nope")  # type: ignore[arg-type]

    class Flipped(QwenPRM):
        def rewards(self, inputs: dict, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
            return 1 - super().rewards(inputs, rows, cols)

    monkeypatch.setitem(FAMILIES, "flipped", Flipped)
    qwen = prm("qwen_prm_llama")
    flipped = RewardWorker(qwen.model, qwen.tokenizer, replace(qwen.config, family="flipped"))
    rounds = [[req("a", None, STEPS[:2])], [req("b", "a", STEPS)]]
    for requests in rounds:
        (want,), (got,) = qwen.score(requests), flipped.score(requests)
        assert got.tokens == want.tokens
        assert got.rewards == pytest.approx([1 - r for r in want.rewards], abs=1e-6)
    assert flipped.stats()["hits"] == 1


def test_loading_errors_name_the_directory_and_the_fix(tmp_path, prm_dirs):
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_prm(tmp_path / "absent", PRMConfig("qwen_prm"))
    with pytest.raises(ModelLoadError, match=r"missing from the checkpoint$"):
        load_prm(prm_dirs["math_shepherd"], PRMConfig("qwen_prm"))  # a causal LM, no 2-label head
    with pytest.raises(ModelLoadError, match="trust_remote_code=True"):
        load_prm(prm_dirs["qwen_prm_custom"], PRMConfig("qwen_prm"))
    tokenizer, model = load_prm(prm_dirs["outcome_2"], PRMConfig("outcome"))
    assert model.dtype == torch.float32 and not model.training
    tokenizer, causal_lm = load_prm(prm_dirs["math_shepherd"], PRMConfig("math_shepherd"))
    with pytest.raises(ValueError, match="ForSequenceClassification"):
        RewardWorker(causal_lm, tokenizer, PRMConfig("outcome"))
