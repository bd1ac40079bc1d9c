"""The README's commands that print an answer, run as a newcomer runs them: the defaults (shipped
models, default reward), a `lodestar serve` with no model flags, each command as written. They
are the first thing anyone runs, so each must print the right answer."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from lodestar.tasks.arithmetic import read_problem
from lodestar.v1 import search_pb2 as pb
from lodestar.v1 import search_pb2_grpc as pb_grpc
from tests.test_cli_serve import LODESTAR, start_server, stop

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.integration  # `lodestar` subprocesses and a server

_BLOCK_COMMAND = re.compile(r"^\.venv/bin/lodestar (search|solve) (.+)$", re.MULTILINE)
_INLINE_COMMAND = re.compile(r"`lodestar (search|solve) (\"[^\"`]+\"[^`]*)`")
_GRPCURL = re.compile(r"grpcurl -plaintext -d '(?P<body>[^']+)' \\\n\s*\S+ (?P<method>\S+)")


def readme_commands() -> list[tuple[str, list[str]]]:
    """(subcommand, its arguments) for every `lodestar search|solve` the README shows, in code
    blocks and inline."""
    text = README.read_text()
    found = _BLOCK_COMMAND.findall(text) + _INLINE_COMMAND.findall(text)
    return [(sub, shlex.split(rest)) for sub, rest in found]


def expected(args: list[str]) -> str:
    return str(read_problem(args[0]).answer)


def final_answer(stdout: str) -> str | None:
    m = re.search(r"final answer\s+(\S+)", stdout)
    return m.group(1) if m else None


def test_the_readme_shows_the_examples_this_test_runs() -> None:
    commands = readme_commands()
    assert sum(sub == "search" for sub, _ in commands) >= 2
    assert sum(sub == "solve" for sub, _ in commands) >= 2
    assert _GRPCURL.search(README.read_text())


def test_every_readme_example_prints_the_right_answer(tmp_path: Path) -> None:
    commands = readme_commands()
    wrong = []
    for sub, args in commands:
        if sub != "solve":
            continue
        run = subprocess.run(
            [*LODESTAR, "solve", *args], capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stdout + run.stderr
        if final_answer(run.stdout) != expected(args):
            wrong.append(("solve", args, final_answer(run.stdout), expected(args)))
    server, address = start_server(tmp_path / "serve.log")
    try:
        for sub, args in commands:
            if sub != "search":
                continue
            run = subprocess.run(
                [*LODESTAR, "search", *args, "--address", address],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert run.returncode == 0, run.stdout + run.stderr
            if final_answer(run.stdout) != expected(args):
                wrong.append(("search", args, final_answer(run.stdout), expected(args)))
        call = _GRPCURL.search(README.read_text())
        assert call is not None
        request = json_format.ParseDict(json.loads(call.group("body")), pb.SearchRequest())
        assert call.group("method") == "lodestar.v1.SearchService/Search"
        with grpc.insecure_channel(address) as channel:
            result = pb_grpc.SearchServiceStub(channel).Search(request, timeout=300)
        answer = str(read_problem(request.problem.text).answer)
        if result.final_answer != answer:
            wrong.append(("grpcurl", [request.problem.text], result.final_answer, answer))
    finally:
        assert stop(server) == 0
    assert not wrong, f"README examples with a wrong answer (command, args, got, right): {wrong}"
