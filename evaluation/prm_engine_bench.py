"""A `lodestar bench --engines` row: PRM scoring as particle filtering calls it, the HF reward
engine's incremental scoring (A: `RewardWorker`, each request naming its parent) vs vLLM's
pooling runner (B: `LLM.encode(pooling_task="token_classify")`, STEP pooling at the separator,
each particle's whole prefix) on one model directory both load.

Model (`save_qwen_prm`): a tiny random PRM in the shape of Qwen2.5-Math-PRM-7B, built in a
temporary directory: a Qwen2 backbone and a two-layer MLP `score` head in the directory's own
modeling code, which transformers loads through `auto_map` (trust_remote_code, as
`lodestar_prm.json` says) and vLLM as its `Qwen2ForProcessRewardModel` (config.json's
`architectures`, as the real model's says). A character tokenizer with ChatML and `<extra_0>`.

Workload (`pf_plan`): P particles x S real arithmetic steps on one held-out problem with S
operations. Before each step but the first, parents are resampled from the previous step's
particles (multinomial on random weights, as PF does, so copies of a parent fork); each child
adds a step of its own (a random legal next operation). All draws come from one fixed RNG, so
both sides score exactly the same requests: HF with `parent_id` set to the parent's seq id,
vLLM with the same token ids the HF worker builds (vLLM is started with `skip_tokenizer_init`:
it never renders or tokenizes). Both sides tokenize inside the timed calls. vLLM 0.32 supports
no prefix caching with STEP pooling (`ModelConfig.is_prefix_caching_supported`), so B encodes
every prefix whole at every step; the row reports both sides' encoded tokens.

Measurement: one untimed warm-up run per side, then `repeats` rounds, the sides' order
alternating; medians. Before every timed run the process idles `SETTLE_S`: vLLM's worker
busy-polls for a second after its last request, which would slow an HF run that follows it on
a small CPU. Rewards must agree within `TOLERANCE` or the row fails (`EnginesDisagree`).
vLLM starts its engine core with `spawn`: call this from a script with a main guard (the
`lodestar` command has one); importing this module does no work.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.markup import escape

from lodestar.evaluation.engine_bench import CUDA_MEMORY_SHARE, engine_threads
from lodestar.evaluation.systems import BenchOptions, Row, median
from lodestar.tasks.arithmetic import (
    STEP_DELIMITER,
    Difficulty,
    Problem,
    generate_problems,
    problem_from_text,
    solution_steps,
)
from lodestar.workers.factory import PRM_CONFIG_FILE
from lodestar.workers.messages import ScoreRequest, StepScores

SECTION = 9
NAME = "PRM scoring: HF incremental vs vLLM pooling"
TOLERANCE = 1e-3
"""Largest |HF reward - vLLM reward| the row accepts (both fp32; the probe saw 3.4e-6)."""
SPREAD = 0.05
"""Least stdev of the rewards for the agreement to mean something (the probe's: 0.25)."""
SETTLE_S = 1.5
KV_CACHE_GIB = 1
"""vLLM's CPU KV cache in GiB (`VLLM_CPU_KVCACHE_SPACE`): ~1M tokens of this model, far above a
step's call."""

# -- the model directory ------------------------------------------------------------------------

VLLM_ARCHITECTURE = "Qwen2ForProcessRewardModel"
SEPARATOR = "<extra_0>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MAX_POSITIONS = 1024
MODELING_FILE = "modeling_qwen_prm.py"
# The shape of Qwen2.5-Math-PRM-7B's `modeling_qwen2_rm.py` (and of vLLM's qwen2_rm.py): a Qwen2
# backbone, `score` = Linear, ReLU, Linear to 2 labels, so one checkpoint's tensor names load on
# both sides (tests/prm_factory.py's `qwen_prm_custom` is built from it too).
QWEN_PRM_MODELING = """
from torch import nn
from transformers import Qwen2Config, Qwen2Model, Qwen2PreTrainedModel


class QwenProcessRewardModel(Qwen2PreTrainedModel):
    config_class = Qwen2Config

    def __init__(self, config):
        super().__init__(config)
        self.model = Qwen2Model(config)
        self.score = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size),
            nn.ReLU(),
            nn.Linear(config.hidden_size, 2),
        )
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, use_cache=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=past_key_values,
                         use_cache=use_cache)
        return (self.score(out.last_hidden_state),)
"""


@dataclass(frozen=True)
class PRMShape:
    hidden: int = 128
    """vLLM's CPU attention needs head_dim in {32, 64, 80, ...}: 4 heads, so hidden >= 128."""
    layers: int = 2
    seed: int = 0
    init_std: float = 0.2
    """Large, so rewards spread over (0, 1): agreeing on rewards all near 0.5 proves little."""


def save_qwen_prm(path: Path, shape: PRMShape = PRMShape()) -> Path:
    """Save the random PRM, its tokenizer and `lodestar_prm.json` under `path`."""
    from transformers import Qwen2Config

    from lodestar.training.char_tokenizer import DEFAULT_ALPHABET, build_char_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer(
        DEFAULT_ALPHABET,
        extra_special_tokens=(SEPARATOR, *CHAT_TOKENS),
        chat_template=CHAT_TEMPLATE,
    )
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=2 * shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=shape.init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # The class from the very source transformers will load from the directory.
    modeling = path / MODELING_FILE
    modeling.write_text(QWEN_PRM_MODELING)
    scope: dict[str, Any] = {}
    exec(compile(QWEN_PRM_MODELING, str(modeling), "exec"), scope)
    with torch.random.fork_rng():
        torch.manual_seed(shape.seed)
        model = scope["QwenProcessRewardModel"](config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    config_file = path / "config.json"
    saved = json.loads(config_file.read_text())
    saved["architectures"] = [VLLM_ARCHITECTURE]  # vLLM picks its model class from this
    saved["auto_map"] = {"AutoModel": f"{modeling.stem}.QwenProcessRewardModel"}  # transformers
    saved["num_labels"] = 2
    config_file.write_text(json.dumps(saved, indent=2))
    prm = {"family": "qwen_prm", "trust_remote_code": True}
    (path / PRM_CONFIG_FILE).write_text(json.dumps(prm))
    return path


# -- the workload -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PRMEngineWorkload:
    particles: int = 16
    steps: int = 10
    repeats: int = 3
    threads: int = 1
    """torch threads of the HF side, and vLLM's CPU threads (`VLLM_CPU_OMP_THREADS_BIND`)."""
    seed: int = 0

    @classmethod
    def of(cls, options: BenchOptions) -> PRMEngineWorkload:
        """The (sized) options' particles, repeats and threads; 3 steps when quick, else 10."""
        sized = options.sized()
        steps = 3 if options.quick else 10
        return cls(sized.particles, steps, sized.repeats, sized.threads)


@dataclass(frozen=True)
class Particle:
    steps: tuple[str, ...]
    parent: int | None
    """Index of its parent among the previous step's particles (None at the first step)."""


def pf_plan(workload: PRMEngineWorkload) -> tuple[str, list[list[Particle]]]:
    """The problem and, per step, the particles to score: PF's access pattern, drawn in advance
    from one seeded RNG so that every side and every round scores the same requests."""
    plain = Difficulty(ops=workload.steps, min_operand=1, max_operand=9, min_value=0)  # no signs
    (problem,) = generate_problems("test", 1, plain, seed=workload.seed)
    rng = random.Random(f"prm-engine-bench|{workload.seed}")
    n = workload.particles
    state: list[tuple[Problem | None, tuple[str, ...]]] = [(problem, ())] * n  # (rest, steps)
    plan: list[list[Particle]] = []
    for t in range(workload.steps):
        parents: list[int | None] = [None] * n
        if t > 0:  # multinomial resampling on random weights; copies of a parent side by side
            weights = [rng.random() ** 3 for _ in range(n)]
            parents = [*sorted(rng.choices(range(n), weights=weights, k=n))]
        children = []
        for a in parents:
            rest, steps = state[0 if a is None else a]
            assert rest is not None  # a problem of S operations takes S steps
            step, after = next_step(rest, rng)
            children.append((after, (*steps, step)))
        state = children
        plan.append([Particle(steps, a) for (_, steps), a in zip(state, parents, strict=True)])
    return problem.expression, plan


def next_step(problem: Problem, rng: random.Random) -> tuple[str, Problem | None]:
    """A random legal next step of `problem` and what is left after it (None: it boxed the
    answer). A step that leaves work restates the rest: "2*7=14, so 8-14+5\\n\\n"."""
    step = solution_steps(problem, random.Random(rng.getrandbits(64)))[0]
    if not step.endswith(STEP_DELIMITER):
        return step, None
    return step, problem_from_text(step.rsplit(", so ", 1)[1])


# -- the two sides ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    rewards: tuple[float, ...]
    tokens: int
    """Tokens the engine encoded for this request."""
    cached: int = 0
    """Prompt tokens the engine read from its prefix cache instead."""


class Side(Protocol):
    def score(self, prompt: str, t: int, particles: Sequence[Particle], tag: str) -> list[Scored]:
        """Score step `t`'s particles (one engine call)."""
        ...

    def reset(self) -> None:
        """Forget what earlier runs cached (untimed)."""
        ...


class HFIncremental:
    """A: the HF reward engine as PF calls it, each request naming its parent's seq id."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    def score(self, prompt: str, t: int, particles: Sequence[Particle], tag: str) -> list[Scored]:
        requests = [
            ScoreRequest(
                seq_id=f"{tag}/t{t}/p{i}",
                parent_id=None if p.parent is None else f"{tag}/t{t - 1}/p{p.parent}",
                prompt=prompt,
                steps=p.steps,
            )
            for i, p in enumerate(particles)
        ]
        outs = self.worker.score(requests)
        failed = [o for o in outs if not isinstance(o, StepScores)]
        if failed:
            raise RuntimeError(f"the HF reward engine failed requests: {failed}")
        return [Scored(o.rewards, o.tokens) for o in outs]

    def reset(self) -> None:
        self.worker.clear()


def prefix_ids(worker: Any, prompt: str, steps: Sequence[str]) -> list[int]:
    """The token ids the HF worker scores for these steps: its rendering, its tokenizer, ending
    at the last step's separator (the worker's own check: one separator per step)."""
    text, _ = worker.render(prompt, steps)
    ids = worker.tokenizer(text, add_special_tokens=not worker.chat)["input_ids"]
    if not ids or ids[-1] != worker.separator_id or ids.count(worker.separator_id) != len(steps):
        raise ValueError(f"{len(steps)} steps do not tokenize to one separator each, last")
    return ids


class VLLMPooling:
    """B: vLLM's pooling runner on each particle's whole prefix, as the HF worker's token ids;
    the reward of a step is softmax(2 labels)[positive] at its separator, as the HF family's."""

    def __init__(self, llm: Any, worker: Any) -> None:
        self.llm, self.worker = llm, worker
        self.positive = worker.config.positive_label

    def score(self, prompt: str, t: int, particles: Sequence[Particle], tag: str) -> list[Scored]:
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        prompts = [
            TokensPrompt(prompt_token_ids=prefix_ids(self.worker, prompt, p.steps))
            for p in particles
        ]
        params = PoolingParams(step_tag_id=self.worker.separator_id)
        outs = self.llm.encode(
            prompts, pooling_params=params, pooling_task="token_classify", use_tqdm=False
        )
        scored = []
        for o in outs:
            rewards = o.outputs.data[:, self.positive].float().tolist()  # [steps]
            cached = o.num_cached_tokens or 0
            scored.append(Scored(tuple(rewards), len(o.prompt_token_ids) - cached, cached))
        return scored

    def reset(self) -> None:
        """Nothing to drop: each request carries its whole prefix."""


@dataclass
class ScoringRun:
    """One side's pass over the plan: per step, the call's wall time and what it encoded."""

    step_s: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    step_cached: list[int] = field(default_factory=list)
    rewards: list[list[tuple[float, ...]]] = field(default_factory=list)
    """Per step, per particle: one reward per step so far."""

    @property
    def total_s(self) -> float:
        return sum(self.step_s)


def run_plan(side: Side, prompt: str, plan: Sequence[Sequence[Particle]], tag: str) -> ScoringRun:
    """The plan on one side, one timed call per step; `tag` names this run's seq ids."""
    side.reset()
    run = ScoringRun()
    for t, particles in enumerate(plan):
        started = time.perf_counter()
        scored = side.score(prompt, t, particles, tag)
        run.step_s.append(time.perf_counter() - started)
        if len(scored) != len(particles):
            raise RuntimeError(f"step {t + 1}: {len(scored)} answers to {len(particles)} requests")
        run.step_tokens.append(sum(s.tokens for s in scored))
        run.step_cached.append(sum(s.cached for s in scored))
        run.rewards.append([s.rewards for s in scored])
    side.reset()
    return run


# -- building the engines -----------------------------------------------------------------------


@contextlib.contextmanager
def cpu_kv_cache(gib: int) -> Iterator[None]:
    """`VLLM_CPU_KVCACHE_SPACE` for engines started inside, unless already set; restored after."""
    before = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    if before is None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(gib)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)


def pooling_engine_kwargs(path: Path, particles: int, cuda: bool) -> dict[str, Any]:
    """vLLM's pooling runner on the PRM directory: fp32 like the HF side, a whole step's call
    (particles x <= MAX_POSITIONS tokens) in one engine step."""
    kwargs: dict[str, Any] = {
        "model": str(path),
        "runner": "pooling",
        "dtype": "float32",
        "enforce_eager": True,
        "block_size": 32,
        "max_model_len": MAX_POSITIONS,
        "max_num_batched_tokens": 16 * MAX_POSITIONS,
        "max_num_seqs": max(64, particles),
        # Token ids come from the HF worker's tokenizer (identical input). vLLM then warns that
        # its chat-template warm-up failed: harmless, it renders nothing here.
        "skip_tokenizer_init": True,
        "disable_log_stats": True,
        "seed": 0,
    }
    if cuda:
        kwargs["gpu_memory_utilization"] = CUDA_MEMORY_SHARE
    return kwargs


@dataclass
class PRMEngines:
    hf: HFIncremental
    vllm: VLLMPooling
    prefix_caching: bool
    """Whether vLLM's engine came up with prefix caching on (0.32: off for STEP pooling, see
    `ModelConfig.is_prefix_caching_supported`)."""
    device: str


@contextlib.contextmanager
def open_prm_engines(workload: PRMEngineWorkload, shape: PRMShape) -> Iterator[PRMEngines]:
    """Both sides on one freshly built PRM directory (removed on exit, after vLLM's engine
    core has stopped)."""
    from vllm import LLM

    from lodestar.workers.factory import ModelConfig, hf_reward

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    with contextlib.ExitStack() as stack:
        stack.enter_context(engine_threads(workload.threads, cpu=not cuda))
        if not cuda:
            stack.enter_context(cpu_kv_cache(KV_CACHE_GIB))
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="lodestar-prm-bench-"))
        path = save_qwen_prm(Path(tmp) / "qwen-prm", shape)
        worker = hf_reward(ModelConfig(reward=path, device=device, dtype="fp32"))
        llm = LLM(**pooling_engine_kwargs(path, workload.particles, cuda))
        stack.callback(llm.llm_engine.engine_core.shutdown)
        caching = bool(llm.llm_engine.vllm_config.cache_config.enable_prefix_caching)
        yield PRMEngines(HFIncremental(worker), VLLMPooling(llm, worker), caching, device)


# -- the row ------------------------------------------------------------------------------------


class EnginesDisagree(RuntimeError):
    """The two engines' rewards differ by more than `TOLERANCE`: the row's timings compare
    different computations, so there is no row."""


def reward_gap(hf: ScoringRun, vllm: ScoringRun) -> tuple[float, int]:
    """Largest |HF - vLLM| over every reward of two runs of one plan, and how many were
    compared; EnginesDisagree when they do not have the same rewards to compare."""
    gap, n = 0.0, 0
    for t, (sa, sb) in enumerate(zip(hf.rewards, vllm.rewards, strict=True)):
        for i, (ra, rb) in enumerate(zip(sa, sb, strict=True)):
            if len(ra) != len(rb):
                raise EnginesDisagree(
                    f"step {t + 1}, particle {i}: HF gave {len(ra)} rewards, vLLM {len(rb)} "
                    "(STEP pooling found another number of separators)"
                )
            for x, y in zip(ra, rb, strict=True):
                gap, n = max(gap, abs(x - y)), n + 1
    return gap, n


def measure(
    engines: PRMEngines,
    prompt: str,
    plan: Sequence[Sequence[Particle]],
    repeats: int,
    progress: Callable[[str], None],
) -> dict[str, list[ScoringRun]]:
    """One warm-up per side, then `repeats` rounds of both, order alternating; runs by side."""
    sides: dict[str, Side] = {"hf": engines.hf, "vllm": engines.vllm}
    progress("PRM engine row: warm-up")
    for name, side in sides.items():  # first calls: allocator, kernels, engine loop
        run_plan(side, prompt, plan, f"warm/{name}")
    runs: dict[str, list[ScoringRun]] = {name: [] for name in sides}
    for r in range(repeats):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            progress(f"PRM engine row: round {r + 1}/{repeats}: {name}")
            time.sleep(SETTLE_S)  # untimed: let vLLM's worker stop busy-polling
            runs[name].append(run_plan(sides[name], prompt, plan, f"r{r}/{name}"))
    return runs


def prm_engine_row(
    runs: dict[str, list[ScoringRun]],
    workload: PRMEngineWorkload,
    shape: PRMShape,
    prefix_caching: bool,
    device: str,
) -> Row:
    """The row from both sides' runs (`prefix_caching`: vLLM's engine had it on); raises
    EnginesDisagree unless every round's rewards agree."""
    hf, vllm = runs["hf"], runs["vllm"]
    gaps = [reward_gap(a, b) for a, b in zip(hf, vllm, strict=True)]
    gap, compared = max(g for g, _ in gaps), gaps[0][1]
    if gap > TOLERANCE:
        raise EnginesDisagree(
            f"max |HF - vLLM| reward {gap:.3g} > {TOLERANCE:g} over {compared} rewards a round"
        )
    flat = [x for step in hf[0].rewards for rewards in step for x in rewards]

    a_s, b_s = median(hf, lambda x: x.total_s), median(vllm, lambda x: x.total_s)
    extra: dict[str, float] = {
        "total_ms_a": a_s * 1e3,
        "total_ms_b": b_s * 1e3,
        "first_step_ms_a": median(hf, lambda x: x.step_s[0]) * 1e3,
        "first_step_ms_b": median(vllm, lambda x: x.step_s[0]) * 1e3,
        "last_step_ms_a": median(hf, lambda x: x.step_s[-1]) * 1e3,
        "last_step_ms_b": median(vllm, lambda x: x.step_s[-1]) * 1e3,
        "tokens_encoded_a": sum(hf[0].step_tokens),
        "tokens_encoded_b": sum(vllm[0].step_tokens),
        "cached_tokens_b": sum(vllm[0].step_cached),
        "prefix_caching_b": float(prefix_caching),
        "max_reward_diff": gap,
        "rewards_compared": compared,
        "reward_stdev": statistics.pstdev(flat),
        "particles": workload.particles,
        "steps": workload.steps,
    }
    for side, xs in (("a", hf), ("b", vllm)):
        for t, tokens in enumerate(xs[0].step_tokens, start=1):
            extra[f"tokens_{side}_step{t}"] = tokens
    same_work = all(
        x.step_tokens == xs[0].step_tokens and x.step_cached == xs[0].step_cached
        for xs in (hf, vllm)
        for x in xs
    )
    setting = (
        f"tiny {VLLM_ARCHITECTURE} (hidden {shape.hidden}, {shape.layers} layers, fp32, "
        f"{device}), {workload.particles} particles x {workload.steps} arithmetic steps, "
        f"parents resampled each step, {workload.threads} thread(s)"
    )
    return Row(
        section=SECTION,
        name=NAME,
        setting=setting,
        a="HF incremental (parent ids), whole run",
        a_s=a_s,
        b="vLLM pooling (whole prefixes), whole run",
        b_s=b_s,
        ratio=b_s / a_s,
        note=(
            "Each step one call scoring every particle, as PF calls the PRM. HF names each "
            "particle's parent, so it encodes only the new step on the parent's KV cache; vLLM's "
            "pooling runner (STEP pooling at <extra_0>) gets each whole prefix as the same token "
            "ids; 0.32 supports no prefix caching with STEP pooling (and token_classify requests "
            "skip reading it), so it re-encodes every prefix each step. "
            "B/A > 1: vLLM is slower. Rewards must agree within 1e-3."
        ),
        checks={
            f"rewards agree ({TOLERANCE:g})": True,  # else EnginesDisagree was raised
            "step 1 same tokens (same ids)": hf[0].step_tokens[0] == vllm[0].step_tokens[0],
            "same work every round": same_work,
            f"rewards spread (stdev > {SPREAD:g})": extra["reward_stdev"] > SPREAD,
        },
        extra=extra,
    )


def prm_engine_rows(
    options: BenchOptions,
    console: Console,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """The row at the (sized) options' particles, repeats and threads; none, with the install
    hint printed, when vLLM is not installed. Raises EnginesDisagree when the rewards differ."""
    from lodestar.workers.vllm_policy import INSTALL_HINT, vllm_available

    if not vllm_available():
        # escaped: rich would read "[vllm]" in the hint as markup and drop it
        console.print(f"[yellow]{NAME} skipped:[/yellow] {escape(INSTALL_HINT)}")
        return []
    report = progress or (lambda _: None)
    workload, shape = PRMEngineWorkload.of(options), PRMShape()
    prompt, plan = pf_plan(workload)
    report("PRM engine row: building the PRM, starting vLLM's pooling engine")
    with open_prm_engines(workload, shape) as engines:
        runs = measure(engines, prompt, plan, workload.repeats, report)
    return [prm_engine_row(runs, workload, shape, engines.prefix_caching, engines.device)]
