"""Idempotency-Key (server/idempotency.py): replay, 422, 409, derived event ids, what is kept
and for how long, scoping, and a restart; on each backend (a SQLite file, then PostgreSQL)
through the real Outbox and its group-commit writer, with the real tool mapping making the
call's events."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any, NamedTuple

import httpx2
import orjson
import pytest
from starlette.responses import Response
from starlette.testclient import TestClient

from server.errors import (
    BadRequest,
    FunnelgateError,
    IdempotencyInProgress,
    IdempotencyKeyReused,
    InvalidParameters,
    UpstreamRejected,
    UpstreamUnavailable,
)
from server.idempotency import (
    MAX_STORED_BODY_BYTES,
    Idempotency,
    derived_ids,
    fingerprint,
    parse_key,
)
from server.responses import json_response
from server.storage import schema_pg
from server.storage.database import Connection, connect_sync, open_database
from server.storage.idempotency import KEY_TTL_SECONDS, RUNNING_SECONDS, claim, prune
from server.storage.outbox import Outbox
from tests.support import (
    NOW,
    PROJECT,
    FakeGraph,
    Step,
    funnel_parameters,
    graph_error,
    make_config,
)
from tools.base import BuildContext, Violation
from tools.catalog import load_catalog, load_openapi

TOOL = "FACEBOOK_ADS_SEND_FUNNEL_EVENT"
ENTRY = load_catalog(load_openapi())[TOOL]
KEY = "8e03978e-40d5-43e8-bc93-6894a57f9324"
NO_EVENT_ID = funnel_parameters(eventId=None)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class RunTool:
    """Run Tool behind the route, as idempotency sees it: the real mapping makes the call's
    events with the call's `new_id`, and the answer is the queued 202 (event_ids, Location,
    Preference-Applied). `gate` holds calls open; `error` is raised, `status` answered."""

    def __init__(self, *, status: int = 202, error: FunnelgateError | None = None) -> None:
        self.status = status
        self.error = error
        self.gate: asyncio.Event | None = None
        self.runs: list[list[str]] = []  # each run's event ids
        self.body_bytes = 0  # > 0: the answer carries that many bytes of padding

    def call(self, parameters: Any) -> Callable[[Callable[[], str]], Awaitable[Response]]:
        async def run(new_id: Callable[[], str]) -> Response:
            batch = ENTRY.tool.build(parameters, BuildContext(now=NOW, new_event_id=new_id))
            self.runs.append(batch.event_ids)
            if self.gate is not None:
                await self.gate.wait()
            if self.error is not None:
                raise self.error
            body: dict[str, Any] = {"status": "queued", "event_ids": batch.event_ids}
            if self.body_bytes:
                body["padding"] = "x" * self.body_bytes
            response = json_response(body, self.status)
            response.headers["Location"] = f"/projects/{PROJECT}/events/{batch.event_ids[0]}"
            response.headers["Preference-Applied"] = "respond-async"
            response.headers["X-Not-Kept"] = "1"
            return response

        return run


@pytest.fixture
def clock() -> Clock:
    return Clock()


class Place(NamedTuple):
    """Where the state is: the SQLite file, or the PostgreSQL database `url` names."""

    path: Path
    url: str | None

    def connect(self) -> Connection:
        return connect_sync(self.path, self.url)


@pytest.fixture
def place(tmp_path: Path, backend: str | None) -> Place:
    return Place(tmp_path / "funnelgate.db", backend)


def open_outbox(place: Place, clock: Clock) -> Outbox:
    """The server's outbox (PostgreSQL's schema first, as start-up makes it)."""
    if place.url is not None:
        with closing(place.connect()) as db:
            schema_pg.upgrade(db)
    return Outbox(open_database(place.path, place.url), clock=clock)


@pytest.fixture
def outbox(place: Place, clock: Clock) -> Iterator[Outbox]:
    store = open_outbox(place, clock)
    yield store
    store.close()


@pytest.fixture
def idem(outbox: Outbox, clock: Clock) -> Idempotency:
    return Idempotency(outbox, clock=clock)


def start(
    idem: Idempotency,
    tool: RunTool,
    parameters: Any = NO_EVENT_ID,
    *,
    key: str = KEY,
    user: str = "user-1",
    project: str = PROJECT,
    tool_name: str = TOOL,
) -> Coroutine[Any, Any, Response]:
    """One Run Tool call with `key`, as the route makes it."""
    call = tool.call(parameters)
    return idem.handle(project, user, key, tool_name=tool_name, parameters=parameters, call=call)


def handle(idem: Idempotency, tool: RunTool, parameters: Any = NO_EVENT_ID, **kw: Any) -> Response:
    return asyncio.run(start(idem, tool, parameters, **kw))


def refused(
    idem: Idempotency, tool: RunTool, parameters: Any = NO_EVENT_ID, **kwargs: Any
) -> FunnelgateError:
    with pytest.raises(FunnelgateError) as caught:
        handle(idem, tool, parameters, **kwargs)
    return caught.value


def rows(place: Place) -> int:
    with closing(place.connect()) as db:
        return int(db.execute("SELECT count(*) FROM idempotency").fetchone()[0])


# --- the three cases -----------------------------------------------------------------------


def test_same_key_and_request_replays_the_first_answer(idem: Idempotency):
    tool = RunTool()
    first = handle(idem, tool)
    # The same parameters, re-serialised with other key order: the same request.
    reordered = orjson.loads(orjson.dumps(dict(reversed(list(NO_EVENT_ID.items())))))
    again = handle(idem, tool, reordered)

    assert len(tool.runs) == 1
    assert again.status_code == first.status_code == 202
    assert again.body == first.body
    assert again.headers["content-type"] == first.headers["content-type"] == "application/json"
    for name in ("Location", "Preference-Applied"):
        assert again.headers[name] == first.headers[name]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert "X-Not-Kept" not in again.headers  # only the headers that matter are kept
    assert int(again.headers["content-length"]) == len(first.body)


def test_same_key_with_another_request_is_422(idem: Idempotency):
    tool = RunTool()
    handle(idem, tool)
    other = funnel_parameters(eventId=None, value=12.5)

    error = refused(idem, tool, other)
    assert isinstance(error, IdempotencyKeyReused)
    assert (error.status, error.code, error.retryable) == (422, "IDEMPOTENCY_KEY_REUSED", False)
    # Another tool with the same parameters is another request too.
    assert isinstance(refused(idem, tool, tool_name="FACEBOOK_ADS_SEND_LEAD_EVENT"),
                      IdempotencyKeyReused)  # fmt: skip
    assert len(tool.runs) == 1


def test_retry_while_the_first_call_runs_is_409_then_the_answer(idem: Idempotency):
    tool = RunTool()

    async def scenario() -> tuple[Response, list[BaseException | Response], Response]:
        tool.gate = asyncio.Event()
        params = NO_EVENT_ID
        first = asyncio.create_task(start(idem, tool, params))
        while not tool.runs:  # the first call is inside Run Tool
            await asyncio.sleep(0)
        other = funnel_parameters(eventId=None, value=99)
        during = await asyncio.gather(
            start(idem, tool, params),
            start(idem, tool, other),
            return_exceptions=True,
        )
        tool.gate.set()
        answer = await first
        after = await start(idem, tool, params)
        return answer, list(during), after

    answer, (same, different), after = asyncio.run(scenario())
    assert isinstance(same, IdempotencyInProgress)
    assert (same.status, same.code, same.retryable) == (409, "IDEMPOTENCY_IN_PROGRESS", True)
    assert same.headers() == {"Retry-After": "1"}
    assert isinstance(different, IdempotencyKeyReused)  # another request is refused at once
    assert len(tool.runs) == 1
    assert after.body == answer.body
    assert after.headers["Idempotent-Replayed"] == "true"


# --- event ids: a re-run makes the same ones -------------------------------------------------


def test_a_call_without_event_id_rerun_after_a_5xx_sends_the_same_event_id(idem: Idempotency):
    tool = RunTool(error=UpstreamUnavailable("Meta is unavailable.", {}, event_ids=[]))
    with pytest.raises(UpstreamUnavailable):
        handle(idem, tool)
    tool.error = None
    retried = handle(idem, tool)

    first_ids, rerun_ids = tool.runs
    assert first_ids == rerun_ids
    assert len(first_ids[0]) == 32 and int(first_ids[0], 16) >= 0  # hex, like random ids
    assert orjson.loads(retried.body)["event_ids"] == first_ids
    # Another key, user, project or request: other ids.
    handle(idem, tool, key="another-key")
    handle(idem, tool, user="user-2")
    handle(idem, tool, project="other-project")
    handle(idem, tool, funnel_parameters(eventId=None, value=3), key="third-key")
    assert len({ids[0] for ids in tool.runs[1:]}) == 5


def test_a_cancelled_call_keeps_nothing_and_its_rerun_has_the_same_ids(idem: Idempotency):
    tool = RunTool()

    async def scenario() -> Response:
        tool.gate = asyncio.Event()
        first = asyncio.create_task(start(idem, tool, NO_EVENT_ID))
        while not tool.runs:
            await asyncio.sleep(0)
        first.cancel()  # the client went away, or the server is stopping
        with pytest.raises(asyncio.CancelledError):
            await first
        tool.gate = None
        return await start(idem, tool, NO_EVENT_ID)

    rerun = asyncio.run(scenario())
    assert rerun.status_code == 202
    assert tool.runs[0] == tool.runs[1]


def test_the_nth_id_of_a_call_is_derived_from_n():
    fp = fingerprint(TOOL, NO_EVENT_ID)
    one, two = derived_ids(PROJECT, "u", KEY, fp), derived_ids(PROJECT, "u", KEY, fp)
    assert [one(), one(), one()] == [two(), two(), two()]
    three = derived_ids(PROJECT, "u", KEY, fp)
    assert len({three(), three(), three()}) == 3


# --- what is kept -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        UpstreamUnavailable("Meta is unavailable.", {}, event_ids=[], status=504),
        UpstreamUnavailable("Meta is unavailable.", {}, event_ids=[]),
    ],
)
def test_a_5xx_is_not_kept_so_the_retry_runs_again(
    idem: Idempotency, place: Place, error: FunnelgateError
):
    tool = RunTool(error=error)
    for _ in range(2):
        with pytest.raises(UpstreamUnavailable):
            handle(idem, tool)
    assert len(tool.runs) == 2
    assert rows(place) == 0


def test_a_5xx_answer_returned_is_not_kept_either(idem: Idempotency, place: Place):
    tool = RunTool(status=503)
    assert handle(idem, tool).status_code == 503
    assert handle(idem, tool).status_code == 503
    assert len(tool.runs) == 2
    assert rows(place) == 0


def test_metas_refusal_is_kept_and_replayed_as_the_same_error(idem: Idempotency):
    upstream = {"message": "Invalid parameter", "code": 100, "fbtrace_id": "T1"}
    tool = RunTool(error=UpstreamRejected("Meta refused the event.", upstream, event_ids=["e"]))
    with pytest.raises(UpstreamRejected):
        handle(idem, tool)
    replay = handle(idem, tool)
    assert len(tool.runs) == 1
    assert replay.status_code == 400
    assert orjson.loads(replay.body) == {
        "message": "Meta refused the event.",
        "code": "UPSTREAM_REJECTED",
        "retryable": False,
        "event_ids": ["e"],
        "upstream": upstream,
    }


def test_funnelgates_own_refusal_is_not_kept_so_a_corrected_call_may_use_the_key(
    idem: Idempotency, place: Place
):
    """Nothing was sent: a corrected retry, or one after `credentials set`, just runs."""
    tool = RunTool(error=InvalidParameters([Violation("parameters.eventName", "is required")]))
    with pytest.raises(InvalidParameters):
        handle(idem, tool)
    assert rows(place) == 0
    tool.error = None
    assert handle(idem, tool, funnel_parameters(eventId=None, value=1)).status_code == 202


def test_an_answer_over_1_mib_is_answered_but_not_kept(idem: Idempotency, place: Place):
    tool = RunTool(status=200)
    tool.body_bytes = MAX_STORED_BODY_BYTES
    assert len(handle(idem, tool).body) > MAX_STORED_BODY_BYTES
    assert rows(place) == 0
    tool.body_bytes = MAX_STORED_BODY_BYTES - 1000
    handle(idem, tool)
    assert rows(place) == 1


def test_kept_24_hours_then_expired_and_pruned(
    idem: Idempotency, outbox: Outbox, clock: Clock, place: Place
):
    tool = RunTool()
    handle(idem, tool)
    clock.now = NOW + KEY_TTL_SECONDS - 1
    assert handle(idem, tool).headers["Idempotent-Replayed"] == "true"
    assert asyncio.run(outbox.write(lambda db: prune(db, before=clock.now - KEY_TTL_SECONDS))) == 0

    clock.now = NOW + KEY_TTL_SECONDS + 1
    # Expired: the key is free, even for another request, which gets its own event ids.
    other = funnel_parameters(eventId=None, value=7)
    assert "Idempotent-Replayed" not in handle(idem, tool, other).headers
    assert len(tool.runs) == 2 and tool.runs[0] != tool.runs[1]
    assert rows(place) == 1  # the expired row was replaced

    clock.now += KEY_TTL_SECONDS + 1
    assert asyncio.run(outbox.write(lambda db: prune(db, before=clock.now - KEY_TTL_SECONDS))) == 1
    assert rows(place) == 0


# --- the key --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ('"8e03978e-40d5-43e8-bc93-6894a57f9324"', "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        (' "order-1001" ', "order-1001"),
        (r'"a\"b\\c"', 'a"b\\c'),
        ("x", "x"),
        ('"' + "k" * 255 + '"', "k" * 255),
        ("k" * 255, "k" * 255),
        ("abc/DEF+ghi==", "abc/DEF+ghi=="),
    ],
)
def test_keys_accepted(value: str, key: str):
    assert parse_key([value]) == key


@pytest.mark.parametrize(
    ("values", "says"),
    [
        (['""'], "empty"),
        ([""], "empty"),
        (['"' + "k" * 256 + '"'], "longer than 255"),
        (["k" * 256], "longer than 255"),
        (['"joe smith@example.com"'], "visible ASCII"),
        (['"caf\u00e9"'], "visible ASCII"),
        (['"abc"; x=1'], "nothing after it"),
        (['"abc", "def"'], "nothing after it"),
        (['"abc'], "no closing quote"),
        ([r'"a\x"'], "may only escape"),
        (["abc,def"], "one quoted string"),
        (['ab"c'], "one quoted string"),
        (["abc", "def"], "one Idempotency-Key header"),
    ],
)
def test_keys_refused_with_a_clear_400(values: list[str], says: str):
    with pytest.raises(BadRequest) as caught:
        parse_key(values)
    error = caught.value
    assert (error.status, error.code) == (400, "INVALID_REQUEST")
    assert says in error.message and "Idempotency-Key" in error.message
    assert "joe" not in error.message  # the caller's key is never echoed


def test_no_header_is_no_key():
    assert parse_key([]) is None


def test_the_fingerprint_ignores_whitespace_and_key_order_only():
    compact = orjson.loads(b'{"a":1,"b":{"y":[1,2],"x":"v"}}')
    spaced = orjson.loads(b'{ "b" : { "x" : "v", "y" : [ 1, 2 ] },\n "a" : 1 }')
    assert fingerprint(TOOL, compact) == fingerprint(TOOL, spaced)
    assert fingerprint(TOOL, compact) != fingerprint(TOOL, {**compact, "a": 2})
    assert fingerprint(TOOL, compact) != fingerprint("OTHER_TOOL", compact)
    assert fingerprint(TOOL, {"b": {"y": [2, 1], "x": "v"}, "a": 1}) != fingerprint(TOOL, compact)


# --- scope and restarts -------------------------------------------------------------------------


def test_another_users_or_projects_same_key_is_another_key(idem: Idempotency):
    tool = RunTool()
    handle(idem, tool)
    other = funnel_parameters(eventId=None, value=5)
    for scope in ({"user": "user-2"}, {"project": "other-project"}):
        answer = handle(idem, tool, other, **scope)
        assert "Idempotent-Replayed" not in answer.headers
    assert len(tool.runs) == 3
    # Each scope keeps its own answer.
    assert handle(idem, tool, other, user="user-2").headers["Idempotent-Replayed"] == "true"
    assert isinstance(refused(idem, tool, other), IdempotencyKeyReused)


def test_a_new_process_on_the_same_database_replays_the_stored_answer(place: Place, clock: Clock):
    tool = RunTool()
    first_store = open_outbox(place, clock)
    try:
        first = handle(Idempotency(first_store, clock=clock), tool)
    finally:
        first_store.close()

    restarted = open_outbox(place, clock)
    try:
        idem = Idempotency(restarted, clock=clock)
        after = RunTool()
        replay = handle(idem, after)
        assert isinstance(
            refused(idem, after, funnel_parameters(eventId=None, value=2)), IdempotencyKeyReused
        )
    finally:
        restarted.close()
    assert after.runs == []
    assert (replay.status_code, replay.body) == (first.status_code, first.body)
    assert replay.headers["Location"] == first.headers["Location"]
    assert replay.headers["Idempotent-Replayed"] == "true"


def test_the_key_is_stored_only_as_its_hash(idem: Idempotency, place: Place):
    handle(idem, RunTool(), key="joe@example.com")
    with closing(place.connect()) as db:
        [(stored_key,)] = db.execute("SELECT key FROM idempotency").fetchall()
    assert "joe" not in stored_key and len(stored_key) == 64


# --- over HTTP, through the real app ----------------------------------------------------------

URL = f"/projects/{PROJECT}/tools"


def post(
    client: TestClient,
    sign: Callable[..., str],
    parameters: Any = NO_EVENT_ID,
    *,
    key: str | None = f'"{KEY}"',
    user: str = "user-1",
    query: str = "",
    headers: dict[str, str] | None = None,
) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {sign(user)}", **(headers or {})}
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post(URL + query, json={"tool": TOOL, "parameters": parameters}, headers=headers)


def sent_event_ids(graph: FakeGraph) -> list[str]:
    return [event["event_id"] for body in graph.bodies() for event in body["data"]]


def test_http_replay_422_and_a_bad_key(client: TestClient, graph: FakeGraph, sign):
    first = post(client, sign)
    again = post(client, sign)
    assert first.status_code == again.status_code == 200
    assert again.content == first.content
    assert again.headers["content-type"] == first.headers["content-type"]
    assert again.headers["idempotent-replayed"] == "true"
    assert len(graph.received) == 1

    reused = post(client, sign, funnel_parameters(eventId=None, value=1))
    assert (reused.status_code, reused.json()["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    assert reused.json()["message"]

    bad = post(client, sign, key='"two words"')
    assert (bad.status_code, bad.json()["code"]) == (400, "INVALID_REQUEST")
    assert "Idempotency-Key" in bad.json()["message"]
    assert len(graph.received) == 1  # neither was sent


def test_http_a_retry_after_a_5xx_sends_the_same_event_id(client: TestClient, graph, sign):
    graph.script.append(graph_error(400, 190))  # Meta refuses the token: 502, not kept
    failed = post(client, sign)
    assert (failed.status_code, failed.json()["code"]) == (502, "UPSTREAM_AUTH")

    retried = post(client, sign)  # the token was fixed meanwhile
    assert retried.status_code == 200
    assert "idempotent-replayed" not in retried.headers  # the 502 was not kept: it ran again
    first, second = sent_event_ids(graph)
    assert first == second  # one event, deduplicated by Meta on event_id
    assert post(client, sign, key=None).status_code == 200  # without a key: a new event
    assert len(set(sent_event_ids(graph))) == 2


def test_http_queued_202_is_replayed_with_its_headers_and_one_event(
    backend, make_client, sign, tmp_path: Path, rsa_key
):  # `backend` first: its database is dropped after the app stops
    config = make_config(tmp_path, rsa_key, delivery_mode="queued", database_url=backend,
                         facebook_access_token="EAAB-project-token")  # fmt: skip
    client = make_client(config)
    headers = {"Prefer": "respond-async"}
    first = post(client, sign, headers=headers)
    again = post(client, sign, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.content == first.content
    for name in ("location", "preference-applied"):
        assert again.headers[name] == first.headers[name]
    assert again.headers["idempotent-replayed"] == "true"
    with closing(Place(config.storage.database_path, backend).connect()) as db:
        [(events,)] = db.execute("SELECT count(*) FROM outbox").fetchall()
    assert events == 1


def test_http_dry_run_shows_the_event_id_the_call_will_send(client: TestClient, graph, sign):
    dry = post(client, sign, query="?dry_run=true")
    [shown] = [event["event_id"] for event in dry.json()["request"]["body"]["data"]]
    assert post(client, sign).status_code == 200
    assert sent_event_ids(graph) == [shown]
    assert post(client, sign, query="?dry_run=true").json() == dry.json()  # nothing kept


def test_http_409_while_the_first_call_waits_for_meta(client: TestClient, graph, sign):
    graph.script.append(Step(delay=1.0))
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, client, sign)
        deadline = time.monotonic() + 5
        while not graph.received and time.monotonic() < deadline:
            time.sleep(0.01)
        during = post(client, sign)
        answer = first.result(timeout=10)
    assert (during.status_code, during.json()["code"]) == (409, "IDEMPOTENCY_IN_PROGRESS")
    assert during.json()["retryable"] is True and during.headers["retry-after"] == "1"
    assert answer.status_code == 200
    assert post(client, sign).content == answer.content
    assert len(graph.received) == 1


def test_http_the_answer_holds_across_restarts_and_instances(
    backend, make_client, graph: FakeGraph, sign, tmp_path: Path, rsa_key
):  # `backend` first: its database is dropped after the apps stop
    config = make_config(tmp_path, rsa_key, database_url=backend,
                         facebook_access_token="EAAB-project-token")  # fmt: skip
    first = post(make_client(config), sign)
    replay = post(make_client(config), sign)  # a new app (or another instance) on the same state
    assert (replay.status_code, replay.content) == (first.status_code, first.content)
    assert replay.headers["idempotent-replayed"] == "true"
    assert len(graph.received) == 1


def test_http_another_users_same_key_is_theirs(client: TestClient, graph: FakeGraph, sign):
    post(client, sign)
    other = post(client, sign, funnel_parameters(eventId=None, value=3), user="user-2")
    assert other.status_code == 200 and "idempotent-replayed" not in other.headers
    assert len(graph.received) == 2


# --- across instances: the running mark is in the database ---------------------------------


def test_a_key_running_on_one_instance_is_409_on_another_then_replayed(place: Place, clock: Clock):
    first, second = open_outbox(place, clock), open_outbox(place, clock)
    a, b = Idempotency(first, clock=clock), Idempotency(second, clock=clock)
    tool = RunTool()

    async def scenario() -> tuple[Response, FunnelgateError, Response]:
        tool.gate = asyncio.Event()
        running = asyncio.create_task(start(a, tool))  # instance A waits on Meta
        while not tool.runs:
            await asyncio.sleep(0.01)
        with pytest.raises(IdempotencyInProgress) as meanwhile:
            await start(b, tool)  # instance B: no memory of A's call, the database has it
        tool.gate.set()
        answer = await running
        return answer, meanwhile.value, await start(b, tool)

    try:
        answer, meanwhile, replayed = asyncio.run(scenario())
    finally:
        first.close()
        second.close()
    assert meanwhile.status == 409 and len(tool.runs) == 1
    assert (replayed.status_code, replayed.body) == (answer.status_code, answer.body)
    assert replayed.headers["Idempotent-Replayed"] == "true"


def test_a_call_with_nothing_to_keep_frees_its_key_for_a_retry_anywhere(place: Place, clock: Clock):
    first, second = open_outbox(place, clock), open_outbox(place, clock)
    failing = RunTool(error=UpstreamUnavailable("Meta is unavailable.", {}, event_ids=[]))
    try:
        with pytest.raises(UpstreamUnavailable):
            handle(Idempotency(first, clock=clock), failing)
        assert rows(place) == 0  # no running mark left behind
        retried = handle(Idempotency(second, clock=clock), RunTool())
    finally:
        first.close()
        second.close()
    assert retried.status_code == 202 and "Idempotent-Replayed" not in retried.headers


def test_a_running_mark_left_by_a_dead_instance_is_taken_over_once_stale(
    place: Place, clock: Clock
):
    outbox = open_outbox(place, clock)
    try:
        with closing(place.connect()) as db:  # what an instance that died mid-call leaves
            db.execute("BEGIN")
            key = hashlib.sha256(KEY.encode()).hexdigest()  # as the server stores it
            claim(db, PROJECT, "user-1", key, fingerprint(TOOL, NO_EVENT_ID, None), now=clock.now)
            db.execute("COMMIT")
        idem = Idempotency(outbox, clock=clock)
        assert isinstance(refused(idem, RunTool()), IdempotencyInProgress)
        clock.now += RUNNING_SECONDS + 1
        assert handle(idem, RunTool()).status_code == 202  # runs again: the same event ids
    finally:
        outbox.close()
