"""The console's pages: HTML rendered on the server (Jinja2), no script.

| Route                                 | Page                          | Template       |
|---------------------------------------|-------------------------------|----------------|
| GET  /console                         | Overview                      | overview.html  |
| GET  /console/login, POST             | the login form; a session     | login.html     |
| POST /console/logout                  | ends the session              |                |
| GET  /console/pixels/{project}/{pixel}| Pixel: coverage, failures     | pixel.html     |
| GET  /console/failed                  | Failed events, filtered       | failed.html    |
| GET  /console/events/{seq}            | one event, as Meta receives it| event.html     |
| POST /console/replay                  | replays the chosen events     |                |
| GET  /console/replay?seq=...          | what became of them           | replay.html    |
| GET  /console/lookup?event_id=...     | Event lookup                  | lookup.html    |
| GET  /console/static/console.css      | the stylesheet                |                |

Every page but the login form wants a session (else a GET goes to the login form and a POST is
refused with 403); every POST checks the session's CSRF token and the Origin (auth.py). A bad
value is a 400 page naming the field; an unknown project, pixel or event a 404 page.
Numbers come from the per-minute counters (storage/minutes.py), rows from the outbox
(queries.py); customer data never reaches a page but as SHA-256 digests (redact.py).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
import orjson
from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from server.config import Config
from server.console import charts, queries
from server.console.auth import (
    COOKIE,
    PATH,
    LoginThrottle,
    Revocations,
    Session,
    Sessions,
    TokenSource,
    client_of,
    csrf_matches,
    revoked_path,
    same_origin,
    token_path,
)
from server.console.inputs import (
    CODE,
    EVENT_ID,
    PIXEL,
    PROJECT,
    SEQ,
    BadInput,
    Values,
    choice,
    next_path,
    number,
    query,
    read_form,
    seqs,
    text,
)
from server.console.readings import percent, readings
from server.console.redact import shown_event
from server.delivery.throttle import Breakers
from server.durations import human_age
from server.logs import log
from server.storage import minutes, outbox
from server.storage.database import ERRORS
from server.storage.minutes import Coverage
from server.storage.outbox import EventStatus

HERE = Path(__file__).parent
MAX_LIST = 200  # rows a list shows, and events one replay takes
RECENT_FAILURES = 20
LOOKUP_LIMIT = 50
# A pixel page's windows: (seconds, a chart bucket's seconds).
WINDOWS = {"1h": (3600, 60), "24h": (86400, 900), "7d": (7 * 86400, 3 * 3600)}
DAY_STEP = 900  # the overview's 24-hour charts: a bar per 15 minutes
COVERAGE_LINES = ("em", "ph", "external_id", "fbc", "fbp", "ip_ua")
# The console is for people with a browser; its answers are never cached, framed or sniffed,
# and may load nothing but its own stylesheet (MDN, Content-Security-Policy).
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
Handler = Callable[[Request, Session, Values], Awaitable[Response]]


def served(config: Config) -> bool:
    """Whether the console is on: enabled, with a token in the config or beside the database
    at start-up (a token made later is read then; turning the console on takes a restart)."""
    console = config.console
    return console.enabled and (
        console.token_sha256 is not None or token_path(config.storage).exists()
    )


@dataclass(frozen=True)
class Throttled:
    pixel_id: str
    seconds: float  # until a request may probe again
    failures: int


def throttled(breakers: Breakers) -> list[Throttled]:
    """Pixels whose breaker is open now, one line each (the longest wait, when several
    tokens send to one pixel)."""
    found: dict[str, Throttled] = {}
    for pixel_id, seconds, failures in breakers.open_pixels():
        if pixel_id not in found or seconds > found[pixel_id].seconds:
            found[pixel_id] = Throttled(pixel_id, seconds, failures)
    return sorted(found.values(), key=lambda line: line.pixel_id)


class Console:
    """The pages, and what they share: the token, the sessions, the login bound, a reader.
    `state` is the app's: the lifespan puts the outbox, the breakers and the Graph latencies
    there."""

    def __init__(self, config: Config, state: State, *, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.state = state
        self.tokens = TokenSource(config.console, token_path(config.storage))
        self.sessions = Sessions(
            config.console.session_hours * 3600,
            clock,
            Revocations(revoked_path(config.storage), clock),
            secret=config.storage.secret_keys[0].material if config.storage.secret_keys else b"",
        )
        self.throttle = LoginThrottle()
        self.read = queries.Reader(lambda: state.outbox.database)
        self.templates = Jinja2Templates(env=_environment())

    def routes(self) -> list[BaseRoute]:
        """`/console` itself, then the rest mounted (with its own HTML 404 and 405)."""
        inner = Starlette(
            routes=[
                Route("/login", self.console_login_form, methods=["GET"]),
                Route("/login", self.console_login, methods=["POST"]),
                Route("/logout", self._page(self.logout, post=True), methods=["POST"]),
                Route("/pixels/{project_id}/{pixel_id}", self._page(self.pixel), methods=["GET"]),
                Route("/failed", self._page(self.failed), methods=["GET"]),
                Route("/events/{seq}", self._page(self.event), methods=["GET"]),
                Route("/replay", self._page(self.replay, post=True), methods=["POST"]),
                Route("/replay", self._page(self.replayed), methods=["GET"]),
                Route("/lookup", self._page(self.lookup), methods=["GET"]),
                Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
            ],
            exception_handlers={HTTPException: self._http_error},
        )
        return [Route(PATH, self._page(self.overview), methods=["GET"]), Mount(PATH, app=inner)]

    # --- what every page does ---------------------------------------------------------------

    def _page(self, handler: Handler, *, post: bool = False) -> Callable[[Request], Any]:
        """`handler` behind the session check (and, for a POST, the CSRF check), its bad
        input answered with an error page."""

        async def endpoint(request: Request) -> Response:
            session = self._session(request)
            if session is None:
                if post:
                    return self._error(request, 403, "Log in first: nothing was done.")
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return _secured(
                    RedirectResponse(f"{PATH}/login?next={quote(target, safe='')}", 303)
                )
            try:
                if post:
                    values = await read_form(request)
                    if not self._form_trusted(request, session, values):
                        log("console_csrf_refused", logging.WARNING)
                        return self._error(
                            request, 403, "This form has expired or came from elsewhere: "
                            "nothing was done. Open the page again and retry.", session,
                        )  # fmt: skip
                else:
                    values = query(request)
                return _secured(await handler(request, session, values))
            except BadInput as exc:
                return self._error(request, exc.status, exc.message, session)
            except ERRORS as exc:
                log("console_storage_error", logging.ERROR, error=type(exc).__name__)
                return self._error(request, 503, "The database did not answer: try again.", session)

        endpoint.__name__ = f"console_{handler.__name__}"  # what the request log names
        return endpoint

    def _session(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(COOKIE), self.tokens.current())

    def _form_trusted(self, request: Request, session: Session, values: Values) -> bool:
        submitted = values.get("csrf", ())
        return (
            len(submitted) == 1
            and csrf_matches(session, submitted[0])
            and same_origin(request, self.config.console.origin)
        )

    def render(
        self,
        request: Request,
        template: str,
        context: dict[str, Any],
        session: Session | None,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> Response:
        context = {
            "session": session,
            "csrf": session.csrf if session else "",
            "projects": list(self.config.projects),
            **context,
        }
        response = self.templates.TemplateResponse(
            request, template, context, status_code=status, headers=headers
        )
        return _secured(response)

    def _error(
        self,
        request: Request,
        status: int,
        message: str,
        session: Session | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        return self.render(
            request, "error.html", {"status": status, "message": message}, session,
            status=status, headers=headers,
        )  # fmt: skip

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        """Routing misses under /console, as pages."""
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            allow = dict(exc.headers) if exc.headers else None
            return self._error(request, 405, "Not here with that method.", headers=allow)
        return self._error(request, 404, "No such page.")

    # --- login ------------------------------------------------------------------------------

    async def console_login_form(self, request: Request) -> Response:
        """(Named as the request log shows it, like every console endpoint.)"""
        try:
            target = next_path(text(query(request), "next", EVENT_ID))
        except BadInput:
            target = next_path(None)  # a login goes on to the overview then
        session = self._session(request)
        if session is not None:
            return _secured(RedirectResponse(target, 303))
        return self._login_page(request, target)

    def _login_page(
        self, request: Request, target: str, *, message: str = "", status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> Response:  # fmt: skip
        context = {"next": target, "message": message, "ready": self.tokens.current() is not None}
        return self.render(request, "login.html", context, None, status=status, headers=headers)

    async def console_login(self, request: Request) -> Response:
        try:
            values = await read_form(request)
            target = next_path(text(values, "next", EVENT_ID))
        except BadInput as exc:
            return self._error(request, exc.status, exc.message)
        if not same_origin(request, self.config.console.origin):
            return self._error(request, 403, "This form came from elsewhere: nothing was done.")
        client = client_of(request)
        wait = self.throttle.retry_after(client)
        if wait > 0:
            log("console_login", logging.WARNING, outcome="throttled")
            seconds = str(max(1, round(wait)))
            return self._login_page(
                request, target, status=429, headers={"Retry-After": seconds},
                message=f"Too many failed logins: try again in {seconds} seconds.",
            )  # fmt: skip
        given = values.get("token", [""])
        token = self.tokens.matches(given[0].strip() if len(given) == 1 else "")
        if token is None:
            self.throttle.failed(client)
            log("console_login", logging.WARNING, outcome="refused")
            return self._login_page(
                request, target, status=401, message="That is not the console's token."
            )
        self.throttle.succeeded(client)
        cookie, _ = self.sessions.create(token)
        log("console_login", outcome="ok")
        response = _secured(RedirectResponse(target, 303))
        response.set_cookie(
            COOKIE, cookie, max_age=int(self.sessions.lifetime), path=PATH,
            secure=request.url.scheme == "https", httponly=True, samesite="strict",
        )  # fmt: skip
        return response

    async def logout(self, request: Request, session: Session, values: Values) -> Response:
        try:
            await asyncio.to_thread(self.sessions.end, session)  # a file write: off the loop
        except OSError as exc:  # the cookie is still cleared; a copy of it lives to its expiry
            log(
                "console_logout_unrecorded", logging.ERROR, error=exc.strerror or type(exc).__name__
            )
        response = RedirectResponse(f"{PATH}/login", 303)
        response.delete_cookie(
            COOKIE, path=PATH, secure=request.url.scheme == "https", httponly=True,
            samesite="strict",
        )  # fmt: skip
        return response

    # --- Overview ---------------------------------------------------------------------------

    async def overview(self, request: Request, session: Session, values: Values) -> Response:
        now = self.clock()
        until = int(now) // 60 * 60 + 60  # the current minute included
        hour = until - 3600
        day = -(-(until - 86400) // DAY_STEP) * DAY_STEP  # 96 whole buckets, the last one now

        def job(db: Any) -> tuple[Any, ...]:
            return (
                minutes.series(db, day, until),
                minutes.pixels(db, day),
                minutes.failure_codes(db, day),
                outbox.oldest_pending(db),
            )

        day_series, pixels, codes, oldest = await self.read(job)
        hour_series = [row for row in day_series if row.minute >= hour]
        charts_hour, charts_day = [], []
        for name in ("accepted", "delivered", "failed"):
            points = [(row.minute, float(getattr(row, name))) for row in day_series]
            label = name.capitalize()
            hourly = f"{label} per minute, last hour"
            charts_hour.append(charts.bars(points, name=f"{name}-hour", label=hourly,
                                           since=hour, until=until, step=60))  # fmt: skip
            daily = f"{label} per 15 minutes, last 24 hours"
            charts_day.append(charts.bars(points, name=f"{name}-day", label=daily,
                                          since=day, until=until, step=DAY_STEP))  # fmt: skip
        totals = {
            name: sum(getattr(row, name) for row in hour_series)
            for name in ("accepted", "delivered", "failed", "retried")
        }
        queue: Any = getattr(self.state, "outbox", None)
        latency: Any = getattr(self.state, "graph_latency", None)
        p50, p99 = latency.quantiles() if latency is not None else (None, None)
        breakers: Any = getattr(self.state, "breakers", None)
        context = {
            "totals": totals,
            "charts_hour": charts_hour,
            "charts_day": charts_day,
            "pending": queue.pending if queue is not None else None,
            "oldest_age": None if oldest is None else max(0.0, now - oldest),
            "p50": p50,
            "p99": p99,
            "throttled": throttled(breakers) if breakers is not None else [],
            "pixels": pixels,
            "codes": codes,
        }
        return self.render(request, "overview.html", context, session)

    # --- Pixel ------------------------------------------------------------------------------

    async def pixel(self, request: Request, session: Session, values: Values) -> Response:
        project_id, pixel_id = self._pixel_of(request)
        window = choice(values, "window", tuple(WINDOWS), "24h")
        seconds, step = WINDOWS[window]
        until = int(self.clock()) // 60 * 60 + 60
        since = until - seconds

        def job(db: Any) -> tuple[Any, ...]:
            return (
                minutes.series(db, since, until, project_id, pixel_id),
                minutes.coverage(db, since, project_id, pixel_id),
                minutes.coverage_series(db, since, until, project_id, pixel_id),
                minutes.sources(db, since, project_id, pixel_id),
                minutes.failure_codes(db, since, project_id, pixel_id),
                queries.failed(db, project_id=project_id, pixel_id=pixel_id, limit=RECENT_FAILURES),
            )

        counts, coverage, over_time, sources, codes, failures = await self.read(job)
        websites = {name for name, source, _ in sources if source == "website"}
        totals = {
            name: sum(getattr(row, name) for row in counts)
            for name in ("accepted", "delivered", "failed", "retried")
        }
        chart = charts.lines(
            _coverage_lines(over_time, since=since, until=until, step=step),
            name="coverage", since=since, until=until, step=step,
            label=f"Share of accepted events carrying each key, per {step // 60} minutes",
        )  # fmt: skip
        context = {
            "project_id": project_id,
            "pixel_id": pixel_id,
            "window": window,
            "windows": list(WINDOWS),
            "totals": totals,
            "coverage": [_coverage_row(row) for row in coverage],
            "readings": readings(coverage, websites),
            "coverage_chart": chart,
            "coverage_keys": COVERAGE_LINES,
            "sources": sources,
            "codes": codes,
            "failures": [(row, queries.failure(row)) for row in failures],
        }
        return self.render(request, "pixel.html", context, session)

    def _pixel_of(self, request: Request) -> tuple[str, str]:
        project_id = request.path_params["project_id"]
        pixel_id = request.path_params["pixel_id"]
        if project_id not in self.config.projects or not PIXEL.fullmatch(pixel_id):
            raise BadInput("No such project or pixel.", 404)
        return project_id, pixel_id

    # --- Failed events, one event, replay ---------------------------------------------------

    async def failed(self, request: Request, session: Session, values: Values) -> Response:
        project_id = self._project(values)
        pixel_id = text(values, "pixel", PIXEL)
        code = text(values, "code", CODE)
        limit = number(values, "limit", low=1, high=MAX_LIST, default=50)
        rows = await self.read(
            lambda db: queries.failed(
                db, project_id=project_id, pixel_id=pixel_id, code=code, limit=limit
            )
        )
        context = {
            "rows": [(row, queries.failure(row)) for row in rows],
            "filters": {"project": project_id or "", "pixel": pixel_id or "", "code": code or ""},
            "limit": limit,
            "max_replay": MAX_LIST,
        }
        return self.render(request, "failed.html", context, session)

    def _project(self, values: Values) -> str | None:
        project_id = text(values, "project", PROJECT)
        if project_id is not None and project_id not in self.config.projects:
            raise BadInput("project is not one of the config's projects.")
        return project_id

    async def event(self, request: Request, session: Session, values: Values) -> Response:
        seq = request.path_params["seq"]
        found = None
        if SEQ.fullmatch(seq):
            found = await self.read(lambda db: queries.stored(db, int(seq)))
        if found is None:
            raise BadInput("No such event (it may have been pruned).", 404)
        shown = orjson.dumps(shown_event(found.event), option=orjson.OPT_INDENT_2).decode()
        context = {
            "row": found.status,
            "failure": queries.failure(found.status),
            "test_event_code": found.test_event_code,
            "shown": shown,
        }
        return self.render(request, "event.html", context, session)

    async def replay(self, request: Request, session: Session, values: Values) -> Response:
        chosen = seqs(values, "seq", most=MAX_LIST)
        if not chosen:
            raise BadInput("Choose at least one event to replay.")
        queue: Any = self.state.outbox
        now = self.clock()
        # By seq: the rows ticked, not every user's event with the same event_id.
        replayed: list[EventStatus] = await queue.write(
            lambda db: outbox.replay(db, now=now, seqs=chosen, limit=MAX_LIST)
        )
        if replayed:
            # The queue's bound counts them; the dispatcher finds them due within a second
            # (it polls for the CLI's replays too).
            await queue.recount()
        log("console_replay", events=len(replayed), chosen=len(chosen))
        done = [row.seq for row in replayed]
        skipped = [seq for seq in chosen if seq not in set(done)]
        target = f"{PATH}/replay?" + urlencode(
            [("seq", seq) for seq in done] + [("skipped", seq) for seq in skipped]
        )
        return RedirectResponse(target, 303)

    async def replayed(self, request: Request, session: Session, values: Values) -> Response:
        done = seqs(values, "seq", most=MAX_LIST)
        skipped = seqs(values, "skipped", most=MAX_LIST)
        rows = await self.read(lambda db: queries.by_seq(db, done + skipped))
        context = {
            "replayed": [(row, queries.failure(row)) for row in rows if row.seq in set(done)],
            "skipped": [(row, queries.failure(row)) for row in rows if row.seq in set(skipped)],
            "missing": len(done) + len(skipped) - len(rows),
            "query": request.url.query,
        }
        return self.render(request, "replay.html", context, session)

    # --- Event lookup -----------------------------------------------------------------------

    async def lookup(self, request: Request, session: Session, values: Values) -> Response:
        project_id = self._project(values)
        event_id = text(values, "event_id", EVENT_ID)
        rows: Sequence[EventStatus] = []
        if event_id is not None:
            projects = [project_id] if project_id else list(self.config.projects)
            rows = await self.read(
                lambda db: queries.lookup(db, projects, event_id, limit=LOOKUP_LIMIT)
            )
        context = {
            "event_id": event_id or "",
            "project": project_id or "",
            "rows": [(row, queries.failure(row)) for row in rows],
            "searched": event_id is not None,
            "limit": LOOKUP_LIMIT,
        }
        return self.render(request, "lookup.html", context, session)


def _secured(response: Response) -> Response:
    response.headers.update(HEADERS)
    return response


def _coverage_row(row: Coverage) -> dict[str, Any]:
    """A coverage row as the table shows it: the count, and each key's share."""
    shares = {
        key: percent(getattr(row, key) / row.total) if row.total else "-"
        for key in minutes.COVERAGE
    }
    return {"event_name": row.event_name, "total": row.total, "shares": shares}


def _coverage_lines(
    over_time: Sequence[tuple[int, Coverage]], *, since: int, until: int, step: int
) -> dict[str, list[tuple[int, float | None]]]:
    """Each key's share (percent) per bucket of `step` seconds; None for a bucket without
    accepted events."""
    start = since - since % step
    count = max(1, -(-(until - start) // step))
    totals = [0] * count
    sums = {key: [0] * count for key in COVERAGE_LINES}
    for minute, row in over_time:
        index = (minute - start) // step
        if 0 <= index < count:
            totals[index] += row.total
            for key in COVERAGE_LINES:
                sums[key][index] += getattr(row, key)
    return {
        key: [
            (start + i * step, 100 * sums[key][i] / totals[i] if totals[i] else None)
            for i in range(count)
        ]
        for key in COVERAGE_LINES
    }


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=_when, age=_age, ms=_ms, pct=percent)
    return env


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else human_age(seconds)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"
