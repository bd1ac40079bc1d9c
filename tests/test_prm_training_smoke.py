"""The PRM training script end to end on a miniature policy: samples, trains, saves, scores."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lodestar.evaluation.prm_quality import auc, within_group_auc
from lodestar.tasks.arithmetic import (
    Difficulty,
    evaluate_steps,
    generate_problems,
    reductions,
    solution_steps,
)
from lodestar.training.train_policy import TrainConfig, build_model, build_tokenizer
from lodestar.training.train_prm import (
    NEGATIVE_KINDS,
    SEPARATOR,
    PRMTrainConfig,
    build_prm,
    encode,
    near_miss,
    perturb,
    ranking_loss,
    renderer,
    train,
)
from lodestar.workers.factory import ModelConfig, build_reward
from lodestar.workers.messages import ScoreRequest
from lodestar.workers.reward import PRMConfig, RewardWorker

STEP_FORMAT = re.compile(r"-?\d+[-+*]-?\d+=-?\d+(, so [-+*()\d]+| \\boxed\{-?\d+\})")

TINY_POLICY = dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
TINY_PRM = dict(
    minutes=None,
    steps=2,
    problems=6,
    samples=2,
    max_steps=3,
    max_step_tokens=8,
    batch_size=4,
    warmup_steps=1,
    log_every=1,
)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("policy")
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    build_model(TrainConfig(out=out, **TINY_POLICY), tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prm_dir(policy_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prm")
    train(PRMTrainConfig(policy=policy_dir, out=out, **TINY_PRM), log=False)
    return out


def test_it_saves_a_qwen_prm_directory(prm_dir: Path) -> None:
    assert json.loads((prm_dir / "lodestar_prm.json").read_text()) == {"family": "qwen_prm"}
    config = json.loads((prm_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForTokenClassification"]
    assert len(config["id2label"]) == 2
    record = json.loads((prm_dir / "training.json").read_text())
    assert record["steps"] == 2 and record["data"]["examples"] > 0


def test_the_reward_worker_loads_and_scores_it(prm_dir: Path) -> None:
    reward = build_reward(ModelConfig(reward=prm_dir, device="cpu"))
    assert isinstance(reward, RewardWorker) and reward.chat
    steps = ("7+5=12\n\n", "12*3=36\n\n", "36-4=32 \\boxed{32}")
    (out,) = reward.score([ScoreRequest("s", None, "(7+5)*3-4", steps)])
    assert len(out.rewards) == 3 and all(0.0 <= r <= 1.0 for r in out.rewards)


def test_training_input_is_what_the_worker_scores(prm_dir: Path) -> None:
    reward = RewardWorker.from_pretrained(prm_dir, PRMConfig(family="qwen_prm", device="cpu"))
    problem = "(7+5)*3-4"
    steps = ("7+5=12\n\n", "12*3=36\n\n", "36-4=32 \\boxed{32}")
    ids, positions = encode(reward, problem, steps)
    (plan,) = reward._plan([ScoreRequest("s", None, problem, steps)])
    assert plan.token_ids == ids and plan.positions == positions
    text = reward.tokenizer.decode(ids)
    assert text.startswith("<s>Q: (7+5)*3-4\nA:\n7+5=12" + SEPARATOR)
    assert text.endswith("\\boxed{32}" + SEPARATOR)


def test_same_seed_and_steps_give_identical_weights(
    policy_dir: Path, prm_dir: Path, tmp_path: Path
) -> None:
    train(PRMTrainConfig(policy=policy_dir, out=tmp_path, **TINY_PRM), log=False)
    a, b = load_file(prm_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_prm_starts_from_the_policy_backbone(policy_dir: Path) -> None:
    tokenizer, model = build_prm(policy_dir)
    sep = tokenizer.convert_tokens_to_ids(SEPARATOR)
    assert sep == len(tokenizer) - 1  # appended: every character keeps its policy id
    assert tokenizer("1<extra_0>2", add_special_tokens=False)["input_ids"][1] == sep
    worker = renderer(model, tokenizer)
    assert worker.separator_id == sep


def test_perturbed_solutions_are_wrong_only_at_their_last_step() -> None:
    rng = random.Random(0)
    made = 0
    for problem in generate_problems("train", 40):
        steps = perturb(problem, rng)
        if steps is None:
            continue
        made += 1
        labels = evaluate_steps(problem, steps)
        assert labels == [True] * (len(steps) - 1) + [False]
        assert len(steps) <= len(solution_steps(problem))
    assert made >= 38


@pytest.mark.parametrize("kind", NEGATIVE_KINDS)
def test_every_near_miss_kind_makes_wrong_steps_in_the_step_format(kind: str) -> None:
    rng = random.Random(kind)
    outcomes = []
    for ops in (1, 3):  # a last step (boxed) and a middle one (restated)
        for problem in generate_problems("train", 30, Difficulty(ops=ops)):
            (reduction, after), *_ = reductions(problem.tree)
            step = near_miss(kind, problem.tree, reduction, after, rng)
            if step is not None:
                assert STEP_FORMAT.fullmatch(step.strip()), step
                outcomes.append(evaluate_steps(problem, [step])[0])
    # `perturb` drops the rare draw that stays right (2+2 read as 2*2).
    assert outcomes.count(False) >= 10 and outcomes.count(True) <= len(outcomes) // 10


def test_auc() -> None:
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)


def test_within_group_auc_sees_a_ranking_that_pooling_hides() -> None:
    # An easy problem scores everything high, a hard one everything low. Inside each problem the
    # wrong samples outrank the right ones, yet pooled, right samples mostly score higher.
    scores = [0.90, 0.91, 0.92, 0.95, 0.10, 0.20, 0.30, 0.40]
    labels = [1, 1, 1, 0, 1, 0, 0, 0]
    assert auc(scores, labels) == 9 / 16
    assert within_group_auc(scores, labels, 4) == 0.0
    assert math.isnan(within_group_auc([0.1, 0.2], [1, 1], 2))  # no problem with both classes


def test_ranking_loss_compares_only_one_problem_at_one_depth() -> None:
    keys = [("a", 0), ("a", 0), ("b", 0), ("a", 1)]
    labels = [1, 0, 0, 1]
    # Only the pair (0, 1) shares a problem and a depth: the loss is softplus(m1 - m0).
    margins = torch.tensor([2.0, -1.0, 50.0, -50.0], requires_grad=True)
    loss = ranking_loss(margins, keys, labels)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-3.0)))
    loss.backward()
    assert margins.grad is not None
    assert margins.grad[2] == 0 and margins.grad[3] == 0
    assert margins.grad[0] < 0 < margins.grad[1]  # push the right one up, the wrong one down
    assert ranking_loss(margins, [("a", 0), ("b", 0)], [1, 0]).item() == 0.0
