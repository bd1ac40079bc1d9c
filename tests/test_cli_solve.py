"""`lodestar solve` end to end: the shipped policy and the verifier, in this process."""

import json

import pytest
from typer.testing import CliRunner

from lodestar.services.cli import app

runner = CliRunner()


@pytest.mark.slow
def test_solve_prints_the_answer_and_spend_as_json():
    out = runner.invoke(app, ["solve", "(7+5)*3", "--algorithm", "pf", "--budget", "4", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    assert result["final_answer"] == "36"
    assert "\\boxed{36}" in result["answer"]
    assert len(result["candidates"]) == 4
    spend = result["spend"]
    assert spend["generated_tokens"] > 0 and spend["prm_passes"] > 0 and spend["wall_time_s"] > 0


@pytest.mark.slow
def test_solve_table_output_and_greedy():
    out = runner.invoke(app, ["solve", "2+3*4", "--algorithm", "greedy"])
    assert out.exit_code == 0, out.output
    assert "final answer" in out.output and "generated_tokens" in out.output


def test_bad_parameters_are_reported_with_the_field_before_any_model_loads():
    out = runner.invoke(
        app, ["solve", "1+1", "--algorithm", "pf", "--param", "softmax_temperature=0"]
    )
    assert out.exit_code == 2
    assert "params.softmax_temperature" in out.output
    out = runner.invoke(app, ["solve", "1+1", "--algorithm", "nope"])
    assert out.exit_code == 2 and "unknown algorithm" in out.output


@pytest.mark.slow
def test_a_problem_the_served_models_refuse_is_a_bad_argument_naming_the_field():
    """`solve` submits through the orchestrator, so the submit-time intake applies to it too."""
    out = runner.invoke(app, ["solve", "what is the capital of France?"])
    assert out.exit_code == 2, out.output
    assert "problem" in out.output and "integers 0-99" in out.output


def test_a_bad_vllm_memory_setting_is_a_usage_error_naming_the_flag_before_any_model_loads():
    out = runner.invoke(app, ["solve", "1+1", "--gpu-memory-utilization", "1.5"])
    assert out.exit_code == 2, out.output
    assert "--gpu-memory-utilization" in out.output and "(0, 1]" in out.output
    out = runner.invoke(app, ["solve", "1+1", "--max-model-len", "0"])
    assert out.exit_code == 2, out.output
    assert "--max-model-len" in out.output
