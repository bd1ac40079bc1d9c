import tomllib
from pathlib import Path

import pytest

from lodestar.orchestrator.algorithms.codec import decode_state, encode_state
from lodestar.orchestrator.algorithms.registry import (
    ALGORITHMS,
    ParamError,
    parse_budget,
    parse_params,
    start_search,
)
from lodestar.orchestrator.algorithms.state import SearchCommon, Spend, Trajectory
from lodestar.workers.messages import ChatMessage

ROOT = Path(__file__).resolve().parents[1]


def test_every_family_is_registered():
    expected = {
        "greedy", "best_of_n", "weighted_best_of_n", "self_consistency", "beam", "dvts",
        "pf", "epf", "astar", "early_rejection",
    }  # fmt: skip
    assert expected <= set(ALGORITHMS)
    for name, algorithm in ALGORITHMS.items():
        assert algorithm.name == name


def test_unknown_algorithm_names_the_field():
    with pytest.raises(ParamError) as e:
        start_search("pff", "1+1")
    assert e.value.field == "algorithm" and "pf" in e.value.message


def test_out_of_range_and_unknown_parameters_name_the_field():
    with pytest.raises(ParamError) as e:
        parse_params("pf", {"n": 0})
    assert e.value.field == "params.n"
    with pytest.raises(ParamError) as e:
        parse_params("pf", {"particles": 4})
    assert e.value.field == "params.particles"
    with pytest.raises(ParamError) as e:
        parse_params("pf", {"temperature": "hot"})
    assert e.value.field == "params.temperature"
    with pytest.raises(ParamError) as e:
        parse_budget({"max_prm_passes": -1})
    assert e.value.field == "budget.max_prm_passes"


def test_empty_problem_and_bad_seed_are_rejected():
    with pytest.raises(ParamError) as e:
        start_search("greedy", "   ")
    assert e.value.field == "problem"
    with pytest.raises(ParamError) as e:
        start_search("greedy", "1+1", seed=-1)
    assert e.value.field == "seed"


def test_common_state_round_trips_through_bytes_with_its_random_stream():
    common = SearchCommon(problem=(ChatMessage("user", "2+2"),), seed=7)
    common.spend = Spend(generated_tokens=3)
    first = common.rng().random()
    data = encode_state("x", common)
    back = decode_state(data, SearchCommon)
    assert back == common
    assert back.rng().random() == common.rng().random() != first


def test_trajectory_floats_round_trip_exactly():
    t = Trajectory(seq_id="1", parent_id=None, steps=["a\n\n"], rewards=[0.1 + 0.2], score=1 / 3)
    back = decode_state(encode_state("x", t), Trajectory)
    assert back == t


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            name = ".".join([package, *rel.parts])
            assert name in listed, f"{name} ({init.parent}) missing from pyproject packages"
