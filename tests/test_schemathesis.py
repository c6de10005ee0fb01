"""Schemathesis over every operation of the served openapi.json, with every check, on loopback.

funnelgate runs under uvicorn on 127.0.0.1 with the fake Graph as its transport (never the
network); requests carry a valid user token for the test project, so they reach the real
handlers. Every phase runs (the document's examples, coverage, fuzzing); generation is
derandomized and small, so the cases are the same on every run and take seconds.

One refinement of the `positive_data_acceptance` check, on Run Tool and Run Action only: a
schema-valid call may still get 400 INVALID_PARAMETERS for Meta's rules that JSON Schema cannot
state (the event time window, a website event's URL and user agent, baseline customer
matching, a valid email or IP address; openapi.json says so). `meta_rules_only` keeps that
from hiding a contract gap: such a 400 must carry INVALID_PARAMETERS, and the server's own
schema validator must accept the parameters, so every violation is one of Meta's rules and
none is a disagreement between openapi.json and the schema the server validates against. The
one bound the document states in words only is the nesting of free-form values (AnyBoundedJson:
JSON Schema cannot count depth), so a value nested too deep is Meta's rules' peer here.

Likewise a well-formed `X-Paragon-Credential` that names no credential of the user is refused
with 400 CREDENTIAL_NOT_FOUND on Run Tool and List Tools (`unknown_credential_only`): the
document cannot list which credentials exist.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import schemathesis
import schemathesis.engine
from cryptography.hazmat.primitives.asymmetric import rsa
from schemathesis.engine import events
from schemathesis.schemas import BaseSchema

from server.app import create_app
from server.errors import InvalidParameters
from server.storage.credentials import open_credentials
from server.validation import ParameterValidator
from tests.live import serving
from tests.support import PROJECT, WallClockGraph, make_config
from tools.catalog import load_catalog as load_tools
from tools.catalog import load_openapi
from tools.limits import MAX_DEPTH

RUN_OPERATIONS = ("runTool", "runAction")
LIST_OPERATIONS = ("listTools", "listActions")
CREDENTIAL_HEADER = "X-Paragon-Credential"
# A schema-valid call may still be refused: Meta's rules (400), an Idempotency-Key in use (409)
# or reused with another body (422), the limits on calls (429, 503).
RUN_STATUSES = ["2xx", "400", "401", "404", "409", "422", "429", "5xx"]
# An invalid call is refused as schemathesis expects, or with 413 when breaking a bound took more
# than the 1 MiB a body may carry (1,001 strings of 16,384 characters, say).
REFUSED = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
TOO_DEEP = f"nests deeper than {MAX_DEPTH} levels"  # server/validation.py's shape check
VALIDATORS = {name: ParameterValidator(name, tool.schema) for name, tool in load_tools().items()}


@schemathesis.check
def meta_rules_only(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schema-valid Run Tool call refused with 400 is refused for Meta's rules only."""
    operation_id = case.operation.definition.raw.get("operationId")
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if operation_id not in RUN_OPERATIONS or not positive or response.status_code != 400:
        return None
    body = response.json()
    if body.get("code") == "CREDENTIAL_NOT_FOUND":
        return unknown_credential_only(ctx, response, case)
    assert body.get("code") == "INVALID_PARAMETERS", (
        f"a schema-valid call was refused as {body.get('code')}: {body.get('message')}"
    )
    name = case.body.get("tool", case.body.get("action"))
    try:
        VALIDATORS[name].check(case.body["parameters"])
    except InvalidParameters as exc:
        if [v.message for v in exc.violations] == [TOO_DEEP]:
            return True
        raise AssertionError(
            f"openapi.json accepts parameters that the server's schema for {name} refuses: "
            f"{[(v.path, v.message) for v in exc.violations]}"
        ) from None
    return True


@schemathesis.check
def unknown_credential_only(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schema-valid call refused with 400 on List Tools (or Run Tool, through
    `meta_rules_only`) named a credential the user does not have."""
    operation_id = case.operation.definition.raw.get("operationId")
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    wanted = (*RUN_OPERATIONS, *LIST_OPERATIONS)
    if operation_id not in wanted or not positive or response.status_code != 400:
        return None
    code = response.json().get("code")
    if operation_id in RUN_OPERATIONS and code != "CREDENTIAL_NOT_FOUND":
        return None  # meta_rules_only judges those
    assert code == "CREDENTIAL_NOT_FOUND", f"a schema-valid listing was refused as {code}"
    assert CREDENTIAL_HEADER in (case.headers or {}), "CREDENTIAL_NOT_FOUND without the header"
    return True


def contract_failures(base_url: str, token: str, only_path: str | None = None) -> list[str]:
    """Every distinct failure of a derandomized run over the served document's operations (or
    those of `only_path`), each with its request and response; each must have been tested."""
    settings: dict[str, Any] = {
        "base-url": base_url,
        "headers": {"Authorization": f"Bearer {token}"},
        "parameters": {"path.project_id": PROJECT},
        "request-timeout": 5,
        "generation": {"max-examples": 12, "deterministic": True, "database": "none"},
        "suppress-health-check": ["all"],
    }
    if only_path is None:  # (schemathesis drops a schema's include() filter when this is set)
        settings["operations"] = [
            {
                "include-operation-id": list(RUN_OPERATIONS),
                "checks": {
                    "positive_data_acceptance": {"expected-statuses": RUN_STATUSES},
                    "negative_data_rejection": {"expected-statuses": [*REFUSED, "5xx"]},
                },
            },
            {
                "include-operation-id": list(LIST_OPERATIONS),
                "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "400"]}},
            },
        ]
    config = schemathesis.Config.from_dict(settings)
    # The served document, loaded as data: loaded by URL, schemathesis skips that operation.
    served = httpx.get(f"{base_url}/openapi.json", timeout=5).raise_for_status().json()
    schema: BaseSchema = schemathesis.openapi.from_dict(served, config=config)
    if only_path is not None:
        schema = schema.include(path=only_path)
    operations = {
        f"{method.upper()} {path}"
        for path, item in served["paths"].items()
        for method in item
        if only_path in (None, path)
    }
    tested: set[str] = set()
    failures: dict[tuple[str, str, str], str] = {}
    errors: list[str] = []
    finished = None
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            tested.add(recorder.label)
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    if check.failure_info is not None:
                        key = (recorder.label, check.name, check.failure_info.failure.title)
                        interaction = recorder.interactions.get(case_id)
                        failures.setdefault(key, _describe(recorder.label, check, interaction))
        elif isinstance(event, events.NonFatalError):
            errors.append(f"{event.label}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            errors.append(repr(event.exception))
        elif isinstance(event, events.EngineFinished):
            finished = event
    assert finished is not None and not errors, errors
    # (the stateful phase follows the 202's Location to the status route: a scenario of its own)
    assert tested - {"Stateful tests"} == operations
    return [*failures.values(), *(f"{f.title}: {f.message}" for f in finished.failures)]


def _describe(label: str, check: Any, interaction: Any) -> str:
    failure = check.failure_info.failure
    response = interaction.response if interaction else None
    answer = f"{response.status_code} {response.content[:300]!r}" if response else "none"
    return (
        f"{label} [{check.name}] {failure.title}: {failure.message.strip()[:300]}\n"
        f"    request: {check.failure_info.code_sample}\n    response: {answer}"
    )


def user_token(key: rsa.RSAPrivateKey) -> str:
    now = int(time.time())
    return jwt.encode({"sub": "user-1", "iat": now, "exp": now + 3600}, key, "RS256")


def test_every_operation_keeps_the_contract(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    graph = WallClockGraph()
    config = make_config(tmp_path, rsa_key, facebook_access_token="EAAB-project-token")
    # The credentials the document's header examples name, so its examples reach Meta.
    examples = load_openapi()["components"]["parameters"][CREDENTIAL_HEADER]["examples"]
    with contextlib.closing(open_credentials(config.storage)) as store:
        store.set(PROJECT, "user-1", "EAAB-by-id", credential_id=examples["id"]["value"])
        external = examples["externalId"]["value"].removeprefix("ext:")
        store.set(PROJECT, "user-1", "EAAB-by-external-id", external_id=external)
    with serving(create_app(config, graph_transport=graph.transport())) as url:
        failures = contract_failures(url, user_token(rsa_key))
    assert not failures, f"{len(failures)} contract failures:\n" + "\n".join(failures)
    # The run reached delivery: Meta (the fake Graph) got the document's example events.
    delivered = {event["event_name"] for body in graph.bodies() for event in body["data"]}
    assert delivered >= {"Purchase", "Lead"}


def test_the_sandbox_route_keeps_the_contract(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    graph = WallClockGraph()
    config = make_config(tmp_path, rsa_key, facebook_access_token="EAAB-project-token")
    config = dataclasses.replace(config, graph=dataclasses.replace(config.graph, sandbox=True))
    with serving(create_app(config, graph_transport=graph.transport())) as url:
        failures = contract_failures(url, user_token(rsa_key), only_path="/sandbox/events")
    assert not failures, f"{len(failures)} contract failures:\n" + "\n".join(failures)
