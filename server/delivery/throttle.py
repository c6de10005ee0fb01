"""A shared breaker per (access token, pixel): when Meta throttles or fails, every sender of
those events (sync calls and the dispatcher) backs off together, so a throttled pixel gets at
most one probing request per interval however many events wait for it.

Meta throttles per app and per ad account and asks callers to slow down
(https://developers.facebook.com/docs/graph-api/overview/rate-limiting); its throttling codes
are in policy.py. A throttling answer opens the breaker at once; other transient failures
(5xx, timeouts) after THRESHOLD in a row, so one blip does not divert a pixel's calls.

Several instances on one database share their breakers (shared_backoff.py): an interval one
instance opens is published with its opener, the others hold the same key a little longer
(PROBE_GRACE_SECONDS), and the opener probes: a throttled pixel gets one probe per interval
from all the instances together. The opener's success closes it everywhere; its failure opens
the next interval everywhere; an opener gone quiet is followed by one probe per instance.

Bound (README, Delivery): while a breaker is open nothing is sent for its key; when the
interval ends one request probes, and the others wait for its outcome. Intervals start at
FAILING_SECONDS (THROTTLED_SECONDS when Meta said so), double on each failed probe up to the
cap, and carry up to 25 % jitter, never below the start.
"""

from __future__ import annotations

import functools
import hashlib
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

THRESHOLD = 3
FAILING_SECONDS, FAILING_CAP = 1.0, 60.0
THROTTLED_SECONDS, THROTTLED_CAP = 5.0, 300.0
# Meta's throttling codes (Graph API rate limiting; the Marketing API's 80000-80014).
THROTTLE_CODES = frozenset({4, 17, 32, 613, *range(80000, 80015)})

MAX_UNSHARED = 1000  # changes kept while the database is down (the newest)
Key = tuple[str, str]  # (access token, pixel id); never logged
# An opened or closed breaker as instances share it: (digest of the key, pixel, open until,
# failures); open until 0 means closed.
Change = tuple[str, str, float, int]
# A breaker open on the database: a Change and the instance that opened it (its prober).
Shared = tuple[str, str, float, int, str]
# Another instance's interval: this one waits this much longer, so the opener's probe and
# its outcome (shared within a second or two) come first; past it, the opener is taken for
# gone and this instance probes itself.
PROBE_GRACE_SECONDS = 3.0


@functools.lru_cache(maxsize=4096)
def digest(key: Key) -> str:
    """The key as it is stored and shared: a SHA-256, never the access token itself."""
    token, pixel_id = key
    return hashlib.sha256(f"{token}\0{pixel_id}".encode()).hexdigest()


@dataclass
class _State:
    pixel_id: str
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False
    shared: bool = False  # opened by another instance (merge), which probes it


class Breakers:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._clock = clock
        self._rand = rand
        self._states: dict[str, _State] = {}  # by digest(key)
        self._changes: list[Change] = []  # not yet shared with the other instances
        self.instance = secrets.token_hex(8)  # who opened a shared breaker

    def open_until(self, key: Key) -> float:
        """When `key` may be tried again; 0 when it may be tried now."""
        state = self._states.get(digest(key))
        if state is None or (state.open_until <= self._clock() and not state.probing):
            return 0.0
        return max(state.open_until, self._clock() + FAILING_SECONDS / 4)

    def allow(self, key: Key) -> bool:
        """Whether a request for `key` may go now. After an open interval the first caller
        gets True (the probe) and must report its outcome; the others get False until then."""
        state = self._states.get(digest(key))
        if state is None or state.open_until == 0.0:
            return True
        if state.probing or state.open_until > self._clock():
            return False
        state.probing = True
        return True

    def succeeded(self, key: Key) -> None:
        state = self._states.pop(digest(key), None)
        if state is not None and state.open_until:
            self._changes.append((digest(key), state.pixel_id, 0.0, 0))

    def failed(self, key: Key, *, throttled: bool) -> None:
        state = self._states.setdefault(digest(key), _State(key[1]))
        was_probe, state.probing = state.probing, False
        if state.open_until > self._clock() and not was_probe:
            return  # sent before the breaker opened: its failure is already counted
        state.failures += 1
        if not throttled and state.failures < THRESHOLD and state.open_until == 0.0:
            return
        start, cap = (
            (THROTTLED_SECONDS, THROTTLED_CAP) if throttled else (FAILING_SECONDS, FAILING_CAP)
        )
        doublings = max(0, state.failures - (1 if throttled else THRESHOLD))
        interval = min(cap, start * 2.0**doublings) * (1.0 + 0.25 * self._rand())
        state.open_until = self._clock() + interval
        state.shared = False  # opened here: this instance probes it
        self._changes.append((digest(key), key[1], state.open_until, state.failures))

    def taken_changes(self) -> list[Change]:
        """The breakers opened or closed here since the last call, to share."""
        changes, self._changes = self._changes, []
        return changes

    def requeue(self, changes: list[Change]) -> None:
        """Changes that could not be shared yet: tried again with the next."""
        self._changes = (changes + self._changes)[-MAX_UNSHARED:]

    def merge(self, shared: list[Shared]) -> None:
        """The breakers open on the database (and those ended lately). Another instance's
        interval holds here too, PROBE_GRACE_SECONDS longer: its opener probes, and one probe
        goes per interval, not one per instance. One its opener has closed (its probe went
        through) is closed here too."""
        now = self._clock()
        elsewhere = set()
        for key_digest, pixel_id, open_until, failures, owner in shared:
            if owner == self.instance:
                continue
            elsewhere.add(key_digest)
            state = self._states.setdefault(key_digest, _State(pixel_id, shared=True))
            if state.probing or open_until <= now:
                continue  # the opener is probing (or gone: the grace decides)
            wait = open_until + PROBE_GRACE_SECONDS if state.shared else open_until
            if state.open_until < wait:
                state.open_until = wait
                state.failures = max(state.failures, failures)
        for key_digest, state in list(self._states.items()):
            if state.shared and not state.probing and key_digest not in elsewhere:
                del self._states[key_digest]

    def open_pixels(self) -> list[tuple[str, float, int]]:
        """(pixel, seconds until a probe may go, failures) of each breaker open now; never a
        key's access token."""
        now = self._clock()
        return [
            (state.pixel_id, max(0.0, state.open_until - now), state.failures)
            for state in list(self._states.values())
            if state.open_until > now or state.probing
        ]

    def abandoned(self, key: Key) -> None:
        """A probe ended without an answer to judge by (cancelled): let another probe."""
        state = self._states.get(digest(key))
        if state is not None:
            state.probing = False
