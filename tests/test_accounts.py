"""Several credentials per user and JWT Permissions, end to end: Run Tool, List Tools, the dry
run, the event status and MCP on the real app, with the fake Graph the only fake. Which
credential a call went with is read from the access token Meta received.

ActionKit's wording: "Multi Account Authorization ... ActionKit: Yes (via X-Paragon-Credential
header)" (https://docs.useparagon.com/apis/api-reference/multi-account-authorization); JWT
Permissions: https://docs.useparagon.com/apis/api-reference/jwt-permissions.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from starlette.testclient import TestClient

from server import logs
from server.app import create_app
from server.permissions import CLAIM
from server.storage import outbox
from server.storage.credentials import CredentialStore, open_credentials
from server.storage.database import connect_sync
from tests.live import serving
from tests.support import (
    NOW,
    PROJECT,
    PROJECT_TOKEN,
    FakeGraph,
    Step,
    fixed_clock,
    funnel_parameters,
    graph_error,
    make_config,
)

URL = f"/projects/{PROJECT}/tools"
TOOL = "FACEBOOK_ADS_SEND_FUNNEL_EVENT"
A = "0b7c6a52-1f0e-4c3b-9a55-6d1f2e3a4b5c"  # user-1's, addressed by external id too
B = "9e8d7c6b-5a49-4382-b1a0-fedcba987654"  # user-1's default
C = "5d4c3b2a-1908-4776-8554-433221100fed"  # user-2's
EXT_A = "agency-a@example.com"  # an external id may be an e-mail: never echoed
EXT_C = "client-c@example.com"
TOKENS = {A: "EAAB-secret-of-A", B: "EAAB-secret-of-B", C: "EAAB-secret-of-C"}
RENEWED = "EAAB-secret-of-A-renewed"
SECRETS = (*TOKENS.values(), RENEWED, PROJECT_TOKEN)
NO_CLAIM = object()
DENY_ALL = {"integration:*": False}
ONLY_A = {"integration:*": False, f"credential:{A}": True}
REFUSED = graph_error(400, 190, error_subcode=463)  # Meta: the access token has expired


def connect_users(store: CredentialStore) -> None:
    store.set(PROJECT, "user-1", TOKENS[A], credential_id=A, external_id=EXT_A, label="Agency A")
    store.set(PROJECT, "user-1", TOKENS[B], credential_id=B, label="Brand B", make_default=True)
    store.set(PROJECT, "user-2", TOKENS[C], credential_id=C, external_id=EXT_C)


@dataclass
class Accounts:
    """The app with user-1 (credentials A and B, B the default) and user-2 (C); user-3 has
    none. Every answer is kept, to be searched for tokens at teardown."""

    client: TestClient
    graph: FakeGraph
    store: CredentialStore
    signer: Callable[..., str]
    answers: list[httpx2.Response] = field(default_factory=list)

    def token(self, claim: Any = NO_CLAIM, user: str = "user-1") -> str:
        return self.signer(user) if claim is NO_CLAIM else self.signer(user, **{CLAIM: claim})

    def headers(self, credential: str | None, claim: Any, user: str) -> list[tuple[str, str]]:
        headers = [("Authorization", f"Bearer {self.token(claim, user)}")]
        return headers if credential is None else [*headers, ("X-Paragon-Credential", credential)]

    def kept(self, response: httpx2.Response) -> httpx2.Response:
        self.answers.append(response)
        return response

    def post(
        self,
        credential: str | None = None,
        *,
        claim: Any = NO_CLAIM,
        user: str = "user-1",
        parameters: dict[str, Any] | None = None,
        query: str = "",
        extra: tuple[tuple[str, str], ...] = (),
    ) -> httpx2.Response:
        body = {
            "tool": TOOL,
            "parameters": funnel_parameters() if parameters is None else parameters,
        }
        headers = [*self.headers(credential, claim, user), *extra]
        return self.kept(self.client.post(URL + query, json=body, headers=headers))

    def listed(
        self, credential: str | None = None, *, claim: Any = NO_CLAIM, limit: bool = True
    ) -> list[str]:
        """The names List Tools shows."""
        response = self.kept(
            self.client.get(
                URL,
                params={"limit_to_available": str(limit).lower()},
                headers=self.headers(credential, claim, "user-1"),
            )
        )
        assert response.status_code == 200
        return [f["function"]["name"] for tools in response.json()["tools"].values() for f in tools]

    def status(self, location: str, *, until: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The event status route's answer, polled (≤ 5 s) until `until` holds."""
        deadline = time.monotonic() + 5
        while True:
            body: dict[str, Any] = self.kept(
                self.client.get(location, headers={"Authorization": f"Bearer {self.token()}"})
            ).json()
            if until(body) or time.monotonic() > deadline:
                return body
            time.sleep(0.02)

    def sent_with(self) -> list[str]:
        """The access token of every request Meta received, in order."""
        return [body["access_token"] for body in self.graph.bodies()]


def no_secret_in(texts: list[str]) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


@pytest.fixture
def accounts(
    backend, make_client, graph, sign, log_capture, tmp_path, rsa_key
) -> Iterator[Accounts]:
    """On each backend: the CLI's credentials reach the app through the database. (`backend`
    comes first: its database is set up before the app and dropped after it stops.)"""
    config = make_config(
        tmp_path, rsa_key, facebook_access_token=PROJECT_TOKEN, database_url=backend
    )
    client: TestClient = make_client(config)
    with closing(open_credentials(config.storage)) as store:  # as the CLI does
        connect_users(store)
        accounts = Accounts(client, graph, store, sign)
        yield accounts
    lines = log_capture.lines(client)
    assert lines and accounts.answers  # the search below has something to search
    no_secret_in([r.text for r in accounts.answers])
    no_secret_in([json.dumps(line) for line in lines])


def error_of(response: httpx2.Response) -> tuple[int, str]:
    return response.status_code, response.json()["code"]


# --- Which credential goes to Meta --------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "used"),
    [(None, B), (A, A), (B, B), (f"ext:{EXT_A}", A), (f"  {A}  ", A)],
    ids=["default", "id-A", "id-B", "external-id", "padded"],
)
def test_the_header_picks_the_users_credential_else_its_default(accounts, header, used):
    response = accounts.post(header)
    assert response.status_code == 200, response.text
    assert accounts.sent_with() == [TOKENS[used]]


@pytest.mark.parametrize(
    "header",
    [C, f"ext:{EXT_C}", "3f0c8a1e-0000-4000-8000-000000000000", "x" * 200],
    ids=["other-users-id", "other-users-ext", "unknown-id", "200-chars"],
)
def test_a_credential_not_the_users_is_not_found_and_nothing_is_sent(accounts, header):
    response = accounts.post(header)
    assert error_of(response) == (400, "CREDENTIAL_NOT_FOUND")
    assert response.json()["message"] == "No credential with this id for this user."
    assert header.strip().removeprefix("ext:").lower() not in response.text.lower()
    assert accounts.graph.received == []
    for limit in ("true", "false"):  # List Tools too, whatever limit_to_available says
        listing = accounts.client.get(
            URL,
            params={"limit_to_available": limit, "integrations": "facebookAds"},
            headers=accounts.headers(header, NO_CLAIM, "user-1"),
        )
        assert error_of(listing) == (400, "CREDENTIAL_NOT_FOUND")


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Paragon-Credential", "")],
        [("X-Paragon-Credential", "   ")],
        [("X-Paragon-Credential", "x" * 201)],
        [("X-Paragon-Credential", A), ("X-Paragon-Credential", B)],
    ],
    ids=["empty", "blank", "201-chars", "two-lines"],
)
def test_a_malformed_header_is_an_invalid_request(accounts, headers):
    response = accounts.post(extra=tuple(headers))
    assert error_of(response) == (400, "INVALID_REQUEST")
    assert "X-Paragon-Credential" in response.json()["message"]
    assert accounts.graph.received == []


def test_a_user_without_credential_goes_with_the_projects_token(accounts):
    assert accounts.post(user="user-3").status_code == 200
    assert accounts.sent_with() == [PROJECT_TOKEN]


def test_a_user_without_credential_in_a_project_without_token_is_not_enabled(
    make_client, graph, sign
):
    client = make_client(facebook_access_token=None)
    with closing(open_credentials(client.app.state.config.storage)) as store:
        connect_users(store)
    body = {"tool": TOOL, "parameters": funnel_parameters()}
    headers = {"Authorization": f"Bearer {sign('user-3')}"}
    response = client.post(URL, json=body, headers=headers)
    assert error_of(response) == (400, "INTEGRATION_NOT_ENABLED")
    assert response.json()["message"] == "Integration not enabled for user."
    shown = client.post(URL + "?dry_run=true", json=body, headers=headers).json()
    assert (shown["integration_enabled"], shown["credential"]) == (False, None)
    assert graph.received == []


# --- JWT Permissions ---------------------------------------------------------------------


def test_a_token_denied_the_integration_gets_403_before_anything_is_looked_at(accounts):
    assert accounts.post(claim={"integration:*": True}).status_code == 200  # the claim is read
    for attempt in (
        accounts.post(claim=DENY_ALL),
        accounts.post(A, claim=DENY_ALL),
        accounts.post(C, claim=DENY_ALL),  # not the user's: the header is not looked at
        accounts.post(claim=DENY_ALL, parameters={}),  # nor are the parameters
        accounts.post(claim=DENY_ALL, query="?dry_run=true"),
        accounts.post(claim=DENY_ALL, user="user-3"),  # the project's token
    ):
        assert error_of(attempt) == (403, "INTEGRATION_FORBIDDEN")
    assert accounts.sent_with() == [TOKENS[B]]


@pytest.mark.parametrize("limit", [True, False])
def test_list_tools_hides_an_integration_the_token_may_not_use(accounts, limit):
    assert TOOL in accounts.listed(limit=limit)
    assert accounts.listed(claim=DENY_ALL, limit=limit) == []
    assert accounts.listed(A, claim=DENY_ALL, limit=limit) == []


def test_a_token_granted_one_credential_may_use_that_one_only(accounts):
    assert accounts.post(A, claim=ONLY_A).status_code == 200
    assert accounts.post(f"ext:{EXT_A}", claim=ONLY_A).status_code == 200
    assert error_of(accounts.post(B, claim=ONLY_A)) == (403, "CREDENTIAL_FORBIDDEN")
    default = accounts.post(claim=ONLY_A)  # the default, B, is not granted
    assert error_of(default) == (403, "CREDENTIAL_FORBIDDEN")
    assert "X-Paragon-Credential" in default.json()["message"]
    project = accounts.post(claim=ONLY_A, user="user-3")  # nor is the project's token
    assert error_of(project) == (403, "CREDENTIAL_FORBIDDEN")
    dry_run = accounts.post(claim=ONLY_A, query="?dry_run=true")
    assert error_of(dry_run) == (403, "CREDENTIAL_FORBIDDEN")
    assert accounts.sent_with() == [TOKENS[A], TOKENS[A]]
    # List Tools: with the granted credential, or not limited to available ones.
    assert TOOL in accounts.listed(A, claim=ONLY_A)
    assert accounts.listed(claim=ONLY_A) == []
    assert TOOL in accounts.listed(claim=ONLY_A, limit=False)


def test_a_denial_of_one_credential_keeps_the_others(accounts):
    claim = {"integration:*": True, f"credential:{B}": False}
    assert error_of(accounts.post(claim=claim)) == (403, "CREDENTIAL_FORBIDDEN")
    assert accounts.post(A, claim=claim).status_code == 200
    assert accounts.post(claim=claim, user="user-3").status_code == 200
    assert accounts.sent_with() == [TOKENS[A], PROJECT_TOKEN]


def test_an_idempotency_key_names_one_account(accounts):
    key = (("Idempotency-Key", "order-1002-try"),)
    assert accounts.post(A, extra=key).status_code == 200
    assert accounts.post(A, extra=key).headers["Idempotent-Replayed"] == "true"
    assert error_of(accounts.post(B, extra=key)) == (422, "IDEMPOTENCY_KEY_REUSED")
    assert accounts.sent_with() == [TOKENS[A]]


def test_a_credential_id_in_upper_case_names_the_same_credential(accounts):
    assert accounts.post(A.upper()).status_code == 200
    assert accounts.sent_with() == [TOKENS[A]]


def test_an_idempotency_key_replay_is_subject_to_the_tokens_permissions(accounts):
    key = (("Idempotency-Key", "order-1001-try"),)
    assert accounts.post(A, extra=key).status_code == 200
    assert error_of(accounts.post(A, claim=DENY_ALL, extra=key)) == (403, "INTEGRATION_FORBIDDEN")
    only_b = {"integration:*": False, f"credential:{B}": True}
    assert error_of(accounts.post(A, claim=only_b, extra=key)) == (403, "CREDENTIAL_FORBIDDEN")


# --- The dry run ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "user", "shown"),
    [
        (None, "user-1", {"id": B, "label": "Brand B", "source": "default"}),
        (A, "user-1", {"id": A, "label": "Agency A", "source": "header"}),
        (f"ext:{EXT_A}", "user-1", {"id": A, "label": "Agency A", "source": "header"}),
        (None, "user-3", {"id": None, "label": None, "source": "project"}),
    ],
    ids=["default", "id", "external-id", "project"],
)
def test_the_dry_run_names_the_credential_never_its_token(accounts, header, user, shown):
    response = accounts.post(header, user=user, query="?dry_run=true")
    assert response.status_code == 200
    assert response.json()["integration_enabled"] is True
    assert response.json()["credential"] == {**shown, "status": "valid"}
    assert accounts.graph.received == []  # and the teardown finds no token in the answer


# --- Credential status -----------------------------------------------------------------------


def test_a_token_meta_refuses_marks_its_credential_invalid_until_it_is_set_again(accounts):
    accounts.graph.script.append(REFUSED)
    assert error_of(accounts.post(A)) == (502, "UPSTREAM_AUTH")
    refused = accounts.store.by_id(PROJECT, A)
    assert refused is not None and refused.status == "invalid"
    assert refused.status_error is not None and refused.status_error["upstream"]["code"] == 190
    assert accounts.store.by_id(PROJECT, B).status == "valid"
    assert accounts.listed(A) == []  # limit_to_available: not a usable credential
    assert TOOL in accounts.listed(A, limit=False)
    assert TOOL in accounts.listed()  # the default, B
    shown = accounts.post(A, query="?dry_run=true").json()["credential"]
    assert (shown["id"], shown["status"]) == (A, "invalid")
    assert accounts.post().status_code == 200  # B still works

    accounts.store.set(PROJECT, "user-1", RENEWED, credential_id=A)  # `credentials set`
    assert accounts.store.by_id(PROJECT, A).status == "valid"
    assert TOOL in accounts.listed(A)
    assert accounts.post(A).status_code == 200
    assert accounts.sent_with() == [TOKENS[A], TOKENS[B], RENEWED]


def test_a_refusal_of_a_token_replaced_meanwhile_leaves_the_credential_valid(accounts):
    accounts.graph.script.append(Step(REFUSED.status, error=REFUSED.error, delay=0.5))
    answers: list[httpx2.Response] = []
    call = threading.Thread(target=lambda: answers.append(accounts.post(A)))
    call.start()
    deadline = time.monotonic() + 5
    while not accounts.graph.received and time.monotonic() < deadline:
        time.sleep(0.01)  # the old token is on its way to Meta
    accounts.store.set(PROJECT, "user-1", RENEWED, credential_id=A)  # `credentials set`
    call.join(10)
    assert error_of(answers[0]) == (502, "UPSTREAM_AUTH")  # Meta refused the old token
    assert accounts.store.by_id(PROJECT, A).status == "valid"


def test_a_queued_event_keeps_its_credential_and_waits_while_it_is_refused(accounts):
    accounts.graph.script.append(REFUSED)
    accepted = accounts.post(A, extra=(("Prefer", "respond-async"),))
    assert accepted.status_code == 202
    location = accepted.headers["location"]
    held = accounts.status(location, until=lambda body: body.get("held", False))
    assert (held["status"], held["held"]) == ("queued", True)
    assert held["credential"] == {"id": A, "status": "invalid"}
    only_b = {"integration:*": False, f"credential:{B}": True}
    seen = accounts.client.get(location, headers=accounts.headers(None, only_b, "user-1"))
    assert seen.status_code == 200 and "credential" not in seen.json()  # A is not this token's
    assert accounts.store.by_id(PROJECT, A).status == "invalid"
    assert accounts.sent_with() == [TOKENS[A]]

    accounts.store.set(PROJECT, "user-1", RENEWED, credential_id=A)  # what the CLI does
    storage = accounts.client.app.state.config.storage
    with closing(connect_sync(storage.database_path, storage.url)) as db:
        assert outbox.release_held(db, now=NOW, project_id=PROJECT, credential_id=A) == 1
    delivered = accounts.status(location, until=lambda body: body["status"] == "delivered")
    assert delivered["status"] == "delivered"
    assert delivered["credential"] == {"id": A, "status": "valid"}
    assert accounts.sent_with() == [TOKENS[A], RENEWED]


def test_a_queued_event_for_the_projects_token_names_no_credential(accounts):
    accepted = accounts.post(user="user-3", extra=(("Prefer", "respond-async"),))
    assert accepted.status_code == 202
    token = accounts.token(user="user-3")
    status = accounts.kept(
        accounts.client.get(
            accepted.headers["location"], headers={"Authorization": f"Bearer {token}"}
        )
    ).json()
    assert "credential" not in status


# --- MCP ----------------------------------------------------------------------------------------


@pytest.fixture
def mcp_url(tmp_path: Path, rsa_key: Any, graph: FakeGraph) -> Iterator[str]:
    """The real app on loopback (the official client speaks HTTP), Graph faked in-process."""
    config = make_config(tmp_path, rsa_key, facebook_access_token=PROJECT_TOKEN)
    with closing(open_credentials(config.storage)) as store:
        connect_users(store)
    app = create_app(config, graph_transport=graph.transport(), clock=fixed_clock(NOW))
    with serving(app) as base_url:
        yield f"{base_url}/projects/{PROJECT}/mcp"


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    logs.configure(out)
    yield out
    logs._sink.flush()
    logs._sink.stream = None


def mcp(url: str, token: str, use: Callable[[Client], Any], credential: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    if credential is not None:
        headers["X-Paragon-Credential"] = credential

    async def run() -> Any:
        async with (
            httpx2.AsyncClient(headers=headers, timeout=30) as http,
            Client(streamable_http_client(url, http_client=http)) as client,
        ):
            return await use(client)

    return anyio.run(run)


def requests_logged(out: io.StringIO) -> int:
    logs.flush(5)
    return sum(json.loads(line)["event"] == "request" for line in out.getvalue().splitlines())


async def call(client: Client) -> Any:
    return await client.call_tool(TOOL, funnel_parameters())


async def names(client: Client) -> list[str]:
    return [tool.name for tool in (await client.list_tools()).tools]


def test_mcp_calls_go_with_the_credential_the_header_names(mcp_url, graph, sign, log_stream):
    results = [
        mcp(mcp_url, sign(), call, f"ext:{EXT_A}"),
        mcp(mcp_url, sign(), call, A),
        mcp(mcp_url, sign(), call),
    ]
    assert [result.is_error for result in results] == [False, False, False]
    assert [body["access_token"] for body in graph.bodies()] == [TOKENS[A], TOKENS[A], TOKENS[B]]
    missing = mcp(mcp_url, sign(), call, C)
    assert (
        missing.is_error and json.loads(missing.content[0].text)["code"] == "CREDENTIAL_NOT_FOUND"
    )
    assert len(graph.received) == 3
    deadline = time.monotonic() + 5  # the server logs a request after answering it
    while requests_logged(log_stream) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert requests_logged(log_stream) >= 4
    no_secret_in([log_stream.getvalue(), *(r.content[0].text for r in [*results, missing])])


def test_mcp_honours_the_tokens_permissions(mcp_url, graph, sign):
    def restricted(claim: dict[str, Any]) -> str:
        return str(sign(**{CLAIM: claim}))

    assert TOOL in mcp(mcp_url, sign(), names)
    assert mcp(mcp_url, restricted(DENY_ALL), names) == []
    assert TOOL in mcp(mcp_url, restricted(ONLY_A), names)
    outcomes = [
        (mcp(mcp_url, restricted(DENY_ALL), call, A), "INTEGRATION_FORBIDDEN"),
        (mcp(mcp_url, restricted(ONLY_A), call, B), "CREDENTIAL_FORBIDDEN"),
        (mcp(mcp_url, restricted(ONLY_A), call), "CREDENTIAL_FORBIDDEN"),
    ]
    for result, code in outcomes:
        assert result.is_error and json.loads(result.content[0].text)["code"] == code
    assert graph.received == []
    assert not mcp(mcp_url, restricted(ONLY_A), call, A).is_error
    assert [body["access_token"] for body in graph.bodies()] == [TOKENS[A]]
