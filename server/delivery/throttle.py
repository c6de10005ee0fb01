"""A shared breaker per (access token, pixel): when Meta throttles or fails, every sender of
those events (sync calls and the dispatcher) backs off together, so a throttled pixel gets at
most one probing request per interval however many events wait for it.

Meta throttles per app and per ad account and asks callers to slow down
(https://developers.facebook.com/docs/graph-api/overview/rate-limiting); its throttling codes
are in policy.py. A throttling answer opens the breaker at once; other transient failures
(5xx, timeouts) after THRESHOLD in a row, so one blip does not divert a pixel's calls.

Bound (README, Delivery): while a breaker is open nothing is sent for its key; when the
interval ends one request probes, and the others wait for its outcome. Intervals start at
FAILING_SECONDS (THROTTLED_SECONDS when Meta said so), double on each failed probe up to the
cap, and carry up to 25 % jitter, never below the start.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

THRESHOLD = 3
FAILING_SECONDS, FAILING_CAP = 1.0, 60.0
THROTTLED_SECONDS, THROTTLED_CAP = 5.0, 300.0
# Meta's throttling codes (Graph API rate limiting; the Marketing API's 80000-80014).
THROTTLE_CODES = frozenset({4, 17, 32, 613, *range(80000, 80015)})

Key = tuple[str, str]  # (access token, pixel id); never logged


@dataclass
class _State:
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False


class Breakers:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._clock = clock
        self._rand = rand
        self._states: dict[Key, _State] = {}

    def open_until(self, key: Key) -> float:
        """When `key` may be tried again; 0 when it may be tried now."""
        state = self._states.get(key)
        if state is None or (state.open_until <= self._clock() and not state.probing):
            return 0.0
        return max(state.open_until, self._clock() + FAILING_SECONDS / 4)

    def allow(self, key: Key) -> bool:
        """Whether a request for `key` may go now. After an open interval the first caller
        gets True (the probe) and must report its outcome; the others get False until then."""
        state = self._states.get(key)
        if state is None or state.open_until == 0.0:
            return True
        if state.probing or state.open_until > self._clock():
            return False
        state.probing = True
        return True

    def succeeded(self, key: Key) -> None:
        self._states.pop(key, None)

    def failed(self, key: Key, *, throttled: bool) -> None:
        state = self._states.setdefault(key, _State())
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

    def open_pixels(self) -> list[tuple[str, float, int]]:
        """(pixel, seconds until a probe may go, failures) of each breaker open now; never a
        key's access token."""
        now = self._clock()
        return [
            (pixel_id, max(0.0, state.open_until - now), state.failures)
            for (_, pixel_id), state in list(self._states.items())
            if state.open_until > now or state.probing
        ]

    def abandoned(self, key: Key) -> None:
        """A probe ended without an answer to judge by (cancelled): let another probe."""
        state = self._states.get(key)
        if state is not None:
            state.probing = False
