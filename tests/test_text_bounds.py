"""Text no backend stores: a NUL character (PostgreSQL's text refuses U+0000) in the body, the
user token's `sub` or an event id asked for is a clear 4xx before any work, on both backends,
never a 503 that fails other calls sharing the same insert."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.support import (
    PROJECT,
    PROJECT_TOKEN,
    MakeClient,
    funnel_parameters,
    make_config,
)


@pytest.fixture
def queued_client(
    backend: str | None, make_client: MakeClient, tmp_path: Any, rsa_key: Any
) -> TestClient:
    config = make_config(tmp_path, rsa_key, delivery_settings={"mode": "queued"},
                         database_url=backend, facebook_access_token=PROJECT_TOKEN)  # fmt: skip
    return make_client(config)


def call(client: TestClient, token: str, **parameters: Any) -> Any:
    return client.post(
        f"/projects/{PROJECT}/tools",
        json={
            "tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT",
            "parameters": funnel_parameters(**parameters),
        },
        headers={"Authorization": f"Bearer {token}"},
    )


@pytest.mark.parametrize(
    "parameters",
    [{"eventId": "a\x00b"}, {"contentName": "shoe\x00"}, {"customerEmail": "a\x00@example.com"}],
)
def test_a_nul_in_a_parameter_is_a_400_naming_it_and_the_next_call_is_queued(
    queued_client: TestClient, sign, parameters: dict[str, Any]
):
    refused = call(queued_client, sign(), **parameters)
    assert refused.status_code == 400
    body = refused.json()
    assert body["code"] == "INVALID_PARAMETERS"
    [name] = parameters
    assert body["errors"] == [
        {"path": f"parameters.{name}", "message": "holds a NUL character (\\u0000): "
         "send text without it"}
    ]  # fmt: skip
    assert call(queued_client, sign(), eventId="fine").status_code == 202


def test_a_nul_in_a_key_names_its_object_and_outside_the_parameters_each_field_decides(
    queued_client: TestClient, sign
):
    for body, status, code in (
        # A key with a NUL: its object is named, the key never echoed.
        (b'{"tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT", "parameters": {"custom_data": '
         b'{"x\\u0000": 1}}}', 400, "INVALID_PARAMETERS"),
        # Outside the parameters, the field's own check answers (an unknown tool here).
        (b'{"tool": "FACEBOOK\\u0000", "parameters": {}}', 404, "UNKNOWN_TOOL"),
    ):  # fmt: skip
        answer = queued_client.post(
            f"/projects/{PROJECT}/tools", content=body,
            headers={"Authorization": f"Bearer {sign()}", "Content-Type": "application/json"},
        )  # fmt: skip
        assert (answer.status_code, answer.json()["code"]) == (status, code), answer.text
        assert "\x00" not in answer.text


def test_an_escaped_backslash_before_u0000_is_text_not_a_nul(queued_client: TestClient, sign):
    # `\\u0000` in JSON is a backslash then "u0000": six visible characters, which are fine.
    answer = call(queued_client, sign(), contentName="path\\u0000")
    assert answer.status_code == 202


@pytest.mark.parametrize("sub", ["user\x00one", "user\ud800", "tab\there"])
def test_a_sub_with_a_control_character_or_a_lone_surrogate_is_a_401(
    queued_client: TestClient, sign, sub: str
):
    answer = call(queued_client, sign(sub=sub))
    assert answer.status_code == 401
    assert answer.json()["code"] == "UNAUTHORIZED"


def test_an_event_id_with_a_nul_is_not_found(queued_client: TestClient, sign):
    answer = queued_client.get(
        f"/projects/{PROJECT}/events/a%00b", headers={"Authorization": f"Bearer {sign()}"}
    )
    assert answer.status_code == 404
