"""What a user may type to the shipped arithmetic models: an expression of integers 0-99 with
`+ - *` and parentheses, any spacing, inside a light question; it is searched in the canonical
form the policy was trained on, and anything else is refused at submit with a one-line reason.
Parser cases are pure; then the intake, a real gRPC server, and the CLI."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import pytest
from rich.console import Console
from typer.testing import CliRunner

from lodestar.models import POLICY, shipped_model_dir
from lodestar.orchestrator.driver import Orchestrator, OrchestratorConfig
from lodestar.orchestrator.inprocess import LocalWorkers
from lodestar.orchestrator.state_store import MemoryStateStore
from lodestar.services.cli import app
from lodestar.services.client import run_search
from lodestar.services.server import LodestarServer, ServerConfig
from lodestar.tasks.arithmetic import (
    MAX_CHECKED_OPS,
    SHIPPED_DOMAIN,
    OutsideDomain,
    evaluate_steps,
    read_problem,
    solution_steps,
)
from lodestar.v1 import search_pb2 as pb
from lodestar.v1 import search_pb2_grpc as pb_grpc
from lodestar.workers.factory import ModelConfig, build_intake
from lodestar.workers.intake import ProblemRefused
from lodestar.workers.messages import ChatMessage, ExtendRequest
from lodestar.workers.verifier import VerifierReward, accepts_prompt
from tests.runtime_parts import shipped_workers

Code = grpc.StatusCode

# -- reading what a user types (pure) -----------------------------------------------------------

ACCEPTED = {
    "2+3*4": "2+3*4",
    "2 + 3 * 4": "2+3*4",
    " ( 7 + 5 ) * 3 - 4 ": "(7+5)*3-4",
    "what is 2+3?": "2+3",
    "What is 2 + 3 ?": "2+3",
    "2+3=": "2+3",
    "2 + 3 = ?": "2+3",
    "Compute 2 + 3.": "2+3",
    "What's (7+5)*3?": "(7+5)*3",
    "What\u2019s (7+5)*3?": "(7+5)*3",
    "calculate: 9 - 2": "9-2",
    "((7+5))*3-4": "(7+5)*3-4",  # redundant parentheses go
    "(2*3)+4": "2*3+4",
    "9-(3-2)": "9-(3-2)",  # needed ones stay
    "99*9-0": "99*9-0",  # two digits at most
    "9-99*10": "9-99*10",  # a value down to -999
    "2-5+4": "2-5+4",  # a negative intermediate value
    "3-9": "3-9",  # a negative answer
    "1+2+3+4+5": "1+2+3+4+5",  # four operations
}

REFUSED = {
    "": "no expression",
    "what is ?": "no expression",
    "7": "no operation",
    "(7)": "no operation",
    "1+2+3+4+5+6": "5 operations, at most 4",
    "99*99-0": "a value beyond +-999",
    "0-10*(99+2)": "a value beyond +-999",
    "100+1": "an operand over 99",
    "(1+2)*100": "an operand over 99",
    "7/2+1": "division",
    "7 \u00f7 2": "division",
    "1.5+2": "a decimal number",
    "what is the capital of France?": "words beyond",
    "2+3, please": "words beyond",
    "Compute (7+5)*3-4, please.": "words beyond",
    "2 + x": "words beyond",
    "(7+5*3": "unbalanced parentheses",
    "8+5)*3": "unbalanced parentheses",
    ")7+5(": "unbalanced parentheses",
    "-3+4": "a negative operand",
    "2*-3": "a negative operand",
    "2**3": "not an expression",
    "2+3=5": "not an expression",
}


@pytest.mark.parametrize(("text", "canonical"), ACCEPTED.items())
def test_what_a_user_types_is_read_as_the_canonical_expression(text: str, canonical: str) -> None:
    assert read_problem(text).expression == canonical
    assert accepts_prompt(text, bounded=True) is None


def test_every_spelling_of_a_problem_is_one_search_input() -> None:
    spellings = ["2+3*4", "2 + 3 * 4", "what is 2 + 3 * 4?", "(2)+(3*4)", "Compute 2+(3*4)."]
    assert {read_problem(s) for s in spellings} == {read_problem("2+3*4")}


@pytest.mark.parametrize(("text", "reason"), REFUSED.items())
def test_what_the_shipped_models_cannot_take_is_refused_with_the_reason(
    text: str, reason: str
) -> None:
    with pytest.raises(OutsideDomain) as info:
        read_problem(text)
    assert info.value.reason.startswith(reason)
    message = accepts_prompt(text, bounded=True)
    assert message == f"{info.value.reason}; {SHIPPED_DOMAIN}"
    if len(text) > 3:  # the message never quotes what was typed
        assert text not in message


def test_the_verifier_alone_checks_any_size_but_never_overflows_the_stack() -> None:
    """With a real policy the verifier takes bigger problems; a huge one is refused, not a
    RecursionError (it was a traceback from `lodestar solve`)."""
    assert read_problem("what is 100*100 + 1?", bounded=False).expression == "100*100+1"
    assert accepts_prompt("+".join(["1"] * MAX_CHECKED_OPS), bounded=False) is None
    deep = "(" * MAX_CHECKED_OPS + "1+1" + ")" * MAX_CHECKED_OPS
    assert read_problem(deep, bounded=False).expression == "1+1"
    for text in ("+".join(["1"] * 1000), "(" * 400 + "1+1" + ")" * 400, "(" * 1000 + "1+1"):
        for bounded in (True, False):
            with pytest.raises(OutsideDomain):
                read_problem(text, bounded=bounded)


def test_steps_below_zero_are_checked_with_signed_numbers() -> None:
    for expression in ("2-5+4", "5*(2-7)", "1-9-9", "(1-3)*(2-8)"):
        steps = solution_steps(expression)
        assert all(evaluate_steps(expression, steps)), steps
    assert solution_steps("5*(2-7)") == ["2-7=-5, so 5*-5\n\n", "5*-5=-25 \\boxed{-25}"]
    assert evaluate_steps("2-5+4", ["2-5=3, so 3+4\n\n"]) == [False]
    (scores,) = VerifierReward().score(
        [_score("what is 2 - 5 + 4?", ("2-5=-3, so -3+4\n\n", "-3+4=1 \\boxed{1}"))]
    )
    assert scores.rewards == (1.0, 1.0)


def _score(prompt: str, steps: tuple[str, ...]) -> Any:
    from lodestar.workers.messages import ScoreRequest

    return ScoreRequest(seq_id="s", parent_id=None, prompt=prompt, steps=steps)


# -- the intake: which deployments read it so --------------------------------------------------


@pytest.fixture(scope="module")
def intake() -> Any:
    return build_intake(ModelConfig())


def test_the_shipped_models_search_the_canonical_form_and_count_its_tokens(intake) -> None:
    assert intake.admit("what is ( 7 + 5 ) * 3 - 4 ?") == "(7+5)*3-4"
    assert intake.check("what is ( 7 + 5 ) * 3 - 4 ?") == intake.check("(7+5)*3-4")
    chat = (ChatMessage("system", "Be brief."), ChatMessage("user", "Compute 2 + 3."))
    assert intake.admit(chat) == (ChatMessage("system", "Be brief."), ChatMessage("user", "2+3"))
    with pytest.raises(ProblemRefused) as info:
        intake.admit("what is 2/3?")
    assert info.value.field == "problem"
    assert info.value.message == f"division; {SHIPPED_DOMAIN}"


def test_the_shipped_policy_with_a_prm_still_takes_only_its_domain() -> None:
    prm = build_intake(ModelConfig(reward="prm"))
    assert prm.admit("2 + 3 * 4") == "2+3*4"
    with pytest.raises(ProblemRefused, match="words beyond"):
        prm.admit("what is the capital of France?")


def test_a_real_policy_gets_the_text_as_sent_unless_the_verifier_scores_it() -> None:
    """A `--policy DIR` is a real model (here the shipped weights under a path: the rule is the
    deployment's, not the weights'): with a PRM, prose and spacing reach it untouched; with the
    verifier, the problem is arithmetic of any size, searched canonical."""
    real = shipped_model_dir(POLICY)
    with_prm = build_intake(ModelConfig(policy=real, reward="prm"))
    assert with_prm.admit("what is 2 + 3, please?") == "what is 2 + 3, please?"
    with_verifier = build_intake(ModelConfig(policy=real))
    assert with_verifier.admit("what is 100 * 100 + 1?") == "100*100+1"
    with pytest.raises(ProblemRefused, match="the verifier reward scores arithmetic only"):
        with_verifier.admit("what is the capital of France?")


# -- a real gRPC server ----------------------------------------------------------------------


class Recording:
    """The shipped policy, noting the prompt of every request it is asked to extend."""

    concurrent = False

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.prompts: set[Any] = set()

    def extend(self, requests: Sequence[ExtendRequest]) -> list[Any]:
        self.prompts.update(r.prompt for r in requests)
        return self.worker.extend(requests)

    def release_prefix(self, prefix: str) -> int:
        return self.worker.release_prefix(prefix)


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    return shipped_workers()


def serve(
    models: tuple[Any, Any],
    intake: Any,
    client: Callable[[pb_grpc.SearchServiceStub, str], Awaitable[Any]],
) -> Any:
    async def main() -> Any:
        orch = Orchestrator(
            MemoryStateStore(), LocalWorkers(*models), OrchestratorConfig(), intake=intake
        )
        await orch.start()
        server = LodestarServer(orch, ServerConfig(address="127.0.0.1:0"))
        address = f"127.0.0.1:{await server.start()}"
        await server.set_serving()
        channel = grpc.aio.insecure_channel(address, server.config.channel_options)
        try:
            return await client(pb_grpc.SearchServiceStub(channel), address)
        finally:
            await channel.close()
            await server.stop()
            await orch.close()

    return asyncio.run(main())


def pf(problem: str, search_id: str) -> pb.SearchRequest:
    return pb.SearchRequest(
        problem=pb.Problem(text=problem),
        params=pb.AlgorithmParams(pf=pb.ParticleFilterParams(n=2)),
        search_id=search_id,
        seed=7,
    )


async def outcome(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details()


def test_a_wrapped_problem_is_searched_as_its_expression_and_a_foreign_one_refused(
    models, intake
) -> None:
    policy = Recording(models[0])

    async def client(stub, address) -> list[Any]:
        wrapped = await outcome(stub.Search(pf("What is 2 + 3 * 4?", "wrapped")))
        plain = await outcome(stub.Search(pf("2+3*4", "plain")))
        batch = await outcome(
            stub.SubmitBatch(
                pb.SubmitBatchRequest(
                    items=[pb.BatchItem(problem=pb.Problem(text=t)) for t in ("2+3", "9 / 3")],
                    params=pb.AlgorithmParams(pf=pb.ParticleFilterParams(n=2)),
                )
            )
        )
        return [
            wrapped,
            plain,
            await outcome(stub.Search(pf("(1+2)*100", "big"))),
            await outcome(stub.Search(pf("what is the capital of France?", "prose"))),
            batch,
        ]

    wrapped, plain, big, prose, batch = serve((policy, models[1]), intake, client)
    assert policy.prompts == {"2+3*4"}  # the only text the policy saw
    assert isinstance(wrapped, pb.SearchResult) and isinstance(plain, pb.SearchResult)
    assert wrapped.answer == plain.answer and wrapped.final_answer == plain.final_answer
    assert [c.text for c in wrapped.candidates] == [c.text for c in plain.candidates]
    assert big == (Code.INVALID_ARGUMENT, f"problem: an operand over 99; {SHIPPED_DOMAIN}")
    assert prose[0] is Code.INVALID_ARGUMENT and prose[1].startswith("problem: words beyond")
    assert "France" not in prose[1]
    assert batch[0] is Code.INVALID_ARGUMENT and batch[1].startswith("items[1].problem: division")


def test_lodestar_search_prints_a_refusal_as_one_line_and_exits_2(models, intake) -> None:
    out = io.StringIO()
    console = Console(file=out, width=300)

    async def client(stub, address) -> tuple[int, int]:
        bad = await run_search(address, "what is 7/2?", "greedy", {}, 0, {}, None, None, console)
        good = await run_search(address, "what is 2+3?", "greedy", {}, 0, {}, None, None, console)
        return bad, good

    bad, good = serve(models, intake, client)
    lines = out.getvalue().splitlines()
    assert (bad, good) == (2, 0)
    assert lines[0] == f"INVALID_ARGUMENT: problem: division; {SHIPPED_DOMAIN}"
    assert "Traceback" not in out.getvalue() and "final answer" in out.getvalue()


# -- lodestar solve ----------------------------------------------------------------------------


@pytest.mark.slow
def test_lodestar_solve_refuses_out_of_domain_problems_without_a_traceback() -> None:
    runner = CliRunner()
    for problem in ("what is 2/3?", "+".join(["1"] * 1000), "(" * 400 + "1+1" + ")" * 400):
        out = runner.invoke(app, ["solve", problem, "--algorithm", "greedy"])
        assert out.exit_code == 2, out.output
        assert out.exception is None or isinstance(out.exception, SystemExit), out.exception
        assert "Traceback" not in out.output and "the shipped arithmetic models" in flat(out)
    out = runner.invoke(app, ["solve", "what is 2+3?", "--algorithm", "greedy"])
    assert out.exit_code == 0, out.output
    assert "final answer" in out.output


def flat(out: Any) -> str:
    """The output's words without the error panel's frame and line breaks."""
    return " ".join(re.sub("[\u2500-\u257f]", " ", out.output).split())
