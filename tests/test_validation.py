"""The fast validator (jsonschema-rs) and the reference (jsonschema) agree on every tool's
schema, over valid parameters and systematic mutations of them."""

from __future__ import annotations

import copy
import time
from typing import Any

import jsonschema_rs
import pytest
from jsonschema import Draft202012Validator

from server.errors import InvalidParameters
from server.validation import ParameterValidator
from tests.support import PIXEL, funnel_parameters
from tools.catalog import load_catalog

TOOLS = load_catalog()
EVENT = {
    "event_name": "Purchase", "event_time": int(time.time()), "action_source": "website",
    "event_source_url": "https://x.example", "user_data": {"em": ["a@b.co"], "client_user_agent": "UA"},
    "custom_data": {"value": 1.5, "currency": "USD", "contents": [{"id": "A", "quantity": 1}], "x": [1]},
}  # fmt: skip
VALID = {
    "FACEBOOK_ADS_SEND_FUNNEL_EVENT": funnel_parameters(
        value=3, currency="EUR", optOut=True, contents=[{"id": "A", "quantity": 2}]
    ),
    "FACEBOOK_ADS_SEND_LEAD_EVENT": funnel_parameters(
        eventName=None, dataProcessingOptions=["LDU"]
    ),
    "meta_send_conversion_event": {"pixel_id": PIXEL, **EVENT, "response_format": "json"},
    "FACEBOOK_ADS_SEND_EVENTS": {"pixel_id": PIXEL, "events": [EVENT, EVENT]},
}
WRONG_VALUES: list[Any] = [None, 7, 2.5, True, "text", "", [], ["a"], [1], {}, {"id": "A"}]


def mutations(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    """(path, replacement) pairs: every leaf and container swapped for each wrong value,
    every key dropped (None marks a drop) and an unknown key added to every object."""
    found = [(path, wrong) for wrong in WRONG_VALUES if wrong != value] if path else []
    if isinstance(value, dict):
        found += [((*path, "unknownField"), "x")]
        for key, item in value.items():
            found += [((*path, key), None), *mutations(item, (*path, key))]
    elif isinstance(value, list) and value:
        found += mutations(value[0], (*path, 0))
    return found


def mutated(base: Any, path: tuple[Any, ...], replacement: Any) -> Any:
    result = copy.deepcopy(base)
    target = result
    for step in path[:-1]:
        target = target[step]
    if replacement is None and isinstance(target, dict):
        target.pop(path[-1], None)
    else:
        target[path[-1]] = replacement
    return result


# (id, tool name, parameters)
CORPUS: list[tuple[str, str, Any]] = [
    (f"{name}:{'.'.join(map(str, path))}={replacement!r}", name, mutated(base, path, replacement))
    for name, base in VALID.items()
    for path, replacement in [((), None), *mutations(base)]
    if path
] + [(f"{name}:valid", name, base) for name, base in VALID.items()]
CASES = [pytest.param(name, parameters, id=case_id) for case_id, name, parameters in CORPUS]


@pytest.mark.parametrize(("tool_name", "parameters"), CASES)
def test_fast_validator_agrees_with_the_reference(tool_name, parameters):
    schema = dict(TOOLS[tool_name].schema)
    reference_ok = not list(Draft202012Validator(schema).iter_errors(parameters))
    assert jsonschema_rs.Draft202012Validator(schema).is_valid(parameters) is reference_ok


def test_corpus_has_both_outcomes():
    schema_ok = [
        not list(Draft202012Validator(dict(TOOLS[name].schema)).iter_errors(parameters))
        for _, name, parameters in CORPUS
    ]
    assert len(CORPUS) > 500 and sum(schema_ok) >= 4 and schema_ok.count(False) > 400


@pytest.mark.parametrize("tool_name", list(VALID))
def test_valid_parameters_pass_and_invalid_ones_name_their_paths(tool_name):
    validator = ParameterValidator(tool_name, TOOLS[tool_name].schema)
    validator.check(VALID[tool_name])
    with pytest.raises(InvalidParameters) as raised:
        validator.check({**VALID[tool_name], "unknownField": 1})
    assert [v.path for v in raised.value.violations] == ["parameters.unknownField"]
