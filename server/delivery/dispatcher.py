"""The dispatcher: delivers what the outbox holds, inside `funnelgate serve`.

It claims due events under a lease (outbox.py), opens the token of the credential each one was
accepted for at send time, groups them by project, pixel, credential, app secret and test code
into Graph requests of up to 1,000 events, and settles each by Meta's verdict (policy.py):

- delivered: done, with Meta's fbtrace_id;
- refused whole (400; one bad event fails the request): bisected until each bad event stands
  alone, so the good ones are delivered and each bad one fails with Meta's own error;
- credential refused (code 190 and friends): the credential is marked invalid and its events
  held, not failed, until `funnelgate credentials set` replaces its token (or a restart, for
  the project's token from the config file);
- transient (5xx, timeouts, throttling): due again after a capped exponential backoff with
  jitter, and never sooner than its (token, pixel) breaker allows (throttle.py), until Meta's
  age limit for the event, then failed with EVENT_EXPIRED.

At most `[delivery] max_concurrent_requests` requests are in flight, whatever the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson

from server.config import Config, Project
from server.delivery.graph import (
    MAX_EVENTS_PER_REQUEST,
    Attempt,
    GraphClient,
    final_error,
    log_attempt,
    signed_body_of,
)
from server.delivery.policy import Verdict
from server.delivery.timeouts import AttemptTimeouts
from server.errors import StorageUnavailable
from server.logs import log
from server.storage import breakers, credentials, idempotency, minutes, outbox
from server.storage.credentials import Credentials
from server.storage.outbox import CREDENTIAL_REMOVED, Claimed, Outbox
from server.storage.writer import PRUNE_BATCH

CLAIM_LIMIT = 5 * MAX_EVENTS_PER_REQUEST
# A claim is renewed every RENEW_SECONDS while its events are being sent; a crash leaves them
# due again within LEASE_SECONDS.
LEASE_SECONDS = 20.0
RENEW_SECONDS = 5.0
# Due events wait this long before a claim, unless a backlog is being worked off, so that the
# events of many calls gather into full requests (at 5,000 events/s, 1,000 per request), at a
# cost of this much latency on a quiet server.
LINGER_SECONDS = 0.2
POLL_SECONDS = 1.0  # replays from the CLI and ended leases are seen at least this often
RETRY_BASE_SECONDS, RETRY_CAP_SECONDS = 1.0, 900.0
PRUNE_EVERY_SECONDS = 3600.0
# The queue bound's count from the table: other processes (the CLI's replays, other workers
# and instances, which deliver what this one accepted) change it.
RECOUNT_EVERY_SECONDS = 5.0
USES_EVERY_SECONDS = 60.0
UNREADABLE = "\x00unreadable"  # _token's answer for a token no key opens (never a token)
UNREADABLE_RETRY_SECONDS = 60.0

_EXPIRED = "The event became older than Meta accepts (7 days; 62 for physical_store) first."
_NO_CREDENTIAL = "Integration not enabled for user."  # ActionKit's words (server/errors.py)
# (project, pixel, credential id, access token, app secret, test event code): one request's
# worth. The credential id is None for the project's token.
GroupKey = tuple[str, str, str | None, str, str | None, str | None]


def retry_delay(attempts: int, rand: Callable[[], float] = random.random) -> float:
    """Exponential backoff with jitter ("equal jitter": never less than half the step)."""
    step = min(RETRY_CAP_SECONDS, RETRY_BASE_SECONDS * 2.0 ** (attempts - 1))
    return step / 2 + rand() * step / 2


def row_error(result: Attempt) -> dict[str, Any]:
    """What a failed or retrying row records: Meta's error, never the request."""
    exc = final_error(result, 1, [])
    upstream = {k: v for k, v in exc.upstream.items() if k != "attempts"}
    return {"code": exc.code, "message": exc.message, "upstream": upstream}


class Dispatcher:
    def __init__(
        self,
        queue: Outbox,
        graph: GraphClient,
        store: Credentials,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._queue = queue
        self._graph = graph
        self._credentials = store
        self._config = config
        self._clock = clock
        self._rand = rand
        # Its own clock, and a patient one: a batch of up to 1,000 events takes longer at Meta
        # than one event, a cut batch is up to 1,000 copies, and no caller is waiting.
        self._timeouts = AttemptTimeouts(config.graph.timeout_seconds * 5)
        self._limit = config.delivery.max_concurrent_requests
        self._slots = asyncio.Semaphore(self._limit)
        self._in_flight: set[int] = set()  # seqs being sent: a re-claim must not send twice
        self._tasks: dict[asyncio.Task[None], list[int]] = {}  # sends, with their seqs
        self._freed = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._backlog = False
        self._main: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._main = asyncio.create_task(self._run())
        self._renewer = asyncio.create_task(self._renew())

    @property
    def running(self) -> bool:
        """Whether its loop runs: it ends on stop(), or on a failure the loop could not
        catch (its task cancelled, a BaseException)."""
        return self._main is not None and not self._main.done()

    def wake(self) -> None:
        """New events are due: the loop claims them now instead of at its next poll."""
        self._wakeup.set()

    async def stop(self, timeout: float) -> None:
        """Stops claiming; sends in flight get `timeout` seconds to finish, the rest are
        cancelled and their events released (due now) for the next start."""
        self._stopping = True
        self._wakeup.set()
        self._freed.set()
        if self._main is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        with contextlib.suppress(Exception):  # a last use is worth a try, not a failed stop
            await self.write_uses()
        if not self._tasks:
            await self._stop_renewing()
            return
        _, late = await asyncio.wait(set(self._tasks), timeout=timeout)
        unfinished = [seq for task in late for seq in self._tasks.get(task, ())]
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        await self._stop_renewing()
        if unfinished:
            now = self._clock()
            due = [(seq, now) for seq in unfinished]
            await self._queue.write(
                lambda db: outbox.reschedule(db, due, now=now, error=None, attempted=False)
            )
            log("dispatcher_released", events=len(due))

    async def _stop_renewing(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)

    async def _renew(self) -> None:
        """Extends the leases of the events being sent (claimed and waiting for a slot, or in
        a request), so a long send keeps its claim and a dead process's claims end soon."""
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            if not self._in_flight:
                continue
            until = self._clock() + LEASE_SECONDS
            seqs = list(self._in_flight)
            try:
                await self._queue.write(partial(outbox.renew, seqs=seqs, lease_until=until))
            except Exception as exc:  # the next round tries again; the lease has 20 s
                log("lease_renewal_failed", logging.ERROR, error=type(exc).__name__)

    async def _run(self) -> None:
        now = self._clock()
        try:
            # A restart may bring a new project token: its held events get another try.
            resumed = await self._queue.write(
                lambda db: outbox.release_held(db, now=now, project_token=True)
            )
            if resumed:
                log("held_events_resumed", events=resumed)
            await self._prune(now)
        except Exception as exc:  # the loop below still delivers; the next prune retries
            log("dispatcher_error", logging.ERROR, error=type(exc).__name__)
        last_prune = last_count = last_uses = time.monotonic()
        while not self._stopping:
            try:
                if time.monotonic() - last_prune >= PRUNE_EVERY_SECONDS:
                    await self._prune(self._clock())
                    last_prune = time.monotonic()
                if time.monotonic() - last_count >= RECOUNT_EVERY_SECONDS:
                    await self._queue.recount()
                    last_count = time.monotonic()
                if time.monotonic() - last_uses >= USES_EVERY_SECONDS:
                    await self.write_uses()
                    last_uses = time.monotonic()
                await self._cycle()
            except Exception as exc:  # the disk or a bug: keep the loop, say so, slow down
                log("dispatcher_error", logging.ERROR, error=type(exc).__name__)
                await self._pause(POLL_SECONDS)

    async def write_uses(self) -> None:
        """The credentials' last uses since the previous write (one write a minute, not one
        per call)."""
        uses = self._credentials.taken_uses()
        if uses:
            await self._queue.write(lambda db: credentials.write_uses(db, uses))

    async def _cycle(self) -> None:
        while len(self._tasks) >= self._limit and not self._stopping:
            self._freed.clear()
            await self._freed.wait()
        if self._stopping:
            return
        now = self._clock()
        due = await self._queue.read(outbox.next_due)
        if due is None or due > now:
            await self._pause(POLL_SECONDS if due is None else min(POLL_SECONDS, due - now))
            return
        if not self._backlog:
            # Let the events of many calls gather into full requests; wake-ups need no
            # answer meanwhile, the claim is coming.
            await asyncio.sleep(LINGER_SECONDS)
            now = self._clock()
        lease_until = now + LEASE_SECONDS
        claimed = await self._queue.write(
            lambda db: outbox.claim(db, now=now, lease_until=lease_until, limit=CLAIM_LIMIT)
        )
        self._backlog = len(claimed) == CLAIM_LIMIT  # more are due: no lingering next time
        fresh = [row for row in claimed if row.seq not in self._in_flight]
        if fresh:
            await self._dispatch(fresh, now)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wakeup.wait()
        self._wakeup.clear()

    async def _dispatch(self, rows: list[Claimed], now: float) -> None:
        groups: defaultdict[GroupKey, list[Claimed]] = defaultdict(list)
        tokens: dict[tuple[str, str | None], str | None] = {}
        expired: list[Claimed] = []
        orphaned: list[Claimed] = []
        uncredentialed: list[Claimed] = []  # for the project's token, which is gone
        removed: list[Claimed] = []  # for a credential that was removed
        unreadable: list[Claimed] = []  # a token no configured key opens: wait for the key
        for row in rows:
            project = self._config.projects.get(row.project_id)
            if row.expires_at <= now:
                expired.append(row)
            elif project is None:
                orphaned.append(row)
            else:
                which = (row.project_id, row.credential_id)
                if which not in tokens:
                    tokens[which] = await self._token(project, row.credential_id)
                token = tokens[which]
                if token is None:
                    (uncredentialed if row.credential_id is None else removed).append(row)
                    continue
                if token == UNREADABLE:
                    unreadable.append(row)
                    continue
                key = (row.project_id, row.pixel_id, row.credential_id, token,
                       project.facebook_app_secret, row.test_event_code)  # fmt: skip
                groups[key].append(row)
        await self._fail(expired, now, "EVENT_EXPIRED", _EXPIRED)
        await self._fail(orphaned, now, "UNKNOWN_PROJECT", "Its project is no longer configured.")
        await self._fail(uncredentialed, now, "INTEGRATION_NOT_ENABLED", _NO_CREDENTIAL)
        await self._fail(removed, now, CREDENTIAL_REMOVED["code"], CREDENTIAL_REMOVED["message"])
        if unreadable:
            later = now + UNREADABLE_RETRY_SECONDS
            await self._reschedule(unreadable, lambda _row: later, attempted=False, error=None)
        for key, group in groups.items():
            for start in range(0, len(group), MAX_EVENTS_PER_REQUEST):
                self._spawn(key, group[start : start + MAX_EVENTS_PER_REQUEST])

    async def _token(self, project: Project, credential_id: str | None) -> str | None:
        """The credential's token now; None when it is gone, UNREADABLE when no configured
        key opens it (a key file changed: its events wait for the key, they are not lost)."""
        try:
            return await self._credentials.token_of(project, credential_id)
        except StorageUnavailable:
            raise  # not the key's fault: the cycle fails, and the lease makes the rows due again
        except Exception as exc:
            log("credential_unreadable", logging.ERROR, project=project.id,
                error=type(exc).__name__)  # fmt: skip
            return UNREADABLE

    async def _fail(
        self,
        rows: list[Claimed],
        now: float,
        code: str,
        message: str,
        last: dict[str, Any] | None = None,
    ) -> None:
        if not rows:
            return
        error: dict[str, Any] = {"code": code, "message": message}
        if last and "upstream" in last:
            error["upstream"] = last["upstream"]
        seqs = [row.seq for row in rows]
        done = await self._queue.write(
            lambda db: outbox.mark_failed(db, seqs, now=now, error=error, attempted=False)
        )
        self._queue.finished(done)
        self._failed(rows, code)
        log("events_failed", code=code, events=len(seqs))

    def _failed(self, rows: list[Claimed], code: str) -> None:
        """Tells the observers, per pixel."""
        by_pixel: defaultdict[tuple[str, str], list[str]] = defaultdict(list)
        for row in rows:
            by_pixel[(row.project_id, row.pixel_id)].append(row.event_name)
        for (project_id, pixel_id), names in by_pixel.items():
            self._graph.observers.failed(project_id, pixel_id, names, code)

    def _spawn(self, key: GroupKey, rows: list[Claimed]) -> None:
        seqs = [row.seq for row in rows]
        self._in_flight.update(seqs)
        task = asyncio.create_task(self._send(key, rows))
        self._tasks[task] = seqs

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.pop(task, None)
            self._in_flight.difference_update(seqs)
            self._freed.set()
            if not task.cancelled() and task.exception() is not None:
                log("dispatch_failed", logging.ERROR, project=key[0],
                    error=type(task.exception()).__name__)  # fmt: skip

        task.add_done_callback(done)

    async def _send(self, key: GroupKey, rows: list[Claimed]) -> None:
        async with self._slots:
            await self._deliver(key, rows)

    async def _deliver(self, key: GroupKey, rows: list[Claimed]) -> None:
        project_id, pixel_id, credential_id, token, app_secret, test_code = key
        breaker = (token, pixel_id)
        if not self._graph.breakers.allow(breaker):
            until = self._graph.breakers.open_until(breaker) or self._clock() + POLL_SECONDS
            await self._reschedule(rows, lambda _row: until, attempted=False, error=None)
            return
        data = b"[" + b",".join(row.data for row in rows) + b"]"
        content = orjson.dumps(signed_body_of(data, test_code, token, app_secret))
        try:
            result = await self._graph.attempt(self._graph.url(pixel_id), content, self._timeouts)
        except BaseException:
            self._graph.breakers.abandoned(breaker)
            raise
        log_attempt(result, project_id, pixel_id, len(rows), max(r.attempts for r in rows) + 1,
                    queued=True)  # fmt: skip
        self._graph.judge(breaker, result)
        now = self._clock()
        seqs = [row.seq for row in rows]
        if result.verdict is Verdict.DELIVERED:
            trace = (result.payload or {}).get("fbtrace_id")
            done = await self._queue.write(
                lambda db: outbox.mark_delivered(db, seqs, now=now, fbtrace_id=trace)
            )
            self._queue.finished(done)
            self._graph.observers.delivered(project_id, pixel_id, [r.event_name for r in rows])
        elif result.verdict is Verdict.REJECTED and len(rows) > 1:
            # Meta refuses a request whole for one bad event: halve until it stands alone.
            half = len(rows) // 2
            await self._deliver(key, rows[:half])
            await self._deliver(key, rows[half:])
        elif result.verdict is Verdict.REJECTED:
            error = row_error(result)
            done = await self._queue.write(
                lambda db: outbox.mark_failed(db, seqs, now=now, error=error)
            )
            self._queue.finished(done)
            self._failed(rows, str(error["code"]))
        elif result.verdict is Verdict.AUTH:
            project = self._config.projects.get(project_id)
            if project is not None and await self._token(project, credential_id) != token:
                # The token was replaced while this request was out: not held on the old
                # token's refusal, the events go again at once with the new one.
                await self._reschedule(rows, lambda _row: now, attempted=True, error=None)
                return
            error = row_error(result)

            def hold(db: sqlite3.Connection) -> None:
                outbox.mark_held(db, seqs, now=now, error=error)
                if credential_id is not None:
                    credentials.mark_invalid(db, project_id, credential_id, error)

            await self._queue.write(hold)
            log("events_held", project=project_id, pixel=pixel_id, events=len(seqs))
        else:
            until = self._graph.breakers.open_until(breaker)
            await self._reschedule(
                rows,
                lambda row: max(until, now + retry_delay(row.attempts + 1, self._rand)),
                attempted=True,
                error=row_error(result),
            )

    async def _reschedule(
        self,
        rows: list[Claimed],
        due_at: Callable[[Claimed], float],
        *,
        attempted: bool,
        error: dict[str, Any] | None,
    ) -> None:
        """Due again at `due_at(row)`; a row Meta would refuse by then fails instead."""
        now = self._clock()
        due: list[tuple[int, float]] = []
        expired: list[Claimed] = []
        for row in rows:
            at = due_at(row)
            if at >= row.expires_at:
                expired.append(row)
            else:
                due.append((row.seq, at))
        if due:
            await self._queue.write(
                lambda db: outbox.reschedule(db, due, now=now, error=error, attempted=attempted)
            )
            if attempted:
                waiting = Counter((r.project_id, r.pixel_id) for r in rows if r not in expired)
                for (project_id, pixel_id), count in waiting.items():
                    self._graph.observers.retried(project_id, pixel_id, count)
        await self._fail(expired, now, "EVENT_EXPIRED", _EXPIRED, error)

    async def _prune(self, now: float) -> None:
        """Finished events past the retention, and idempotency keys past their 24 h."""
        days = self._config.storage.retention_days
        events = await self._prune_all(outbox.prune, now - days * 86400)
        await self._prune_all(idempotency.prune, now - idempotency.KEY_TTL_SECONDS)
        await self._prune_all(minutes.prune, now - days * 86400)
        await self._queue.write(partial(breakers.prune, before=now - breakers.KEEP_SECONDS))
        if events:
            log("events_pruned", events=events)

    async def _prune_all(self, prune: Callable[..., int], before: float) -> int:
        total = 0
        while not self._stopping:
            count = await self._queue.write(partial(prune, before=before))
            total += count
            if count < PRUNE_BATCH:
                break
        return total
