"""The policy training script end to end on a miniature model: trains, saves, loads back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lodestar.evaluation.policy_quality import evaluate_policy, pass_at_k
from lodestar.tasks.arithmetic import format_problem, generate_problems
from lodestar.training.train_policy import (
    TrainConfig,
    build_tokenizer,
    encode_example,
    parse_args,
    train,
)
from lodestar.workers.messages import ExtendRequest, SamplingParams
from lodestar.workers.policy import PolicyWorker

TINY = dict(
    steps=3, batch_size=4, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, log_every=1
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("policy")
    train(TrainConfig(out=out, minutes=None, **TINY))
    return out


def test_it_saves_an_ordinary_hugging_face_directory(tiny_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_dir / name).is_file()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    assert model.config.model_type == "llama"
    assert tokenizer.tokenize("12*3=36") == list("12*3=36")  # still one token per character
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_the_chat_template_renders_the_training_prompt(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    p = generate_problems("test", 1)[0]
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "ignored"}, {"role": "user", "content": p.expression}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == tokenizer.bos_token + format_problem(p)
    ids, n_prompt = encode_example(build_tokenizer(), p)
    assert ids[:n_prompt] == tokenizer.encode(rendered, add_special_tokens=False)
    assert ids[-1] == tokenizer.eos_token_id


def test_same_seed_and_steps_give_identical_weights(tiny_dir: Path, tmp_path: Path) -> None:
    train(TrainConfig(out=tmp_path, minutes=None, **TINY))
    a, b = load_file(tiny_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_policy_worker_and_the_evaluator_run_it(tiny_dir: Path) -> None:
    worker = PolicyWorker.from_pretrained(tiny_dir)
    request = ExtendRequest(
        "s", None, "(7+5)*3-4", (), seed=0, sampling=SamplingParams(max_step_tokens=8)
    )
    (out,) = worker.extend([request])
    assert out.num_tokens >= 1
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    report = evaluate_policy(model, tokenizer, generate_problems("test", 2), k=2, max_new_tokens=8)
    assert report.n == 2 and set(report.pass_at) == {1, 2}


def test_the_bare_step_format_trains_without_the_restatement() -> None:
    p = generate_problems("test", 1)[0]
    tokenizer = build_tokenizer("bare")
    ids, n_prompt = encode_example(tokenizer, p, restate=False)
    assert ", so" not in tokenizer.decode(ids[n_prompt:])
    assert tokenizer.unk_token_id not in ids
    assert len(tokenizer) < len(build_tokenizer())  # the first shipped policy's vocabulary
    with pytest.raises(ValueError, match="step_format"):
        train(TrainConfig(out=Path("unused"), minutes=None, step_format="plain", **TINY))


def test_pass_at_k_estimator() -> None:
    assert pass_at_k(8, 0, 1) == 0.0
    assert pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(8, 2, 1) == pytest.approx(0.25)
    assert pass_at_k(8, 1, 8) == 1.0


def test_cli_arguments() -> None:
    cfg = parse_args(["--out", "x", "--minutes", "2", "--seed", "7", "--ops-weights", "0.5,0.5"])
    assert (cfg.minutes, cfg.seed, cfg.ops_weights, cfg.steps) == (2.0, 7, (0.5, 0.5), None)
