"""The wire contract stays in step with its generated code and with the algorithm registry."""

from __future__ import annotations

import typing

from lodestar.orchestrator.algorithms.registry import ALGORITHMS
from lodestar.services.client import params_to_wire
from lodestar.services.convert import params_from_wire
from lodestar.services.protos import stale_files
from lodestar.v1 import search_pb2 as pb


def test_checked_in_generated_code_is_current() -> None:
    assert stale_files() == [], "run: python -m lodestar.services.protos"


def _in_real_oneof(field) -> bool:
    """proto3 `optional` fields sit in synthetic oneofs named `_<field>`."""
    oneof = field.containing_oneof
    return oneof is not None and not oneof.name.startswith("_")


def test_every_algorithm_has_a_params_message_with_exactly_its_fields() -> None:
    oneof = pb.AlgorithmParams.DESCRIPTOR.oneofs_by_name["algorithm"]
    assert {f.name for f in oneof.fields} == set(ALGORITHMS)
    for field in oneof.fields:
        model = ALGORITHMS[field.name].Params
        message = field.message_type
        wire = {f.name for f in message.fields if not _in_real_oneof(f)}
        expected = set(model.model_fields) - {"inner", "inner_params"}
        assert wire == expected, field.name
        if "inner" in model.model_fields:
            inner = {f.name for f in message.oneofs_by_name["inner"].fields}
            assert inner == set(typing.get_args(model.model_fields["inner"].annotation))


def test_cli_parameters_round_trip_through_the_wire() -> None:
    cases = [
        ("pf", {"n": 8, "resampling": "systematic", "ess_threshold": 0.5}),
        ("epf", {"lookahead": True, "lam": 0.25}),
        ("early_rejection", {"tau": 16, "inner": "pf", "inner_params": {"n": 4}}),
        ("greedy", {}),
    ]
    for algorithm, params in cases:
        assert params_from_wire(params_to_wire(algorithm, params)) == (algorithm, params)
