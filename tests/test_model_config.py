"""`ModelConfig`'s vLLM memory settings: refused out of range, and set from every command that
loads models (`--gpu-memory-utilization`, `--max-model-len`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from lodestar.services.cli import _runtime_config, app
from lodestar.workers.factory import ModelConfig


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"gpu_memory_utilization": 0.0}, r"gpu_memory_utilization must be in \(0, 1\]"),
        ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization must be in \(0, 1\]"),
        ({"gpu_memory_utilization": float("nan")}, "gpu_memory_utilization"),
        ({"max_model_len": 0}, "max_model_len must be >= 1"),
    ],
)
def test_model_config_refuses_a_gpu_share_outside_0_1_and_a_max_model_len_below_1(
    fields: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields)


def test_model_config_takes_the_whole_gpu_or_any_share_of_it_and_any_max_model_len() -> None:
    assert ModelConfig(gpu_memory_utilization=1.0).gpu_memory_utilization == 1.0
    assert ModelConfig(gpu_memory_utilization=0.6, max_model_len=1).max_model_len == 1
    assert ModelConfig().max_model_len is None


@pytest.mark.parametrize(
    "command", [["solve", "1+1"], ["serve"], ["batch", "run"], ["eval", "-o", "out"]]
)
def test_every_command_that_loads_models_takes_the_vllm_memory_flags(
    command: list[str], tmp_path: Path
) -> None:
    group = typer.main.get_command(app)
    if command[0] == "batch":
        group, command = group.commands["batch"], command[1:]
        problems = tmp_path / "problems.jsonl"
        problems.write_text('"1+2"\n')
        command += [str(problems), "-o", str(tmp_path / "out.jsonl")]
    name, *rest = command
    flags = ["--gpu-memory-utilization", "0.6", "--max-model-len", "2048"]
    params = group.commands[name].make_context(name, [*rest, *flags]).params
    assert (params["gpu_memory_utilization"], params["max_model_len"]) == (0.6, 2048)
    defaults = group.commands[name].make_context(name, rest).params
    assert (defaults["gpu_memory_utilization"], defaults["max_model_len"]) == (0.85, None)


def test_serve_and_batch_run_hand_the_settings_to_the_actors_models() -> None:
    args = (None, "verifier", None, None, "local", 1, 1, 0.5, None, 8, 8, 15.0)
    config = _runtime_config(*args, engine="vllm", gpu_memory_utilization=0.6, max_model_len=2048)
    models = config.runtime.pool.models
    assert (models.gpu_memory_utilization, models.max_model_len) == (0.6, 2048)
